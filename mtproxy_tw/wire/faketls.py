"""Fake-TLS codec for ``ee`` secrets: ClientHello check, ServerHello flight, record framing.

Everything here is pure: functions take bytes (and the current time where it matters) and
return bytes or small frozen dataclasses. Malformed input raises :class:`TLSError`.
"""

from __future__ import annotations

import hmac
import os
import random
import secrets as _random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = [
    "BOOT_TIME_MAX",
    "MAX_HELLO_LEN",
    "MAX_INCOMING_PAYLOAD",
    "MAX_OUTGOING_PAYLOAD",
    "MIN_HELLO_LEN",
    "ClientHello",
    "HelloMatch",
    "HelloRecord",
    "NeedMore",
    "TLSError",
    "TLSRecordReader",
    "build_client_hello",
    "build_server_hello",
    "check_server_hello",
    "choose_cipher_suite",
    "fallback_app_data_len",
    "parse_client_hello",
    "read_client_hello",
    "timestamp_ok",
    "verify_client_hello",
    "wrap_records",
]

MIN_HELLO_LEN = 512
"""Smallest first-record length taken as a ClientHello."""
MAX_HELLO_LEN = 16384
"""Largest ClientHello handshake message (and first record) accepted."""
MAX_OUTGOING_PAYLOAD = 16384
"""Largest ApplicationData payload sent to clients."""
MAX_INCOMING_PAYLOAD = 16384 + 256
"""Largest record payload accepted from clients."""
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


# --- ClientHello -------------------------------------------------------------------------


def read_client_hello(data: bytes) -> HelloRecord | NeedMore | None:
    """Look for a ClientHello at the start of a connection's buffered bytes.

    Returns ``None`` when the bytes are not a ClientHello (first record not ``16 03 01`` with
    a length of at least 512), :class:`NeedMore` while incomplete, else the hello.
    """
    if _HELLO_PREFIX[: len(data)] != data[:3]:
        return None
    if len(data) < 5:
        return NeedMore(5)
    record_len = int.from_bytes(data[3:5], "big")
    if record_len < MIN_HELLO_LEN:
        return None
    if record_len > MAX_HELLO_LEN:
        raise TLSError(f"ClientHello record too long: {record_len}")
    end = 5 + record_len
    if len(data) < end:
        return NeedMore(end)
    if data[5] != 1:
        raise TLSError("first handshake message is not a ClientHello")
    message_len = 4 + int.from_bytes(data[6:9], "big")
    if message_len <= record_len:
        return HelloRecord(data[:end], end)
    if message_len > MAX_HELLO_LEN:
        raise TLSError(f"ClientHello too long: {message_len}")
    # The hello continues in further handshake records: reassemble it.
    fragments = [data[5:end]]
    got = record_len
    while got < message_len:
        if len(data) < end + 5:
            return NeedMore(end + 5)
        if data[end : end + 3] != _HELLO_PREFIX:
            raise TLSError("ClientHello fragment is not a handshake record")
        size = int.from_bytes(data[end + 3 : end + 5], "big")
        if size == 0 or got + size > message_len:
            raise TLSError("bad ClientHello fragment length")
        if len(data) < end + 5 + size:
            return NeedMore(end + 5 + size)
        fragments.append(data[end + 5 : end + 5 + size])
        got += size
        end += 5 + size
    record = _HELLO_PREFIX + message_len.to_bytes(2, "big") + b"".join(fragments)
    return HelloRecord(record, end)


class _Cursor:
    """Bounds-checked reader over ``buf[pos:end]``."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    @property
    def done(self) -> bool:
        return self.pos == self.end

    def take(self, n: int) -> bytes:
        start, self.pos = self.pos, self.pos + n
        if self.pos > self.end:
            raise TLSError("truncated ClientHello")
        return self.buf[start : self.pos]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, len_size: int) -> _Cursor:
        """A cursor over a vector prefixed by a ``len_size``-byte length."""
        n = self.uint(len_size)
        self.take(n)
        return _Cursor(self.buf, self.pos - n, self.pos)

    def rest(self) -> bytes:
        return self.take(self.end - self.pos)

    def finish(self) -> None:
        if not self.done:
            raise TLSError("trailing bytes in ClientHello")


def parse_client_hello(record: bytes) -> ClientHello:
    """Parse one complete ClientHello record; raise :class:`TLSError` if malformed."""
    cur = _Cursor(record)
    if cur.take(3)[:2] != b"\x16\x03":
        raise TLSError("not a TLS handshake record")
    payload = cur.vector(2)
    cur.finish()
    if payload.uint(1) != 1:
        raise TLSError("not a ClientHello")
    hello = payload.vector(3)
    payload.finish()
    hello.take(2)  # legacy_version
    random = hello.take(32)
    session_id = hello.vector(1).rest()
    if len(session_id) > 32:
        raise TLSError("session id too long")
    suites = hello.vector(2).rest()
    if not suites or len(suites) % 2:
        raise TLSError("bad cipher suite list")
    if hello.vector(1).done:
        raise TLSError("no compression methods")
    names: tuple[str, ...] | None = None
    if not hello.done:
        extensions = hello.vector(2)
        hello.finish()
        while not extensions.done:
            ext_type = extensions.uint(2)
            body = extensions.vector(2)
            if ext_type == 0x0000:
                if names is not None:
                    raise TLSError("duplicate server_name extension")
                names = _parse_server_names(body)
    return ClientHello(
        record=record,
        random=random,
        session_id=session_id,
        cipher_suites=struct.unpack(f">{len(suites) // 2}H", suites),
        server_names=names or (),
    )


def _parse_server_names(ext: _Cursor) -> tuple[str, ...]:
    entries = ext.vector(2)
    ext.finish()
    if entries.done:
        raise TLSError("empty server_name list")
    names = []
    while not entries.done:
        name_type = entries.uint(1)
        name = entries.vector(2).rest()
        if name_type == 0:
            if not name or not name.isascii():
                raise TLSError("bad SNI host name")
            names.append(name.decode("ascii"))
    return tuple(names)


def choose_cipher_suite(suites: Iterable[int]) -> int:
    """The client's first TLS 1.3 suite (``13 01``..``13 05``; never GREASE), else ``13 01``."""
    return next((s for s in suites if 0x1301 <= s <= 0x1305), 0x1301)


