"""
A ClientHello like the Telegram apps send, for tests and the test clients.
"""

from __future__ import annotations

import hmac
import os
import secrets as _random

from mtproxy_tw.wire.faketls.base import (
    _HANDSHAKE,
    _ZERO_RANDOM,
    _extension,
    _vector16,
)
from mtproxy_tw.wire.faketls.records import _record

# --- ClientHello like Telegram apps send (for tests and the test client) -------------------

_CLIENT_SUITES = bytes.fromhex(
    "5a5a130113021303c02bc02fc02cc030cca9cca8c013c014009c009d002f0035000a"
)
_SIGNATURE_ALGORITHMS = bytes.fromhex("040308040401050308050501080606010201")
_MLKEM_Q = 3329


def mlkem768_public_key() -> bytes:
    """A well-formed ML-KEM-768 encapsulation key (1184 bytes), as tdlib sends.

    256 x 3 coefficients below q = 3329, packed twelve bits each, then a 32-byte seed: a
    server checks that every coefficient is reduced (FIPS 203, 7.2) and refuses the hello
    with an ``illegal_parameter`` alert otherwise, so random bytes would not do.
    """
    packed = bytearray()
    for _ in range(384):
        low, high = _random.randbelow(_MLKEM_Q), _random.randbelow(_MLKEM_Q)
        packed += (low | high << 12).to_bytes(3, "little")
    return bytes(packed) + os.urandom(32)


def build_client_hello(
    secret: bytes,
    domain: str,
    timestamp: int,
    *,
    session_id: bytes | None = None,
    key_share: bytes | None = None,
    mlkem: bool = False,
    consistent_grease: bool = False,
) -> bytes:
    """Build a ClientHello record the way tdlib does, signed with ``secret``.

    Without ``mlkem`` it is the classic 517-byte hello (padded); with ``mlkem`` it also
    offers an X25519MLKEM768 share (a well-formed ML-KEM key, which a server accepts), ALPS
    and ECH like current apps (~1.8 KB, no padding).
    ``session_id`` and the X25519 ``key_share`` default to random bytes.
    ``consistent_grease`` gives the GREASE key share the GREASE group listed in
    supported_groups, as tdlib does (the known-answer layout does not).
    """
    if session_id is None:
        session_id = os.urandom(32)
    if key_share is None:
        key_share = os.urandom(32)
    groups = b"\x1a\x1a" + (b"\x11\xec" if mlkem else b"") + b"\x00\x1d\x00\x17\x00\x18"
    # tdlib's GREASE key share uses the GREASE group it lists; the published
    # vector does not, and OpenSSL refuses a share for an unlisted group.
    shares = (b"\x1a\x1a" if consistent_grease else b"\x2a\x2a") + b"\x00\x01\x00"
    if mlkem:
        shares += b"\x11\xec" + _vector16(mlkem768_public_key() + os.urandom(32))
    shares += b"\x00\x1d" + _vector16(key_share)
    extensions = [
        _extension(0x0A0A, b""),
        _extension(0x0000, _vector16(b"\x00" + _vector16(domain.encode("ascii")))),
        _extension(0x0017, b""),
        _extension(0xFF01, b"\x00"),
        _extension(0x000A, _vector16(groups)),
        _extension(0x000B, b"\x01\x00"),
        _extension(0x0023, b""),
        _extension(0x0010, _vector16(b"\x02h2\x08http/1.1")),
        _extension(0x0005, b"\x01\x00\x00\x00\x00"),
        _extension(0x000D, _vector16(_SIGNATURE_ALGORITHMS)),
        _extension(0x0012, b""),
        _extension(0x0033, _vector16(shares)),
        _extension(0x002D, b"\x01\x01"),
        _extension(0x002B, b"\x0a\x3a\x3a\x03\x04\x03\x03\x03\x02\x03\x01"),
        _extension(0x001B, b"\x02\x00\x02"),
    ]
    if mlkem:
        ech_payload = os.urandom(_random.choice((144, 176, 208, 240)))
        ech = b"\x00\x00\x01\x00\x01" + os.urandom(1) + _vector16(os.urandom(32))
        extensions.append(_extension(0x44CD, b"\x00\x03\x02h2"))
        extensions.append(_extension(0xFE0D, ech + _vector16(ech_payload)))
    extensions.append(_extension(0x4A4A, b"\x00"))
    head = b"\x03\x03" + _ZERO_RANDOM + bytes((len(session_id),)) + session_id
    head += _vector16(_CLIENT_SUITES) + b"\x01\x00"
    size = 5 + 4 + len(head) + 2 + sum(map(len, extensions))
    if size < 513:
        extensions.append(_extension(0x0015, bytes(513 - size)))
    body = head + _vector16(b"".join(extensions))
    record = _record(_HANDSHAKE, b"\x01" + len(body).to_bytes(3, "big") + body, 0x0301)
    mac = hmac.digest(secret, record, "sha256")
    stamp = int.from_bytes(mac[28:], "little") ^ (timestamp & 0xFFFFFFFF)
    return record[:11] + mac[:28] + stamp.to_bytes(4, "little") + record[43:]
