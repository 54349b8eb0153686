"""
Whole flows in memory (:mod:`mtproxy_tw.testing.memory`): client -> proxy ->
fake DC or fronted site, with no sockets and no real time.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import (
    DOWNLOAD_CHUNK,
    FakeDC,
    FakeSite,
    FakeTLSClient,
    RawClient,
    download_chunk,
    download_request,
)
from mtproxy_tw.testing.memory import MemoryNetwork, MemoryProxy, MemoryTransport
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED
from mtproxy_tw.wire.secrets import parse_secret

DD = parse_secret("alice=dd" + "a7" * 16, "x")
EE = parse_secret("erin=ee" + "e5" * 16 + b"example.com".hex(), "x")
SITE = Address("127.0.0.1", 8443)
MiB = 1 << 20


def _payload(size: int) -> bytes:
    # A multiple of 4 comes back exactly, padded or not; never 8 zero
    # bytes in front (the fake DC would read MTProto).
    return b"\x01" + os.urandom(size - 1)


class _Proxy(SynchronousTestCase):
    def proxy(self, *secrets: Any, **options: Any) -> tuple[MemoryProxy, FakeDC]:
        """
        A proxy in memory whose DC 2 (Telegram's real address, never
        dialled) is a fake.
        """
        proxy = MemoryProxy(Settings(secrets=secrets or (DD,), **options))
        dc = FakeDC(proxy.reactor)
        proxy.serve_dc(2, dc)
        return proxy, dc


class DirectFlowTests(_Proxy):
    def _echo(self, fast: bool) -> None:
        proxy, dc = self.proxy(fast_mode=fast)
        client = proxy.connect_client(DD, dc=2)
        proxy.flush()
        self.assertEqual(dc.seen, [(TAG_PADDED, 2)])
        for size in (4, 1024, 64 * 1024 + 4):
            payload = _payload(size)
            answer = client.request(payload)
            proxy.flush()
            self.assertEqual(self.successResultOf(answer), payload)
        self.assertEqual(proxy.core.stats.accepted, {"alice": 1})

    def test_dd_echo(self) -> None:
        self._echo(fast=True)

    def test_dd_echo_slow_mode(self) -> None:
        self._echo(fast=False)

    def test_outbound_attempt_is_only_recorded(self) -> None:
        proxy = MemoryProxy(Settings(secrets=(DD,)))
        proxy.connect_client(DD, dc=2)
        proxy.flush()
        address, _ = proxy.core.settings.dcs.lookup(2)
        self.assertEqual(proxy.pending(), [(address.host, address.port)])

    def test_unreachable_dc(self) -> None:
        proxy = MemoryProxy(Settings(secrets=(DD,)))
        client = proxy.connect_client(DD, dc=2)
        proxy.flush()
        proxy.refuse()
        proxy.flush()
        self.assertTrue(client.lost.called)
        self.assertEqual(proxy.core.stats.upstream_failures, {"connect": 1})
        self.assertEqual(proxy.core.clients, set())

    def test_client_close_ends_the_dc_connection(self) -> None:
        proxy, dc = self.proxy()
        client = proxy.connect_client(DD, dc=2)
        answer = client.request(_payload(8))
        proxy.flush()
        self.successResultOf(answer)
        closed = client.close()
        proxy.flush()
        self.successResultOf(closed)
        (conn,) = dc.connections
        self.assertTrue(conn.lost.called)
        self.assertEqual(proxy.connections, [])
        self.assertEqual(proxy.core.clients, set())

    def test_idle_connection_closed_on_the_clock(self) -> None:
        proxy, dc = self.proxy(idle_timeout=60.0)
        client = proxy.connect_client(DD, dc=2)
        proxy.flush()
        # Checked every idle_timeout: the first check notes the activity,
        # the next one finds none since.
        proxy.advance(60.0)
        proxy.advance(59.0)
        self.assertFalse(client.lost.called)
        proxy.advance(1.0)
        self.assertTrue(client.lost.called)
        self.assertTrue(dc.connections[0].lost.called)
        self.assertEqual(proxy.core.stats.idle_closed, 1)

    def test_fake_tls(self) -> None:
        proxy, dc = self.proxy(EE)
        client = FakeTLSClient(EE.key, reactor=proxy.reactor)
        proxy.accept(client)
        proxy.flush()
        self.successResultOf(client.answered)
        client.start()
        payload = _payload(4096)
        answer = client.request(payload)
        proxy.flush()
        self.assertEqual(self.successResultOf(answer), payload)
        self.assertEqual(client.bad_records, [])
        self.assertEqual(dc.seen, [(TAG_PADDED, 2)])

    def test_fronted_to_the_site(self) -> None:
        proxy, dc = self.proxy(EE, mask_host=SITE)
        site = FakeSite("example.com", tls=False)
        proxy.serve(SITE.host, SITE.port, site.factory)
        request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
        client = RawClient(request)
        proxy.accept(client)
        proxy.flush()
        (conn,) = site.connections
        self.assertEqual(bytes(conn.received), request)
        self.assertEqual(bytes(client.received), site.response)
        self.assertTrue(client.lost.called)
        self.assertEqual(dc.connections, [])
        self.assertEqual(proxy.core.stats.fronted, {"http": 1})


class FlowControlTests(_Proxy):
    """
    A slow reader on either side pauses the writer on the other, through
    both transports of the proxy; nothing is buffered without bound.
    """

    def test_slow_client_pauses_the_dc(self) -> None:
        proxy, dc = self.proxy()
        client = proxy.connect_client(DD, dc=2)
        received: list[bytes] = []
        client.on_packet = received.append
        proxy.flush()
        client.pause()
        size = 16 * MiB
        client.send(download_request(size))
        proxy.flush()

        (upstream,) = dc.connections
        front = proxy.connection_of(client)
        back = proxy.connection_of(upstream)
        # The proxy's transport toward the client filled up and paused its
        # producer, the proxy's transport toward the DC, which stopped
        # reading; the DC's transport filled up in turn and paused the DC.
        self.assertTrue(front.server_transport.producerPaused)
        self.assertIs(front.server_transport.producer, back.client_transport)
        self.assertFalse(back.client_transport.reading)
        self.assertTrue(back.server_transport.producerPaused)
        self.assertTrue(upstream.paused)
        self.assertTrue(upstream.downloading)
        # What is in flight: about one buffer per transport, plus one chunk.
        in_flight = upstream.sent - sum(map(len, received))
        bound = front.server_transport.bufferSize + back.server_transport.bufferSize
        self.assertLessEqual(in_flight, bound + 2 * DOWNLOAD_CHUNK)
        self.assertLess(upstream.sent, size // 8)

        client.resume()
        proxy.flush()
        self.assertFalse(upstream.paused)
        self.assertEqual(sum(map(len, received)), size)
        for index, packet in enumerate(received):
            self.assertEqual(packet, download_chunk(index))
        self.assertGreaterEqual(back.server_transport.producer_pauses, 1)

    def test_slow_dc_pauses_the_client(self) -> None:
        proxy, dc = self.proxy()
        client = proxy.connect_client(DD, dc=2)
        proxy.flush()
        (upstream,) = dc.connections
        IPushProducer(upstream.transport).pauseProducing()
        packet = _payload(64 * 1024)
        for _ in range(64):
            client.send(packet)
        proxy.flush()

        front = proxy.connection_of(client)
        back = proxy.connection_of(upstream)
        # The leg's buffer filled and paused the proxy's reading from the
        # client, so the rest waits with the client.
        self.assertTrue(back.client_transport.producerPaused)
        self.assertFalse(front.server_transport.reading)
        self.assertGreater(front.client_transport.buffered(), 0)
        self.assertLess(upstream.packets, 64)

        IPushProducer(upstream.transport).resumeProducing()
        proxy.flush()
        self.assertEqual(upstream.packets, 64)
        self.assertTrue(front.server_transport.reading)


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.read_closed = False
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason


class _Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class MemoryTransportTests(SynchronousTestCase):
    def pair(self) -> tuple[MemoryNetwork, _Recorder, _Recorder, Any]:
        network = MemoryNetwork()
        a, b = _Recorder(), _Recorder()
        return network, a, b, network.connect(b, a)

    def test_producer_paused_when_full_resumed_when_empty(self) -> None:
        network, _, b, conn = self.pair()
        transport: MemoryTransport = conn.client_transport
        producer = _Producer()
        transport.registerProducer(producer, True)
        transport.write(b"x" * transport.bufferSize)
        self.assertEqual(producer.events, [])
        transport.write(b"x")
        self.assertEqual(producer.events, ["pause"])
        network.flush()
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(len(b.data), transport.bufferSize + 1)

    def test_paused_reader_leaves_bytes_with_the_writer(self) -> None:
        network, _, b, conn = self.pair()
        conn.server_transport.pauseProducing()
        conn.client_transport.write(b"hello")
        network.flush()
        self.assertEqual((b.data, conn.client_transport.buffered()), (b"", 5))
        conn.server_transport.resumeProducing()
        network.flush()
        self.assertEqual(b.data, b"hello")

    def test_close_flushes_abort_drops(self) -> None:
        network, _, b, conn = self.pair()
        conn.client_transport.write(b"last words")
        conn.client_transport.loseConnection()
        network.flush()
        self.assertEqual(b.data, b"last words")
        self.assertTrue(conn.closed)
        assert b.reason is not None
        b.reason.trap(ConnectionDone)

        network, _, b, conn = self.pair()
        conn.client_transport.write(b"lost")
        conn.client_transport.abortConnection()
        network.flush()
        self.assertEqual(b.data, b"")
        self.assertTrue(conn.closed)

    def test_half_close(self) -> None:
        network, a, b, conn = self.pair()
        conn.client_transport.write(b"request")
        conn.client_transport.loseWriteConnection()
        network.flush()
        self.assertEqual((b.data, b.read_closed, conn.closed), (b"request", True, False))
        conn.server_transport.write(b"answer")
        conn.server_transport.loseConnection()
        network.flush()
        self.assertEqual(a.data, b"answer")
        self.assertTrue(conn.closed)
