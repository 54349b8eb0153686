"""
Counting events that would flood the log, and saying so at most once a
period.
"""

from __future__ import annotations

__all__ = ["Throttle"]


class Throttle:
    """
    Counts hits; :meth:`hit` answers the count to report when a report is
    due (the first hit, then at most once per ``interval`` seconds).

    It never reads a clock itself: the caller passes the time.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: float | None = None
        self._count = 0

    def hit(self, now: float) -> int | None:
        """
        Count one event at time ``now``; the number to report, if due.
        """
        self._count += 1
        if self._last is not None and now - self._last < self.interval:
            return None
        count, self._count, self._last = self._count, 0, now
        return count
