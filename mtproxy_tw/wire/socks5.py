"""
The client side of a SOCKS5 CONNECT (RFC 1928), with username/password
authentication (RFC 1929), as a sans-IO machine.

:class:`Socks5Client` is fed the server's bytes and answers what to send;
it never raises anything but :class:`Socks5Error`, whatever it is fed, and
keeps at most one reply (262 bytes) buffered.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "REPLIES",
    "Bound",
    "Socks5Client",
    "Socks5Error",
    "Socks5Refused",
    "UpstreamProxy",
    "parse_url",
]

#: RFC 1928 section 6: the REP field.
REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

_NO_AUTH, _USER_PASS, _NONE_ACCEPTABLE = 0x00, 0x02, 0xFF
_IPV4, _DOMAIN, _IPV6 = 0x01, 0x03, 0x04
_port = struct.Struct(">H")


class Socks5Error(Exception):
    """
    The SOCKS server refused, or answered something that is not SOCKS5.
    """


class Socks5Refused(Socks5Error):
    """
    The server works but could not connect (the REP field, :data:`REPLIES`).
    """

    def __init__(self, code: int) -> None:
        super().__init__(REPLIES.get(code, f"unknown reply code {code:#04x}"))
        self.code = code


@dataclass(frozen=True)
class UpstreamProxy:
    """
    A SOCKS5 server to reach Telegram through; the credentials never print.
    """

    host: str
    port: int
    username: bytes | None = None
    password: bytes | None = None

    def __repr__(self) -> str:
        return f"UpstreamProxy({self.label})"

    @property
    def label(self) -> str:
        """
        ``HOST:PORT`` (``[IPv6]:PORT``), for logs.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(text: str) -> UpstreamProxy:
    """
    ``socks5://[user:pass@]HOST:PORT`` (``%`` escapes in user and pass).

    :raises ValueError: with the reason, never echoing the credentials.
    """
    from urllib.parse import unquote_to_bytes, urlsplit

    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("socks5", "socks5h"):
        raise ValueError("expected socks5://[USER:PASS@]HOST:PORT")
    userinfo, at, hostport = rest.rpartition("@")
    if "/" in hostport.rstrip("/") or "?" in hostport or "#" in hostport:
        raise ValueError("expected socks5://[USER:PASS@]HOST:PORT, nothing after the port")
    try:
        parts = urlsplit("//" + hostport.rstrip("/"))
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if not host or port is None or not 1 <= port <= 65535:
        raise ValueError("expected socks5://[USER:PASS@]HOST:PORT with a port from 1 to 65535")
    if not at:
        return UpstreamProxy(host, port)
    user, colon, password = userinfo.partition(":")
    username, secret = unquote_to_bytes(user), unquote_to_bytes(password)
    if not colon or not username or not 1 <= len(secret) <= 255 or len(username) > 255:
        raise ValueError("the username and password must be 1 to 255 bytes each (USER:PASS@)")
    return UpstreamProxy(host, port, username, secret)


@dataclass(frozen=True)
class Bound:
    """
    The server's reply: the address it connected from (BND.ADDR, BND.PORT;
    a host name, or an IP as text) and the bytes that followed the reply.
    """

    host: str
    port: int
    rest: bytes


def _address(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if not 1 <= len(name) <= 255:
            raise Socks5Error(f"host name of {len(name)} bytes") from None
        return bytes((_DOMAIN, len(name))) + name
    return bytes((_IPV4 if ip.version == 4 else _IPV6,)) + ip.packed


class Socks5Client:
    """
    One CONNECT to ``host:port`` through a SOCKS5 server.

    :meth:`start` gives the greeting; each :meth:`receive` gives the bytes
    to send next, and :attr:`bound` is set once the server has connected.
    """

    def __init__(self, host: str, port: int, proxy: UpstreamProxy | None = None) -> None:
        if not 0 <= port <= 65535:
            raise Socks5Error(f"port {port}")
        self._request = b"\x05\x01\x00" + _address(host) + _port.pack(port)
        self._username = proxy.username if proxy is not None else None
        self._password = (proxy.password if proxy is not None else None) or b""
        self._buffer = b""
        self._stage = "new"
        self.bound: Bound | None = None

    @property
    def stage(self) -> str:
        """
        ``new``, ``method``, ``auth``, ``reply`` (waiting for that answer), ``done``.
        """
        return self._stage

    def start(self) -> bytes:
        if self._stage != "new":
            raise Socks5Error("already started")
        self._stage = "method"
        # With credentials only username/password is offered: a server that
        # would let anyone in is not the one configured.
        if self._username is not None:
            return b"\x05\x01\x02"
        return b"\x05\x01\x00"

    def receive(self, data: bytes) -> bytes:
        """
        Take the server's bytes; return what to send (possibly nothing).

        :raises Socks5Error: the server refused or spoke garbage.
        """
        if self._stage in ("new", "done"):
            raise Socks5Error(f"unexpected data in stage {self._stage}")
        self._buffer += data
        out = []
        while self._stage != "done":
            step = getattr(self, "_" + self._stage)(self._buffer)
            if step is None:
                if len(self._buffer) > 262:
                    raise Socks5Error("reply too long")
                break
            used, send = step
            self._buffer = self._buffer[used:]
            out.append(send)
        return b"".join(out)

    def _method(self, buf: bytes) -> tuple[int, bytes] | None:
        if len(buf) < 2:
            return None
        if buf[0] != 5:
            raise Socks5Error(f"not a SOCKS5 server (version byte {buf[0]:#04x})")
        method = buf[1]
        if method == _NONE_ACCEPTABLE:
            needs = "username/password" if self._username is not None else "no authentication"
            raise Socks5Error(f"the server accepts no offered method ({needs})")
        if self._username is not None and method == _USER_PASS:
            self._stage = "auth"
            user, password = self._username, self._password
            return 2, bytes((1, len(user))) + user + bytes((len(password),)) + password
        if self._username is None and method == _NO_AUTH:
            self._stage = "reply"
            return 2, self._request
        raise Socks5Error(f"the server chose a method not offered ({method:#04x})")

    def _auth(self, buf: bytes) -> tuple[int, bytes] | None:
        if len(buf) < 2:
            return None
        if buf[0] != 1:
            raise Socks5Error(f"bad authentication reply (version byte {buf[0]:#04x})")
        if buf[1] != 0:
            raise Socks5Error("the server refused the username and password")
        self._stage = "reply"
        return 2, self._request

    def _reply(self, buf: bytes) -> tuple[int, bytes] | None:
        if len(buf) < 5:
            return None
        if buf[0] != 5:
            raise Socks5Error(f"bad reply (version byte {buf[0]:#04x})")
        if buf[1] != 0:
            raise Socks5Refused(buf[1])
        if buf[2] != 0:
            raise Socks5Error(f"bad reply (reserved byte {buf[2]:#04x})")
        kind = buf[3]
        if kind == _IPV4:
            size, start = 4, 4
        elif kind == _IPV6:
            size, start = 16, 4
        elif kind == _DOMAIN:
            size, start = buf[4], 5
        else:
            raise Socks5Error(f"bad reply (address type {kind:#04x})")
        end = start + size + 2
        if len(buf) < end:
            return None
        raw = buf[start : start + size]
        if kind == _DOMAIN:
            host = raw.decode("ascii", "replace")
        else:
            host = str(ipaddress.ip_address(raw))
        (port,) = _port.unpack(buf[end - 2 : end])
        self._stage = "done"
        self.bound = Bound(host, port, buf[end:])
        return end, b""
