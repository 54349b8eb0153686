"""
Named users and address limits: the ``[users.NAME]`` and ``[limits]`` tables
of the ``--config`` file.

::

    [users.alice]
    secret = "ee0123...."            # or secrets = ["dd...", "ee..."]
    max_connections = 16
    max_ips = 3
    expires = 2027-03-01T00:00:00Z
    quota = "20GB"
    enabled = true
    ad_tag = "0123456789abcdef0123456789abcdef"

    [limits]
    max_connections_per_ip = 64
    allow = ["0.0.0.0/0", "::/0"]
    deny = ["203.0.113.0/24"]
    allow_file = "/etc/mtproxy/allow.txt"
    deny_file = "/etc/mtproxy/deny.txt"

A user's name is what logs and metrics show for its connections (never a
secret): letters, digits, ``_`` and ``-``. Its secrets are named ``alice``,
``alice.2``, ``alice.3`` ... in the order given.

Sizes are binary: ``K``, ``KB`` and ``KiB`` all mean 1024 bytes (``M``,
``G``, ``T`` likewise), as everywhere else in the file; a whole number is
bytes. A date-time without an offset is UTC, and a date is its midnight UTC.

Nothing here imports Twisted.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from mtproxy_tw.config import ConfigError, values
from mtproxy_tw.wire.secrets import Secret, SecretError, parse_secret

__all__ = [
    "Limits",
    "Network",
    "UserSpec",
    "format_size",
    "parse_limits",
    "parse_networks_text",
    "parse_quota",
    "parse_users",
    "user_secrets",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_USER_NAME = re.compile(r"[A-Za-z0-9_-]{1,48}")
_QUOTA = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_UTC = datetime.timezone.utc


@dataclass(frozen=True)
class UserSpec:
    """
    One user as configured.

    :ivar name: shown in logs and metrics for the user's connections.
    :ivar secrets: the user's secrets, named ``NAME``, ``NAME.2`` ...
    :ivar max_connections: TCP connections at once.
    :ivar max_ips: distinct client addresses at once.
    :ivar expires: POSIX time from which the user is refused and cut.
    :ivar quota: bytes both ways, over all time (kept in the state dir).
    :ivar ad_tag: the user's own ad tag in middle mode.
    """

    name: str
    secrets: tuple[Secret, ...]
    max_connections: int | None = None
    max_ips: int | None = None
    expires: float | None = None
    quota: int | None = None
    enabled: bool = True
    ad_tag: bytes | None = field(default=None, repr=False)

    def describe(self) -> str:
        """
        The user's limits in a few words, for the log (no secret, no tag).
        """
        parts = [f"{len(self.secrets)} secret{'s' if len(self.secrets) != 1 else ''}"]
        if not self.enabled:
            parts.append("disabled")
        if self.max_connections is not None:
            parts.append(f"at most {self.max_connections} connections")
        if self.max_ips is not None:
            parts.append(f"at most {self.max_ips} addresses")
        if self.quota is not None:
            parts.append(f"quota {format_size(self.quota)}")
        if self.expires is not None:
            when = datetime.datetime.fromtimestamp(self.expires, _UTC)
            parts.append(f"expires {when:%Y-%m-%d %H:%M:%S}Z")
        if self.ad_tag is not None:
            parts.append("own ad tag")
        return ", ".join(parts)


@dataclass(frozen=True)
class Limits:
    """
    Limits on client addresses, whatever their secret.

    :ivar allow: when not empty, only these networks may connect.
    :ivar deny: these networks may not connect (deny wins over allow).
    :ivar allow_file: more ``allow`` networks, one a line, read by
        :meth:`networks` (so again on every reload).
    :ivar deny_file: likewise for ``deny``.
    """

    max_connections_per_ip: int | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    allow_file: Path | None = None
    deny_file: Path | None = None

    def networks(self) -> tuple[tuple[Network, ...], tuple[Network, ...]]:
        """
        ``(allow, deny)``: the networks given inline and those in the files.

        :raises ValueError: a file cannot be read or a line is not a CIDR;
            the message names the file and the line.
        """
        return (
            self.allow + _read_networks(self.allow_file),
            self.deny + _read_networks(self.deny_file),
        )


def user_secrets(users: tuple[UserSpec, ...]) -> tuple[Secret, ...]:
    """
    Every user's secrets, user by user.
    """
    return tuple(secret for user in users for secret in user.secrets)


def parse_users(data: Any, where: str) -> tuple[UserSpec, ...]:
    """
    The users of the ``users`` table (``data`` is that table: a user's name
    to its table).

    :raises ConfigError: one line, ``WHERE: users.NAME.KEY: why``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: users: must be a table of [users.NAME] tables")
    result: list[UserSpec] = []
    owners: dict[bytes, str] = {}
    for name, table in data.items():
        path = f"users.{name}"
        if not _USER_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: {path}: a user's name may hold letters, digits, _ and - only "
                "(at most 48)"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {path}: must be a table")
        user = _user(name, table, f"{where}: {path}")
        for secret in user.secrets:
            other = owners.setdefault(secret.key, name)
            if other != name:
                raise ConfigError(
                    f"{where}: {path}: a secret has the same key as one of users.{other}"
                )
        result.append(user)
    return tuple(result)


