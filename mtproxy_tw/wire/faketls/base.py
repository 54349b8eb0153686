"""
The fake-TLS codec's constants, errors and result types.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Generic, TypeVar

MIN_HELLO_LEN = 512
"""Smallest first-record length taken as a ClientHello."""
MAX_HELLO_LEN = 16384
"""Largest ClientHello handshake message (and first record) accepted."""
MAX_OUTGOING_PAYLOAD = 16384 + 1 + 16
"""Largest ApplicationData payload sent to clients: a full TLS 1.3 record's (2^14 plaintext
bytes, the content type and a 16-byte AEAD tag). TDLib, Telegram Desktop and Android read any
16-bit record length."""
MAX_INCOMING_PAYLOAD = 16384 + 256
"""Largest record payload accepted from clients."""
X25519 = 0x001D
"""The x25519 key-share group."""
X25519MLKEM768 = 0x11EC
"""The hybrid post-quantum key-share group current apps and servers prefer."""
MLKEM768_SERVER_SHARE = 1120
"""A server's X25519MLKEM768 share: a 1088-byte ML-KEM-768 ciphertext and an x25519 key."""
BOOT_TIME_MAX = 7 * 86400
"""Timestamps below this (7 days) are taken as seconds since the client booted.

Real clocks are near 1.7e9; [PY] accepts boot times up to 1000 days, but such stamps never
expire, so only the replay cache guards them: keep the allowance short.
"""

_HANDSHAKE = 0x16
_CHANGE_CIPHER_SPEC = 0x14
_APPLICATION_DATA = 0x17
_TLS12 = 0x0303
_HELLO_PREFIX = b"\x16\x03\x01"
_CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
_APP_DATA_PREFIX = b"\x17\x03\x03"
_RANDOM = slice(11, 43)
_ZERO_RANDOM = bytes(32)
_HEADER = struct.Struct(">BHH")  # record type, version, payload length

T = TypeVar("T")


class TLSError(Exception):
    """The peer sent something that is not the expected TLS."""


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not enough data yet: ``total`` bytes are needed in the buffer."""

    total: int


@dataclass(frozen=True, slots=True)
class HelloRecord:
    """A complete ClientHello record and how many buffered bytes it used.

    ``record`` is one ``16 03 01`` record; a hello that arrived fragmented is rebuilt as the
    single record the client hashed, so ``consumed`` may exceed ``len(record)``.
    """

    record: bytes
    consumed: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The fields of a ClientHello the proxy cares about."""

    record: bytes
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    server_names: tuple[str, ...]
    key_share_groups: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class HelloMatch(Generic[T]):
    """A ClientHello whose digest matched one of the secrets."""

    name: T
    secret: bytes
    timestamp: int
    client_random: bytes
    session_id: bytes
    server_name: str | None
    cipher_suite: int
    cipher_suites: tuple[int, ...] = ()
    #: The groups of the client's key shares, in its order (GREASE included).
    key_share_groups: tuple[int, ...] = ()


def _vector16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _extension(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + _vector16(body)