def verify_client_hello(record: bytes, secrets: Sequence[tuple[T, bytes]]) -> HelloMatch[T] | None:
    """Find the secret whose HMAC produced the hello's random; ``None`` if none did.

    The random must equal ``HMAC(S, record with random zeroed)`` except for its last four
    bytes, which carry ``u32le(timestamp)`` XORed in. Raises :class:`TLSError` if the record
    is malformed. The time window (:func:`timestamp_ok`) is left to the caller.
    """
    hello = parse_client_hello(record)
    zeroed = record[:11] + _ZERO_RANDOM + record[43:]
    for name, secret in secrets:
        mac = hmac.digest(secret, zeroed, "sha256")
        if hmac.compare_digest(mac[:28], hello.random[:28]):
            ts = int.from_bytes(mac[28:], "little") ^ int.from_bytes(hello.random[28:], "little")
            return HelloMatch(
                name=name,
                secret=secret,
                timestamp=ts,
                client_random=hello.random,
                session_id=hello.session_id,
                server_name=hello.server_names[0] if hello.server_names else None,
                cipher_suite=choose_cipher_suite(hello.cipher_suites),
                cipher_suites=hello.cipher_suites,
            )
    return None


def timestamp_ok(
    ts: int, now: float, *, skew: float = 300.0, boot_time_max: float = BOOT_TIME_MAX
) -> bool:
    """Whether a hello's timestamp is acceptable.

    True when ``|now - ts| <= skew``, or when ``ts < boot_time_max`` (a client reporting the
    time since it booted; pass ``boot_time_max=0`` to refuse those).
    """
    return abs(now - ts) <= skew or ts < boot_time_max


# --- ServerHello flight --------------------------------------------------------------------


def fallback_app_data_len(rng: random.Random | None = None) -> int:
    """A plausible ApplicationData size (2500..3619) when the real site's is unknown.

    A certificate chain's worth of bytes, as the official proxy uses when its probe fails.
    """
    rng = rng or random.SystemRandom()
    return 2500 + rng.randrange(1120)


def build_server_hello(
    secret: bytes,
    client_random: bytes,
    session_id: bytes,
    *,
    cipher_suite: int = 0x1301,
    app_data_len: int | None = None,
    filler: bytes | None = None,
    public_key: bytes | None = None,
    key_share_first: bool = True,
) -> bytes:
    """Build the answer to a valid hello: ServerHello + ChangeCipherSpec + ApplicationData.

    The ApplicationData payload is ``filler`` if given, else ``app_data_len`` random bytes
    (default: random length 2500..3619). ``public_key`` defaults to a fresh X25519 key.
    Bytes 11..42 carry ``HMAC(secret, client_random ‖ flight with those bytes zeroed)``.
    """
    if filler is None:
        if app_data_len is None:
            app_data_len = fallback_app_data_len()
        filler = os.urandom(app_data_len)
    elif app_data_len is not None and app_data_len != len(filler):
        raise ValueError("app_data_len does not match the filler")
    if not 0 < len(filler) <= MAX_OUTGOING_PAYLOAD:
        raise ValueError(f"bad ApplicationData length {len(filler)}")
    if public_key is None:
        public_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    key_share = _extension(0x0033, b"\x00\x1d" + _vector16(public_key))
    versions = _extension(0x002B, b"\x03\x04")
    extensions = key_share + versions if key_share_first else versions + key_share
    body = b"".join(
        (
            b"\x03\x03",
            _ZERO_RANDOM,
            bytes((len(session_id),)),
            session_id,
            cipher_suite.to_bytes(2, "big"),
            b"\x00",
            _vector16(extensions),
        )
    )
    flight = b"".join(
        (
            _record(_HANDSHAKE, b"\x02" + len(body).to_bytes(3, "big") + body),
            _CCS_RECORD,
            _record(_APPLICATION_DATA, filler),
        )
    )
    digest = hmac.digest(secret, client_random + flight, "sha256")
    return flight[:11] + digest + flight[43:]


