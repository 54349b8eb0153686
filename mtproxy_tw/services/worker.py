"""
A worker process's side of ``--workers``: what its parent handed down.

The parent starts each worker as ``python -m twisted [its twist options]
mtproxy [its options]`` with :data:`WORKER_ENV` set to ``INDEX`` and
:data:`SOCKETS_ENV` to the descriptors it passed: the channels to the parent
(descriptors 3 and 4) and one listening socket per ``--listen``, as
``FD:FAMILY`` items.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer

from mtproxy_tw.shared.amp import RemoteState
from mtproxy_tw.shared.channel import ClaimsClient

__all__ = [
    "CHANNEL_FD",
    "CLAIMS_FD",
    "SOCKETS_ENV",
    "WORKER_ENV",
    "AdoptedEndpoint",
    "StopOnce",
    "WorkerChannel",
    "WorkerSpec",
    "worker_endpoints",
]

WORKER_ENV = "MTPROXY_TW_WORKER"
SOCKETS_ENV = "MTPROXY_TW_WORKER_SOCKETS"
#: The worker's end of its channel to the parent (AMP).
CHANNEL_FD = 3
#: The worker's end of its claims channel to the parent.
CLAIMS_FD = 4


@dataclass(frozen=True)
class WorkerSpec:
    """
    :ivar index: the worker's number, from 1.
    :ivar sockets: ``(descriptor, address family)`` of each listener, in
        ``--listen`` order.
    """

    index: int
    sockets: tuple[tuple[int, int], ...]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> WorkerSpec | None:
        """
        The spec this process was started with, or ``None`` (not a worker).

        :raises ValueError: the variables are set but not as a parent sets them.
        """
        env = os.environ if environ is None else environ
        index = env.get(WORKER_ENV)
        if index is None:
            return None
        sockets = []
        for item in filter(None, env.get(SOCKETS_ENV, "").split(",")):
            fd, _, family = item.partition(":")
            sockets.append((int(fd), int(family)))
        return cls(int(index), tuple(sockets))


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    Listens on a socket that is already listening (one the parent opened).
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        os.set_blocking(self.fd, False)  # the reactor's accept must not wait
        port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        os.close(self.fd)  # adopting made a copy
        return succeed(port)


def worker_endpoints(
    reactor: Any, spec: WorkerSpec, listen: list[str]
) -> list[IStreamServerEndpoint]:
    """
    An endpoint for each of ``listen`` on the socket the parent handed down
    for it (behind the PROXY-protocol wrapper where the description has one).
    """
    if len(spec.sockets) != len(listen):
        raise ValueError("the parent handed down a socket per --listen")
    endpoints: list[IStreamServerEndpoint] = []
    for (fd, family), description in zip(spec.sockets, listen, strict=True):
        endpoint: IStreamServerEndpoint = AdoptedEndpoint(reactor, fd, family)
        if description.startswith("haproxy:"):
            endpoint = proxyEndpoint(endpoint)
        endpoints.append(endpoint)
    return endpoints


class StopOnce:
    """
    SIGTERM and SIGINT stop the reactor once, however many arrive: systemd
    and timeout(1) signal the whole process group while the parent asks its
    workers too, and a second ``reactor.stop()`` is Twisted's "reactor not
    running" traceback. Installed once the reactor runs (it installs its own
    handlers then, after the services have started).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)
        reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for name in ("SIGTERM", "SIGINT"):
            number = getattr(signal, name, None)
            if number is not None:
                signal.signal(number, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Nothing but scheduling happens inside a signal handler.
        self.reactor.callFromThread(self.stop)

    def _shutting_down(self) -> None:
        self.stopping = True

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()


class WorkerChannel(Service):
    """
    Connects the worker's :class:`RemoteState` to its parent at start; when
    the parent's end closes (the parent is gone), the worker stops: it
    drains like on SIGTERM.
    """

    log = Logger()

    def __init__(self, reactor: Any, remote: RemoteState, index: int) -> None:
        self.reactor = reactor
        self.remote = remote
        self.index = index
        remote.on_lost = self._parent_lost
        remote.on_stop = self._stop
        self.claims = ClaimsClient()
        self.claims.on_lost = self._parent_lost
        self._stop_once: StopOnce | None = None

    def _parent_lost(self) -> None:
        if self.running and not (self._stop_once and self._stop_once.stopping):
            self.log.info("worker {index}: the parent is gone; stopping", index=self.index)
            self._stop()

    def _stop(self) -> None:
        if self._stop_once is not None:
            self._stop_once.stop()

    def startService(self) -> None:
        super().startService()
        self._stop_once = StopOnce(self.reactor)
        self.reactor.adoptStreamConnection(
            CHANNEL_FD, socket.AF_UNIX, Factory.forProtocol(lambda: self.remote)
        )
        os.close(CHANNEL_FD)
        self.reactor.adoptStreamConnection(
            CLAIMS_FD, socket.AF_UNIX, Factory.forProtocol(lambda: self.claims)
        )
        os.close(CLAIMS_FD)
        self.remote.claims = self.claims
        self.log.info("worker {index} started (pid {pid})", index=self.index, pid=os.getpid())

    def stopService(self) -> None:
        super().stopService()
