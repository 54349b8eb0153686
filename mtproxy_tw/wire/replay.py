"""
A bounded cache of handshakes already seen (PROTOCOL.md section 6), and the
snapshot of it kept across restarts.

The snapshot format (all integers big-endian)::

    "MTRC"  version (1 byte)  count (4 bytes)
    count records: time (8-byte IEEE double)  key length (1 byte)  key
    CRC-32 of everything before it (4 bytes)

Records are oldest first. A snapshot never holds more entries than the cache
it was taken from, so its size is bounded by ``--replay-capacity``.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple, Protocol

__all__ = [
    "Clock",
    "ReplayCache",
    "Snapshot",
    "decode_snapshot",
    "encode_snapshot",
    "snapshot_size_limit",
]

MAGIC = b"MTRC"
VERSION = 1
#: The longest key a record can hold (its length is one byte).
MAX_KEY = 255

_HEADER = struct.Struct(">4sBI")
_RECORD = struct.Struct(">dB")
_CRC = struct.Struct(">I")


class Clock(Protocol):
    """
    Anything that tells the time, like a reactor.
    """

    def seconds(self) -> float: ...


class ReplayCache:
    """
    Remembers handshake keys for ``window`` seconds, at most ``capacity``.

    Callers insert only handshakes that were valid, so garbage cannot evict
    real entries. When full, the oldest entry goes first.

    :ivar additions: keys added so far; a store compares it to know whether
        there is anything new to save.
    """

    def __init__(self, clock: Clock, capacity: int = 65536, window: float = 600.0):
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._clock = clock
        self.capacity = capacity
        self.window = window
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self.additions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - self.window
        while entries:
            key, seen = next(iter(entries.items()))
            if seen > horizon:
                break
            del entries[key]

    def check_and_add(self, key: bytes) -> bool:
        """
        Record ``key``; return ``True`` if it was already there (a replay).
        """
        now = self._clock.seconds()
        self._expire(now)
        if key in self._entries:
            return True
        self._entries[key] = now
        self.additions += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return False

    def entries(self) -> list[tuple[bytes, float]]:
        """
        The keys still inside the window and when each was seen, oldest first.
        """
        self._expire(self._clock.seconds())
        return list(self._entries.items())

    def restore(self, entries: Iterable[tuple[bytes, float]]) -> int:
        """
        Take back ``entries`` (from :meth:`entries`, maybe of an earlier run).

        Those outside the window are left out, a time in the future counts
        as now, and of everything held afterwards only the newest
        ``capacity`` stay. Returns how many keys the cache holds now.
        """
        now = self._clock.seconds()
        horizon = now - self.window
        merged = dict(self._entries)
        for key, seen in entries:
            if not seen > horizon:  # also a NaN
                continue
            seen = min(seen, now)
            if merged.get(key, horizon) < seen:
                merged[key] = seen
        newest = sorted(merged.items(), key=lambda entry: entry[1])[-self.capacity :]
        self._entries = OrderedDict(newest)
        return len(self._entries)


class Snapshot(NamedTuple):
    """
    What :func:`decode_snapshot` read: the entries, or why there are none.
    """

    entries: list[tuple[bytes, float]]
    #: ``None`` when the snapshot was whole; else what is wrong with it.
    error: str | None = None


def snapshot_size_limit(capacity: int) -> int:
    """
    The largest snapshot of a cache of ``capacity`` keys.
    """
    return _HEADER.size + capacity * (_RECORD.size + MAX_KEY) + _CRC.size


def encode_snapshot(entries: Iterable[tuple[bytes, float]]) -> bytes:
    """
    The snapshot of ``entries`` (key, time), in their order.

    Keys longer than :data:`MAX_KEY` bytes and times that are not finite
    are left out (the cache's keys are 36 or 48 bytes).
    """
    body = bytearray()
    count = 0
    pack = _RECORD.pack
    for key, seen in entries:
        if len(key) > MAX_KEY or not math.isfinite(seen):
            continue
        body += pack(seen, len(key))
        body += key
        count += 1
    data = _HEADER.pack(MAGIC, VERSION, count) + body
    return data + _CRC.pack(zlib.crc32(data))


def decode_snapshot(data: bytes) -> Snapshot:
    """
    The entries of a snapshot; a snapshot that is not whole gives none and
    an error saying why, never an exception.
    """
    if len(data) < _HEADER.size + _CRC.size:
        return Snapshot([], f"too short ({len(data)} bytes)")
    magic, version, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return Snapshot([], "not a replay cache snapshot")
    if version != VERSION:
        return Snapshot([], f"unknown version {version}")
    end = len(data) - _CRC.size
    if zlib.crc32(data[:end]) != _CRC.unpack_from(data, end)[0]:
        return Snapshot([], "checksum mismatch (truncated or damaged)")
    entries: list[tuple[bytes, float]] = []
    at = _HEADER.size
    unpack = _RECORD.unpack_from
    for _ in range(count):
        if at + _RECORD.size > end:
            return Snapshot([], f"{count} records announced, {len(entries)} present")
        seen, size = unpack(data, at)
        at += _RECORD.size
        if at + size > end:
            return Snapshot([], f"{count} records announced, {len(entries)} present")
        if not math.isfinite(seen):
            return Snapshot([], "a record's time is not a number")
        entries.append((bytes(data[at : at + size]), seen))
        at += size
    if at != end:
        return Snapshot([], f"{end - at} bytes after the last record")
    return Snapshot(entries)
