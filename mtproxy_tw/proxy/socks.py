"""
Reaching Telegram through SOCKS5 servers (``--upstream-proxy``).

:class:`Upstreams` takes the configured servers in turn, skipping one that
failed until its backoff is over, and says once per outage that a server
is down and once that it is back. :class:`SOCKS5Endpoint` is the
``IStreamClientEndpoint`` the legs connect with: it connects to a server,
runs the :class:`~mtproxy_tw.wire.socks5.Socks5Client` machine, then hands
the TCP connection itself to the leg's protocol (nothing relays in
between, so the relay's writes stay on the plain-TCP path of
:mod:`mtproxy_tw._twisted`). :func:`tunnel_addresses` gives, for such a
connection, the address the server connected from and the target's, which
is what the far end sees.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Sequence
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.wire.socks5 import Socks5Client, Socks5Error, Socks5Refused, UpstreamProxy

__all__ = ["SOCKS5Endpoint", "UpstreamError", "Upstreams", "plain_endpoint", "tunnel_addresses"]

#: The tunnelled connections: (the server's bound address, the target's).
_TUNNELS: weakref.WeakKeyDictionary[Any, tuple[IAddress, IAddress]] = weakref.WeakKeyDictionary()


class UpstreamError(Exception):
    """
    A SOCKS5 server could not be used, or could not reach the target.
    """


def _ip_address(host: str, port: int) -> IAddress:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return IPv4Address("TCP", "0.0.0.0", port)
    if ip.version == 6:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def tunnel_addresses(transport: Any) -> tuple[IAddress, IAddress] | None:
    """
    ``(host, peer)`` as the far end sees a connection made through a SOCKS5
    server: the address the server reported it connected from (BND.ADDR,
    BND.PORT) and the target; None for any other connection.
    """
    try:
        return _TUNNELS.get(transport)
    except TypeError:
        return None


def plain_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    A TCP endpoint toward ``host:port``; IP literals skip name resolution.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout)


class Upstreams:
    """
    The configured SOCKS5 servers, used in turn; a failed one is skipped
    until its backoff (``backoffPolicy``) is over.
    """

    log = Logger()

    def __init__(self, reactor: Any, proxies: Sequence[UpstreamProxy], timeout: float) -> None:
        if not proxies:
            raise ValueError("no upstream proxy")
        self.reactor = reactor
        self.proxies = tuple(proxies)
        self.timeout = timeout
        self.policy = backoffPolicy(initialDelay=1.0, maxDelay=60.0)
        #: Failed servers: failures in a row, and until when they are skipped.
        self.down: dict[UpstreamProxy, tuple[int, float]] = {}
        self._next = 0

    def pick(self) -> UpstreamProxy:
        """
        The next server not backing off; if all are, the one that is back soonest.
        """
        now = self.reactor.seconds()
        count = len(self.proxies)
        for i in range(count):
            proxy = self.proxies[(self._next + i) % count]
            if self.down.get(proxy, (0, 0.0))[1] <= now:
                self._next = (self._next + i + 1) % count
                return proxy
        return min(self.proxies, key=lambda p: self.down[p][1])

    def failed(self, proxy: UpstreamProxy, reason: str) -> None:
        failures = self.down.get(proxy, (0, 0.0))[0] + 1
        delay = self.policy(failures - 1)
        self.down[proxy] = (failures, self.reactor.seconds() + delay)
        if failures == 1:
            self.log.warn(
                "upstream proxy {proxy} is down ({reason}); skipped for {delay:.0f} s, "
                "then retried with backoff",
                proxy=proxy.label,
                reason=reason,
                delay=delay,
            )

    def succeeded(self, proxy: UpstreamProxy) -> None:
        if self.down.pop(proxy, None) is not None:
            self.log.info("upstream proxy {proxy} is back", proxy=proxy.label)

    def endpoint(self, host: str, port: int) -> SOCKS5Endpoint:
        return SOCKS5Endpoint(self, host, port)

    def describe(self) -> str:
        return ", ".join(p.label for p in self.proxies)


@implementer(IStreamClientEndpoint)
class SOCKS5Endpoint:
    """
    A connection to ``host:port`` through the next of ``upstreams``.
    """

    def __init__(self, upstreams: Upstreams, host: str, port: int) -> None:
        self.upstreams = upstreams
        self.host = host
        self.port = port

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        upstreams = self.upstreams
        proxy = upstreams.pick()
        negotiation = _Negotiation(self, proxy, factory)
        done: Deferred[IProtocol] = Deferred(lambda _: negotiation.cancel())
        negotiation.done = done
        server = plain_endpoint(upstreams.reactor, proxy.host, proxy.port, upstreams.timeout)
        negotiation.connecting = server.connect(_Once(negotiation))
        negotiation.connecting.addErrback(negotiation.unreachable)

        def timed_out(result: Any, timeout: float) -> Any:
            reason = f"no SOCKS5 answer in {timeout:g} s"
            upstreams.failed(proxy, reason)
            raise UpstreamError(f"upstream proxy {proxy.label}: {reason}")

        return done.addTimeout(upstreams.timeout, upstreams.reactor, onTimeoutCancel=timed_out)


class _Once(Factory):
    """
    Builds the one negotiation it was made with.
    """

    def __init__(self, negotiation: _Negotiation) -> None:
        self.negotiation = negotiation

    def buildProtocol(self, addr: IAddress | None) -> _Negotiation:
        return self.negotiation


class _Negotiation(Protocol):
    """
    The SOCKS5 exchange on a new connection to the server; then, where the
    connection cannot be handed over, a pass-through to the leg's protocol.
    """

    transport: Any

    def __init__(self, endpoint: SOCKS5Endpoint, proxy: UpstreamProxy, factory: Any) -> None:
        self.endpoint = endpoint
        self.proxy = proxy
        self.factory = factory
        self.machine = Socks5Client(endpoint.host, endpoint.port, proxy)
        self.done: Deferred[IProtocol] | None = None
        self.connecting: Deferred[Any] | None = None
        self.inner: IProtocol | None = None
        self.finished = False

    def cancel(self) -> None:
        self.finished = True
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.transport is not None:
            self.transport.abortConnection()

    def unreachable(self, failure: Failure) -> None:
        self.connecting = None
        if not self.finished:
            self._fail(failure.getErrorMessage() or repr(failure.value), proxy_down=True)

    def connectionMade(self) -> None:
        self.connecting = None
        if self.finished:
            self.transport.abortConnection()
            return
        self.transport.write(self.machine.start())

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.finished:
            return
        try:
            out = self.machine.receive(data)
        except Socks5Refused as e:
            # The server works; the target could not be reached.
            self._fail(f"{self.endpoint.host}:{self.endpoint.port}: {e}", proxy_down=False)
            return
        except Socks5Error as e:
            self._fail(str(e), proxy_down=True)
            return
        if out:
            self.transport.write(out)
        bound = self.machine.bound
        if bound is not None:
            self._connected(bound.host, bound.port, bound.rest)

    def _connected(self, host: str, port: int, rest: bytes) -> None:
        self.finished = True
        endpoint = self.endpoint
        peer = _ip_address(endpoint.host, endpoint.port)
        inner = self.factory.buildProtocol(peer)
        if inner is None:
            self.transport.abortConnection()
            self._settle(Failure(UpstreamError("the connection was refused locally")))
            return
        self.endpoint.upstreams.succeeded(self.proxy)
        _TUNNELS[self.transport] = (_ip_address(host, port), peer)
        if not _twisted.hand_over(self.transport, inner):
            self.inner = inner
        inner.makeConnection(self.transport)
        self._settle(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
            return
        if not self.finished:
            stage = self.machine.stage
            hint = " (wrong username or password?)" if stage == "auth" else ""
            self._fail(f"closed the connection in the SOCKS5 {stage} stage{hint}", True)

    def _fail(self, reason: str, proxy_down: bool) -> None:
        self.finished = True
        if self.transport is not None:
            self.transport.abortConnection()
        if proxy_down:
            self.endpoint.upstreams.failed(self.proxy, reason)
        self._settle(Failure(UpstreamError(f"upstream proxy {self.proxy.label}: {reason}")))

    def _settle(self, result: Any) -> None:
        done, self.done = self.done, None
        if done is None or done.called:
            return
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)
