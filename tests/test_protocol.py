"""
The client protocol in memory: limits, timeouts, what reaches the log,
and what is connected to when.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.settings import Settings
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.faketls import build_client_hello
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import parse_secret

SECRET = parse_secret("alice=dd" + "a7" * 16, "x")
DC = Address("127.0.0.1", 4430)


class Transport(StringTransport):
    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def core(self, **options: Any) -> ProxyCore:
        settings = Settings(secrets=(SECRET,), dcs=DCTable({2: DC}), **options)
        return ProxyCore(settings, self.reactor)

    def connect(self, core: ProxyCore) -> tuple[ClientProtocol, Transport]:
        protocol = ClientProtocol(core)
        transport = Transport()
        protocol.makeConnection(transport)
        return protocol, transport

    def assertQuietLog(self) -> None:
        """
        Nothing above info level, no traceback, and never the secret.
        """
        for event in self.events:
            self.assertNotIn("log_failure", event)
            self.assertLess(event.get("log_level", LogLevel.info), LogLevel.warn, event)
            text = formatEvent(event)
            self.assertNotIn(SECRET.key.hex(), text)
            self.assertNotIn(SECRET.hex(), text)

    def established(self, core: ProxyCore) -> Transport:
        protocol, transport = self.connect(core)
        protocol.dataReceived(generate_init(TAG_PADDED, 2, secret=SECRET.key).wire)
        return transport

    def test_connection_limit(self) -> None:
        core = self.core(max_connections=2)
        first = self.established(core)
        second = self.established(core)
        _, third = self.connect(core)
        self.assertEqual((first.aborted, second.aborted, third.aborted), (False, False, True))
        self.assertEqual(core.stats.rejected["limit"], 1)
        self.assertEqual(len(core.clients), 2)

    def test_bad_inputs_are_quiet(self) -> None:
        """
        Garbage, a wrong secret and a stall close the connection, answer
        nothing, open nothing toward Telegram and log no error.
        """
        core = self.core(handshake_timeout=10)
        wrong = generate_init(TAG_PADDED, 2, secret=bytes(16))
        for data in (os.urandom(64), wrong.wire, b"\x00" * 63, b"GET / HTTP/1.1\r\n\r\n"):
            protocol, transport = self.connect(core)
            protocol.dataReceived(data)
            if not transport.disconnecting:
                self.reactor.advance(10)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")
            protocol.connectionLost()
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(
            dict(core.stats.rejected), {"bad-init": 2, "handshake-timeout": 1, "http": 1}
        )
        self.assertEqual(core.clients, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertQuietLog()

    def test_valid_init_connects_once(self) -> None:
        core = self.core()
        protocol, transport = self.connect(core)
        init = generate_init(TAG_PADDED, 2, secret=SECRET.key)
        protocol.dataReceived(init.wire[:40])
        self.assertEqual(self.reactor.tcpClients, [])
        protocol.dataReceived(init.wire[40:] + init.encryptor.update(b"\x04\x00\x00\x00ping"))
        self.assertEqual([(c[0], c[1]) for c in self.reactor.tcpClients], [(DC.host, DC.port)])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(core.stats.accepted["alice"], 1)
        protocol.connectionLost()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertQuietLog()


EE = parse_secret("erin=ee" + "e5" * 16 + b"example.com".hex(), "x")


class FuzzTests(SynchronousTestCase):
    """
    Whatever bytes arrive, in whatever pieces, the protocol neither raises
    nor logs above info, and buffers a bounded amount.
    """

    def run_fuzz(self, chunks: list[bytes], **options: Any) -> None:
        reactor = MemoryReactorClock()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            config = Settings(secrets=(SECRET, EE), dcs=DCTable({2: DC}), mask_host=DC, **options)
            core = ProxyCore(config, reactor)
            protocol = ClientProtocol(core)
            transport = Transport()
            protocol.makeConnection(transport)
            for chunk in chunks:
                protocol.dataReceived(chunk)
                self.assertLessEqual(
                    (protocol.handshake.buffered if protocol.handshake else 0),
                    17000 + 64 + len(chunk),
                )
            reactor.advance(config.handshake_timeout)
            protocol.connectionLost()
            self.assertEqual(core.clients, set())
        finally:
            globalLogPublisher.removeObserver(events.append)
        for event in events:
            self.assertNotIn("log_failure", event)
            self.assertLess(event.get("log_level", LogLevel.info), LogLevel.warn, event)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=700), max_size=6), st.booleans())
    def test_random_bytes(self, chunks: list[bytes], tls_first: bool) -> None:
        if tls_first:
            chunks = [b"\x16\x03\x01\x02\x00", *chunks]
        self.run_fuzz(chunks)

    @settings(max_examples=100, deadline=None)
    @given(st.integers(0, 600), st.binary(max_size=300), st.booleans())
    def test_damaged_hello(self, cut: int, tail: bytes, mlkem: bool) -> None:
        hello = build_client_hello(EE.key, "example.com", int(time.time()), mlkem=mlkem)
        self.run_fuzz([hello[:cut], tail], mask=False)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=400))
    def test_valid_hello_then_garbage(self, tail: bytes) -> None:
        """
        After a valid hello the proxy answers; garbage records then only close.
        """
        hello = build_client_hello(EE.key, "example.com", int(time.time()))
        self.run_fuzz([hello, tail])