def check_server_hello(data: bytes, secret: bytes, client_random: bytes) -> int | NeedMore:
    """Client side: validate the flight at the start of ``data`` and return its length.

    Checks the ``16 03 03`` / ``14 03 03 00 01 01`` / ``17 03 03`` structure and the server
    digest; raises :class:`TLSError` on mismatch, returns :class:`NeedMore` while incomplete.
    """
    if len(data) < 5:
        return NeedMore(5)
    if data[:3] != b"\x16\x03\x03":
        raise TLSError("flight does not start with a TLS 1.2 handshake record")
    hello_len = int.from_bytes(data[3:5], "big")
    if hello_len < 38:
        raise TLSError("ServerHello record too short")
    app_start = 5 + hello_len + len(_CCS_RECORD)
    if len(data) < app_start + 5:
        return NeedMore(app_start + 5)
    if data[app_start - len(_CCS_RECORD) : app_start + 3] != _CCS_RECORD + _APP_DATA_PREFIX:
        raise TLSError("ServerHello is not followed by ChangeCipherSpec and ApplicationData")
    end = app_start + 5 + int.from_bytes(data[app_start + 3 : app_start + 5], "big")
    if len(data) < end:
        return NeedMore(end)
    zeroed = data[:11] + _ZERO_RANDOM + data[43:end]
    expected = hmac.digest(secret, client_random + zeroed, "sha256")
    if not hmac.compare_digest(expected, data[_RANDOM]):
        raise TLSError("bad ServerHello digest")
    return end


# --- records after the handshake ----------------------------------------------------------


class TLSRecordReader:
    """Turns the client's TLS records back into a byte stream.

    Feed it chunks as they arrive; it returns the ApplicationData payloads, skips
    ChangeCipherSpec records and keeps at most one incomplete record. After a
    :class:`TLSError` the stream is broken and the reader must not be fed again.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> bytes:
        """Consume ``data`` and return the payload bytes it completed."""
        view = memoryview(data)
        payloads: list[bytes | memoryview] = []
        partial = self._partial
        if partial:
            # Complete the pending record first, copying only its own bytes.
            if len(partial) < 5:
                missing = 5 - len(partial)
                partial += view[:missing]
                view = view[missing:]
                if len(partial) < 5:
                    return b""
            record_type, size = _check_header(partial, 0)
            missing = 5 + size - len(partial)
            partial += view[:missing]
            view = view[missing:]
            if len(partial) < 5 + size:
                return b""
            if record_type == _APPLICATION_DATA:
                payloads.append(memoryview(partial)[5:])
            elif partial[5] != 1:
                raise TLSError("bad ChangeCipherSpec")
            self._partial = bytearray()
        pos, end = 0, len(view)
        while end - pos >= 5:
            record_type, size = _check_header(view, pos)
            if pos + 5 + size > end:
                break
            if record_type == _APPLICATION_DATA:
                payloads.append(view[pos + 5 : pos + 5 + size])
            elif view[pos + 5] != 1:
                raise TLSError("bad ChangeCipherSpec")
            pos += 5 + size
        if pos < end:
            self._partial = bytearray(view[pos:])
        if len(payloads) == 1:
            return bytes(payloads[0])
        return b"".join(payloads)


def _check_header(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    record_type, version, size = _HEADER.unpack_from(buf, pos)
    if version != _TLS12:
        raise TLSError(f"bad record version {version:#06x}")
    if record_type == _APPLICATION_DATA:
        if size > MAX_INCOMING_PAYLOAD:
            raise TLSError(f"record too long: {size}")
    elif record_type != _CHANGE_CIPHER_SPEC or size != 1:
        raise TLSError(f"unexpected record type {record_type:#04x} (length {size})")
    return record_type, size


def wrap_records(data: bytes, max_payload: int = MAX_OUTGOING_PAYLOAD) -> bytes:
    """Frame ``data`` as ApplicationData records of at most ``max_payload`` bytes each."""
    if len(data) <= max_payload:
        return _record(_APPLICATION_DATA, data) if data else b""
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for pos in range(0, len(data), max_payload):
        chunk = view[pos : pos + max_payload]
        parts += (_HEADER.pack(_APPLICATION_DATA, _TLS12, len(chunk)), chunk)
    return b"".join(parts)


def _record(record_type: int, payload: bytes, version: int = _TLS12) -> bytes:
    return _HEADER.pack(record_type, version, len(payload)) + payload


# --- ClientHello like Telegram apps send (for tests and the test client) -------------------

_CLIENT_SUITES = bytes.fromhex(
    "5a5a130113021303c02bc02fc02cc030cca9cca8c013c014009c009d002f0035000a"
)
_SIGNATURE_ALGORITHMS = bytes.fromhex("040308040401050308050501080606010201")


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
    offers an X25519MLKEM768 share, ALPS and ECH like current apps (~1.8 KB, no padding).
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
        shares += b"\x11\xec" + _vector16(os.urandom(1216))
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


def _vector16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _extension(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + _vector16(body)
