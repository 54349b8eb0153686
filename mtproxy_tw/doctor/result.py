"""
What a check answers: a :class:`Result` (status, name, detail), one line each.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.python.failure import Failure

__all__ = ["Result", "Status", "exit_status", "reason"]


class Status(enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Result:
    """
    One check's answer.
    """

    status: Status
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status.value:<4} {self.name}: {self.detail}"


def exit_status(results: Iterable[Result]) -> int:
    """
    1 when any check failed, else 0.
    """
    return 1 if any(r.status is Status.FAIL for r in results) else 0


def reason(failure: Failure, timeout: float | None = None) -> str:
    """
    A short reason for a failed connection or look-up.
    """
    value = failure.value
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, defer.TimeoutError | error.TimeoutError | defer.CancelledError):
        return f"no answer in {timeout:g} s" if timeout is not None else "timed out"
    if isinstance(value, error.DNSLookupError):
        return "the name does not resolve"
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        return reason(reasons[0], timeout)
    return failure.getErrorMessage() or type(value).__name__
