"""
The data-phase messages of both ends: RPC_PROXY_REQ, RPC_PROXY_ANS,
RPC_SIMPLE_ACK, RPC_CLOSE_EXT, RPC_CLOSE_CONN, RPC_PING and RPC_PONG.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from mtproxy_tw.wire.rpc.base import (
    FLAG_ABRIDGED,
    FLAG_EXTMODE2,
    FLAG_HAS_AD_TAG,
    FLAG_INTERMEDIATE,
    FLAG_MAGIC,
    FLAG_NOT_ENCRYPTED,
    FLAG_PAD,
    FLAG_QUICKACK,
    FLAGS_EXTRA,
    RPC_CLOSE_CONN,
    RPC_CLOSE_EXT,
    RPC_PING,
    RPC_PONG,
    RPC_PROXY_ANS,
    RPC_PROXY_REQ,
    RPC_SIMPLE_ACK,
    TL_PROXY_TAG,
    Address,
    IPAddress,
    RPCError,
    check_port,
    check_u64,
    expect,
    normal_ip,
    type_of,
)

__all__ = [
    "CloseConn",
    "CloseExt",
    "Message",
    "Ping",
    "Pong",
    "ProxyAns",
    "ProxyReq",
    "SimpleAck",
    "UnknownMessage",
    "build_close_conn",
    "build_close_ext",
    "build_ping",
    "build_pong",
    "build_proxy_ans",
    "build_proxy_req",
    "build_simple_ack",
    "parse_message",
    "parse_proxy_req",
    "proxy_req_flags",
]

_TAG_ABRIDGED = b"\xef" * 4
_TAG_INTERMEDIATE = b"\xee" * 4
_TAG_PADDED = b"\xdd" * 4

_u32 = struct.Struct("<I")
_proxy_req = struct.Struct("<IIQ16sI16sI")
_proxy_ans = struct.Struct("<IIQ")
_conn_msg = struct.Struct("<IQ")  # CLOSE_EXT, CLOSE_CONN, PING, PONG
_simple_ack = struct.Struct("<IQ4s")


@dataclass(frozen=True, slots=True)
class ProxyReq:
    flags: int
    conn_id: int
    client_addr: tuple[IPAddress, int]
    proxy_addr: tuple[IPAddress, int]
    ad_tag: bytes | None
    data: bytes


@dataclass(frozen=True, slots=True)
class ProxyAns:
    flags: int
    conn_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SimpleAck:
    conn_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class CloseExt:
    conn_id: int


@dataclass(frozen=True, slots=True)
class CloseConn:
    conn_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: int


@dataclass(frozen=True, slots=True)
class Pong:
    ping_id: int


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    msg_type: int
    payload: bytes


Message: TypeAlias = (
    ProxyReq | ProxyAns | SimpleAck | CloseExt | CloseConn | Ping | Pong | UnknownMessage
)


def proxy_req_flags(
    tag: bytes,
    *,
    has_ad_tag: bool,
    not_encrypted: bool = False,
    quickack: bool = False,
    pad_flag: bool = False,
) -> int:
    """
    RPC_PROXY_REQ flags for a client using the transport with this protocol tag.

    ``pad_flag`` adds FLAG_PAD for padded-intermediate clients ([PY], [ERL],
    [RS]); it is off by default, as in [C].
    """
    flags = FLAG_MAGIC | FLAG_EXTMODE2
    if tag == _TAG_ABRIDGED:
        flags |= FLAG_ABRIDGED
    elif tag == _TAG_INTERMEDIATE:
        flags |= FLAG_INTERMEDIATE
    elif tag == _TAG_PADDED:
        flags |= FLAG_INTERMEDIATE | (FLAG_PAD if pad_flag else 0)
    else:
        raise ValueError(f"unknown protocol tag {tag.hex()}")
    if has_ad_tag:
        flags |= FLAG_HAS_AD_TAG
    if not_encrypted:
        flags |= FLAG_NOT_ENCRYPTED
    if quickack:
        flags |= FLAG_QUICKACK
    return flags


def _encode_addr(addr: Address) -> tuple[bytes, int]:
    ip = normal_ip(addr[0])
    check_port(addr[1])
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed, addr[1]
    return ip.packed, addr[1]


def _decode_addr(raw: bytes, port: int) -> tuple[IPAddress, int]:
    if port > 0xFFFF:
        raise RPCError(f"bad port {port}")
    return normal_ip(ipaddress.IPv6Address(raw)), port


def _tl_string(data: bytes) -> bytes:
    head = bytes([len(data)]) if len(data) < 254 else b"\xfe" + len(data).to_bytes(3, "little")
    body = head + data
    return body + bytes(-len(body) % 4)


def _parse_tl_string(data: bytes, pos: int) -> bytes:
    if pos >= len(data):
        raise RPCError("truncated TL string")
    if data[pos] < 254:
        start, length = pos + 1, data[pos]
    elif data[pos] == 254 and pos + 4 <= len(data):
        start, length = pos + 4, int.from_bytes(data[pos + 1 : pos + 4], "little")
    else:
        raise RPCError("bad TL string")
    if start + length > len(data):
        raise RPCError("truncated TL string")
    return data[start : start + length]


def build_proxy_req(
    *,
    conn_id: int,
    client_addr: Address,
    proxy_addr: Address,
    data: bytes,
    tag: bytes,
    ad_tag: bytes | None = None,
    quickack: bool = False,
    pad_flag: bool = False,
) -> bytes:
    """
    RPC_PROXY_REQ carrying one client packet (transport framing removed).

    ``tag`` is the client's protocol tag; NOT_ENCRYPTED is set when the packet
    starts with a zero auth_key_id. Without an ad tag the extra section is omitted.
    """
    check_u64(conn_id, "conn_id")
    if len(data) % 4:
        raise ValueError("packet length must be a multiple of 4")
    if ad_tag is not None and len(ad_tag) != 16:
        raise ValueError("ad tag must be 16 bytes")
    flags = proxy_req_flags(
        tag,
        has_ad_tag=ad_tag is not None,
        not_encrypted=len(data) >= 8 and not any(data[:8]),
        quickack=quickack,
        pad_flag=pad_flag,
    )
    client_ip, client_port = _encode_addr(client_addr)
    proxy_ip, proxy_port = _encode_addr(proxy_addr)
    head = _proxy_req.pack(
        RPC_PROXY_REQ, flags, conn_id, client_ip, client_port, proxy_ip, proxy_port
    )
    if ad_tag is None:
        return head + data
    extra = _u32.pack(TL_PROXY_TAG) + _tl_string(ad_tag)
    return b"".join((head, _u32.pack(len(extra)), extra, data))


def parse_proxy_req(payload: bytes) -> ProxyReq:
    """
    Middle-proxy side: decode an RPC_PROXY_REQ.
    """
    expect(payload, RPC_PROXY_REQ, _proxy_req.size, "RPC_PROXY_REQ")
    _, flags, conn_id, client_ip, client_port, proxy_ip, proxy_port = _proxy_req.unpack_from(
        payload
    )
    pos, ad_tag = _proxy_req.size, None
    if flags & FLAGS_EXTRA:
        if len(payload) < pos + 4:
            raise RPCError("truncated RPC_PROXY_REQ extra section")
        (extra_size,) = _u32.unpack_from(payload, pos)
        pos += 4
        if extra_size % 4 or extra_size > len(payload) - pos:
            raise RPCError(f"bad RPC_PROXY_REQ extra size {extra_size}")
        extra = payload[pos : pos + extra_size]
        pos += extra_size
        if flags & FLAG_HAS_AD_TAG:
            if len(extra) < 4 or _u32.unpack_from(extra)[0] != TL_PROXY_TAG:
                raise RPCError("RPC_PROXY_REQ without the announced ad tag")
            ad_tag = _parse_tl_string(extra, 4)
    return ProxyReq(
        flags,
        conn_id,
        _decode_addr(client_ip, client_port),
        _decode_addr(proxy_ip, proxy_port),
        ad_tag,
        payload[pos:],
    )


def build_proxy_ans(conn_id: int, data: bytes, flags: int = 0) -> bytes:
    check_u64(conn_id, "conn_id")
    return _proxy_ans.pack(RPC_PROXY_ANS, flags, conn_id) + data


def build_simple_ack(conn_id: int, token: bytes) -> bytes:
    check_u64(conn_id, "conn_id")
    if len(token) != 4:
        raise ValueError("quick-ack token must be 4 bytes")
    return _simple_ack.pack(RPC_SIMPLE_ACK, conn_id, token)


def _conn_msg_build(msg_type: int, value: int, name: str) -> bytes:
    check_u64(value, name)
    return _conn_msg.pack(msg_type, value)


def build_close_ext(conn_id: int) -> bytes:
    return _conn_msg_build(RPC_CLOSE_EXT, conn_id, "conn_id")


def build_close_conn(conn_id: int) -> bytes:
    return _conn_msg_build(RPC_CLOSE_CONN, conn_id, "conn_id")


def build_ping(ping_id: int) -> bytes:
    return _conn_msg_build(RPC_PING, ping_id, "ping_id")


def build_pong(ping_id: int) -> bytes:
    return _conn_msg_build(RPC_PONG, ping_id, "ping_id")


def _parse_proxy_ans(payload: bytes) -> ProxyAns:
    expect(payload, RPC_PROXY_ANS, _proxy_ans.size, "RPC_PROXY_ANS")
    _, flags, conn_id = _proxy_ans.unpack_from(payload)
    return ProxyAns(flags, conn_id, payload[_proxy_ans.size :])


def _parse_simple_ack(payload: bytes) -> SimpleAck:
    expect(payload, RPC_SIMPLE_ACK, _simple_ack.size, "RPC_SIMPLE_ACK")
    _, conn_id, token = _simple_ack.unpack_from(payload)
    return SimpleAck(conn_id, token)


def _conn_msg_parser(
    msg_type: int, cls: Callable[[int], Message], name: str
) -> Callable[[bytes], Message]:
    def parse(payload: bytes) -> Message:
        expect(payload, msg_type, _conn_msg.size, name)
        return cls(_conn_msg.unpack_from(payload)[1])

    return parse


_PARSERS: dict[int, Callable[[bytes], Message]] = {
    RPC_PROXY_REQ: parse_proxy_req,
    RPC_PROXY_ANS: _parse_proxy_ans,
    RPC_SIMPLE_ACK: _parse_simple_ack,
    RPC_CLOSE_EXT: _conn_msg_parser(RPC_CLOSE_EXT, CloseExt, "RPC_CLOSE_EXT"),
    RPC_CLOSE_CONN: _conn_msg_parser(RPC_CLOSE_CONN, CloseConn, "RPC_CLOSE_CONN"),
    RPC_PING: _conn_msg_parser(RPC_PING, Ping, "RPC_PING"),
    RPC_PONG: _conn_msg_parser(RPC_PONG, Pong, "RPC_PONG"),
}


def parse_message(payload: bytes) -> Message:
    """
    Decode a data-phase message (either direction); unknown types become UnknownMessage.

    Trailing bytes after a fixed-size message are ignored; short ones raise RPCError.
    """
    msg_type = type_of(payload)
    parser = _PARSERS.get(msg_type)
    return parser(payload) if parser else UnknownMessage(msg_type, payload)
