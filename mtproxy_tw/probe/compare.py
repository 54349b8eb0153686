"""
What one probe saw, and whether the proxy's answer can be told from the
site's. Pure: no I/O.

Two answers are the *same* when all of these hold:

- they close the same way: a FIN, an RST, the probe's own close, or not
  at all within the wait (``timeout``);
- where both closed, they closed within ``tolerance`` seconds of each
  other, and where both answered, their first bytes came within
  ``tolerance`` seconds of each other;
- both are empty, or both are TLS records of the same types in the same
  order whose sizes are within :data:`SIZE_SLACK` bytes of each other, or
  both are something else with the same first :data:`PREFIX` bytes and
  sizes within :data:`SIZE_SLACK` bytes or 5 %;
- the probe's TLS client ended the same way with both.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

__all__ = [
    "FIN",
    "PREFIX",
    "PROBE_CLOSED",
    "REFUSED",
    "RST",
    "SIZE_SLACK",
    "TIMEOUT",
    "UNREACHABLE",
    "Answer",
    "compare",
    "describe",
    "records",
    "result_line",
]

#: How an answer ended.
FIN = "FIN"
RST = "RST"
TIMEOUT = "timeout"
REFUSED = "refused"
#: The connection could not be made for another reason (no such name, no route).
UNREACHABLE = "unreachable"
#: The probe closed the connection itself (its TLS client gave up).
PROBE_CLOSED = "probe-closed"

#: Bytes a record's size may differ by between two answers of one site
#: (an ECDSA signature's DER length varies by a few).
SIZE_SLACK = 8
#: Leading bytes of a non-TLS answer that must match.
PREFIX = 16

_TLS_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})
_PRINTABLE = frozenset(string.printable.encode()) - frozenset(b"\t\n\r\x0b\x0c")


@dataclass(frozen=True)
class Answer:
    """
    What came back to one probe connection.

    :ivar data: the bytes received (the first ones, when there were many).
    :ivar size: how many bytes were received in all.
    :ivar close: how it ended: :data:`FIN`, :data:`RST`, :data:`TIMEOUT`,
        :data:`PROBE_CLOSED`, or it never began: :data:`REFUSED`,
        :data:`UNREACHABLE`.
    :ivar closed_after: seconds from the probe's first byte to the close;
        ``None`` when it did not close within the wait.
    :ivar first_after: seconds from the probe's first byte to the
        answer's; ``None`` without an answer.
    :ivar note: how the probe's own TLS client ended, if it made one.
    :ivar waited: the wait the probe had, in seconds.
    """

    data: bytes
    size: int
    close: str
    closed_after: float | None = None
    first_after: float | None = None
    note: str = ""
    waited: float = 0.0


def records(data: bytes) -> list[tuple[int, int]] | None:
    """
    ``(type, payload size)`` of each TLS record ``data`` starts with (a
    last one cut short is listed with the size its header gives); ``None``
    when ``data`` does not start with a TLS record.
    """
    if len(data) < 3 or data[0] not in _TLS_TYPES or data[1] != 3:
        return None
    found = []
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 5]
        if len(header) < 5:
            break
        if header[0] not in _TLS_TYPES or header[1] != 3:
            found.append((-1, len(data) - pos))  # not a record: the rest
            break
        size = int.from_bytes(header[3:5], "big")
        found.append((header[0], size))
        pos += 5 + size
    return found


def _layout(found: list[tuple[int, int]]) -> str:
    parts = [f"{kind:02x}:{size}" if kind >= 0 else f"junk:{size}" for kind, size in found]
    return " ".join(parts)


def _content(answer: Answer) -> str:
    if not answer.size:
        return "nothing"
    found = records(answer.data)
    if found is not None:
        return f"TLS {_layout(found)} ({answer.size} B)"
    head = answer.data[:PREFIX]
    line = head.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if line and all(b in _PRINTABLE for b in line):
        return f"{answer.size} B {line.decode('ascii')!r}"
    return f"{answer.size} B {head[:8].hex()}"


def _ending(answer: Answer) -> str:
    if answer.close == TIMEOUT:
        return f"open after {answer.waited:g} s"
    if answer.closed_after is None:
        return answer.close
    return f"{answer.close} after {answer.closed_after:.2f} s"


def describe(answer: Answer) -> str:
    """
    ``answer`` in a few words: what came back, how and when it ended.
    """
    text = f"{_content(answer)}, {_ending(answer)}"
    if answer.note:
        text += f" ({answer.note})"
    return text


def _sizes_close(a: int, b: int) -> bool:
    return abs(a - b) <= SIZE_SLACK


def _same_content(site: Answer, proxy: Answer) -> bool:
    if not site.size or not proxy.size:
        return site.size == proxy.size
    ours, theirs = records(site.data), records(proxy.data)
    if ours is not None or theirs is not None:
        if ours is None or theirs is None or len(ours) != len(theirs):
            return False
        return all(
            a[0] == b[0] and _sizes_close(a[1], b[1]) for a, b in zip(ours, theirs, strict=True)
        )
    if site.data[:PREFIX] != proxy.data[:PREFIX]:
        return False
    slack = max(SIZE_SLACK, max(site.size, proxy.size) // 20)
    return abs(site.size - proxy.size) <= slack


def _apart(a: float | None, b: float | None, tolerance: float) -> bool:
    return a is not None and b is not None and abs(a - b) > tolerance


def compare(site: Answer, proxy: Answer, tolerance: float = 1.0) -> list[str]:
    """
    How ``proxy``'s answer differs from ``site``'s, one phrase each; empty
    when they are the same.
    """
    differences = []
    if site.close != proxy.close:
        differences.append(f"close: site {_ending(site)}, proxy {_ending(proxy)}")
    elif _apart(site.closed_after, proxy.closed_after, tolerance):
        differences.append(
            f"close time: site {site.closed_after:.2f} s, proxy {proxy.closed_after:.2f} s"
        )
    if not _same_content(site, proxy):
        differences.append(f"answer: site {_content(site)}, proxy {_content(proxy)}")
    elif _apart(site.first_after, proxy.first_after, tolerance):
        differences.append(
            f"answer time: site {site.first_after:.2f} s, proxy {proxy.first_after:.2f} s"
        )
    if site.note != proxy.note:
        differences.append(
            f"TLS client: site {site.note or 'no error'}, proxy {proxy.note or 'no error'}"
        )
    return differences


def result_line(name: str, site: Answer, proxy: Answer, tolerance: float = 1.0) -> str:
    """
    The line printed for one probe: ``same`` or ``different``, its name,
    then the answer both gave or how they differ.
    """
    differences = compare(site, proxy, tolerance)
    if differences:
        return f"different {name}: " + "; ".join(differences)
    text = f"same      {name}: {describe(site)}"
    if site.close == TIMEOUT:
        text += "; raise --wait to compare later closes"
    return text
