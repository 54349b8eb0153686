"""
Where Telegram's data centres are, for direct mode (PROTOCOL.md section 7).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["DEFAULT_DC", "Address", "DCTable", "parse_address", "parse_dc_override"]

#: Where a DC id with no address goes (PROTOCOL.md section 13, item 9).
DEFAULT_DC = 2

_V4 = {
    1: "149.154.175.50",
    2: "149.154.167.51",
    3: "149.154.175.100",
    4: "149.154.167.91",
    5: "149.154.171.5",
    203: "91.105.192.100",
}
_V6 = {
    1: "2001:b28:f23d:f001::a",
    2: "2001:67c:4e8:f002::a",
    3: "2001:b28:f23d:f003::a",
    4: "2001:67c:4e8:f004::a",
    5: "2001:b28:f23f:f005::a",
    203: "2a0a:f280:203:a:5000::100",
}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def parse_address(text: str, default_port: int | None = None) -> Address:
    """
    Parse ``HOST:PORT``, ``[IPv6]:PORT``, or with ``default_port`` just a host.

    :raises ValueError: naming what is wrong.
    """
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"{text!r} is not HOST:PORT (write IPv6 as [::1]:443)")
    v6, v6port, host, port = match.groups()
    if v6 is not None:
        ipaddress.IPv6Address(v6)
        host, port = v6, v6port
    elif not _HOSTNAME.match(host):
        raise ValueError(f"{host!r} is not a host name or address")
    if port is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port")
        return Address(host, default_port)
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range")
    return Address(host, number)


def parse_dc_override(text: str) -> tuple[int, Address]:
    """
    Parse ``ID=HOST:PORT`` as given to ``--dc``; ``ID`` may be negative.
    """
    ident, sep, rest = text.partition("=")
    try:
        dc = int(ident)
    except ValueError:
        raise ValueError(f"{ident!r} is not a DC id") from None
    if not sep or not -32768 <= dc <= 32767 or dc == 0:
        raise ValueError("expected ID=HOST:PORT with a non-zero 16-bit ID")
    return dc, parse_address(rest)


@dataclass
class DCTable:
    """
    The built-in production table, plus the operator's overrides.

    An override names exactly one id: a media DC (negative id) needs its own
    entry, otherwise it shares the address of its positive twin.
    """

    overrides: Mapping[int, Address] = field(default_factory=dict)
    prefer_ipv6: bool = False

    def lookup(self, dc: int) -> tuple[Address, bool]:
        """
        The address for a client's DC id, and whether the id was known.

        Unknown ids go to :data:`DEFAULT_DC` (``False`` is returned then).
        """
        if dc in self.overrides:
            return self.overrides[dc], True
        table = _V6 if self.prefer_ipv6 else _V4
        known = abs(dc) in table
        number = abs(dc) if known else DEFAULT_DC
        if not known and DEFAULT_DC in self.overrides:
            return self.overrides[DEFAULT_DC], False
        return Address(table[number], 443), known