def parse_limits(data: Any, where: str) -> Limits:
    """
    The ``limits`` table.

    :raises ConfigError: one line, ``WHERE: limits.KEY: why``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: limits: must be a table")
    found: dict[str, Any] = {}
    for key, value in data.items():
        check = _LIMIT_KEYS.get(key)
        if check is None:
            raise ConfigError(
                f"{where}: limits.{key}: not a key of [limits] ({', '.join(_LIMIT_KEYS)})"
            )
        try:
            found[key] = check(value)
        except ValueError as e:
            raise ConfigError(f"{where}: limits.{key}: {e}") from None
    return Limits(**found)


def parse_quota(value: Any) -> int:
    """
    ``20GB``, ``1.5 TiB``, ``500M`` (binary multiples) or a whole number of
    bytes, to bytes; at least one.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('must be a size such as "20GB" or a whole number of bytes')
    if isinstance(value, int):
        result = value
    else:
        match = _QUOTA.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a size (e.g. 20GB, 512MiB)")
        digits, unit = match.groups()
        result = int(Decimal(digits) * (1 << _SHIFT[(unit or "").upper()]))
    if result < 1:
        raise ValueError("must be at least 1 byte (enabled = false refuses a user)")
    return result


def format_size(n: int) -> str:
    """
    ``n`` bytes the way :func:`parse_quota` reads them back (roughly).
    """
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def parse_networks_text(text: str, where: str) -> tuple[Network, ...]:
    """
    One CIDR a line (a bare address is one host), ``#`` comments.

    :raises ValueError: ``WHERE: line N: why``.
    """
    result = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            result.append(_network(line))
        except ValueError as e:
            raise ValueError(f"{where}: line {number}: {e}") from None
    return tuple(result)


# -- the parts


def _user(name: str, table: dict[str, Any], where: str) -> UserSpec:
    unknown = sorted(set(table) - set(_USER_KEYS) - {"secret", "secrets"})
    if unknown:
        keys = ", ".join(["secret", "secrets", *_USER_KEYS])
        raise ConfigError(f"{where}.{unknown[0]}: not a key of a user ({keys})")
    if "secret" in table and "secrets" in table:
        raise ConfigError(f"{where}: give secret or secrets, not both")
    key = "secret" if "secret" in table else "secrets"
    given = table.get(key)
    if given is None:
        raise ConfigError(f'{where}: a user needs a secret (secret = "...")')
    items = [given] if isinstance(given, str) else given
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}.{key}: must be a string or a non-empty array of strings")
    secrets = []
    for number, item in enumerate(items, 1):
        secret_name = name if number == 1 else f"{name}.{number}"
        try:
            # The user's name goes first, so that a value holding "=" is
            # never taken for NAME=SECRET.
            secrets.append(parse_secret(f"{secret_name}={item.strip()}", secret_name))
        except SecretError as e:
            at = f"{key}[{number - 1}]" if isinstance(given, list) else key
            raise ConfigError(f"{where}.{at}: {e}") from None
    found: dict[str, Any] = {}
    for option, check in _USER_KEYS.items():
        if option in table:
            try:
                found[option] = check(table[option])
            except ValueError as e:
                raise ConfigError(f"{where}.{option}: {e}") from None
    return UserSpec(name=name, secrets=tuple(secrets), **found)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return values.whole(1)(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _ad_tag(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("must be a string of 32 hex digits")
    return values.ad_tag(value)


def _expires(value: Any) -> float:
    moment: Any = value
    if isinstance(value, str):
        text = value.strip()
        text = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            moment = None
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_UTC)
        return float(moment.timestamp())
    if isinstance(moment, datetime.date):
        return datetime.datetime(moment.year, moment.month, moment.day, tzinfo=_UTC).timestamp()
    raise ValueError("must be a TOML date or date-time (e.g. 2027-03-01T00:00:00Z)")


def _network(value: str) -> Network:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR (e.g. 10.0.0.0/8)") from None


def _network_list(value: Any) -> tuple[Network, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be an array of strings (CIDRs)")
    return tuple(_network(i) for i in items)


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file name")
    return Path(value)


def _read_networks(path: Path | None) -> tuple[Network, ...]:
    if path is None:
        return ()
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return parse_networks_text(text, str(path))


_USER_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_connections": _count,
    "max_ips": _count,
    "expires": _expires,
    "quota": parse_quota,
    "enabled": _flag,
    "ad_tag": _ad_tag,
}

_LIMIT_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_connections_per_ip": _count,
    "allow": _network_list,
    "deny": _network_list,
    "allow_file": _path,
    "deny_file": _path,
}
