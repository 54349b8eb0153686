"""
The obfuscated2 handshake (PROTOCOL.md section 2), free of I/O.

Whoever opens a connection sends a 64-byte *init*: bytes 0..55 in clear,
bytes 56..63 (protocol tag and DC id) encrypted with its own send stream.
Both ends derive two AES-256-CTR streams from it, keyed with SHA-256 over the
seed and the 16-byte secret, or with the raw seeds when there is no secret
(the proxy's own connection to a DC).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = [
    "INIT_LENGTH",
    "TAG_ABRIDGED",
    "TAG_INTERMEDIATE",
    "TAG_PADDED",
    "AcceptedInit",
    "InitiatorStreams",
    "accept_init",
    "ctr",
    "generate_init",
    "make_init",
]

INIT_LENGTH = 64
TAG_ABRIDGED = b"\xef\xef\xef\xef"
TAG_INTERMEDIATE = b"\xee\xee\xee\xee"
TAG_PADDED = b"\xdd\xdd\xdd\xdd"
TAGS = frozenset({TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED})

#: First words an init must not start with, read as u32le (section 2.2):
#: HEAD, POST, GET, OPTI, a TLS ClientHello, and two transport tags.
_FORBIDDEN_FIRST_WORDS = frozenset(
    {0x44414548, 0x54534F50, 0x20544547, 0x4954504F, 0x02010316, 0xDDDDDDDD, 0xEEEEEEEE}
)

_i16 = struct.Struct("<h")


def ctr(key: bytes, iv: bytes) -> CipherContext:
    """
    An AES-256-CTR stream (encryption and decryption are the same operation).
    """
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def _key(seed: bytes, secret: bytes | None) -> bytes:
    return hashlib.sha256(seed + secret).digest() if secret is not None else seed


def _forward(seed: bytes, secret: bytes | None) -> tuple[bytes, bytes]:
    """
    (key, IV) of the init's sender's direction (its send stream, the
    acceptor's receive stream), from the init's bytes 8..56.
    """
    return _key(seed[:32], secret), seed[32:48]


def _backward(seed: bytes, secret: bytes | None) -> tuple[bytes, bytes]:
    """
    (key, IV) of the other direction.
    """
    return _forward(seed[::-1], secret)


def _keys(init: bytes | bytearray, secret: bytes | None) -> tuple[bytes, bytes, bytes, bytes]:
    """
    (forward key, forward IV, backward key, backward IV) for an init.
    """
    seed = bytes(init[8:56])
    return _forward(seed, secret) + _backward(seed, secret)


def is_acceptable_first_bytes(plain: bytes | bytearray) -> bool:
    """
    Whether the clear part of an init obeys the rules of section 2.2.
    """
    (first,) = struct.unpack_from("<I", plain)
    return plain[0] != 0xEF and first not in _FORBIDDEN_FIRST_WORDS and plain[4:8] != b"\0" * 4


@dataclass(slots=True)
class AcceptedInit:
    """
    What an acceptor learned from a valid init.

    :ivar decryptor: decrypts what the initiator sends next (positioned at
        stream offset 64).
    :ivar encryptor: encrypts what the acceptor sends (at offset 0).
    :ivar send_key: the key of ``encryptor``, for fast mode.
    :ivar send_iv: its IV.
    """

    tag: bytes
    dc: int
    decryptor: CipherContext
    encryptor: CipherContext
    send_key: bytes
    send_iv: bytes


def accept_init(
    init: bytes | bytearray,
    secret: bytes | None,
    allowed_tags: Iterable[bytes] = TAGS,
) -> AcceptedInit | None:
    """
    Try one secret on a received 64-byte init (section 2.4).

    :returns: ``None`` when the decrypted tag is not one of ``allowed_tags``;
        a wrong secret and a random blob look the same.
    """
    if len(init) != INIT_LENGTH:
        raise ValueError("an init is 64 bytes")
    init = bytes(init)
    seed = init[8:56]
    decryptor = ctr(*_forward(seed, secret))
    plain = decryptor.update(init)
    tag = plain[56:60]
    if tag not in allowed_tags:
        return None
    # The other direction's key only for the secret that matched: a
    # handshake may try every configured secret first.
    bkey, biv = _backward(seed, secret)
    (dc,) = _i16.unpack_from(plain, 60)
    return AcceptedInit(tag, dc, decryptor, ctr(bkey, biv), bkey, biv)


@dataclass(slots=True)
class InitiatorStreams:
    """
    An initiator's side of a new obfuscated2 stream.

    :ivar wire: the 64 bytes to send first.
    :ivar encryptor: continues at offset 64 for the data that follows.
    :ivar decryptor: decrypts what the acceptor sends, from offset 0.
    """

    wire: bytes
    encryptor: CipherContext
    decryptor: CipherContext


def make_init(plain: bytes, secret: bytes | None) -> InitiatorStreams:
    """
    Encode a chosen 64-byte plaintext init (section 2.1).
    """
    if len(plain) != INIT_LENGTH:
        raise ValueError("an init is 64 bytes")
    fkey, fiv, bkey, biv = _keys(plain, secret)
    encryptor = ctr(fkey, fiv)
    wire = plain[:56] + encryptor.update(plain)[56:]
    return InitiatorStreams(wire, encryptor, ctr(bkey, biv))


def generate_init(
    tag: bytes,
    dc: int,
    secret: bytes | None = None,
    fast_keys: tuple[bytes, bytes] | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> InitiatorStreams:
    """
    A fresh random init (section 2.2), as a client or as the proxy toward a DC.

    :param fast_keys: the proxy's (key, IV) toward the client; when given,
        the DC is made to encrypt with exactly that stream (fast mode,
        section 2.7), so its bytes can be forwarded to the client unchanged.
    """
    seed = None
    if fast_keys is not None:
        key, iv = fast_keys
        seed = (key + iv)[::-1]
    while True:
        plain = bytearray(random(INIT_LENGTH))
        if seed is not None:
            plain[8:56] = seed
        plain[56:60] = tag
        plain[60:62] = _i16.pack(dc)
        if is_acceptable_first_bytes(plain):
            return make_init(bytes(plain), secret)
