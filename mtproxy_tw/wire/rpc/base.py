"""
What every part of the RPC codec shares: message types, flags, limits, the
errors and the checks of ids, ports and message types.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import TypeAlias

__all__ = [
    "CRYPTO_SCHEMA_AES",
    "FLAGS_EXTRA",
    "FLAG_ABRIDGED",
    "FLAG_DROPPED",
    "FLAG_EXTMODE2",
    "FLAG_HAS_AD_TAG",
    "FLAG_INTERMEDIATE",
    "FLAG_MAGIC",
    "FLAG_NOT_ENCRYPTED",
    "FLAG_PAD",
    "FLAG_QUICKACK",
    "HANDSHAKE_ERRORS",
    "HANDSHAKE_FLAG_CRC32C",
    "MAX_CLOCK_SKEW",
    "MAX_FRAME_LEN",
    "PADDING_WORD",
    "RPC_CLOSE_CONN",
    "RPC_CLOSE_EXT",
    "RPC_HANDSHAKE",
    "RPC_HANDSHAKE_ERROR",
    "RPC_NONCE",
    "RPC_PING",
    "RPC_PONG",
    "RPC_PROXY_ANS",
    "RPC_PROXY_REQ",
    "RPC_SIMPLE_ACK",
    "TL_PROXY_TAG",
    "Address",
    "HandshakeRejected",
    "IPAddress",
    "RPCError",
    "check_port",
    "check_u64",
    "expect",
    "normal_ip",
    "type_of",
]

# Message types (u32le on the wire).
RPC_NONCE = 0x7ACB87AA
RPC_HANDSHAKE = 0x7682EEF5
RPC_HANDSHAKE_ERROR = 0x6A27BEDA
RPC_PROXY_REQ = 0x36CEF1EE
RPC_PROXY_ANS = 0x4403DA0D
RPC_CLOSE_EXT = 0x5EB634A2
RPC_CLOSE_CONN = 0x1FCF425D
RPC_SIMPLE_ACK = 0x3BAC409B
RPC_PING = 0x5730A2DF
RPC_PONG = 0x8430EAA7
#: TL constructor that introduces the ad tag in RPC_PROXY_REQ's extra section.
TL_PROXY_TAG = 0xDB1E26AE

# RPC_PROXY_REQ flags.
FLAG_NOT_ENCRYPTED = 0x2
FLAG_HAS_AD_TAG = 0x8
FLAG_MAGIC = 0x1000
FLAG_EXTMODE2 = 0x20000
FLAG_PAD = 0x8000000
FLAG_DROPPED = 0x10000000
FLAG_INTERMEDIATE = 0x20000000
FLAG_ABRIDGED = 0x40000000
FLAG_QUICKACK = 0x80000000
FLAGS_EXTRA = 0x0C

#: RPC_HANDSHAKE flag asking for CRC32C frames (not supported here).
HANDSHAKE_FLAG_CRC32C = 0x800
#: Error codes carried by RPC_HANDSHAKE_ERROR.
HANDSHAKE_ERRORS = {
    -3: "bad length",
    -4: "peer pid mismatch",
    -6: "sender pid mismatch",
    -7: "unsupported flags",
    -8: "CRC32C not supported",
}

CRYPTO_SCHEMA_AES = 1
#: Largest accepted ``|their crypto_ts - now|`` in an RPC_NONCE.
MAX_CLOCK_SKEW = 30
#: Largest accepted frame (``total_len``), as [PY] and [ERL].
MAX_FRAME_LEN = 1 << 24
#: A 4-byte no-op frame used to pad writes to the cipher block size.
PADDING_WORD = b"\x04\x00\x00\x00"

_u32 = struct.Struct("<I")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
#: An ``(ip, port)`` pair; the ip may be a string or an :mod:`ipaddress` object.
Address: TypeAlias = tuple[str | IPAddress, int]


class RPCError(Exception):
    """
    The peer broke the RPC protocol; the connection must be closed.
    """


class HandshakeRejected(RPCError):
    """
    The middle proxy answered RPC_HANDSHAKE_ERROR.
    """

    def __init__(self, code: int) -> None:
        super().__init__(f"handshake rejected: {code} ({HANDSHAKE_ERRORS.get(code, 'unknown')})")
        self.code = code


# -- helpers ---------------------------------------------------------------------------------


def normal_ip(value: str | IPAddress) -> IPAddress:
    ip = ipaddress.ip_address(value) if isinstance(value, str) else value
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_u64(value: int, name: str) -> None:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} out of range: {value}")


def check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad port: {port}")


def type_of(payload: bytes) -> int:
    if len(payload) < 4:
        raise RPCError(f"message too short ({len(payload)} bytes)")
    return int(_u32.unpack_from(payload)[0])


def expect(payload: bytes, msg_type: int, size: int, name: str, exact: bool = False) -> None:
    got = type_of(payload)
    if got != msg_type:
        raise RPCError(f"expected {name}, got type {got:#010x}")
    if len(payload) < size or (exact and len(payload) != size):
        raise RPCError(f"bad {name} length {len(payload)}")
