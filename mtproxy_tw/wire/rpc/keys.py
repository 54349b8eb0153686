"""
Key derivation after the nonce exchange (PROTOCOL.md section 8.7).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from hashlib import md5, sha1

from mtproxy_tw.wire.rpc.base import Address, check_port, normal_ip

__all__ = ["KeyIV", "SessionKeys", "derive_keys", "kdf_input"]

_PURPOSE_CLIENT = b"CLIENT"
_PURPOSE_SERVER = b"SERVER"

_u16 = struct.Struct("<H")
_u32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class KeyIV:
    key: bytes
    iv: bytes


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """
    The AES-256-CBC material of one end: what it encrypts and decrypts with.
    """

    encrypt: KeyIV
    decrypt: KeyIV


def kdf_input(
    purpose: bytes,
    *,
    secret: bytes,
    nonce_srv: bytes,
    nonce_clt: bytes,
    client_ts: int,
    client_addr: Address,
    server_addr: Address,
) -> bytes:
    """
    The string hashed into a key and IV (section 8.7); purpose is b"CLIENT" or b"SERVER".

    client_addr is the proxy's address as the middle proxy sees it (public IP,
    local port); both addresses must be of the same IP version.
    """
    if purpose not in (_PURPOSE_CLIENT, _PURPOSE_SERVER):
        raise ValueError(f"bad purpose {purpose!r}")
    if len(nonce_srv) != 16 or len(nonce_clt) != 16:
        raise ValueError("nonces must be 16 bytes")
    client_ip, server_ip = normal_ip(client_addr[0]), normal_ip(server_addr[0])
    check_port(client_addr[1])
    check_port(server_addr[1])
    if isinstance(client_ip, ipaddress.IPv4Address) and isinstance(
        server_ip, ipaddress.IPv4Address
    ):
        client_v4, server_v4, v6 = _u32.pack(int(client_ip)), _u32.pack(int(server_ip)), b""
    elif isinstance(client_ip, ipaddress.IPv6Address) and isinstance(
        server_ip, ipaddress.IPv6Address
    ):
        client_v4 = server_v4 = bytes(4)
        v6 = client_ip.packed + server_ip.packed
    else:
        raise ValueError("mixed IPv4/IPv6 endpoints")
    return b"".join(
        (
            nonce_srv,
            nonce_clt,
            _u32.pack(client_ts),
            server_v4,
            _u16.pack(client_addr[1]),
            purpose,
            client_v4,
            _u16.pack(server_addr[1]),
            secret,
            nonce_srv,
            v6,
            nonce_clt,
        )
    )


def derive_keys(
    *,
    secret: bytes,
    nonce_srv: bytes,
    nonce_clt: bytes,
    client_ts: int,
    client_addr: Address,
    server_addr: Address,
    server_side: bool = False,
) -> SessionKeys:
    """
    Session keys after the nonce exchange.

    The proxy (RPC client) encrypts with the "CLIENT" key and decrypts with
    the "SERVER" one; ``server_side=True`` gives the middle proxy's view.
    """

    def key_iv(purpose: bytes) -> KeyIV:
        data = kdf_input(
            purpose,
            secret=secret,
            nonce_srv=nonce_srv,
            nonce_clt=nonce_clt,
            client_ts=client_ts,
            client_addr=client_addr,
            server_addr=server_addr,
        )
        return KeyIV(md5(data[1:]).digest()[:12] + sha1(data).digest(), md5(data[2:]).digest())

    client, server = key_iv(_PURPOSE_CLIENT), key_iv(_PURPOSE_SERVER)
    return SessionKeys(server, client) if server_side else SessionKeys(client, server)
