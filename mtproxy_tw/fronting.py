"""
Domain fronting: handing a connection that failed its handshake to a real
web site, so a probe sees that site (PROTOCOL.md section 5).

Every byte already read is sent first, then both directions are relayed
with flow control until either side closes; half-closes pass through like a
plain TCP relay.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import IAddress

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
