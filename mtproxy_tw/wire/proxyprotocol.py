"""
The PROXY protocol v1 line sent ahead of a fronted connection, so the mask
host sees the client's address (PROTOCOL.md section 5).
"""

from __future__ import annotations

import ipaddress
from typing import Any

#: An address object such as Twisted's ``IPv4Address`` (``host``, ``port``).
IAddress = Any

__all__ = ["proxy_protocol_header"]


def proxy_protocol_header(source: IAddress, destination: IAddress) -> bytes:
    """
    A PROXY protocol v1 line naming the client for the mask host.
    """
    src_host = getattr(source, "host", None)
    dst_host = getattr(destination, "host", None)
    if src_host is None or dst_host is None:
        return b"PROXY UNKNOWN\r\n"
    try:
        family = "TCP6" if ipaddress.ip_address(src_host).version == 6 else "TCP4"
    except ValueError:
        return b"PROXY UNKNOWN\r\n"
    line = f"PROXY {family} {src_host} {dst_host} {source.port} {destination.port}\r\n"  # type: ignore[attr-defined]
    return line.encode("ascii")
