"""
Telegram's middle-proxy list (getProxyConfig, getProxyConfigV6) and proxy secret.

Pure parsing (PROTOCOL.md sections 8.2 and 8.3); fetching and refreshing
happen elsewhere. The fallback tables are used until the first fetch succeeds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

__all__ = [
    "DEFAULT_DC",
    "FALLBACK_CONFIG_V4",
    "FALLBACK_CONFIG_V6",
    "PROXY_SECRET_SIZE",
    "ConfigError",
    "Endpoint",
    "ProxyConfig",
    "format_proxy_config",
    "parse_proxy_config",
    "validate_proxy_config",
    "validate_proxy_secret",
]

#: The cluster used for unknown ids when the config has no ``default`` line.
DEFAULT_DC = 2
#: ``(host, port)``; an IPv6 host is stored without brackets.
Endpoint: TypeAlias = tuple[str, int]

_DC_RANGE = (-32768, 32767)
_MIN_CONNECTIONS_RANGE = (1, 1000)
_MAX_CONNECTIONS_RANGE = (1, 1000)
_TIMEOUT_RANGE = (10, 30000)
#: The length of Telegram's proxy secret, the getProxySecret body (section 8.3).
PROXY_SECRET_SIZE = 128
#: Bytes of ASCII text: printable characters, tab, newline, carriage return.
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}

_TOKEN = re.compile(r"#[^\n]*|;|[^\s;#]+")
_INT = re.compile(r"-?[0-9]{1,10}")
_PORT = re.compile(r"[0-9]{1,5}")
_BRACKETED = re.compile(r"\[([^\]]*)\]:(.*)")
_DOTTED = re.compile(r"[0-9.]+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class ConfigError(Exception):
    """
    A proxy config or secret that cannot be used.
    """


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """
    Middle proxies per DC id, plus the optional tuning lines of [C].
    """

    clusters: Mapping[int, tuple[Endpoint, ...]]
    default_dc: int = DEFAULT_DC
    min_connections: int | None = None
    max_connections: int | None = None
    timeout_ms: int | None = None

    def __post_init__(self) -> None:
        frozen = MappingProxyType({dc: tuple(eps) for dc, eps in self.clusters.items()})
        object.__setattr__(self, "clusters", frozen)

    def lookup(self, dc: int) -> tuple[Endpoint, ...]:
        """
        Middle proxies for a DC id; dc 0 and ids without lines use the default cluster.
        """
        if dc != 0 and dc in self.clusters:
            return self.clusters[dc]
        return self.clusters.get(self.default_dc, ())


def _int(token: str, bounds: tuple[int, int], what: str) -> int:
    if not _INT.fullmatch(token) or not bounds[0] <= int(token) <= bounds[1]:
        raise ValueError(f"bad {what} {token!r}")
    return int(token)


def _host(host: str) -> str:
    if ":" in host:
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
        if ip.scope_id is not None:
            raise ValueError(f"bad IPv6 address {host!r}")
        return str(ip)
    if _DOTTED.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"bad IPv4 address {host!r}") from None
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"bad host {host!r}")
    return host


def _endpoint(token: str) -> Endpoint:
    bracketed = _BRACKETED.fullmatch(token)
    if bracketed:
        host, port = bracketed.groups()
        if ":" not in host:
            raise ValueError(f"bad IPv6 address {host!r}")
    else:
        host, colon, port = token.rpartition(":")
        if not colon or not host:
            raise ValueError(f"expected host:port, got {token!r}")
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 0xFFFF:
        raise ValueError(f"bad port {port!r}")
    return _host(host), int(port)


def _statements(text: str) -> list[tuple[int, list[str]]]:
    """
    Split into ``;``-terminated statements, each with the line it starts on.
    """
    statements: list[tuple[int, list[str]]] = []
    tokens: list[str] = []
    line, start_line, last = 1, 1, 0
    for match in _TOKEN.finditer(text):
        line += text.count("\n", last, match.start())
        last = match.start()
        token = match.group()
        if token.startswith("#"):
            continue
        if token == ";":
            if tokens:
                statements.append((start_line, tokens))
            tokens = []
            continue
        if not tokens:
            start_line = line
        tokens.append(token)
    if tokens:
        raise ConfigError(f"line {start_line}: missing ';'")
    return statements


def parse_proxy_config(text: str | bytes) -> ProxyConfig:
    """
    Parse getProxyConfig / getProxyConfigV6; raises ConfigError naming the bad line.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("config is not UTF-8 text") from None
    clusters: dict[int, list[Endpoint]] = {}
    options: dict[str, int] = {}
    bounds = {
        "default": _DC_RANGE,
        "min_connections": _MIN_CONNECTIONS_RANGE,
        "max_connections": _MAX_CONNECTIONS_RANGE,
        "timeout": _TIMEOUT_RANGE,
    }
    for line, (name, *args) in _statements(text):
        try:
            if name == "proxy_for" and len(args) == 2:
                dc = _int(args[0], _DC_RANGE, "dc id")
                clusters.setdefault(dc, []).append(_endpoint(args[1]))
            elif name in bounds and len(args) == 1:
                if name in options:
                    raise ValueError(f"duplicate {name}")
                options[name] = _int(args[0], bounds[name], name)
            elif name in bounds or name == "proxy_for":
                raise ValueError(f"wrong number of arguments to {name}")
            else:
                raise ValueError(f"unknown directive {name[:40]!r}")
        except ValueError as e:
            raise ConfigError(f"line {line}: {e}") from None
    if not clusters:
        raise ConfigError("no proxy_for lines")
    default = options.get("default", DEFAULT_DC)
    if "default" in options and default not in clusters:
        raise ConfigError(f"default cluster {default} has no proxy_for lines")
    low, high = options.get("min_connections"), options.get("max_connections")
    if low is not None and high is not None and low > high:
        raise ConfigError("min_connections is above max_connections")
    return ProxyConfig(
        {dc: tuple(endpoints) for dc, endpoints in clusters.items()},
        default,
        low,
        high,
        options.get("timeout"),
    )


