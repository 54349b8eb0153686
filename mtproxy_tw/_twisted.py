"""
Writing on the hot path without Twisted's buffered round trip.

``transport.write()`` on an idle TCP transport only queues the bytes and asks
the reactor to watch for writability: two ``epoll_ctl`` calls and an extra
loop turn per chunk. When nothing is queued, :func:`write` sends at once and
hands only the unsent rest to ``write()``, which keeps Twisted's ordering,
flow control and error handling for everything that does not fit.

It reads private attributes of ``twisted.internet.abstract.FileDescriptor``
(``dataBuffer``, ``_tempDataLen``, ``socket``); a transport without them
falls back to plain ``write()``. ``setup.cfg`` bounds the Twisted version and
``tests/test_twisted_seam.py`` checks the assumption on the installed one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any

__all__ = ["READ_SIZE", "buffered", "no_delay", "set_read_size", "tune_malloc", "write"]


#: Bytes read per ``dataReceived`` and the write-buffer size at which a
#: transport pauses its producer: large reads amortise the per-call costs.
READ_SIZE = 1 << 18


def set_read_size(transport: Any) -> None:
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE


def buffered(transport: Any) -> int:
    """
    Bytes a TCP transport holds in its own write buffer (0 for other kinds).
    """
    data = getattr(transport, "dataBuffer", b"")
    offset: int = getattr(transport, "offset", 0)
    temp: int = getattr(transport, "_tempDataLen", 0)
    return len(data) - offset + temp


def write(transport: Any, data: bytes) -> None:
    """
    Send ``data`` on ``transport`` now if its buffer is empty, else queue it.
    """
    try:
        idle = (
            not transport.dataBuffer
            and not transport._tempDataLen
            and transport.connected
            and not transport.disconnecting
        )
        sock = transport.socket
    except AttributeError:
        idle = False
    if idle:
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted notice and report the broken connection.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off: MTProto packets are small and latency-bound,
    and every write here is already one whole chunk.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        with contextlib.suppress(OSError):
            set_no_delay(True)


def tune_malloc() -> bool:
    """
    Keep glibc from mapping and trimming memory for every large chunk.

    Reads of 256 KiB make ``bytes`` objects above glibc's dynamic mmap
    threshold; each allocation then costs page faults. Raising the mmap
    threshold to 4 MiB and the trim threshold to 64 MiB removes that churn.
    Returns whether it applied (glibc only).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 4 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))
