"""
Measuring the fronted site's TLS answer: the parser, the profile, the probe.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw.fronting.prober import ProfileProber
from mtproxy_tw.fronting.profile import (
    Observation,
    TLSProfile,
    fallback_size,
    parse_server_answer,
)
from mtproxy_tw.testing import FakeSite
from mtproxy_tw.wire.faketls import NeedMore, TLSError, build_server_hello
from tests.test_integration import LOCAL, reactor

DOMAIN = "example.com"
CCS = b"\x14\x03\x03\x00\x01\x01"


def _record(kind: int, body: bytes) -> bytes:
    return bytes([kind, 3, 3]) + len(body).to_bytes(2, "big") + body


def _tls13(size: int = 2345, cipher: int = 0x1302, key_share_first: bool = True) -> bytes:
    """
    A TLS 1.3 server's first flight as it starts on the wire (the proxy's
    own ServerHello flight has exactly that shape).
    """
    return build_server_hello(
        os.urandom(16),
        os.urandom(32),
        os.urandom(32),
        cipher_suite=cipher,
        app_data_len=size,
        key_share_first=key_share_first,
    )


def _server_hello_12(extensions: bytes = b"") -> bytes:
    """
    A TLS 1.2 ServerHello handshake message (no supported_versions).
    """
    body = b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32) + b"\xc0\x2f\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    return b"\x02" + len(body).to_bytes(3, "big") + body


def _handshake(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


#: A TLS 1.2 server's first flight, each message in its own record.
TLS12_RECORDS = (
    _record(0x16, _server_hello_12(b"\xff\x01\x00\x01\x00"))
    + _record(0x16, _handshake(0x0B, os.urandom(900)))
    + _record(0x16, _handshake(0x0C, os.urandom(300)))
    + _record(0x16, _handshake(0x0E, b""))
)
#: The same flight in one record, as many servers send it.
TLS12_ONE_RECORD = _record(
    0x16,
    _server_hello_12()
    + _handshake(0x0B, os.urandom(900))
    + _handshake(0x0C, os.urandom(300))
    + _handshake(0x0E, b""),
)
#: What an OpenSSL server answers a hello it refuses.
ALERT = b"\x15\x03\x03\x00\x02\x02\x2f"


class ParseServerAnswerTests(SynchronousTestCase):
    def test_tls13(self) -> None:
        for first in (True, False):
            for cipher in (0x1301, 0x1302, 0x1303):
                answer = parse_server_answer(_tls13(2345, cipher, first))
                self.assertEqual(answer, Observation(cipher, first, 2345))

    def test_tls13_followed_by_more_records(self) -> None:
        """
        A flight sent as several encrypted records counts whole: the size is
        what one record needs to take the same room on the wire.
        """
        data = _tls13(66) + _record(0x17, os.urandom(878)) + _record(0x17, os.urandom(281))
        self.assertEqual(
            parse_server_answer(data), Observation(0x1302, True, 66 + 5 + 878 + 5 + 281)
        )
        partial = data + _record(0x17, os.urandom(100))[:50]
        self.assertEqual(parse_server_answer(partial), parse_server_answer(data))
        capped = _tls13(16000) + _record(0x17, os.urandom(9000))
        self.assertEqual(parse_server_answer(capped), Observation(0x1302, True, 16384))

    def test_sizes(self) -> None:
        for size in (1, 64, 1024, 16384):
            answer = parse_server_answer(_tls13(size))
            assert isinstance(answer, Observation)
            self.assertEqual(answer.app_data_len, size)

    def test_tls12_in_records(self) -> None:
        self.assertRaises(TLSError, parse_server_answer, TLS12_RECORDS)

    def test_tls12_resumption_shape(self) -> None:
        # ServerHello, ChangeCipherSpec, ApplicationData, but no
        # supported_versions: not TLS 1.3.
        data = _record(0x16, _server_hello_12()) + CCS + _record(0x17, os.urandom(40))
        self.assertRaises(TLSError, parse_server_answer, data)

    def test_tls12_in_one_record(self) -> None:
        # The first record already shows a TLS 1.2 ServerHello; a site then
        # waits for the client, so there is nothing more to wait for.
        self.assertRaises(TLSError, parse_server_answer, TLS12_ONE_RECORD)

    def test_alert(self) -> None:
        self.assertRaises(TLSError, parse_server_answer, ALERT)

    def test_alert_then_close_is_not_an_observation(self) -> None:
        # Whatever it says about an alert alone, it never takes it for an answer.
        try:
            answer = parse_server_answer(ALERT)
        except TLSError:
            return
        self.assertIsInstance(answer, NeedMore)

    def test_garbage(self) -> None:
        self.assertRaises(TLSError, parse_server_answer, b"HTTP/1.1 400 Bad Request\r\n\r\n")

    def test_wrong_second_record(self) -> None:
        hello = _tls13()
        at = 5 + int.from_bytes(hello[3:5], "big")
        broken = hello[:at] + b"\x14\x03\x03\x00\x01\x02" + hello[at + 6 :]
        self.assertRaises(TLSError, parse_server_answer, broken)

    def test_not_a_server_hello(self) -> None:
        data = _record(0x16, _handshake(0x01, os.urandom(60))) + CCS + _record(0x17, b"x")
        self.assertRaises(TLSError, parse_server_answer, data)

    def test_truncated(self) -> None:
        data = _tls13(300)
        for cut in range(len(data)):
            answer = parse_server_answer(data[:cut])
            assert isinstance(answer, NeedMore), cut
            self.assertGreater(answer.total, cut)
            self.assertLessEqual(answer.total, len(data))

    @given(st.binary(max_size=400))
    @settings(max_examples=300, deadline=None)
    def test_random_bytes(self, data: bytes) -> None:
        try:
            answer = parse_server_answer(data)
        except TLSError:
            return
        self.assertIsInstance(answer, NeedMore | Observation)

    @given(
        st.integers(1, 5000),
        st.booleans(),
        st.data(),
    )
    @settings(max_examples=100, deadline=None)
    def test_random_truncation(self, size: int, first: bool, data: st.DataObject) -> None:
        answer_bytes = _tls13(size, 0x1301, first)
        cut = data.draw(st.integers(0, len(answer_bytes)))
        answer = parse_server_answer(answer_bytes[:cut])
        if cut == len(answer_bytes):
            self.assertEqual(answer, Observation(0x1301, first, size))
        else:
            assert isinstance(answer, NeedMore)
            self.assertTrue(cut < answer.total <= len(answer_bytes))

    @given(st.data())
    @settings(max_examples=300, deadline=None)
    def test_random_damage(self, data: st.DataObject) -> None:
        damaged = bytearray(_tls13(200))
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(damaged) - 1))
            damaged[at] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(damaged)))
        try:
            answer = parse_server_answer(bytes(damaged[:cut]))
        except TLSError:
            return
        self.assertIsInstance(answer, NeedMore | Observation)


class TLSProfileTests(SynchronousTestCase):
    def test_from_observations(self) -> None:
        seen = [Observation(0x1301, True, 300), Observation(0x1302, False, 100)]
        self.assertEqual(TLSProfile.from_observations(seen), TLSProfile((100, 300), 0x1302, False))

    @given(st.lists(st.integers(1, 16384), min_size=1, max_size=5), st.integers())
    @settings(max_examples=200, deadline=None)
    def test_pick_size_bounds(self, sizes: list[int], seed: int) -> None:
        profile = TLSProfile(tuple(sorted(sizes)), 0x1301, True)
        rng = random.Random(seed)
        for _ in range(20):
            size = profile.pick_size(rng)
            self.assertTrue(1 <= size <= 16384, size)
            self.assertTrue(any(abs(size - s) <= 1 for s in sizes), (size, sizes))

    def test_pick_size_spreads_by_one(self) -> None:
        profile = TLSProfile((1000,), 0x1301, True)
        rng = random.Random(1)
        self.assertEqual({profile.pick_size(rng) for _ in range(200)}, {999, 1000, 1001})

    def test_pick_size_edges(self) -> None:
        rng = random.Random(2)
        low = {TLSProfile((1,), 0x1301, True).pick_size(rng) for _ in range(100)}
        high = {TLSProfile((16384,), 0x1301, True).pick_size(rng) for _ in range(100)}
        self.assertEqual(low, {1, 2})
        self.assertEqual(high, {16383, 16384})

    def test_pick_size_default_rng(self) -> None:
        self.assertIn(TLSProfile((500,), 0x1301, True).pick_size(), {499, 500, 501})

    def test_fallback_size(self) -> None:
        rng = random.Random(3)
        sizes = {fallback_size(rng) for _ in range(5000)}
        self.assertEqual((min(sizes), max(sizes)), (2500, 3619))
        self.assertTrue(2500 <= fallback_size() <= 3619)


class _Silent(Protocol):
    """
    Reads and never answers.
    """

    transport: Any

    def __init__(self, seen: list[_Silent]) -> None:
        self.done: Deferred[None] = Deferred()
        seen.append(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


class ProfileProberTests(TestCase):
    """
    The probe against a real TLS server (:class:`FakeSite`) and against
    servers that do not answer like one.
    """

    timeout = 20

    def _site(self, **options: Any) -> FakeSite:
        site = FakeSite(DOMAIN, **options)
        site.listen(reactor, LOCAL)
        self.addCleanup(site.close)
        return site

    def _probe(self, port: int, timeout: float = 5.0) -> Deferred[Observation]:
        prober = ProfileProber(reactor, timeout)
        return prober.probe(TCP4ClientEndpoint(reactor, LOCAL, port), DOMAIN)

    async def _until(self, predicate: Any, what: str, seconds: float = 5.0) -> None:
        deadline = reactor.seconds() + seconds
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.002, lambda: None)

    async def _real_answer(self, site: FakeSite) -> None:
        observation = await self._probe(site.port_number)
        (conn,) = site.connections
        sent = parse_server_answer(bytes(conn.sent))
        self.assertEqual(observation, sent)
        # OpenSSL sends EncryptedExtensions in a record of its own.
        self.assertIn(observation.cipher_suite, {0x1301, 0x1302, 0x1303})
        self.assertFalse(observation.key_share_first)
        await self._until(lambda: conn.closed, "the probe to close its connection")

    def test_probe_reads_a_real_answer(self) -> Deferred[None]:
        return ensureDeferred(self._real_answer(self._site()))

    async def _tls12_site(self) -> None:
        site = self._site(tls13=False)
        started = time.monotonic()
        await self.assertFailure(self._probe(site.port_number), TLSError)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_tls12_site(self) -> Deferred[None]:
        return ensureDeferred(self._tls12_site())

    async def _plain_site(self) -> None:
        site = self._site(tls=False)
        await self.assertFailure(self._probe(site.port_number), TLSError)

    def test_plain_http_site(self) -> Deferred[None]:
        return ensureDeferred(self._plain_site())

    async def _refused(self) -> None:
        port = reactor.listenTCP(0, Factory(), interface=LOCAL)
        number = port.getHost().port
        await port.stopListening()
        await self.assertFailure(self._probe(number), ConnectionRefusedError)

    def test_refused(self) -> Deferred[None]:
        return ensureDeferred(self._refused())

    async def _silent(self) -> None:
        seen: list[_Silent] = []
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Silent(seen)), interface=LOCAL)
        self.addCleanup(port.stopListening)

        async def close_all() -> None:
            for protocol in seen:
                if not protocol.done.called:
                    protocol.transport.abortConnection()
                await protocol.done

        self.addCleanup(close_all)
        await self.assertFailure(self._probe(port.getHost().port, timeout=0.2), TimeoutError)
        self.assertEqual(len(seen), 1)
        # A probe that gave up does not keep its connection open.
        await self._until(lambda: seen[0].done.called, "the timed-out probe to close", 1.0)

    def test_silent_site_times_out_and_closes(self) -> Deferred[None]:
        return ensureDeferred(self._silent())
