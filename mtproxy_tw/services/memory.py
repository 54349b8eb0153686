"""
Memory after load: freed memory handed back to the system once a burst is
over.

After a burst the process keeps its high-water mark: the buffers of the
closed connections are free inside the process but not given back. glibc
keeps freed chunks in its arenas, returning only a free top of the heap
larger than ``M_TRIM_THRESHOLD``, which
:func:`~mtproxy_tw._twisted.tune_malloc` raises to 64 MiB so that the
256 KiB reads of a busy proxy do not map and unmap memory all the time;
the freed 256 KiB read and write buffers sit below live objects, where no
threshold reaches. ``malloc_trim(0)`` gives back every free page of every
arena (``MADV_DONTNEED``), wherever it lies. It costs a walk over the free
lists, milliseconds on a big heap, so :class:`TrimPolicy` calls it only
when the load has fallen a long way since its peak and the process has
grown since the last trim: once after a burst, never tick after tick under
a steady load. Python's own allocator gives an arena of small objects back
by itself once it is empty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.logger import Logger

__all__ = ["INTERVAL", "TrimPolicy", "TrimService", "current_rss", "load_of", "malloc_trim"]

#: Seconds between looks at the load.
INTERVAL = 15.0

#: The load has fallen "a long way" at a quarter of its peak or below.
FALL = 4

#: Growth since the last trim, in bytes and as a share, worth a trim.
GROWTH_BYTES = 8 << 20
GROWTH_SHARE = 0.10

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_trim: Callable[[int], int] | None = None
_looked = False


def malloc_trim() -> bool | None:
    """
    Hand free memory back to the system (glibc's ``malloc_trim(0)``);
    return whether any was, or ``None`` without glibc.
    """
    global _trim, _looked
    if not _looked:
        _looked = True
        name = ctypes.util.find_library("c")
        try:
            function = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):
            function = None
        if function is not None:
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
        _trim = function
    if _trim is None:
        return None
    return bool(_trim(0))


def current_rss() -> int | None:
    """
    This process's resident set in bytes (Linux ``/proc``), else ``None``.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def load_of(core: Any) -> Callable[[], tuple[int, int]]:
    """
    The load of a :class:`~mtproxy_tw.proxy.core.ProxyCore`: its open client
    connections and the bytes its clients moved since start, both ways.
    """

    def load() -> tuple[int, int]:
        clients = list(core.clients)
        stats = core.stats
        moved = stats.bytes_from_clients + stats.bytes_to_clients
        moved += sum(c.bytes_in + c.bytes_out for c in clients)
        return len(clients), moved

    return load


class TrimPolicy:
    """
    Decides, at each look, whether the load fell far enough from its peak
    for freed memory to be worth handing back, and hands it back.

    The load is ``(connections, bytes moved since start)``; the rate is the
    bytes moved since the previous look. It has fallen when the rate is at
    most a quarter of the highest since the last trim, or the connections
    at most a quarter of theirs; a trim also needs the process to have
    grown by :data:`GROWTH_BYTES` and :data:`GROWTH_SHARE` since the last
    (when its size cannot be read, a fall alone does).

    :ivar trims: how many times it trimmed.
    :ivar last_cost: seconds the last trim took.
    """

    log = Logger()

    def __init__(
        self,
        load: Callable[[], tuple[int, int]],
        rss: Callable[[], int | None] = current_rss,
        trim: Callable[[], bool | None] = malloc_trim,
        timer: Callable[[], float] = time.perf_counter,
        collect: Callable[[], object] = gc.collect,
    ) -> None:
        self.load = load
        self.rss = rss
        self.trim = trim
        #: Frees the connections' reference cycles first: an idle process
        #: allocates too little for the collector to run by itself, and the
        #: memory of closed connections would stay taken until it does.
        self.collect = collect
        self.timer = timer
        self.trims = 0
        self.last_cost = 0.0
        self._moved: int | None = None
        self._peak_rate = 0
        self._peak_connections = 0
        self._base = rss()

    def check(self) -> bool:
        """
        Look at the load; trim if it fell; return whether it trimmed.
        """
        connections, moved = self.load()
        if self._moved is None:
            self._moved = moved
            return False
        rate, self._moved = moved - self._moved, moved
        self._peak_rate = max(self._peak_rate, rate)
        self._peak_connections = max(self._peak_connections, connections)
        fell = (self._peak_rate > 0 and rate * FALL <= self._peak_rate) or (
            self._peak_connections > 0 and connections * FALL <= self._peak_connections
        )
        if not fell:
            return False
        size = self.rss()
        if size is not None and self._base is not None:
            grown = size - self._base
            if grown < GROWTH_BYTES or grown < self._base * GROWTH_SHARE:
                return False
        started = self.timer()
        self.collect()
        if self.trim() is None:  # not glibc: nothing to hand back with
            self.load = lambda: (0, 0)
            return False
        self.last_cost = self.timer() - started
        self.trims += 1
        after = self.rss()
        self._base = after
        self._peak_rate, self._peak_connections = rate, connections
        if size is not None and after is not None:
            self.log.info(
                "the load fell: {freed:.0f} MB of memory handed back to the system "
                "({ms:.1f} ms), {rss:.0f} MB in use",
                freed=max(0, size - after) / 1e6,
                ms=self.last_cost * 1e3,
                rss=after / 1e6,
            )
        return True


class TrimService(TimerService):
    """
    Looks at the load every :data:`INTERVAL` seconds (:class:`TrimPolicy`).
    """

    def __init__(self, policy: TrimPolicy, clock: Any, interval: float = INTERVAL) -> None:
        super().__init__(interval, policy.check)
        self.policy = policy
        self.clock = clock
