"""
``--mss-clamp`` and ``--split-server-hello``: their checks, the MSS a
client of a clamped listener sees on loopback, and the ServerHello
written apart from the rest of its flight.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mtproxy_tw import tap
from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing.tlsclient import CCS
from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.faketls import NeedMore, build_client_hello, check_server_hello
from tests.test_fronting import DOMAIN, EE, FrontingHarness
from tests.test_integration import CLASSIC

# struct tcp_info (linux/tcp.h): tcpi_unacked and tcpi_segs_out.
_UNACKED = struct.Struct("=I")
_UNACKED_AT = 24
_SEGS_OUT_AT = 136


def _tcp_info(sock: socket.socket) -> tuple[int, int]:
    """
    Segments not yet acknowledged, and segments sent, on ``sock``.
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _SEGS_OUT_AT + 4:
        raise SkipTest("this kernel's tcp_info has no tcpi_segs_out")
    (unacked,) = _UNACKED.unpack_from(info, _UNACKED_AT)
    (segs_out,) = _UNACKED.unpack_from(info, _SEGS_OUT_AT)
    return unacked, segs_out


class OptionTests(SynchronousTestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--state-dir", self.mktemp(), *argv])
        return options

    def test_defaults_off(self) -> None:
        options = self.parse()
        settings = tap.settings_from_options(options, ())
        self.assertIsNone(settings.mss_clamp)
        self.assertFalse(settings.split_server_hello)

    def test_given(self) -> None:
        options = self.parse("--mss-clamp", "256", "--split-server-hello")
        settings = tap.settings_from_options(options, ())
        self.assertEqual(settings.mss_clamp, 256)
        self.assertTrue(settings.split_server_hello)

    def test_from_the_config_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("mss_clamp = 536\nsplit_server_hello = true\n")
        settings = tap.settings_from_options(self.parse("--config", path), ())
        self.assertEqual(settings.mss_clamp, 536)
        self.assertTrue(settings.split_server_hello)

    def test_bad_values_one_line(self) -> None:
        for value, why in (
            ("87", "must be at least 88"),
            ("32768", "must be at most 32767"),
            ("big", "'big' is not a whole number"),
        ):
            with self.assertRaises(UsageError) as caught:
                self.parse("--mss-clamp", value)
            self.assertEqual(str(caught.exception), f"--mss-clamp: {why}")


class MSSClampTests(FrontingHarness):
    """
    A clamped listener on loopback: the client's kernel learns the small
    MSS from the SYN-ACK and sends its hello in several segments.
    """

    async def _connect(self, **options: Any) -> socket.socket:
        site = await self.site()
        port = await self.start(site=site, **options)
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(sock.close)
        return sock

    async def _hello_segments(self, sock: socket.socket) -> int:
        """
        Send a 517-byte hello; the segments it took once all are acked;
        check the proxy's flight comes back.
        """
        hello = build_client_hello(EE.key, DOMAIN, int(time.time()))
        _, before = _tcp_info(sock)
        sock.sendall(hello)
        await self.until(lambda: _tcp_info(sock)[0] == 0, "the hello to be acknowledged")
        _, after = _tcp_info(sock)
        sock.setblocking(False)
        received = bytearray()

        def flight() -> bool:
            with contextlib.suppress(BlockingIOError):
                received.extend(sock.recv(1 << 16))
            end = check_server_hello(bytes(received), EE.key, hello[11:43])
            return not isinstance(end, NeedMore)

        await self.until(flight, "the ServerHello flight")
        return after - before

    async def _clamped(self) -> None:
        sock = await self._connect(mss_clamp=256)
        # 256 less the timestamp option's 12 bytes.
        self.assertLessEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), 256)
        self.assertGreaterEqual(await self._hello_segments(sock), 3)

    def test_clamped(self) -> Any:
        if not sys.platform.startswith("linux"):
            raise SkipTest("TCP_MAXSEG on a listener is Linux's")
        return self.run_async(self._clamped())

    async def _unclamped(self) -> None:
        sock = await self._connect()
        self.assertGreater(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), 1460)
        self.assertEqual(await self._hello_segments(sock), 1)

    def test_unclamped(self) -> Any:
        if not sys.platform.startswith("linux"):
            raise SkipTest("TCP_MAXSEG on a listener is Linux's")
        return self.run_async(self._unclamped())


class UnclampableListenerTests(TestCase):
    """
    A listener that is not TCP cannot be clamped: a warning names it, and
    the proxy serves all the same.
    """

    async def _unix(self) -> None:
        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        path = self.mktemp()
        settings = Settings(secrets=(CLASSIC,), mss_clamp=256)
        service = ProxyService(settings, reactor, [f"unix:{path}"])
        service.startService()
        self.addCleanup(service.stopService)
        await service.listening()
        warned = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]
        self.assertEqual(len([w for w in warned if w.startswith("--mss-clamp: ")]), 1, warned)
        self.assertIn("is not TCP; not clamped", " ".join(warned))

    def test_unix(self) -> Any:
        return ensureDeferred(self._unix())


class Writes(StringTransport):
    """
    A transport that keeps every write apart.
    """

    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class SplitServerHelloTests(SynchronousTestCase):
    def _writes(self, **options: Any) -> list[bytes]:
        clock = MemoryReactorClock()
        clock.advance(time.time())
        core = ProxyCore(Settings(secrets=(EE,), **options), clock)
        protocol = ClientProtocol(core)
        transport = Writes()
        protocol.makeConnection(transport)
        hello = build_client_hello(EE.key, DOMAIN, int(clock.seconds()))
        protocol.dataReceived(hello)
        writes = [w for w in transport.writes if w]
        end = check_server_hello(b"".join(writes), EE.key, hello[11:43])
        self.assertEqual(end, sum(map(len, writes)))
        return writes

    def test_split(self) -> None:
        hello, rest = self._writes(split_server_hello=True)
        self.assertEqual(hello[:3], b"\x16\x03\x03")
        self.assertEqual(len(hello), 5 + int.from_bytes(hello[3:5], "big"))
        self.assertTrue(rest.startswith(CCS + b"\x17\x03\x03"))

    def test_one_write_by_default(self) -> None:
        (flight,) = self._writes()
        self.assertEqual(faketls.split_flight(flight)[0][:3], b"\x16\x03\x03")


class SplitFlightTests(SynchronousTestCase):
    def test_after_the_first_record(self) -> None:
        first = b"\x16\x03\x03\x00\x02ab"
        rest = CCS + b"\x17\x03\x03\x00\x01x"
        self.assertEqual(faketls.split_flight(first + rest), (first, rest))
        self.assertEqual(faketls.split_flight(first), (first, b""))

    def test_a_real_flight(self) -> None:
        flight = faketls.build_server_hello(EE.key, bytes(32), bytes(32), app_data_len=100)
        hello, rest = faketls.split_flight(flight)
        self.assertEqual(hello + rest, flight)
        self.assertEqual(rest, CCS + flight[-105:])

    def test_not_a_flight(self) -> None:
        for bad in (b"", b"\x16\x03\x03\x00", b"\x16\x03\x03\x00\x05abc"):
            with self.assertRaises(faketls.TLSError):
                faketls.split_flight(bad)