def format_proxy_config(config: ProxyConfig) -> str:
    """
    Render a config in the getProxyConfig syntax (IPv6 hosts bracketed).
    """
    lines = [f"default {config.default_dc};"]
    for name, value in (
        ("min_connections", config.min_connections),
        ("max_connections", config.max_connections),
        ("timeout", config.timeout_ms),
    ):
        if value is not None:
            lines.append(f"{name} {value};")
    for dc, endpoints in config.clusters.items():
        for host, port in endpoints:
            shown = f"[{host}]" if ":" in host else host
            lines.append(f"proxy_for {dc} {shown}:{port};")
    return "\n".join(lines) + "\n"


def validate_proxy_config(text: str | bytes) -> ProxyConfig:
    """
    Parse a downloaded or cached config that is to replace the one in use.

    Besides parsing, it must list middle proxies for its default DC (the
    ``default`` line, else :data:`DEFAULT_DC`): clients of unknown DCs go there.
    """
    config = parse_proxy_config(text)
    if not config.clusters.get(config.default_dc):
        raise ConfigError(f"no proxy_for line for the default DC {config.default_dc}")
    return config


def _looks_like_text(data: bytes) -> bool:
    """
    Whether ``data`` reads as text (an error page) rather than key material.

    Random bytes are about 38 % ASCII text and almost never valid UTF-8.
    """
    if sum(byte in _TEXT_BYTES for byte in data) * 10 >= len(data) * 9:
        return True
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\t\n\r" for char in text)


def validate_proxy_secret(data: bytes) -> bytes:
    """
    Check a getProxySecret body and return it.

    Telegram's proxy secret is :data:`PROXY_SECRET_SIZE` bytes of key
    material: any other length, or text (an HTML error page answered with
    200 OK), is refused. The message never shows the bytes.
    """
    if len(data) != PROXY_SECRET_SIZE:
        raise ConfigError(f"proxy secret must be {PROXY_SECRET_SIZE} bytes, got {len(data)}")
    if _looks_like_text(data):
        raise ConfigError("proxy secret is text (an error page?), not key material")
    return data


def _fallback(table: dict[int, Endpoint]) -> ProxyConfig:
    return ProxyConfig({dc: (endpoint,) for dc, endpoint in table.items()})


#: Built-in IPv4 middle proxies (a snapshot, replaced by the first fetched config).
FALLBACK_CONFIG_V4 = _fallback(
    {
        1: ("149.154.175.50", 8888),
        -1: ("149.154.175.50", 8888),
        2: ("149.154.161.144", 8888),
        -2: ("149.154.161.144", 8888),
        3: ("149.154.175.100", 8888),
        -3: ("149.154.175.100", 8888),
        4: ("91.108.4.136", 8888),
        -4: ("149.154.165.109", 8888),
        5: ("91.108.56.183", 8888),
        -5: ("91.108.56.183", 8888),
    }
)
#: Built-in IPv6 middle proxies.
FALLBACK_CONFIG_V6 = _fallback(
    {
        1: ("2001:b28:f23d:f001::d", 8888),
        -1: ("2001:b28:f23d:f001::d", 8888),
        2: ("2001:67c:4e8:f002::d", 80),
        -2: ("2001:67c:4e8:f002::d", 80),
        3: ("2001:b28:f23d:f003::d", 8888),
        -3: ("2001:b28:f23d:f003::d", 8888),
        4: ("2001:67c:4e8:f004::d", 8888),
        -4: ("2001:67c:4e8:f004::d", 8888),
        5: ("2001:b28:f23f:f005::d", 8888),
        -5: ("2001:b28:f23f:f005::d", 8888),
    }
)
