"""
``--workers N``: this process opens the listeners and starts N worker
processes (its children: a supervisor and ``/proc`` see one tree), each a
whole proxy accepting on those listeners.

- A ``tcp:``/``tcp6:`` listener is N sockets bound with ``SO_REUSEPORT``,
  one per worker, so the kernel spreads new connections evenly; a
  ``systemd:`` listener is the one inherited socket, shared.
- The parent serves its shared state to every worker
  (:class:`~mtproxy_tw.shared.amp.StateServer`): the replay cache, the
  counted limits and the users' usage hold across them as in one process.
- SIGHUP is passed to every worker; stopping (SIGTERM) stops every worker,
  each draining its connections, and waits for them.
- A worker that dies is started again (with backoff, on the same
  sockets); the others and their clients are not touched.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw._twisted import systemd_descriptors
from mtproxy_tw.links import endpoint_address
from mtproxy_tw.services.proxy import ListenError
from mtproxy_tw.services.worker import (
    CHANNEL_FD,
    CLAIMS_FD,
    SOCKETS_ENV,
    WORKER_ENV,
    StopOnce,
)
from mtproxy_tw.shared.amp import Metrics, MiddleConfig, ProfilesChanged, StateServer, Stop
from mtproxy_tw.shared.base import SharedState
from mtproxy_tw.shared.channel import ClaimsServer

__all__ = ["WorkerPool", "open_listeners", "worker_command"]

#: A worker that ran this long before dying is restarted at once.
_HEALTHY = 30.0
#: Seconds a stopping worker gets beyond the drain timeout before SIGKILL.
_KILL_GRACE = 5.0
#: Seconds a worker has to answer a metrics scrape.
_SCRAPE_TIMEOUT = 2.0


def worker_command(plugin_args: Sequence[str], argv: Sequence[str] | None = None) -> list[str]:
    """
    How to start a worker: this interpreter running twist with the same
    twist options (log file, log level, reactor) and the same plugin options.
    """
    argv = list(sys.argv if argv is None else argv)
    plugin_args = list(plugin_args)
    twist_args: list[str] = []
    n = len(plugin_args)
    if (
        len(argv) > n
        and argv[len(argv) - n - 1] == "mtproxy"
        and argv[len(argv) - n :] == plugin_args
    ):
        twist_args = argv[1 : len(argv) - n - 1]
    return [sys.executable, "-m", "twisted", *twist_args, "mtproxy", *plugin_args]


def _reuseport_sockets(description: str, count: int) -> list[socket.socket]:
    inner = description.removeprefix("haproxy:")
    family = socket.AF_INET6 if inner.startswith("tcp6:") else socket.AF_INET
    host, port = endpoint_address(description)
    if port is None:
        raise ValueError("names no port")
    host = host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    fields = dict(part.split("=", 1) for part in inner.split(":")[1:] if "=" in part)
    backlog = int(fields.get("backlog", "50"))  # Twisted's default, as without --workers
    made: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            if port == 0:  # the others join the port the first one got
                port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


def _systemd_socket(description: str) -> socket.socket:
    fields = dict(part.split("=", 1) for part in description.split(":")[1:] if "=" in part)
    fds = systemd_descriptors()
    index = int(fields.get("index", "0"))
    if not 0 <= index < len(fds):
        raise ValueError(f"systemd passed {len(fds)} socket(s), no index {index}")
    # The socket's own family (a ListenStream=443 socket is IPv6 whatever
    # domain= says); systemd hands it over blocking.
    sock = socket.socket(fileno=os.dup(fds[index]))
    sock.setblocking(False)
    return sock


def open_listeners(
    listen: Sequence[str], named_by: Sequence[str], count: int
) -> list[list[socket.socket]]:
    """
    The listening sockets for ``count`` workers: per description, one
    socket per worker, or one shared by all.

    :raises ListenError: one line naming the listener and why.
    """
    opened: list[list[socket.socket]] = []
    try:
        for description, name in zip(listen, named_by, strict=True):
            inner = description.removeprefix("haproxy:")
            try:
                if inner.startswith(("tcp:", "tcp6:")) or inner in ("tcp", "tcp6"):
                    opened.append(_reuseport_sockets(description, count))
                elif inner.startswith("systemd:"):
                    opened.append([_systemd_socket(inner)])
                else:
                    raise ListenError(
                        f"{name}: --workers shares tcp:, tcp6: and systemd: listeners "
                        "only; run one process for this one"
                    )
            except (OSError, ValueError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise ListenError(f"{name}: cannot listen: {reason}") from None
    except BaseException:
        for sockets in opened:
            for sock in sockets:
                sock.close()
        raise
    return opened


class _WorkerProcess(ProcessProtocol):
    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self._ended = ended

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        self._ended(reason)


class _Slot:
    """
    One worker's place: what it was started with, and its current process.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.starts = 0
        self.failures = 0
        self.started_at = 0.0
        self.process: IProcessTransport | None = None
        self.channel: StateServer | None = None
        self.ended: Deferred[None] | None = None
        self.restart: IDelayedCall | None = None


