"""
The handshake payloads: RPC_NONCE, RPC_HANDSHAKE and RPC_HANDSHAKE_ERROR.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from mtproxy_tw.wire.rpc.base import (
    CRYPTO_SCHEMA_AES,
    HANDSHAKE_FLAG_CRC32C,
    MAX_CLOCK_SKEW,
    RPC_HANDSHAKE,
    RPC_HANDSHAKE_ERROR,
    RPC_NONCE,
    HandshakeRejected,
    RPCError,
    expect,
    type_of,
)

__all__ = [
    "Handshake",
    "Nonce",
    "ProcessId",
    "answer_handshake",
    "build_handshake",
    "build_handshake_error",
    "build_nonce",
    "parse_handshake",
    "parse_nonce",
]

_nonce = struct.Struct("<I4sII16s")
_process_id = struct.Struct("<IHHI")
_handshake = struct.Struct("<II12s12s")
_handshake_error = struct.Struct("<Ii12s")


@dataclass(frozen=True, slots=True)
class Nonce:
    key_select: bytes
    schema: int
    crypto_ts: int
    nonce: bytes


def build_nonce(secret: bytes, crypto_ts: int, nonce: bytes) -> bytes:
    """
    RPC_NONCE payload: key_select (the secret's first 4 bytes), schema AES, time, nonce.
    """
    if len(secret) < 4 or len(nonce) != 16:
        raise ValueError("need a secret of >= 4 bytes and a 16-byte nonce")
    return _nonce.pack(RPC_NONCE, secret[:4], CRYPTO_SCHEMA_AES, crypto_ts, nonce)


def parse_nonce(
    payload: bytes, secret: bytes, *, now: int | None = None, max_skew: int = MAX_CLOCK_SKEW
) -> Nonce:
    """
    Validate the peer's RPC_NONCE; with ``now``, also its clock against ours.
    """
    expect(payload, RPC_NONCE, _nonce.size, "RPC_NONCE", exact=True)
    _, key_select, schema, crypto_ts, nonce = _nonce.unpack(payload)
    if key_select != secret[:4]:
        raise RPCError(f"RPC_NONCE key_select {key_select.hex()} does not match the secret")
    if schema != CRYPTO_SCHEMA_AES:
        raise RPCError(f"unsupported crypto schema {schema}")
    if now is not None and abs(crypto_ts - now) > max_skew:
        raise RPCError(f"clock skew of {crypto_ts - now} s")
    return Nonce(key_select, schema, crypto_ts, nonce)


@dataclass(frozen=True, slots=True)
class ProcessId:
    """
    A process id in RPC_HANDSHAKE: IPv4 address, port, pid (16 bits), start time.
    """

    ip: ipaddress.IPv4Address
    port: int
    pid: int
    utime: int

    def encode(self) -> bytes:
        try:
            return _process_id.pack(int(self.ip), self.port, self.pid, self.utime)
        except struct.error as e:
            raise ValueError(f"bad process id: {e}") from None

    @classmethod
    def decode(cls, data: bytes) -> ProcessId:
        if len(data) != _process_id.size:
            raise RPCError("process id must be 12 bytes")
        ip, port, pid, utime = _process_id.unpack(data)
        return cls(ipaddress.IPv4Address(ip), port, pid, utime)


@dataclass(frozen=True, slots=True)
class Handshake:
    flags: int
    sender_pid: ProcessId
    peer_pid: ProcessId


def build_handshake(sender_pid: ProcessId, peer_pid: ProcessId, flags: int = 0) -> bytes:
    return _handshake.pack(RPC_HANDSHAKE, flags, sender_pid.encode(), peer_pid.encode())


def build_handshake_error(code: int, sender_pid: ProcessId) -> bytes:
    return _handshake_error.pack(RPC_HANDSHAKE_ERROR, code, sender_pid.encode())


def parse_handshake(payload: bytes, *, expected_peer_pid: ProcessId | None = None) -> Handshake:
    """
    Validate an RPC_HANDSHAKE; raises :class:`HandshakeRejected` on RPC_HANDSHAKE_ERROR.

    ``expected_peer_pid`` is the sender_pid we sent, which the reply must echo.
    """
    if type_of(payload) == RPC_HANDSHAKE_ERROR:
        expect(payload, RPC_HANDSHAKE_ERROR, _handshake_error.size, "RPC_HANDSHAKE_ERROR")
        raise HandshakeRejected(_handshake_error.unpack_from(payload)[1])
    expect(payload, RPC_HANDSHAKE, _handshake.size, "RPC_HANDSHAKE", exact=True)
    _, flags, sender, peer = _handshake.unpack(payload)
    if flags & 0xFF:
        raise RPCError(f"unsupported handshake flags {flags:#x}")
    if flags & HANDSHAKE_FLAG_CRC32C:
        raise RPCError("CRC32C frames are not supported")
    hs = Handshake(flags, ProcessId.decode(sender), ProcessId.decode(peer))
    if expected_peer_pid is not None and hs.peer_pid != expected_peer_pid:
        raise RPCError("handshake peer pid mismatch")
    return hs


def answer_handshake(payload: bytes, own_pid: ProcessId) -> bytes:
    """
    Middle-proxy side: validate the proxy's RPC_HANDSHAKE and build the reply.
    """
    hs = parse_handshake(payload)
    return build_handshake(own_pid, hs.sender_pid)
