"""
Checks for option values, shared by the command line and the config file.

Each takes the value as given (a string from the command line, or a TOML
value of an accepted type) and returns it typed, or raises
:class:`ValueError` saying why in a few words (without the option's name:
the caller adds ``--name:`` or ``FILE: key:``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from mtproxy_tw.links import split_public_host
from mtproxy_tw.wire.chain import BackProxy, parse_back_proxy
from mtproxy_tw.wire.dcs import Address, parse_address, parse_dc_override
from mtproxy_tw.wire.secrets import Mode, Secret, SecretError, parse_secret
from mtproxy_tw.wire.socks5 import UpstreamProxy, parse_url

__all__ = [
    "ad_tag",
    "auto_or",
    "dc_overrides",
    "domains",
    "host_port",
    "listen",
    "modes",
    "nat_ips",
    "networks",
    "number",
    "port",
    "public_host",
    "secrets",
    "shared_state",
    "size",
    "size_at_least",
    "text",
    "upstream",
    "upstream_proxies",
    "url",
    "whole",
    "workers",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEX32 = re.compile(r"[0-9A-Fa-f]{32}")
_SIZE = re.compile(r"([0-9]+)([KMG]?)(?:i?B)?", re.IGNORECASE)
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def text(value: Any) -> str:
    return str(value)


def number(low: float, *, above: bool = False) -> Callable[[Any], float]:
    """
    A number of at least ``low`` (greater than it with ``above``).
    """

    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if above and not result > low:
            raise ValueError(f"must be greater than {low:g}")
        if not result >= low:
            raise ValueError(f"must be at least {low:g}")
        return result

    return check


def whole(low: int = 1, high: int | None = None) -> Callable[[Any], int]:
    """
    A whole number from ``low`` to ``high``.
    """

    def check(value: Any) -> int:
        if isinstance(value, bool | float):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            result = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a whole number") from None
        if result < low:
            raise ValueError(f"must be at least {low}")
        if high is not None and result > high:
            raise ValueError(f"must be at most {high}")
        return result

    return check


def auto_or(check: Callable[[Any], int]) -> Callable[[Any], int | None]:
    """
    ``auto`` (``None``: the proxy works it out), or what ``check`` accepts.
    """

    def parse(value: Any) -> int | None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        try:
            return check(value)
        except ValueError as e:
            raise ValueError(f"{e} (or auto)") from None

    return parse


def size(value: Any) -> int:
    """
    ``1048576``, ``512K``, ``8M``, ``1G`` (binary multiples) to bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size (e.g. 8M)")
    digits, unit = match.groups()
    return int(digits) << {"": 0, "K": 10, "M": 20, "G": 30}[unit.upper()]


