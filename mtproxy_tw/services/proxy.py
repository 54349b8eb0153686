"""
The proxy as a Twisted service: listeners, shared state, orderly shutdown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import resource
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtproxy_tw._twisted import tune_malloc
from mtproxy_tw.fronting.prober import ProfileService
from mtproxy_tw.proxy.client import ClientFactory
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.settings import Settings

__all__ = ["ListenError", "ProxyService", "raise_open_file_limit"]


class ListenError(SystemExit):
    """
    A listener cannot be set up; ends the program with one line saying why.
    """


def raise_open_file_limit() -> tuple[int, int]:
    """
    Raise the soft limit on open files to the hard limit; return both.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class ProxyService(MultiService):
    """
    Listens on every endpoint and relays the clients that authenticate.

    Stopping it closes the listeners at once, then drains: handshakes and
    idle pairs are closed, busy pairs get up to ``drain_timeout`` seconds
    to finish before they are cut.
    """

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, listen: Sequence[str]) -> None:
        super().__init__()
        self.reactor = reactor
        self.listen = list(listen)
        self.core = ProxyCore(settings, reactor)
        self.factory = ClientFactory(self.core)
        self.listeners: list[StreamServerEndpointService] = []
        for description in listen:
            try:
                endpoint = serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise ListenError(f"--listen {description}: not a usable endpoint ({e})") from None
            listener = StreamServerEndpointService(endpoint, self.factory)
            listener._raiseSynchronously = True  # a port in use must fail the start
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.profiles = ProfileService(self.core)
        self.profiles.setServiceParent(self)
        self._stats_loop = LoopingCall(self.log_stats)
        self._stats_loop.clock = reactor

    def log_stats(self) -> None:
        """
        One line with the counters: connections, handshakes by outcome, bytes.
        """
        self.log.info("stats: {stats}", stats=self.core.stats.snapshot())

    @property
    def settings(self) -> Settings:
        return self.core.settings

    def listening(self) -> Deferred[list[IListeningPort]]:
        """
        Fires with the listening ports once every listener is up.
        """
        waiting = [listener._waitingForPort for listener in self.listeners]
        if any(d is None for d in waiting):
            raise RuntimeError("the service has not started")
        dl: Deferred[Any] = DeferredList(
            [d for d in waiting if d is not None], fireOnOneErrback=True, consumeErrors=True
        )
        return dl.addCallback(lambda results: [port for _, port in results])

    def reload(self, settings: Settings, revoked: Iterable[str] = ()) -> None:
        """
        Use ``settings`` for new connections; close those of ``revoked`` users.
        """
        core = self.core
        domains = core.settings.tls_domains
        core.settings = settings
        self.factory.core = core
        revoked = set(revoked)
        for client in list(core.clients):
            if client.user in revoked:
                client.transport.loseConnection()
        if settings.tls_domains != domains:
            self.profiles.refresh()

    def _check_mask_loop(self, ports: list[IListeningPort]) -> None:
        """
        Refuse a mask host that is this proxy's own listening address: each
        fronted connection would come back as a new bad client, forever.
        """
        settings = self.settings
        targets = {settings.mask_target(domain) for domain in settings.tls_domains}
        targets.add(settings.mask_target(None))
        for target in targets:
            if target is None:
                continue
            host = "127.0.0.1" if target.host == "localhost" else target.host
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                continue  # a name: each fronted connection is checked instead
            for port in ports:
                here = port.getHost()
                if getattr(here, "port", None) != target.port:
                    continue
                bound = ipaddress.ip_address(getattr(here, "host", "0.0.0.0"))
                if address == bound or (bound.is_unspecified and address.is_loopback):
                    self.log.error(
                        "--mask-host {target} is this proxy's own listening address; "
                        "failed handshakes will be closed instead of fronted",
                        target=str(target),
                    )
                    self.core.mask_disabled = True
                    return

    def _listen(self) -> None:
        """
        Start every listener now; a failure ends the start with one line.
        """
        for description, listener in zip(self.listen, self.listeners, strict=True):
            if listener._waitingForPort is not None:
                continue
            try:
                listener.privilegedStartService()
            except CannotListenError as e:
                reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e
                raise ListenError(f"--listen {description}: cannot listen: {reason}") from None

    def privilegedStartService(self) -> None:
        # Listen first: a port below 1024 may need the privileges.
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        soft, hard = raise_open_file_limit()
        self.log.info("open file limit: {soft} (hard {hard})", soft=soft, hard=hard)
        if not tune_malloc():
            self.log.info("malloc thresholds not tuned (not glibc)")
        self.core.draining = False
        super().startService()
        interval = self.settings.stats_interval
        if interval > 0 and not self._stats_loop.running:
            self._stats_loop.start(interval, now=False)
        if any(listener._waitingForPort is None for listener in self.listeners):
            return
        self.listening().addCallback(self._check_mask_loop).addCallback(
            lambda _: self.profiles.start_loop()
        ).addErrback(lambda f: self.log.failure("listening failed", f))

    def stopService(self) -> Deferred[None]:
        if self._stats_loop.running:
            self._stats_loop.stop()
            self.log_stats()
        stopped: Deferred[Any] = super().stopService() or succeed(None)
        return stopped.addCallback(lambda _: self._drain())

    def _drain(self) -> Deferred[None]:
        core = self.core
        core.draining = True
        done: Deferred[None] = Deferred()
        if not core.clients:
            done.callback(None)
            return done
        self.log.info("draining {count} connections", count=len(core.clients))
        deadline = self.reactor.seconds() + self.settings.drain_timeout
        seen: dict[object, int] = {}

        def sweep() -> None:
            if not core.clients:
                poll.stop()
                return
            if self.reactor.seconds() >= deadline:
                self.log.info("cutting {count} busy connections", count=len(core.clients))
                for client in list(core.clients):
                    client.transport.abortConnection()
                return
            for client in list(core.clients):
                before = seen.get(client)
                if before is None or not client.close_if_idle(before):
                    seen[client] = client.activity()

        poll = LoopingCall(sweep)
        poll.clock = self.reactor
        poll.start(0.25, now=True).addCallback(lambda _: done.callback(None))
        return done
