"""
Checks shared by the command-line options: each failure is one
``UsageError`` line naming the option.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

__all__ = ["count", "number"]


def number(
    option: str, value: Any, low: float, *, whole: bool = False, above: bool = False
) -> float:
    """
    ``value`` as a number of at least ``low`` (greater than it with ``above``).
    """
    try:
        result = int(value) if whole else float(value)
    except (TypeError, ValueError):
        kind = "a whole number" if whole else "a number"
        raise usage.UsageError(f"--{option}: {value!r} is not {kind}") from None
    if above and not result > low:
        raise usage.UsageError(f"--{option}: must be greater than {low:g}")
    if not result >= low:
        raise usage.UsageError(f"--{option}: must be at least {low:g}")
    return result


def count(option: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """
    ``value`` as a whole number from ``low`` to ``high``.
    """
    result = int(number(option, value, low, whole=True))
    if high is not None and result > high:
        raise usage.UsageError(f"--{option}: must be at most {high}")
    return result
