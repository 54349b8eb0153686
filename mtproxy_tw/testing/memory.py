"""
The proxy, its clients and the test doubles, connected in memory.

No sockets and no real time: every connection is a pair of
:class:`MemoryTransport` (an ``iosim.FakeTransport`` with TCP's flow
control) moved by a :class:`MemoryPump` (an ``iosim.IOPump``), all on one
``MemoryReactorClock``. A :class:`MemoryNetwork` holds the pairs and
completes the connections the code under test starts with
``reactor.connectTCP`` (every client endpoint ends there);
:class:`MemoryProxy` puts a :class:`~mtproxy_tw.proxy.core.ProxyCore` on one
and accepts clients into :class:`~mtproxy_tw.proxy.client.ClientProtocol`::

    proxy = MemoryProxy(Settings(secrets=(secret,)))
    dc = FakeDC(proxy.reactor)
    proxy.serve_dc(2, dc)               # connections to DC 2 reach the fake
    client = proxy.connect_client(secret, dc=2)
    answer = client.request(b"ping")    # a Deferred
    proxy.flush()                       # move bytes until nothing moves
    assert self.successResultOf(answer) == b"ping"

What a transport does, as ``twisted.internet.abstract.FileDescriptor``
does: written bytes wait in its buffer until the pump moves them, at most
:attr:`~MemoryTransport.bufferSize` bytes per ``dataReceived``; a streaming
producer registered on it is paused by every write that leaves more than
``bufferSize`` bytes waiting, and resumed once all have left;
``pauseProducing`` stops reading, so bytes for it wait with its peer (whose
producer is then paused in turn); ``loseConnection`` closes once the buffer
is empty, ``abortConnection`` at once; ``loseWriteConnection`` is a
half-close. Unlike TCP there is no kernel buffer, and
:func:`mtproxy_tw.testing.buffered_bytes` does not see these buffers (use
:meth:`MemoryTransport.buffered`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing._iosim import MemoryPump, MemoryTransport
from mtproxy_tw.testing.clients import ObfuscatedClient, make_client
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import InitiatorStreams
from mtproxy_tw.wire.secrets import Secret

__all__ = ["MemoryConnection", "MemoryNetwork", "MemoryProxy", "MemoryPump", "MemoryTransport"]

#: Where a :class:`MemoryNetwork`'s clock starts: a plausible present, so
#: timestamps (fake-TLS, MTProto message ids) look like real ones.
START = 1_700_000_000.0


class _Server(Protocol):
    """
    What :meth:`MemoryNetwork.serve` takes: a factory, or a callable
    building the server protocol from the client's address.
    """

    def __call__(self, address: IAddress) -> IProtocol: ...


def _address(host: str, port: int) -> IAddress:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


@dataclass
class MemoryConnection:
    """
    One connection: the protocols at both ends, their transports, its pump.

    ``client`` is the side that connected, ``server`` the side that
    accepted (for a client of the proxy, the
    :class:`~mtproxy_tw.proxy.client.ClientProtocol`).
    """

    client: Any
    server: Any
    client_transport: MemoryTransport
    server_transport: MemoryTransport
    pump: MemoryPump

    @property
    def closed(self) -> bool:
        return bool(self.client_transport.disconnected and self.server_transport.disconnected)


class MemoryNetwork:
    """
    Connections in memory on one clock, and the outbound attempts made on it.

    :ivar clock: the ``MemoryReactorClock`` to hand the code under test as
        its reactor (``connectTCP`` records an attempt, ``callLater`` waits
        for :meth:`advance`).
    :ivar connections: the connections not closed yet.
    """

    def __init__(self, clock: MemoryReactorClock | None = None) -> None:
        if clock is None:
            clock = MemoryReactorClock()
            clock.advance(START)
        self.clock = clock
        self.connections: list[MemoryConnection] = []
        self._routes: dict[tuple[str, int], IProtocolFactory | _Server] = {}
        self._ports = itertools.count(40000)

    def connect(
        self,
        server: IProtocol,
        client: IProtocol,
        server_address: IAddress | None = None,
        client_address: IAddress | None = None,
    ) -> MemoryConnection:
        """
        Connect two protocols: ``server.makeConnection`` first, as a
        listening port does, then ``client.makeConnection``.
        """
        if server_address is None:
            server_address = IPv4Address("TCP", "127.0.0.1", 443)
        if client_address is None:
            client_address = IPv4Address("TCP", "127.0.0.1", next(self._ports))
        client_io = MemoryTransport(client, False, client_address, server_address)
        server_io = MemoryTransport(server, True, server_address, client_address)
        client_io.peer, server_io.peer = server_io, client_io
        pump = MemoryPump(client, server, client_io, server_io, False, clock=self.clock)
        connection = MemoryConnection(client, server, client_io, server_io, pump)
        self.connections.append(connection)
        server.makeConnection(server_io)
        client.makeConnection(client_io)
        return connection

    # -- outbound attempts

    def serve(self, host: str, port: int, server: IProtocolFactory | _Server) -> None:
        """
        Complete every attempt to connect to ``host:port``, now and later,
        with a protocol from ``server`` (a factory, or a callable taking the
        client's address).
        """
        self._routes[(host, port)] = server

    def pending(self) -> list[tuple[str, int]]:
        """
        ``(host, port)`` of every attempt waiting to be completed or refused.
        """
        self._drop_stopped()
        return [(host, port) for host, port, *_ in self.clock.tcpClients]

    def complete(
        self, index: int = 0, server: IProtocol | IProtocolFactory | None = None
    ) -> MemoryConnection:
        """
        Complete attempt number ``index`` of :meth:`pending`, with
        ``server`` (a protocol or a factory), else the :meth:`serve` route.
        """
        self._drop_stopped()
        host, port, factory, _, _ = self.clock.tcpClients.pop(index)
        self.clock.connectors.pop(index)
        here = IPv4Address("TCP", "127.0.0.1", next(self._ports))
        there = _address(host, port)
        chosen: Any = server
        if chosen is None:
            try:
                chosen = self._routes[(host, port)]
            except KeyError:
                raise LookupError(f"nothing serves {host}:{port}") from None
        protocol: IProtocol | None
        if IProtocolFactory.providedBy(chosen):
            protocol = chosen.buildProtocol(here)
        elif IProtocol.providedBy(chosen):
            protocol = chosen
        else:
            protocol = chosen(here)
        client = factory.buildProtocol(there)
        if protocol is None or client is None:
            raise RuntimeError(f"a factory for {host}:{port} built no protocol")
        return self.connect(protocol, client, there, here)

    def refuse(self, index: int = 0, reason: BaseException | None = None) -> None:
        """
        Fail attempt number ``index`` (``ConnectionRefusedError`` by default).
        """
        self._drop_stopped()
        _, _, factory, _, _ = self.clock.tcpClients.pop(index)
        connector = self.clock.connectors.pop(index)
        factory.clientConnectionFailed(connector, Failure(reason or ConnectionRefusedError()))

    def _drop_stopped(self) -> None:
        clock = self.clock
        for i in reversed(range(len(clock.connectors))):
            if clock.connectors[i].stoppedConnecting:
                del clock.connectors[i], clock.tcpClients[i]

    def _complete_routed(self) -> bool:
        self._drop_stopped()
        for i, (host, port, *_) in enumerate(self.clock.tcpClients):
            if (host, port) in self._routes:
                self.complete(i)
                return True
        return False

    # -- time

    def flush(self, limit: int = 100_000) -> bool:
        """
        Complete routed attempts, run what is due now and move bytes, until
        nothing moves; returns whether anything did.
        """
        moved = False
        for _ in range(limit):
            self.clock.advance(0)
            step = self._complete_routed()
            for connection in list(self.connections):
                step = connection.pump.pump(advanceClock=False) or step
            self.connections = [c for c in self.connections if not c.closed]
            if not step:
                return moved
            moved = True
        raise AssertionError(f"the network did not settle in {limit} steps")

    def advance(self, seconds: float) -> bool:
        """
        Let ``seconds`` pass on the clock, then :meth:`flush`.
        """
        self.clock.advance(seconds)
        return self.flush()


class MemoryProxy(MemoryNetwork):
    """
    A :class:`~mtproxy_tw.proxy.core.ProxyCore` with ``settings`` on a
    :class:`MemoryNetwork`: :meth:`accept` connects a client protocol to a
    fresh :class:`~mtproxy_tw.proxy.client.ClientProtocol`, and the
    connections the proxy makes (to DCs, to the mask host) are completed by
    :meth:`serve` routes or by hand.

    :ivar reactor: the clock, which is the core's reactor.
    :ivar core: the core; a test may set ``core.middle`` or replace
        ``core.settings``.
    """

    def __init__(
        self,
        settings: Settings,
        clock: MemoryReactorClock | None = None,
        address: IAddress | None = None,
    ) -> None:
        super().__init__(clock)
        self.reactor = self.clock
        self.core = ProxyCore(settings, self.clock)
        self.address = address if address is not None else IPv4Address("TCP", "127.0.0.1", 443)

    def accept(self, client: IProtocol, peer: IAddress | None = None) -> MemoryConnection:
        """
        Connect ``client`` to the proxy, from ``peer``.
        """
        return self.connect(ClientProtocol(self.core), client, self.address, peer)

    def connect_client(
        self,
        secret: Secret | bytes | None,
        tag: bytes | None = None,
        dc: int = 2,
        init: InitiatorStreams | None = None,
    ) -> ObfuscatedClient:
        """
        Connect an :class:`~mtproxy_tw.testing.clients.ObfuscatedClient`
        (see :func:`~mtproxy_tw.testing.clients.make_client`).
        """
        client = make_client(secret, tag, dc, init)
        self.accept(client)
        return client

    def serve_dc(self, dc: int, server: IProtocolFactory | _Server) -> Address:
        """
        Route the address the settings give DC ``dc`` to ``server``.
        """
        address, _ = self.core.settings.dcs.lookup(dc)
        self.serve(address.host, address.port, server)
        return address

    def connection_of(self, protocol: object) -> MemoryConnection:
        """
        The live connection with ``protocol`` at either end.
        """
        for connection in self.connections:
            if protocol in (connection.client, connection.server):
                return connection
            wrapped = getattr(connection.client, "_wrappedProtocol", None)
            if protocol is wrapped:
                return connection
        raise LookupError(f"no live connection of {protocol!r}")
