"""
The guard ``tests/__init__.py`` installs: tests may only connect to loopback.
"""

from __future__ import annotations

import socket
import time

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw.testing import RawClient
from tests import NonLoopbackConnection, NonLoopbackName, loopback_only
from tests.test_integration import reactor

TEST_NET = "192.0.2.1"


class SocketGuardTests(SynchronousTestCase):
    def test_non_loopback_refused_at_once(self) -> None:
        with socket.socket() as sock:
            sock.settimeout(30)
            started = time.monotonic()
            e = self.assertRaises(NonLoopbackConnection, sock.connect, (TEST_NET, 80))
            self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(str(e), f"[Errno 13] tests may only connect to loopback, not {TEST_NET}")
        self.assertIsInstance(e, OSError)
        self.assertEqual(len(self.flushLoggedErrors(NonLoopbackConnection)), 1)

    def test_connect_ex_and_ipv6(self) -> None:
        with socket.socket() as sock:
            self.assertRaises(NonLoopbackConnection, sock.connect_ex, (TEST_NET, 80))
        if socket.has_ipv6:
            with socket.socket(socket.AF_INET6) as sock:
                self.assertRaises(NonLoopbackConnection, sock.connect, ("2001:db8::1", 80, 0, 0))
        self.assertEqual(
            len(self.flushLoggedErrors(NonLoopbackConnection)), 2 if socket.has_ipv6 else 1
        )

    def test_loopback_allowed(self) -> None:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            with socket.socket() as sock:
                self.assertEqual(sock.connect_ex(("127.0.0.1", port)), 0)

    def test_unix_allowed(self) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            # A path that does not exist: refused by the kernel, not the guard.
            self.assertRaises(FileNotFoundError, sock.connect, "/nonexistent/socket")

    def test_which_hosts(self) -> None:
        for host in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1", "0.0.0.0", "localhost"):
            self.assertTrue(loopback_only(host), host)
        for host in (TEST_NET, "10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1", "example.com"):
            self.assertFalse(loopback_only(host), host)

    def test_names_refused(self) -> None:
        self.assertRaises(NonLoopbackName, socket.getaddrinfo, "example.com", 443)
        self.assertEqual(len(self.flushLoggedErrors(NonLoopbackName)), 1)
        self.assertTrue(socket.getaddrinfo("localhost", 80))
        self.assertTrue(socket.getaddrinfo(TEST_NET, 80))


class TwistedGuardTests(TestCase):
    """
    Through Twisted, the connection attempt fails at once.
    """

    timeout = 10

    def test_tcp_endpoint(self) -> Deferred[None]:
        return ensureDeferred(self._tcp_endpoint())

    async def _tcp_endpoint(self) -> None:
        endpoint = TCP4ClientEndpoint(reactor, TEST_NET, 80, timeout=30)
        e = await self.assertFailure(connectProtocol(endpoint, Protocol()), ConnectError)
        self.assertIn("Permission denied", str(e))
        self.assertEqual(len(self.flushLoggedErrors(NonLoopbackConnection)), 1)

    def test_hostname_endpoint(self) -> Deferred[None]:
        return ensureDeferred(self._hostname_endpoint())

    async def _hostname_endpoint(self) -> None:
        endpoint = HostnameEndpoint(reactor, "example.com", 443, timeout=30)
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        await self.assertFailure(connecting, DNSLookupError)
        self.assertEqual(len(self.flushLoggedErrors(NonLoopbackName)), 1)

    def test_loopback_through_twisted(self) -> Deferred[None]:
        return ensureDeferred(self._loopback_through_twisted())

    async def _loopback_through_twisted(self) -> None:
        served: list[RawClient] = []

        def serve() -> RawClient:
            served.append(RawClient())
            return served[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(serve), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, RawClient(b"hello"))
        client.transport.loseConnection()
        await client.lost
        (server,) = served
        await server.lost
        self.assertEqual(bytes(server.received), b"hello")
