"""
The RPC connections of one DC: kept between ``pool_min`` and ``pool_max``,
grown with load, re-established when lost; unreachable middle proxies are
skipped with an exponential backoff.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.connecting import connect_protocol
from mtproxy_tw.middle.connection import MEConnection
from mtproxy_tw.middle.settings import MiddleSettings
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.proxyconfig import Endpoint

if TYPE_CHECKING:
    from mtproxy_tw.middle.session import ClientSession
    from mtproxy_tw.middle.upstream import MiddleProxy

__all__ = ["Backoff", "DCPool"]

#: A ready connection lost within this many seconds counts as a flap.
_SHORT_LIVED = 5.0


class Backoff(NamedTuple):
    """
    An endpoint that failed: how many times in a row, and until when it is skipped.
    """

    failures: int
    until: float


def _no_jitter() -> float:
    # The delay is spread by a factor (see DCPool._back_off), not a sum.
    return 0.0


class DCPool:
    """
    The RPC connections of one DC (a cluster of the config).

    It keeps ``pool_min`` connections once used, opens another (up to
    ``pool_max``) when every ready one carries ``clients_per_connection``
    clients, and picks endpoints at random among those not backing off.
    """

    log = Logger()

    def __init__(self, upstream: MiddleProxy, dc: int) -> None:
        self.upstream = upstream
        self.dc = dc
        self.ready: list[MEConnection] = []
        #: Every open connection, ready or not.
        self.connections: set[MEConnection] = set()
        self.connecting = 0
        self.waiting: dict[ClientSession, None] = {}
        #: Endpoints that failed, with when they may be tried again.
        self.backoff: dict[Endpoint, Backoff] = {}
        #: Ready connections per endpoint lost soon after the handshake, in a row.
        self.flaps: dict[Endpoint, int] = {}
        self.down = False
        self.stopped = False
        self._retry: IDelayedCall | None = None
        self._attempts: set[Deferred[MEConnection]] = set()

    def __repr__(self) -> str:
        return f"<DCPool {self.dc}: {len(self.ready)} ready, {self.connecting} connecting>"

    @property
    def settings(self) -> MiddleSettings:
        return self.upstream.settings

    def endpoints(self) -> tuple[Endpoint, ...]:
        source = self.upstream.config
        first, second = (
            (source.config_v6, source.config_v4)
            if self.settings.prefer_ipv6
            else (source.config_v4, source.config_v6)
        )
        for config in (first, second):
            if self.dc in config.clusters:
                return config.lookup(self.dc)
        return first.lookup(self.dc) or second.lookup(self.dc)

    # -- sessions

    def acquire(self, session: ClientSession) -> None:
        conn = self._least_loaded()
        if conn is not None:
            session.bind(conn)
            self._maintain()
            return
        if self.down and not self.connecting:
            self._unavailable(session)
            return
        self.waiting[session] = None
        session.wait(self)
        self._maintain()

    def forget_waiting(self, session: ClientSession) -> None:
        self.waiting.pop(session, None)

    def _least_loaded(self) -> MEConnection | None:
        if not self.ready:
            return None
        return min(self.ready, key=lambda c: len(c.sessions))

    def _unavailable(self, session: ClientSession) -> None:
        if self.settings.direct_fallback:
            self.upstream.counters["direct-fallback"] += 1
            session.go_direct()
        else:
            self.upstream.counters["unavailable"] += 1
            session._fail("every middle proxy of its DC is unreachable", level="info")

    def session_left(self, conn: MEConnection) -> None:
        if self.stopped and not conn.sessions:
            conn.transport.loseConnection()

    # -- connections

    def _maintain(self) -> None:
        if self.stopped:
            return
        settings = self.settings
        want = settings.pool_min
        total = len(self.ready) + self.connecting
        if self.ready and self.connecting == 0:
            lightest = min(len(c.sessions) for c in self.ready)
            if lightest >= settings.clients_per_connection:
                want = max(want, total + 1)
        want = min(want, settings.pool_max)
        while total < want:
            if not self._connect_one():
                break
            total += 1

    def _connect_one(self) -> bool:
        endpoints = self.endpoints()
        now = self.upstream.reactor.seconds()
        candidates = [ep for ep in endpoints if self._until(ep) <= now]
        if not candidates:
            self._all_unreachable(endpoints, now)
            return False
        endpoint = self.upstream.random.choice(candidates)
        self.connecting += 1
        source = self.upstream.config
        # An untried proxy secret is tried by every new connection until one
        # handshake decides on it; the secret in use stays until then.
        secret = source.candidate if source.candidate is not None else source.secret
        host, port = endpoint
        attempt = connect_protocol(
            self.upstream.core.endpoint(Address(host, port)), MEConnection(self, endpoint, secret)
        )
        self._attempts.add(attempt)

        def connected(protocol: MEConnection) -> None:
            self._attempts.discard(attempt)

        def failed(failure: Failure) -> None:
            self._attempts.discard(attempt)
            if failure.check(CancelledError):
                self.connecting -= 1
                return
            self.upstream.core.stats.upstream_failures["middle-connect"] += 1
            self.connect_failed(endpoint, failure.getErrorMessage())

        attempt.addCallbacks(connected, failed)
        return True

    def _until(self, endpoint: Endpoint) -> float:
        backoff = self.backoff.get(endpoint)
        return backoff.until if backoff is not None else 0.0

    def _all_unreachable(self, endpoints: tuple[Endpoint, ...], now: float) -> None:
        if self._retry is None or not self._retry.active():
            delay = min((self._until(ep) for ep in endpoints), default=now + 60.0) - now
            self._retry = self.upstream.reactor.callLater(max(delay, 0.0), self._retry_now)
        if self.ready or self.connecting:
            return
        if not self.down:
            self.down = True
            if not endpoints:
                self.log.error("DC {dc}: the config lists no middle proxy for it", dc=self.dc)
            fallback = self.settings.direct_fallback
            log = self.log.error if fallback or self.settings.ad_tag else self.log.warn
            log(
                "DC {dc}: all {count} middle proxies are unreachable; {what}",
                dc=self.dc,
                count=len(endpoints),
                what=(
                    "FALLING BACK TO DIRECT MODE for its clients (no ad tag)"
                    if fallback
                    else "its clients are refused until one answers"
                ),
            )
        waiting, self.waiting = self.waiting, {}
        for session in waiting:
            session.pool = None
            self._unavailable(session)

    def _retry_now(self) -> None:
        self._retry = None
        self._maintain()

    def connect_failed(self, endpoint: Endpoint, reason: str, back_off: bool = True) -> None:
        """
        A connection to ``endpoint`` failed before it was ready: back off from it.

        Without ``back_off`` (it refused an untried proxy secret, not its
        fault) the next connection goes at once, with the secret in use.
        """
        self.connecting -= 1
        if not back_off:
            self.log.info(
                "middle proxy {host}:{port} of DC {dc} refused a new proxy secret ({reason}); "
                "connecting again with the one in use",
                host=endpoint[0],
                port=endpoint[1],
                dc=self.dc,
                reason=reason,
            )
            self._maintain()
            return
        delay = self._back_off(endpoint)
        self.log.info(
            "middle proxy {host}:{port} of DC {dc} failed ({reason}); next try in {delay:.1f} s",
            host=endpoint[0],
            port=endpoint[1],
            dc=self.dc,
            reason=reason,
            delay=delay,
        )
        self._maintain()

    def _back_off(self, endpoint: Endpoint) -> float:
        previous = self.backoff.get(endpoint)
        failures = previous.failures + 1 if previous is not None else 1
        settings = self.settings
        policy = backoffPolicy(
            settings.backoff_initial, settings.backoff_max, factor=2.0, jitter=_no_jitter
        )
        delay = policy(failures - 1) * self.upstream.random.uniform(0.8, 1.2)
        self.backoff[endpoint] = Backoff(failures, self.upstream.reactor.seconds() + delay)
        return float(delay)

    def connection_ready(self, conn: MEConnection) -> None:
        self.connecting -= 1
        self.backoff.pop(conn.endpoint, None)
        if self.stopped:
            conn.transport.loseConnection()
            return
        if self.down:
            self.down = False
            self.log.warn("DC {dc}: middle proxies reachable again", dc=self.dc)
        self.ready.append(conn)
        self.log.debug("DC {dc}: {conn} ready", dc=self.dc, conn=conn)
        waiting, self.waiting = self.waiting, {}
        for session in waiting:
            session.pool = None
            # Spread the waiting clients over the ready connections.
            target = self._least_loaded()
            assert target is not None
            session.bind(target)
        self._maintain()

    def connection_lost(self, conn: MEConnection, reason: Failure) -> None:
        if conn in self.ready:
            self.ready.remove(conn)
        if self.stopped:
            return
        lived = self.upstream.reactor.seconds() - (conn.ready_at or 0.0)
        if lived < _SHORT_LIVED:
            # A middle proxy that drops every connection at once must not
            # make us reconnect in a tight loop: back off after a few.
            flaps = self.flaps[conn.endpoint] = self.flaps.get(conn.endpoint, 0) + 1
            if flaps >= 3:
                self._back_off(conn.endpoint)
        else:
            self.flaps.pop(conn.endpoint, None)
        self.upstream.core.stats.upstream_failures["middle-lost"] += 1
        self.log.info(
            "DC {dc}: lost {host}:{port} ({reason}); reconnecting",
            dc=self.dc,
            host=conn.endpoint[0],
            port=conn.endpoint[1],
            reason=reason.getErrorMessage(),
        )
        self._maintain()

    def stop(self) -> None:
        """
        No new connections; close those without clients (the rest as they empty).
        """
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for attempt in list(self._attempts):
            attempt.cancel()
        for conn in list(self.connections):
            if not conn.ready:
                conn.abort()
            elif not conn.sessions:
                conn.transport.loseConnection()

    def abort(self) -> None:
        for conn in list(self.connections):
            conn.abort()
