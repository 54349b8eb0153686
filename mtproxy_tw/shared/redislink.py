"""
The connection of :mod:`~mtproxy_tw.shared.redis` to its server: every
command is answered, or refused with :class:`Unreachable`, within the
timeout; a connection that fails or stalls is dropped, and the next
:meth:`RedisLink.connect` sets up a fresh one. An outage is logged once when
it starts and once when it ends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.config.values import RedisURL
from mtproxy_tw.connecting import connect_protocol

__all__ = ["RedisLink", "Unreachable", "redis_endpoint"]

log = Logger()


class Unreachable(Exception):
    """
    Redis did not answer (in time); the caller answers from local state.
    """


def redis_endpoint(reactor: Any, url: RedisURL, timeout: float) -> IStreamClientEndpoint:
    """
    An endpoint toward the server of ``url``; an IP literal skips name
    resolution.
    """
    host, port = url.host, url.port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=max(1, round(timeout)))
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, host, port)
    return TCP6ClientEndpoint(reactor, host, port)


def _describe(error: object) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RedisLink:
    """
    :param connected: called once a connection is usable, before anything
        else is sent on it; its answer failing makes the attempt fail.
    """

    def __init__(
        self,
        reactor: Any,
        url: RedisURL,
        timeout: float,
        connected: Callable[[], Deferred[Any]],
    ) -> None:
        self._reactor = reactor
        self.url = url
        self._timeout = timeout
        self._connected = connected
        self._proto: Any = None
        #: commands may be sent
        self.up = False
        #: no new connection, no warning: the state is stopping
        self.stopped = False
        self._warned = False
        self._attempting = False
        self._attempted: list[Deferred[None]] = []

    def idle(self) -> bool:
        """
        Neither connected nor connecting.
        """
        return self._proto is None and not self._attempting

    def connect(self) -> Deferred[None]:
        """
        Fires once the attempt under way (or a new one) is over, whatever
        came of it.
        """
        done: Deferred[None] = Deferred()
        self._attempted.append(done)
        if not self._attempting:
            self._attempting = True
            ensureDeferred(self._connect()).addBoth(self._attempt_done)
        return done

    async def settle(self) -> None:
        """
        Wait for the attempt under way, if any.
        """
        if self._attempting:
            await self.connect()

    async def close(self) -> None:
        proto, self._proto, self.up = self._proto, None, False
        if proto is None or proto.transport is None:
            return
        closed = proto.whenDisconnected()
        closed.addTimeout(self._timeout, self._reactor)
        proto.transport.loseConnection()
        try:
            await closed
        except Exception:
            proto.transport.abortConnection()

    def _endpoint(self) -> IStreamClientEndpoint:
        return redis_endpoint(self._reactor, self.url, self._timeout)

    def _attempt_done(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("shared state {url}: connecting failed", result, url=str(self.url))
        self._attempting = False
        waiting, self._attempted = self._attempted, []
        for d in waiting:
            d.callback(None)

    async def _connect(self) -> None:
        import txredisapi  # imports the global reactor: not before it is chosen

        proto = txredisapi.RedisProtocol(convertNumbers=False)
        bound = self._timeout, self._reactor
        try:
            await connect_protocol(self._endpoint(), proto).addTimeout(*bound)
            if self.url.password is not None:
                await proto.auth(self.url.password).addTimeout(*bound)
            if self.url.db:
                await proto.select(self.url.db).addTimeout(*bound)
        except Exception as e:
            if proto.transport is not None:
                proto.transport.abortConnection()
            self._away(_describe(e))
            return
        if self.stopped:
            proto.transport.abortConnection()
            return
        proto.whenDisconnected().addCallback(self._disconnected)
        self._proto, self.up = proto, True
        try:
            await self._connected()
        except Unreachable:
            return
        if self._warned:
            self._warned = False
            log.info(
                "shared state {url} is back: this host's claims are counted again",
                url=str(self.url),
            )

    def _disconnected(self, proto: object) -> None:
        if proto is self._proto:
            self.drop("the connection was lost")

    def drop(self, why: str) -> None:
        proto, self._proto, self.up = self._proto, None, False
        if proto is not None and proto.transport is not None:
            proto.transport.abortConnection()
        self._away(why)

    def _away(self, why: str) -> None:
        if self._warned or self.stopped:
            return
        self._warned = True
        log.warn(
            "shared state {url} unreachable: {why}; using this host's own state until it is back",
            url=str(self.url),
            why=why,
        )

    def ask(self, command: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        The answer to ``command`` (a method of txredisapi's protocol), or
        :class:`Unreachable` within the timeout, after which the connection
        is dropped. An answer arriving later is ignored: the reconciliation
        of the next connection rewrites whatever it did.
        """
        answer: Deferred[Any] = Deferred()
        proto = self._proto
        if not self.up or proto is None:
            answer.errback(Unreachable("not connected"))
            return answer

        def fail(why: str) -> None:
            if proto is self._proto:
                self.drop(why)
            answer.errback(Unreachable(why))

        timer = self._reactor.callLater(self._timeout, fail, f"no answer in {self._timeout:g} s")

        def replied(result: object) -> None:
            if not timer.active():
                return
            timer.cancel()
            if isinstance(result, Failure):
                fail(_describe(result.value))
            else:
                answer.callback(result)

        try:
            raw = getattr(proto, command)(*args, **kwargs)
        except Exception as e:
            raw = Deferred()
            raw.errback(e)
        raw.addBoth(replied)
        return answer
