"""
TLS records after the handshake: reading the client's, wrapping ours.
"""

from __future__ import annotations

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


def _record(record_type: int, payload: bytes, version: int = _TLS12) -> bytes:
    return _HEADER.pack(record_type, version, len(payload)) + payload
