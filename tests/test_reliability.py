"""
Regression tests for what a hostile network or a careless operator found:
fronted clients that keep sending after the site closed, pairs whose other
side stopped reading, and the connection limits under a handshake flood.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.legs import FLUSH_GRACE
from mtproxy_tw.settings import Settings
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import parse_secret
from mtproxy_tw.wire.throttle import Throttle

DD = parse_secret("alice=dd" + "a7" * 16, "x")
EE = parse_secret("erin=ee" + "e5" * 16 + b"example.com".hex(), "x")
DC = Address("127.0.0.1", 4430)
SITE = Address("127.0.0.1", 4431)


class Transport(StringTransport):
    """
    A transport that records aborts and can pretend its write buffer is
    full, the way a TCP transport's is when its peer stops reading.
    """

    def __init__(self, port: int = 50000) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "127.0.0.1", port),
        )
        self.aborted = False
        self.write_closed = False
        self.dataBuffer = b""

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        # As a TCP transport does: unregistering twice is harmless.
        self.producer = None
        self.streaming = None

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def _complete(reactor: MemoryReactorClock, transport: Transport) -> Any:
    """
    Complete the newest outbound connection attempt over ``transport``.
    """
    factory = reactor.tcpClients[-1][2]
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol


class _Logged(SynchronousTestCase):
    secrets: tuple[Any, ...] = (DD,)

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def core(self, **options: Any) -> ProxyCore:
        config = Settings(secrets=self.secrets, dcs=DCTable({2: DC}), **options)
        return ProxyCore(config, self.reactor)

    def connect(self, core: ProxyCore, port: int = 50000) -> tuple[ClientProtocol, Transport]:
        protocol = ClientProtocol(core)
        transport = Transport(port)
        protocol.makeConnection(transport)
        return protocol, transport

    def assertQuietLog(self, events: list[dict[str, Any]] | None = None) -> None:
        for event in self.events if events is None else events:
            self.assertNotIn("log_failure", event)
            self.assertLess(event.get("log_level", LogLevel.info), LogLevel.warn, event)
            text = formatEvent(event)
            for secret in self.secrets:
                self.assertNotIn(secret.key.hex(), text)

    def warnings(self) -> list[str]:
        levels = [(e, e.get("log_level", LogLevel.info)) for e in self.events]
        return [formatEvent(e) for e, level in levels if level >= LogLevel.warn]


class SiteClosesFirstTests(_Logged):
    """
    A fronted client that keeps sending after the site closed: its bytes
    go nowhere, quietly.
    """

    secrets = (EE,)

    def fronted(self) -> tuple[ProxyCore, ClientProtocol, Transport, Any, Transport]:
        core = self.core(mask_host=SITE)
        client, transport = self.connect(core)
        client.dataReceived(os.urandom(80))
        site_transport = Transport(SITE.port)
        site = _complete(self.reactor, site_transport)
        return core, client, transport, site, site_transport

    def test_bytes_after_the_site_closed(self) -> None:
        core, client, transport, site, _ = self.fronted()
        site.connectionLost(None)
        client.dataReceived(b"more garbage")
        self.assertTrue(transport.disconnecting)
        client.connectionLost()
        self.assertEqual(core.clients, set())
        self.assertQuietLog()

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.binary(min_size=1, max_size=300), max_size=8),
        st.integers(0, 8),
        st.sampled_from(["lost", "eof-then-lost", "eof"]),
        st.booleans(),
    )
    def test_site_closes_at_random_moments(
        self, chunks: list[bytes], at: int, how: str, client_eof: bool
    ) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            core, client, transport, site, site_transport = self.fronted()
            site_lost = False
            for i, chunk in enumerate([*chunks, b""]):
                if i == at:
                    if how.startswith("eof"):
                        site.readConnectionLost()
                    if how.endswith("lost"):
                        site.connectionLost(None)
                        site_lost = True
                        self.assertTrue(transport.disconnecting)
                if i == at // 2 and client_eof:
                    client.readConnectionLost()
                if chunk:
                    client.dataReceived(chunk)
            client.connectionLost()
            self.assertEqual(core.clients, set())
            self.assertTrue(site_lost or site_transport.disconnecting)
            if not site_lost:
                site.connectionLost(None)
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.assertQuietLog(events)


class PairClosedBothWaysTests(_Logged):
    """
    Whatever ends a pair closes both sides, aborting a side whose peer
    stopped reading.
    """

    def relaying(self, core: ProxyCore) -> tuple[ClientProtocol, Transport, Transport]:
        client, transport = self.connect(core)
        client.dataReceived(generate_init(TAG_PADDED, 2, secret=DD.key).wire)
        dc_transport = Transport(DC.port)
        _complete(self.reactor, dc_transport)
        return client, transport, dc_transport

    def test_idle_client_with_a_dc_that_stopped_reading(self) -> None:
        core = self.core(idle_timeout=8)
        client, transport, dc = self.relaying(core)
        dc.dataBuffer = b"x" * 65536  # the DC stopped reading: its queue is full
        self.reactor.advance(8)
        self.reactor.advance(8)
        self.assertTrue(transport.aborted)
        client.connectionLost()
        # What was queued toward the DC gets a grace period to drain, then
        # the socket is aborted: it never stays open for ever.
        self.assertTrue(dc.disconnecting)
        self.assertFalse(dc.aborted)
        self.reactor.advance(FLUSH_GRACE)
        self.assertTrue(dc.aborted)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reading_dc_is_closed_gently(self) -> None:
        core = self.core(idle_timeout=8)
        client, _transport, dc = self.relaying(core)
        client.connectionLost()
        self.assertTrue(dc.disconnecting)
        self.assertFalse(dc.aborted)

    def test_site_that_stopped_reading_is_aborted(self) -> None:
        self.secrets = (EE,)
        core = self.core(mask_host=SITE)
        client, _transport = self.connect(core)
        client.dataReceived(os.urandom(80))
        site = Transport(SITE.port)
        _complete(self.reactor, site)
        site.dataBuffer = b"x" * 65536
        client.connectionLost()
        self.reactor.advance(FLUSH_GRACE)
        self.assertTrue(site.aborted)

    def test_bytes_after_the_dc_closed(self) -> None:
        core = self.core()
        client, transport, _dc = self.relaying(core)
        client._upstream.connectionLost(None)  # type: ignore[union-attr]
        client.dataReceived(b"late bytes")
        self.assertTrue(transport.disconnecting)
        self.assertQuietLog()


class HandshakeFloodTests(_Logged):
    """
    Connections in their handshake have their own cap; a full cap makes
    the oldest handshake give way, so honest clients still get in.
    """

    def test_default_cap_is_a_fraction(self) -> None:
        self.assertEqual(Settings(secrets=(DD,), max_connections=1000).handshake_cap, 250)
        self.assertEqual(Settings(secrets=(DD,), max_connections=20).handshake_cap, 16)
        self.assertEqual(Settings(secrets=(DD,), max_handshakes=7).handshake_cap, 7)

    def test_flood_replaces_the_oldest_handshake(self) -> None:
        core = self.core(max_connections=100, max_handshakes=10)
        flood = [self.connect(core, 50000 + i) for i in range(10)]
        honest, transport = self.connect(core, 60000)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(flood[0][1].disconnecting)
        self.assertEqual([t.disconnecting for _, t in flood[1:]], [False] * 9)
        honest.dataReceived(generate_init(TAG_PADDED, 2, secret=DD.key).wire)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(core.stats.rejected["evicted"], 1)
        self.assertNotIn(honest, core.handshaking)

    def test_full_limit_still_admits_a_new_client(self) -> None:
        """
        Handshakes count toward --max-connections, but a full limit makes
        room by closing the oldest handshake rather than refusing.
        """
        core = self.core(max_connections=10, max_handshakes=10)
        working = [self.connect(core, 40000 + i) for i in range(4)]
        for protocol, _ in working:
            protocol.dataReceived(generate_init(TAG_PADDED, 2, secret=DD.key).wire)
        flood = [self.connect(core, 50000 + i) for i in range(6)]
        for protocol, _ in flood:
            protocol.dataReceived(os.urandom(10))
        _, transport = self.connect(core, 60000)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(flood[0][1].disconnecting)
        self.assertEqual([t.disconnecting for _, t in working], [False] * 4)

    def test_full_of_working_connections_refuses(self) -> None:
        core = self.core(max_connections=3)
        for i in range(3):
            protocol, _ = self.connect(core, 40000 + i)
            protocol.dataReceived(generate_init(TAG_PADDED, 2, secret=DD.key).wire)
        _, transport = self.connect(core, 60000)
        self.assertTrue(transport.aborted)
        self.assertEqual(core.stats.rejected["limit"], 1)

    def test_warning_once_a_minute_with_a_count(self) -> None:
        core = self.core(max_connections=100, max_handshakes=2, handshake_timeout=1000)
        for i in range(2):
            self.connect(core, 50000 + i)
        self.assertEqual(self.warnings(), [])
        for i in range(5):
            self.connect(core, 51000 + i)
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("--max-handshakes", self.warnings()[0])
        self.reactor.advance(61)
        self.connect(core, 52000)
        self.assertEqual(len(self.warnings()), 2)
        self.assertIn(" 5 ", self.warnings()[1])


class ThrottleTests(SynchronousTestCase):
    def test_first_then_once_a_period(self) -> None:
        throttle = Throttle(60)
        self.assertEqual(throttle.hit(0), 1)
        self.assertIsNone(throttle.hit(1))
        self.assertIsNone(throttle.hit(59))
        self.assertEqual(throttle.hit(60), 3)
        self.assertEqual(throttle.hit(500), 1)


class MaxHandshakesOptionTests(SynchronousTestCase):
    def test_option(self) -> None:
        from mtproxy_tw.tap import Options, settings_from_options

        options = Options()
        options.parseOptions(["--secret", DD.hex(), "--max-handshakes", "40", "--port", "1"])
        settings = settings_from_options(options, tuple(options["secrets"]))
        self.assertEqual(settings.handshake_cap, 40)
