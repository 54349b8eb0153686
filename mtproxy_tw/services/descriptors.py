"""
File descriptors: how many the proxy needs, and what the log says when
they run out.
"""

from __future__ import annotations

import contextlib
import resource
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from zope.interface import implementer

from mtproxy_tw._twisted import ACCEPT_FAILED, EMFILE_CLOSED, EMFILE_NOISE, route_accept_log

__all__ = [
    "MIDDLE_POOL_DCS",
    "SPARE_DESCRIPTORS",
    "UNLIMITED_DESCRIPTORS",
    "AcceptFailures",
    "connections_allowed",
    "current_open_file_limit",
    "descriptors_needed",
    "limit_advice",
    "raise_open_file_limit",
]

#: Descriptors kept aside beyond the clients: listeners' spares, the
#: reactor's own (epoll, waker), stdio and log files, state files, DNS,
#: config downloads, Twisted's EMFILE reserve.
SPARE_DESCRIPTORS = 64

#: What an open-file limit of "unlimited" counts as for ``--max-connections
#: auto`` (what :func:`raise_open_file_limit`
#: raises such a soft limit to).
UNLIMITED_DESCRIPTORS = 1 << 20

#: DC ids a middle-proxy pool may be kept for: 1..5 and their media DCs.
MIDDLE_POOL_DCS = 10

#: Accept errors that mean the process or the system ran out of something;
#: ECONNABORTED (a client that gave up in the backlog) is not among them.
_RESOURCE_ERRORS = frozenset({"EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"})


def descriptors_needed(
    max_connections: int, *, middle: bool, pool_connections: int = 0, listeners: int = 1
) -> int:
    """
    Descriptors for ``max_connections`` clients at once.

    A direct client holds two (its own and the one to the DC, or the mask
    host); a middle-proxy client holds its own, its packets riding on the
    shared pool connections.
    """
    per_client = 1 if middle else 2
    pools = pool_connections if middle else 0
    return max_connections * per_client + pools + listeners + SPARE_DESCRIPTORS


def connections_allowed(
    limit: int, *, middle: bool, pool_connections: int = 0, listeners: int = 1
) -> tuple[int, str]:
    """
    The most clients an open-file limit of ``limit`` holds (at least one),
    and a line saying how: the inverse of :func:`descriptors_needed`.
    """
    shown = "unlimited" if limit < 0 else str(limit)
    if limit < 0:
        limit = UNLIMITED_DESCRIPTORS
    per_client = 1 if middle else 2
    reserved = descriptors_needed(
        0, middle=middle, pool_connections=pool_connections, listeners=listeners
    )
    allowed = max(1, (limit - reserved) // per_client)
    pools = f", {pool_connections} of them for the middle-proxy pools" if middle else ""
    why = (
        f"from the open-file limit {shown}: {per_client} "
        f"{'descriptor per middle-proxy' if middle else 'descriptors per direct'} client, "
        f"{reserved} reserved{pools}"
    )
    return allowed, why


def raise_open_file_limit() -> tuple[int, int]:
    """
    Raise the soft limit on open files to the hard limit; return both.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_DESCRIPTORS)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def current_open_file_limit() -> int:
    """
    The soft limit on open files now; ``-1`` for none.
    """
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def limit_advice(need: int) -> str:
    """
    How an operator raises the open-file limit.
    """
    return (
        f"raise it: LimitNOFILE={need} in the systemd unit's [Service] section, "
        f"or ulimit -n {need} in the shell that starts the proxy"
    )


@implementer(ILogObserver)
class AcceptFailures:
    """
    Stands between a listening port and the log: Twisted logs one info line
    for every connection it cannot accept when descriptors run out; this
    turns them into one warning at the first, then at most one a minute
    with the count since the last, while they go on.

    Put it between each ``tcp.Port`` and the log with :meth:`watch`;
    every other event is passed on to ``forward`` unchanged.

    :ivar refused: connections accepted and closed at once, unserved
        (Twisted's EMFILE recovery), since the last warning.
    :ivar errors: failed ``accept`` calls by errno name since the last
        warning; the client waits in the backlog for a later try.
    :ivar need: descriptors the configured load needs, for the advice.
    """

    log = Logger()
    interval = 60.0

    def __init__(
        self,
        clock: Any,
        need: Callable[[], int] | None = None,
        limit: Callable[[], int] = current_open_file_limit,
        forward: ILogObserver = globalLogPublisher,
    ) -> None:
        self.clock = clock
        self.need = need
        self.limit = limit
        self.forward = forward
        self.refused = 0
        self.errors: Counter[str] = Counter()
        self._next: IDelayedCall | None = None
        self._first = False

    def watch(self, port: object) -> bool:
        """
        Route ``port``'s log events through this; return whether it could
        (a TCP port: see :func:`mtproxy_tw._twisted.route_accept_log`).
        """
        return route_accept_log(port, self)

    def __call__(self, event: LogEvent) -> None:
        text = event.get("log_format")
        if text == EMFILE_CLOSED:
            self.refused += 1
        elif text == ACCEPT_FAILED and event.get("acceptError") in _RESOURCE_ERRORS:
            self.errors[str(event["acceptError"])] += 1
        elif text in EMFILE_NOISE:
            return  # the count says it
        else:
            self.forward(event)
            return
        if self._next is None:
            # The first warning waits for the rest of the burst it is part of.
            self._first = True
            self._next = self.clock.callLater(0, self._report)

    def _report(self) -> None:
        first, self._first, self._next = self._first, False, None
        if self._emit("" if first else f" in the last {self.interval:.0f} s", first):
            self._next = self.clock.callLater(self.interval, self._report)
        # Else a quiet minute ends the series: the next failure warns at once.

    def _hint(self) -> str:
        if "ENFILE" in self.errors:
            return "the system's open-file table is full (sysctl fs.file-max)"
        if not self.refused and "EMFILE" not in self.errors:
            return "the kernel is short of memory for sockets"
        limit = self.limit()
        need = self.need() if self.need is not None else None
        if limit < 0:
            return "the open file limit is reached"
        if need is not None and limit < need:
            return (
                f"the open file limit {limit} is below the {need} --max-connections needs; "
                + limit_advice(need)
            )
        return (
            f"the open file limit {limit} is reached; "
            + limit_advice(2 * limit)
            + ", or lower --max-connections"
        )

    def _emit(self, when: str, first: bool = False) -> bool:
        if not self.refused and not self.errors:
            return False
        what = []
        if self.refused:
            what.append(f"{self.refused} connections closed unserved")
        if self.errors:
            reasons = ", ".join(f"{name} {n}" for name, n in sorted(self.errors.items()))
            what.append(f"{sum(self.errors.values())} accepts failed ({reasons})")
        self.log.warn(
            "cannot accept clients{when}: {what}; {hint}{more}",
            when=when,
            what=", ".join(what),
            refused=self.refused,
            errors=dict(self.errors),
            hint=self._hint(),
            more="; more are counted and told once a minute" if first else "",
        )
        self.refused = 0
        self.errors.clear()
        return True

    def stop(self) -> None:
        """
        Warn about what is counted and not told yet; cancel the next warning.
        """
        if self._next is not None:
            if self._next.active():
                self._next.cancel()
            when = "" if self._first else " since the last warning"
            self._first, self._next = False, None
            self._emit(when)