def size_at_least(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        result = size(value)
        if result < low:
            raise ValueError(f"must be at least {low >> 10}K")
        return result

    return check


def url(value: Any) -> str:
    result = str(value)
    try:
        parts = urlsplit(result)
    except ValueError:
        raise ValueError(f"{result!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("use an http:// or https:// URL")
    return result


def modes(value: Any) -> frozenset[Mode]:
    names = value if isinstance(value, list) else str(value).split(",")
    try:
        result = frozenset(Mode(str(m).strip()) for m in names if str(m).strip())
    except ValueError:
        raise ValueError("use classic, secure and tls, comma separated") from None
    if not result:
        raise ValueError("at least one mode is needed")
    return result


def host_port(value: Any) -> Address:
    return parse_address(str(value), default_port=443)


def public_host(value: Any) -> str:
    """
    ``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or an IPv6 address, as given.
    """
    text = str(value).strip()
    split_public_host(text)
    return text


def ad_tag(value: Any) -> bytes:
    tag = str(value).strip()
    if not _HEX32.fullmatch(tag):
        raise ValueError("must be 32 hex digits (from @MTProxybot)")
    return bytes.fromhex(tag)


def upstream(value: Any) -> str | BackProxy:
    """
    ``middle``, ``direct``, or ``mtproxy://HOST:PORT?secret=SECRET`` (a back proxy).
    """
    if value in ("middle", "direct"):
        return str(value)
    if not isinstance(value, str) or not value.startswith("mtproxy:"):
        raise ValueError("use middle, direct or mtproxy://HOST:PORT?secret=SECRET")
    return parse_back_proxy(value)


def port(value: Any) -> int:
    result = whole(0)(value)
    if result >= 65536:
        raise ValueError(f"{result} is out of range")
    return result


# -- repeatable options: each takes the whole list


def secrets(items: Sequence[Any]) -> list[Secret]:
    result: list[Secret] = []
    for item in items:
        try:
            secret = parse_secret(str(item), f"secret{len(result) + 1}")
        except SecretError as e:
            raise ValueError(str(e)) from None
        if any(s.name == secret.name for s in result):
            raise ValueError(f"the name {secret.name!r} is used twice")
        result.append(secret)
    return result


def dc_overrides(items: Sequence[Any]) -> dict[int, Address]:
    result: dict[int, Address] = {}
    for item in items:
        dc, address = parse_dc_override(str(item))
        result[dc] = address
    return result


def domains(items: Sequence[Any]) -> list[str]:
    result = []
    for item in items:
        domain = str(item)
        if not _HOST.fullmatch(domain) or ".." in domain:
            raise ValueError(f"{domain!r} is not a host name")
        result.append(domain.lower())
    return result


def listen(items: Sequence[Any]) -> list[str]:
    return [str(item) for item in items]


def upstream_proxies(items: Sequence[Any]) -> tuple[UpstreamProxy, ...]:
    """
    ``socks5://[USER:PASS@]HOST:PORT`` URLs; a refusal never repeats the credentials.
    """
    result = []
    for item in items:
        try:
            result.append(parse_url(str(item).strip()))
        except ValueError as e:
            raise ValueError(f"not a SOCKS5 proxy URL: {e}") from None
    return tuple(result)


def nat_ips(items: Sequence[Any]) -> list[IPAddress]:
    result: list[IPAddress] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Address | ipaddress.IPv6Address):
            ip = item
        else:
            try:
                ip = ipaddress.ip_address(str(item).strip().strip("[]"))
            except ValueError:
                raise ValueError(f"{item!r} is not an IPv4 or IPv6 address") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{ip} cannot be a host's address")
        if any(a.version == ip.version for a in result):
            raise ValueError(f"more than one IPv{ip.version} address")
        result.append(ip)
    return result


#: Who may scrape the metrics when ``metrics_allow`` is not given.
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def networks(items: Sequence[Any]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """
    CIDRs (a bare address is one host); none given: loopback only.
    """
    result = []
    for item in items:
        try:
            result.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR (e.g. 10.0.0.0/8)") from None
    return tuple(result) or LOOPBACK_NETWORKS


class RedisURL(NamedTuple):
    """
    Where a fleet's shared state lives (``--shared-state``).
    """

    host: str
    port: int
    db: int
    password: str | None

    def __str__(self) -> str:
        # Never the password: this is what logs and errors show.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def __repr__(self) -> str:
        # A tuple's repr would show the password.
        return f"RedisURL({str(self)!r})"


def shared_state(value: Any) -> RedisURL:
    """
    ``redis://[:PASSWORD@]HOST[:PORT][/DB]``, the password percent-encoded
    where it holds ``@``, ``/``, ``:`` or ``%``; a refusal never repeats
    the password.
    """
    text = str(value).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("not a redis://HOST:PORT/DB URL") from None
    if parts.scheme != "redis":
        raise ValueError("use a redis://HOST:PORT/DB URL")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the database is a number (redis://HOST:PORT/0)")
    if parts.query or parts.fragment:
        raise ValueError("the URL takes no query")
    if parts.username:
        # AUTH with a user name (Redis ACLs) is not spoken: never drop it silently.
        raise ValueError("a Redis user name is not supported: redis://:PASSWORD@HOST:PORT/DB")
    password = unquote(parts.password) if parts.password else None
    return RedisURL(parts.hostname, port or 6379, int(path or 0), password)


def usable_cores() -> int:
    """
    The cores this process may run on.
    """
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers(value: Any) -> int:
    """
    A number of worker processes, or ``auto``: one per usable core.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return usable_cores()
    try:
        return whole(1, 1024)(value)
    except ValueError as e:
        raise ValueError(f"{e} (or auto)") from None
