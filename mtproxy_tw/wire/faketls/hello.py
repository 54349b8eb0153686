"""
The ClientHello: finding it in the first bytes, parsing it, checking its digest
against the secrets (PROTOCOL.md section 4).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterable, Sequence

from mtproxy_tw.wire.faketls.base import (
    _HELLO_PREFIX,
    _ZERO_RANDOM,
    BOOT_TIME_MAX,
    MAX_HELLO_LEN,
    MIN_HELLO_LEN,
    ClientHello,
    HelloMatch,
    HelloRecord,
    NeedMore,
    T,
    TLSError,
)

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
    shares: tuple[int, ...] | None = None
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
            elif ext_type == 0x0033:
                if shares is not None:
                    raise TLSError("duplicate key_share extension")
                shares = _parse_key_share_groups(body)
    return ClientHello(
        record=record,
        random=random,
        session_id=session_id,
        cipher_suites=struct.unpack(f">{len(suites) // 2}H", suites),
        server_names=names or (),
        key_share_groups=shares or (),
    )


def _parse_key_share_groups(ext: _Cursor) -> tuple[int, ...]:
    entries = ext.vector(2)
    ext.finish()
    groups = []
    while not entries.done:
        groups.append(entries.uint(2))
        entries.vector(2)
    return tuple(groups)


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
                key_share_groups=hello.key_share_groups,
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
