"""
A bounded cache of handshakes already seen (PROTOCOL.md section 6).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

__all__ = ["Clock", "ReplayCache"]


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
    """

    def __init__(self, clock: Clock, capacity: int = 65536, window: float = 600.0):
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._clock = clock
        self.capacity = capacity
        self.window = window
        self._entries: OrderedDict[bytes, float] = OrderedDict()

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
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return False
