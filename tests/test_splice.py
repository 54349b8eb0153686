"""
Zero-copy downloads (:mod:`mtproxy_tw.proxy.splice`): direct mode, fast
mode, classic and dd clients on plain TCP get the DC's bytes spliced, and
byte-exact; everything else, and ``--no-splice``, takes the ordinary path.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from mtproxy_tw.proxy import splice
from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.testing import (
    DOWNLOAD_CHUNK,
    ObfuscatedClient,
    buffered_bytes,
    download_chunk,
    download_request,
)
from mtproxy_tw.wire.obfuscated2 import TAG_INTERMEDIATE, TAG_PADDED
from tests.test_fronting import FrontingHarness
from tests.test_integration import CLASSIC, LOCAL, SECURE, MiB, ProxyHarness

reactor: Any = _reactor

#: Echo sizes: the FakeDC answers each with a packet of that payload
#: (padded intermediate, for dd, carries whole words only).
ECHOES = {
    TAG_INTERMEDIATE: (1, 1024, 64 * 1024 + 1, MiB),
    TAG_PADDED: (4, 1024, 64 * 1024 + 4, MiB),
}
#: Socket buffers of the slow-reader tests: small, so that the kernel's
#: (up to 32 MiB a socket on loopback) do not hold the whole download.
SMALL_BUFFER = 64 * 1024


def _small_buffers(*transports: Any) -> None:
    for transport in transports:
        sock = transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)


def _needs_splice() -> None:
    if not splice.available():
        raise SkipTest("no os.splice here")


def _payload(size: int) -> bytes:
    return (b"\x01" + os.urandom(size))[:size]


class _Download:
    """
    Counts and checks the packets of one download.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.received = 0
        self.index = 0
        self.bad: list[int] = []
        self.done: Deferred[None] = Deferred()

    def __call__(self, payload: bytes) -> None:
        if payload != download_chunk(self.index, len(payload)):
            self.bad.append(self.index)
        self.index += 1
        self.received += len(payload)
        if self.received >= self.total and not self.done.called:
            self.done.callback(None)

    def check(self, test: TestCase) -> None:
        test.assertEqual(
            (self.received, self.index, self.bad),
            (self.total, -(-self.total // DOWNLOAD_CHUNK), []),
        )


class SpliceTests(ProxyHarness):
    """
    Downloads through the proxy, spliced and not.
    """

    def pump(self, pair: ClientProtocol) -> splice.Pump | None:
        pump: splice.Pump | None = getattr(pair._dc, "pump", None)
        return pump

    async def _exact(self, use_splice: bool, secret: Any = SECURE) -> None:
        if use_splice:
            _needs_splice()
        await self.start(splice=use_splice)
        tag = TAG_PADDED if secret is SECURE else TAG_INTERMEDIATE
        echoes = ECHOES[tag]
        client = await self.client(secret, tag)
        for size in echoes:
            payload = _payload(size)
            self.assertEqual(await self.within(client.request(payload)), payload)
        pair = self.proxy_pair()
        pump = self.pump(pair)
        if use_splice:
            assert pump is not None
            moved = pump.moved
            self.assertGreater(moved, sum(echoes))
        else:
            self.assertIsNone(pump)
        download = _Download(64 * MiB)
        client.on_packet = download
        client.send(download_request(download.total))
        await self.within(download.done, 60)
        download.check(self)
        client.on_packet = None
        self.assertEqual(await self.within(client.request(b"done")), b"done")
        if pump is not None:
            self.assertGreater(pump.moved - moved, download.total)
            self.assertEqual(pair.bytes_out, pump.moved)
        self.assertGreater(pair.bytes_out, download.total + sum(echoes))

    def test_exact_spliced(self) -> Deferred[None]:
        """
        1 B to 1 MiB echoes and a 64 MiB download arrive byte-exact, spliced.
        """
        return self.run_async(self._exact(True))

    def test_exact_spliced_classic(self) -> Deferred[None]:
        return self.run_async(self._exact(True, CLASSIC))

    def test_exact_not_spliced(self) -> Deferred[None]:
        """
        ``--no-splice``: the same, through the process.
        """
        return self.run_async(self._exact(False))

    def test_exact_not_spliced_classic(self) -> Deferred[None]:
        return self.run_async(self._exact(False, CLASSIC))

    async def _slow_mode(self) -> None:
        await self.start(fast_mode=False)
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        self.assertIsNone(self.pump(self.proxy_pair()))

    def test_not_in_slow_mode(self) -> Deferred[None]:
        """
        Without fast mode the proxy re-encrypts: nothing to splice.
        """
        return self.run_async(self._slow_mode())

    async def held_back(self, client: ObfuscatedClient, pump: splice.Pump, dc: Any) -> None:
        """
        Wait until the paused client held the pump and the pump the DC.
        """
        await self.until(
            lambda: pump.held > 0 and dc.paused,
            "backpressure to reach the DC",
            10.0,
        )

    async def _slow_reader(self) -> None:
        _needs_splice()
        await self.start()
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        pair = self.proxy_pair()
        pump = self.pump(pair)
        assert pump is not None and pair._upstream is not None
        upstream = pair._upstream.transport
        (dc,) = self.fakes[2].connections
        _small_buffers(client.transport, pair.transport, upstream, dc.transport)
        download = _Download(16 * MiB)
        client.on_packet = download
        client.pause()
        client.send(download_request(download.total))
        await self.held_back(client, pump, dc)
        self.assertTrue(dc.downloading)
        self.assertTrue(dc.paused)
        # What the proxy holds: at most one pipe, nothing in Python.
        self.assertLessEqual(pump.held, splice.CHUNK)
        self.assertEqual(buffered_bytes(pair.transport) + buffered_bytes(upstream), 0)
        self.assertLess(download.received, download.total // 2)
        self.assertGreater(pump.waits, 0)
        client.resume()
        await self.within(download.done, 30)
        download.check(self)

    def test_slow_reader(self) -> Deferred[None]:
        """
        A client that stops reading holds the DC back with at most a pipe
        in flight; the download completes once it reads again.
        """
        return self.run_async(self._slow_reader())

    async def _dc_closes(self) -> None:
        _needs_splice()
        await self.start()
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        pair = self.proxy_pair()
        pump = self.pump(pair)
        assert pump is not None and pair._upstream is not None
        (dc,) = self.fakes[2].connections
        _small_buffers(client.transport, pair.transport, pair._upstream.transport, dc.transport)
        download = _Download(16 * MiB)
        client.on_packet = download
        client.pause()
        client.send(download_request(download.total))
        await self.held_back(client, pump, dc)
        self.assertGreater(pump.held, 0)
        # The DC stops mid-download and closes after flushing what it sent.
        dc.stopProducing()
        dc.transport.unregisterProducer()
        dc.transport.loseConnection()
        client.resume()
        await self.within(client.lost, 20)
        self.assertLess(dc.sent, download.total)
        self.assertEqual(download.received, dc.sent)
        self.assertEqual(download.bad, [])
        await self.no_clients()

    def test_dc_closes_mid_download(self) -> Deferred[None]:
        """
        The DC's close reaches the client after every byte it sent.
        """
        return self.run_async(self._dc_closes())

    async def _dc_aborts(self) -> None:
        _needs_splice()
        await self.start()
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        (dc,) = self.fakes[2].connections
        dc.transport.abortConnection()
        await self.within(client.lost)
        await self.no_clients()

    def test_dc_aborts(self) -> Deferred[None]:
        return self.run_async(self._dc_aborts())

    async def _client_aborts(self) -> None:
        _needs_splice()
        await self.start()
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        pair = self.proxy_pair()
        pump = self.pump(pair)
        assert pump is not None and pair._upstream is not None
        (dc,) = self.fakes[2].connections
        _small_buffers(client.transport, pair.transport, pair._upstream.transport, dc.transport)
        client.pause()
        client.send(download_request(16 * MiB))
        await self.held_back(client, pump, dc)
        self.assertGreater(pump.held, 0)
        client.transport.abortConnection()
        await self.within(dc.lost)
        await self.no_clients()
        self.assertEqual(pump.held, 0)

    def test_client_aborts_mid_download(self) -> Deferred[None]:
        """
        A client gone mid-download closes the DC; the pipe is let go.
        """
        return self.run_async(self._client_aborts())

    async def _refused(self) -> None:
        _needs_splice()
        self.patch(splice, "_refused", False)

        def refuse(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.EINVAL, "no")

        self.patch(splice, "_SPLICE", refuse)
        await self.start()
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        pair = self.proxy_pair()
        self.assertIsNone(self.pump(pair))
        self.assertFalse(splice.available())
        download = _Download(4 * MiB)
        client.on_packet = download
        client.send(download_request(download.total))
        await self.within(download.done, 20)
        download.check(self)

    def test_kernel_refuses(self) -> Deferred[None]:
        """
        A kernel that does not splice sockets: the pair goes back to
        Twisted at the first read, and splicing is off from then on.
        """
        return self.run_async(self._refused())


class AvailableTests(TestCase):
    def test_not_linux(self) -> None:
        self.patch(sys, "platform", "darwin")
        self.assertFalse(splice.available())

    def test_no_os_splice(self) -> None:
        self.patch(splice, "_SPLICE", None)
        self.assertFalse(splice.available())

    def test_not_plain_tcp(self) -> None:
        self.assertIsNone(splice.start_pump(object(), object(), len, lambda: None))


class FakeTLSNotSplicedTests(FrontingHarness):
    """
    A fake-TLS client's bytes are wrapped in records: never spliced.
    """

    async def _ee(self) -> None:
        site = await self.site()
        await self.start(site=site)
        client = await self.answered()
        payload = _payload(64 * 1024)
        self.assertEqual(await self.within(client.request(payload)), payload)
        (pair,) = self.service.core.clients
        self.assertIsNotNone(pair._dc)
        self.assertIsNone(getattr(pair._dc, "pump", "none"))

    def test_ee_not_spliced(self) -> Deferred[None]:
        return self.run_async(self._ee())


class _End(Protocol):
    def __init__(self, made: Deferred[Any]) -> None:
        self.made = made
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class PumpTests(TestCase):
    """
    A pump between two loopback connections of the real reactor.
    """

    async def connection(self) -> tuple[_End, _End]:
        """
        Both ends of a fresh loopback TCP connection: (accepted, connecting).
        """
        accepted: Deferred[Any] = Deferred()
        connecting: Deferred[Any] = Deferred()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _End(accepted)), interface=LOCAL)
        self.addCleanup(port.stopListening)
        end = _End(connecting)
        await connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port.getHost().port), end)
        near, far = await accepted, await connecting
        for e in (near, far):
            self.addCleanup(self._close, e)
        return near, far

    async def _close(self, end: _End) -> None:
        if not end.lost.called:
            end.transport.abortConnection()
        await end.lost

    async def until(self, predicate: Any, what: str) -> None:
        deadline = reactor.seconds() + 5
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.002, lambda: None)

    async def _queued_first(self) -> None:
        _needs_splice()
        source, dc = await self.connection()
        sink, client = await self.connection()
        counted: list[int] = []
        pump = splice.start_pump(source.transport, sink.transport, counted.append, lambda: None)
        assert pump is not None
        self.addCleanup(pump.stop)
        # Bytes Twisted queued for the sink go out before any spliced ones.
        sink.transport.write(b"first ")
        pump.wrote()
        self.assertNotIn(source.transport, reactor.getReaders())
        dc.transport.write(b"then spliced")
        await self.until(lambda: client.data == b"first then spliced", "both, in order")
        self.assertEqual(sum(counted), len(b"then spliced"))
        self.assertEqual(source.data, b"")
        self.assertIn(source.transport, reactor.getReaders())

    def test_bytes_queued_by_twisted_go_first(self) -> Deferred[None]:
        return ensureDeferred(self._queued_first())
