"""
TLS records after the handshake: reading the client's, wrapping ours.
"""

from __future__ import annotations

import random

from mtproxy_tw.wire.faketls.base import (
    _APPLICATION_DATA,
    _CHANGE_CIPHER_SPEC,
    _HEADER,
    _TLS12,
    MAX_INCOMING_PAYLOAD,
    MAX_OUTGOING_PAYLOAD,
    TLSError,
)

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


# --- the download direction sized as a TLS 1.3 server sizes it -------------------------------

FULL_RECORD = MAX_OUTGOING_PAYLOAD
"""A full TLS 1.3 record's payload: 2^14 plaintext bytes, the content type, a 16-byte tag."""
AEAD_OVERHEAD = 1 + 16
"""What TLS 1.3 adds to the plaintext of a record: the content type and the AES-GCM tag."""
MIN_RECORD = AEAD_OVERHEAD + 1
"""The smallest record a TLS 1.3 server sends with data in it (one plaintext byte)."""
SMALL_PLAINTEXT = (1369, 1400)
"""The plaintext range of the small records at the start of a burst (one MSS-sized record)."""
MEDIUM_PLAINTEXT = 4229
"""Plaintext of the records between the small and the full ones."""
RAMP_RECORDS = 40
"""Records of each size (small, then medium) at the start of a burst, before full ones."""
IDLE_RESET = 1.0
"""Seconds without sending after which the next write is a new burst."""


class RecordWriter:
    """Frames the bytes sent to one client as ApplicationData records sized the way a TLS 1.3
    server with dynamic record sizing sizes them (nginx's ``ssl_dyn_rec`` as the big CDNs run
    it): :data:`RAMP_RECORDS` MSS-sized records at the start of a burst, as many medium ones,
    then full :data:`FULL_RECORD`-byte records; a write :data:`IDLE_RESET` seconds or more
    after the previous one starts a new burst. A write's last record holds what is left, but
    never fewer than :data:`MIN_RECORD` bytes when the write had more (no AEAD record is
    shorter).

    ``small`` (a record payload) is drawn per writer from :data:`SMALL_PLAINTEXT` plus the AEAD
    overhead unless given; full records are always exactly ``full`` bytes, as a real server's.
    """

    __slots__ = ("_idle", "_last", "_limits", "_ramp", "_sent")

    def __init__(
        self,
        *,
        small: int | None = None,
        medium: int = MEDIUM_PLAINTEXT + AEAD_OVERHEAD,
        full: int = FULL_RECORD,
        ramp: int = RAMP_RECORDS,
        idle: float = IDLE_RESET,
        rng: random.Random | None = None,
    ) -> None:
        if small is None:
            small = (rng or random).randint(*SMALL_PLAINTEXT) + AEAD_OVERHEAD
        if not 2 * MIN_RECORD <= small <= medium <= full <= 0xFFFF or ramp < 0:
            raise ValueError(f"bad record sizes {small}/{medium}/{full}, ramp {ramp}")
        self._limits = (small, medium, full)
        self._ramp = ramp
        self._idle = idle
        self._sent = 0  # records sent in this burst, counted up to 2 * ramp
        self._last = float("-inf")

    def wrap(self, data: bytes, now: float) -> bytes:
        """``data``, sent at time ``now`` (seconds), as records."""
        size = len(data)
        if not size:
            return b""
        if now - self._last >= self._idle:
            self._sent = 0
        self._last = now
        sent, ramp = self._sent, self._ramp
        small, medium, full = self._limits
        if sent >= 2 * ramp and size <= full:
            return _HEADER.pack(_APPLICATION_DATA, _TLS12, size) + data
        view = memoryview(data)
        parts: list[bytes | memoryview] = []
        pos = 0
        while pos < size:
            limit = full if sent >= 2 * ramp else small if sent < ramp else medium
            left = size - pos
            length = limit if left > limit else left
            if 0 < left - length < MIN_RECORD:
                length -= MIN_RECORD - (left - length)
            parts += (_HEADER.pack(_APPLICATION_DATA, _TLS12, length), view[pos : pos + length])
            pos += length
            sent += 1
        self._sent = min(sent, 2 * ramp)
        return b"".join(parts)


def _record(record_type: int, payload: bytes, version: int = _TLS12) -> bytes:
    return _HEADER.pack(record_type, version, len(payload)) + payload
