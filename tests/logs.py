"""
Watching the log from a test.
"""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

__all__ = ["at_least_warnings", "observe"]


def observe(case: SynchronousTestCase) -> list[LogEvent]:
    """
    The log events emitted until the end of ``case``.
    """
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def at_least_warnings(events: list[LogEvent]) -> list[str]:
    """
    The text of every event at warning level or above.
    """
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