class WorkerPool(MultiService):
    """
    :param command: the worker's command line (:func:`worker_command`).
    :param shared: the state served to the workers.
    :param drain_timeout: how long a stopping worker may drain.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        listen: Sequence[str],
        named_by: Sequence[str],
        command: Sequence[str],
        shared: SharedState,
        drain_timeout: float,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.count = count
        self.listen = list(listen)
        self.named_by = list(named_by)
        self.command = list(command)
        self.shared = shared
        self.drain_timeout = drain_timeout
        self.slots = [_Slot(i + 1) for i in range(count)]
        self.sockets: list[list[socket.socket]] | None = None
        #: The latest download of each kind of Telegram's config, for
        #: workers started after it.
        self.middle_bodies: dict[str, bytes] = {}
        self._stopping = False
        #: Called once every worker has ended at stop (the workers' last
        #: counts are in by then); a Deferred answered is waited for.
        self.after_stop: list[Callable[[], Deferred[None] | None]] = []
        self._previous_hup: Any = None
        self._stop_once: StopOnce | None = None
        self._backoff = backoffPolicy(initialDelay=0.5, maxDelay=30.0)

    # -- lifecycle

    def open(self) -> None:
        if self.sockets is None:
            self.sockets = open_listeners(self.listen, self.named_by, self.count)

    def privilegedStartService(self) -> None:
        self.open()  # a port below 1024 may need the privileges
        super().privilegedStartService()

    def startService(self) -> None:
        self.open()
        super().startService()
        if self._stop_once is None:
            self._stop_once = StopOnce(self.reactor)
        self._stopping = False
        for slot in self.slots:
            self._spawn(slot)
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)
        self.log.info(
            "{count} workers started, sharing {listeners} listener(s)",
            count=self.count,
            listeners=len(self.listen),
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        waiting = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
            if slot.process is None:
                continue
            slot.ended = Deferred()
            waiting.append(slot.ended)
            self._ask_to_stop(slot)
        kill = self.reactor.callLater(self.drain_timeout + _KILL_GRACE, self._kill_all)
        if waiting:
            self.log.info("stopping {count} workers", count=len(waiting))
        done: Deferred[Any] = DeferredList(waiting) if waiting else succeed(None)

        def stopped(_: object) -> Deferred[Any]:
            if kill.active():
                kill.cancel()
            for sockets in self.sockets or ():
                for sock in sockets:
                    sock.close()
            self.sockets = None
            after = [d for d in (hook() for hook in self.after_stop) if d is not None]
            return DeferredList(after, consumeErrors=True)

        return done.addCallback(stopped).addCallback(lambda _: None)

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                self.log.warn("worker {index} did not stop in time; killing it", index=slot.index)
                self._signal(slot, "KILL")

    def _ask_to_stop(self, slot: _Slot) -> None:
        """
        Over the channel (a worker that got SIGTERM too stops once), else
        with SIGTERM.
        """
        if slot.channel is None:
            self._signal(slot, "TERM")
            return
        try:
            slot.channel.callRemote(Stop)
        except Exception:
            self._signal(slot, "TERM")

    def _signal(self, slot: _Slot, name: str) -> None:
        if slot.process is None:
            return
        try:
            slot.process.signalProcess(name)
        except (OSError, Exception) as e:  # already gone: processEnded follows
            self.log.debug(
                "signal {name} to worker {index}: {e}", name=name, index=slot.index, e=e
            )

    # -- the workers

    def _spawn(self, slot: _Slot) -> None:
        assert self.sockets is not None
        slot.restart = None
        slot.starts += 1
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = StateServer(
            self.shared, f"{slot.index}.{slot.starts}:", lambda: self._channel_lost(slot, channel)
        )
        slot.channel = channel
        self.reactor.adoptStreamConnection(
            parent_end.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel)
        )
        parent_end.close()
        claims = ClaimsServer(self.shared, f"{slot.index}.{slot.starts}:")
        claims_parent, claims_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reactor.adoptStreamConnection(
            claims_parent.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: claims)
        )
        claims_parent.close()
        fds: dict[int, Any] = {
            0: "w",
            1: 1,
            2: 2,
            CHANNEL_FD: child_end.fileno(),
            CLAIMS_FD: claims_child.fileno(),
        }
        items = []
        first = max(CHANNEL_FD, CLAIMS_FD) + 1
        for j, sockets in enumerate(self.sockets):
            sock = sockets[(slot.index - 1) % len(sockets)]
            fds[first + j] = sock.fileno()
            items.append(f"{first + j}:{int(sock.family)}")
        env = dict(os.environ)
        env[WORKER_ENV] = str(slot.index)
        env[SOCKETS_ENV] = ",".join(items)
        slot.started_at = time.monotonic()
        try:
            slot.process = self.reactor.spawnProcess(
                _WorkerProcess(lambda reason: self._ended(slot, reason)),
                self.command[0],
                self.command,
                env=env,
                childFDs=fds,
            )
        finally:
            child_end.close()
            claims_child.close()
        for kind, body in self.middle_bodies.items():
            self._hand_down(channel, kind, body)

    def _channel_lost(self, slot: _Slot, channel: StateServer) -> None:
        if slot.channel is channel:
            slot.channel = None

    def _ended(self, slot: _Slot, reason: Failure) -> None:
        process, slot.process = slot.process, None
        pid = getattr(process, "pid", None)
        if self._stopping or not self.running:
            if slot.ended is not None:
                ended, slot.ended = slot.ended, None
                ended.callback(None)
            return
        lived = time.monotonic() - slot.started_at
        slot.failures = 0 if lived >= _HEALTHY else slot.failures + 1
        delay = self._backoff(slot.failures) if slot.failures else 0.0
        how = getattr(reason.value, "signal", None)
        what = f"was killed by signal {how}" if how else f"exited ({reason.getErrorMessage()})"
        self.log.warn(
            "worker {index} (pid {pid}) {what}; starting it again in {delay:.1f} s",
            index=slot.index,
            pid=pid,
            what=what,
            delay=delay,
        )
        slot.restart = self.reactor.callLater(delay, self._spawn, slot)

    def _on_hup(self, signum: int, frame: object) -> None:
        # Nothing but scheduling happens inside a signal handler.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Every worker re-reads its configuration (SIGHUP to each).
        """
        live = [slot for slot in self.slots if slot.process is not None]
        self.log.info("SIGHUP: reloading {count} workers", count=len(live))
        for slot in live:
            self._signal(slot, "HUP")

    def pids(self) -> list[int]:
        return [int(s.process.pid) for s in self.slots if s.process is not None and s.process.pid]

    # -- asking the workers

    def gather(self) -> Deferred[list[bytes]]:
        """
        Every worker's metrics, as Prometheus text (those that answer in time).
        """
        asks = []
        for slot in self.slots:
            if slot.channel is None:
                continue
            d: Deferred[Any] = slot.channel.callRemote(Metrics)
            d.addTimeout(_SCRAPE_TIMEOUT, self.reactor)
            asks.append(d.addCallback(lambda answer: answer["text"]))
        dl: Deferred[Any] = DeferredList(asks, consumeErrors=True)
        return dl.addCallback(lambda results: [text for ok, text in results if ok])

    def hand_down(self, kind: str, body: bytes) -> None:
        """
        A download of Telegram's config, for every worker (and those
        started later).
        """
        self.middle_bodies[kind] = body
        for slot in self.slots:
            if slot.channel is not None:
                self._hand_down(slot.channel, kind, body)

    def profiles_changed(self) -> None:
        """
        The fronted sites were measured again: every worker takes the answers.
        """
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.callRemote(ProfilesChanged)

    def _hand_down(self, channel: StateServer, kind: str, body: bytes) -> None:
        d = channel.callRemote(MiddleConfig, kind=kind, body=body)
        d.addErrback(lambda f: self.log.debug("handing down {kind}: {f}", kind=kind, f=f))
