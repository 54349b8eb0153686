"""
The ServerHello flight cut into the pieces that leave as separate TCP
segments (``--split-server-hello``).
"""

from __future__ import annotations

from mtproxy_tw.wire.faketls.base import _HEADER, TLSError

__all__ = ["split_flight"]


def split_flight(flight: bytes) -> tuple[bytes, bytes]:
    """
    ``flight`` cut after its first record: the ServerHello, then the rest
    (ChangeCipherSpec and ApplicationData); the rest is empty when the
    flight is one record.

    :raises TLSError: when ``flight`` does not start with a whole record.
    """
    if len(flight) < _HEADER.size:
        raise TLSError("the flight is shorter than a record header")
    _, _, length = _HEADER.unpack_from(flight)
    end = _HEADER.size + length
    if end > len(flight):
        raise TLSError("the flight's first record is incomplete")
    return flight[:end], flight[end:]
