"""
The proxy as a Twisted service: listeners, shared state, orderly shutdown.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import resource
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtproxy_tw._twisted import tune_malloc
from mtproxy_tw.fronting.prober import ProfileService
from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.services.descriptors import (
    AcceptFailures,
    connections_allowed,
    current_open_file_limit,
    descriptors_needed,
    limit_advice,
    raise_open_file_limit,
)
from mtproxy_tw.services.listener import Listener
from mtproxy_tw.services.memory import TrimPolicy, TrimService, load_of
from mtproxy_tw.services.replaystore import REPLAY_FILE, ReplayStore
from mtproxy_tw.settings import Settings

__all__ = ["ListenError", "Listener", "ProxyService", "raise_open_file_limit"]


class ClientFactory(Factory):
    """
    Builds a :class:`ClientProtocol` for every accepted connection, with the
    core current at the time (a reload swaps it; connections keep theirs).
    """

    noisy = False

    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        return ClientProtocol(self.core)


class ListenError(SystemExit):
    """
    A listener cannot be set up; ends the program with one line saying why.
    """


class ProxyService(MultiService):
    """
    Listens on every endpoint and relays the clients that authenticate.

    Stopping it closes the listeners at once, then drains: handshakes and
    idle pairs are closed, busy pairs get up to ``drain_timeout`` seconds
    to finish before they are cut.

    :param named_by: how the operator asked for each of ``listen``, for
        the errors: ``"--port 80"``; by default ``"--listen DESCRIPTION"``.
    :ivar open_file_limit: raises the open-file limit and returns
        ``(soft, hard)``; replaceable for tests.
    :ivar pool_descriptors: descriptors the middle-proxy pools may hold.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        listen: Sequence[str],
        named_by: Sequence[str] | None = None,
        *,
        endpoints: Sequence[IStreamServerEndpoint] | None = None,
        keep_replay: bool = True,
        measure_sites: bool = True,
    ) -> None:
        """
        :param endpoints: what to listen on instead of parsing ``listen``
            (a worker's sockets, handed down by its parent).
        :param keep_replay: keep the replay cache in the state directory
            (a worker's parent keeps it instead).
        :param measure_sites: measure the fronted sites' TLS answers (a
            worker's parent measures them instead).
        """
        super().__init__()
        self.reactor = reactor
        self.listen = list(listen)
        self.named_by = (
            list(named_by) if named_by is not None else [f"--listen {d}" for d in self.listen]
        )
        if len(self.named_by) != len(self.listen):
            raise ValueError("named_by must name every listen description")
        self.open_file_limit: Callable[[], tuple[int, int]] = raise_open_file_limit
        self.pool_descriptors = 0
        #: The soft open-file limit found at start.
        self.soft_limit: int | None = None
        #: What ``--max-connections auto`` came to at start.
        self.auto_connections: int | None = None
        #: What this process's own lines start with: ``"worker 2: "`` in a
        #: worker, whose stats and limits are its own, not the proxy's.
        self.label = ""
        self.accept_failures = AcceptFailures(
            reactor, need=self.descriptors_needed, limit=self._soft_limit
        )
        self.core = ProxyCore(settings, reactor)
        self.factory = ClientFactory(self.core)
        self.listeners: list[Listener] = []
        for i, (description, name) in enumerate(zip(self.listen, self.named_by, strict=True)):
            try:
                endpoint = (
                    endpoints[i]
                    if endpoints is not None
                    else serverFromString(reactor, description)
                )
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise ListenError(f"{name}: not a usable endpoint ({e})") from None
            listener = Listener(endpoint, self.factory, settings.mss_clamp)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.profiles = ProfileService(
            self.core, state_dir=settings.state_dir, measuring=measure_sites
        )
        self.profiles.setServiceParent(self)
        #: Logs :meth:`log_stats` every ``stats_interval`` seconds (and
        #: once at start); ``None`` when the interval is 0.
        self.stats_timer: TimerService | None = None
        if settings.stats_interval > 0:
            self.stats_timer = TimerService(settings.stats_interval, self.log_stats)
            self.stats_timer.clock = reactor
            self.stats_timer.setServiceParent(self)
        #: Hands freed memory back to the system once a burst is over.
        self.trimmer = TrimService(TrimPolicy(load_of(self.core)), reactor)
        self.trimmer.setServiceParent(self)
        #: Keeps the replay cache in the state directory across restarts.
        self.replay_store: ReplayStore | None = None
        if settings.state_dir is not None and keep_replay:
            path = settings.state_dir / REPLAY_FILE
            self.replay_store = ReplayStore(lambda: self.core.replay, path, reactor)
            self.replay_store.setServiceParent(self)

    def log_stats(self) -> None:
        """
        One line with the counters: connections, handshakes by outcome, bytes.
        """
        self.log.info("{label}stats: {stats}", label=self.label, stats=self.core.stats.snapshot())

    @property
    def settings(self) -> Settings:
        return self.core.settings

    def descriptors_needed(self) -> int:
        """
        Open files ``--max-connections`` clients need at once.
        """
        return descriptors_needed(
            self.settings.connection_cap,
            middle=self.core.middle is not None,
            pool_connections=self.pool_descriptors,
            listeners=len(self.listeners),
        )

    def _resolved(self, settings: Settings) -> Settings:
        """
        ``settings`` with ``--max-connections auto`` worked out at start.
        """
        if settings.max_connections is None and self.auto_connections is not None:
            return dataclasses.replace(settings, max_connections=self.auto_connections)
        return settings

    def _check_open_file_limit(self) -> None:
        """
        Raise the open-file limit; work ``--max-connections auto`` out from
        it, or warn when it stays below what the configured number needs.
        """
        soft, hard = self.open_file_limit()
        self.soft_limit = soft
        if self.settings.max_connections is None:
            allowed, why = connections_allowed(
                soft,
                middle=self.core.middle is not None,
                pool_connections=self.pool_descriptors,
                listeners=len(self.listeners),
            )
            self.auto_connections = allowed
            self.core.settings = self._resolved(self.settings)
            self.log.info(
                "{label}--max-connections {max_connections} ({why})",
                label=self.label,
                max_connections=allowed,
                why=why,
            )
            if soft != resource.RLIM_INFINITY and soft < self.descriptors_needed():
                self.log.warn(
                    "open file limit {soft} (hard {hard}) leaves no room for clients beyond "
                    "the reserved descriptors; {advice}",
                    soft=soft,
                    hard=hard,
                    advice=limit_advice(2 * self.descriptors_needed()),
                )
            return
        need = self.descriptors_needed()
        if soft == resource.RLIM_INFINITY or soft >= need:
            self.log.info("open file limit: {soft} (hard {hard})", soft=soft, hard=hard)
            return
        per_client = 1 if self.core.middle is not None else 2
        fits = max(0, (soft - (need - per_client * self.settings.connection_cap)) // per_client)
        self.log.warn(
            "open file limit {soft} (hard {hard}) is below the {need} descriptors "
            "--max-connections {max_connections} needs ({per_client} per client and "
            "{spare} more), room for about {fits} clients; {advice}, "
            "or lower --max-connections",
            soft=soft,
            hard=hard,
            need=need,
            max_connections=self.settings.max_connections,
            per_client=per_client,
            spare=need - per_client * self.settings.connection_cap,
            fits=fits,
            advice=limit_advice(need),
        )

    def _soft_limit(self) -> int:
        return current_open_file_limit() if self.soft_limit is None else self.soft_limit

    def _watch_accepts(self, port: IListeningPort) -> IListeningPort:
        self.accept_failures.watch(port)
        return port

    def listening(self) -> Deferred[list[IListeningPort]]:
        """
        Fires with the listening ports once every listener is up.
        """
        waiting = [listener.port for listener in self.listeners]
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
        core.settings = settings = self._resolved(settings)
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
        for name, listener in zip(self.named_by, self.listeners, strict=True):
            if listener.port is not None:
                continue
            try:
                listener.listen()
            except CannotListenError as e:
                error = e.socketError
                reason = error.strerror if isinstance(error, OSError) else e
                hint = ""
                low = isinstance(e.port, int) and 0 < e.port < 1024
                if low and isinstance(error, OSError) and error.errno == errno.EACCES:
                    hint = (
                        " (a port below 1024 needs root or CAP_NET_BIND_SERVICE, e.g. "
                        "AmbientCapabilities=CAP_NET_BIND_SERVICE in the systemd unit)"
                    )
                raise ListenError(f"{name}: cannot listen: {reason}{hint}") from None
            if listener.port is not None:
                listener.port.addCallback(self._watch_accepts)

    def privilegedStartService(self) -> None:
        # Listen first, with the privileges a port below 1024 may need; the
        # listeners then see they are listening and do not listen again.
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        self._check_open_file_limit()
        if not tune_malloc():
            self.log.info("malloc thresholds not tuned (not glibc)")
        self.core.draining = False
        super().startService()
        self.listening().addCallback(self._check_mask_loop).addCallback(
            lambda _: self.profiles.start_loop()
        ).addErrback(lambda f: self.log.failure("listening failed", f))

    def stopService(self) -> Deferred[None]:
        if self.stats_timer is not None and self.stats_timer.running:
            self.log_stats()  # the last counts; the timer stops with the others
        self.accept_failures.stop()
        stopped: Deferred[Any] = super().stopService() or succeed(None)
        drained = stopped.addCallback(lambda _: self._drain())
        store = self.replay_store
        if store is not None:  # again, with the handshakes that ended while draining
            drained.addCallback(lambda _: store.save())
        return drained

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
