"""
Measuring the fronted site's TLS answer: the parser, the profile, the probe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw.fronting.prober import ProfileProber, ProfileService
from mtproxy_tw.fronting.profile import (
    Observation,
    TLSProfile,
    fallback_size,
    parse_server_answer,
)
from mtproxy_tw.fronting.store import PROFILE_FILE, ProfileStore
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import FakeSite
from mtproxy_tw.testing.fakesite import MLKEM_SITES
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.faketls import (
    MLKEM768_SERVER_SHARE,
    X25519,
    X25519MLKEM768,
    NeedMore,
    TLSError,
    build_client_hello,
    build_server_hello,
    check_server_hello,
    parse_client_hello,
    verify_client_hello,
)
from mtproxy_tw.wire.faketls.client import mlkem768_public_key
from mtproxy_tw.wire.secrets import parse_secret
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
            self.assertIn(size, sizes)

    def test_pick_size_draws_from_what_was_seen(self) -> None:
        """
        Sizes come from the observations, as often as they were seen: no
        jitter shows sizes the site never sends.
        """
        profile = TLSProfile((1000, 1000, 1000, 1234), 0x1301, True)
        rng = random.Random(1)
        drawn = Counter(profile.pick_size(rng) for _ in range(4000))
        self.assertEqual(set(drawn), {1000, 1234})
        self.assertLess(abs(drawn[1000] / 4000 - 0.75), 0.03, drawn)
        # A site with one chain: always its size, as the site does.
        fixed = TLSProfile((1309,) * 3, 0x1301, True)
        self.assertEqual({fixed.pick_size(rng) for _ in range(200)}, {1309})

    def test_pick_size_edges(self) -> None:
        rng = random.Random(2)
        low = {TLSProfile((1,), 0x1301, True).pick_size(rng) for _ in range(100)}
        high = {TLSProfile((16384,), 0x1301, True).pick_size(rng) for _ in range(100)}
        self.assertEqual(low, {1})
        self.assertEqual(high, {16384})

    def test_pick_size_default_rng(self) -> None:
        self.assertEqual(TLSProfile((500,), 0x1301, True).pick_size(), 500)

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

    def _probe(
        self, port: int, timeout: float = 5.0, mlkem: bool = False
    ) -> Deferred[Observation]:
        prober = ProfileProber(reactor, timeout)
        return prober.probe(TCP4ClientEndpoint(reactor, LOCAL, port), DOMAIN, mlkem=mlkem)

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

    async def _both_hellos(self, site: FakeSite) -> tuple[Observation, Observation]:
        classic = await self._probe(site.port_number)
        pq = await self._probe(site.port_number, mlkem=True)
        first, second = site.connections
        # What each probe sent, and what the site really answered it.
        sent = parse_client_hello(_hello_record(bytes(first.received)))
        self.assertEqual(sent.key_share_groups[1:], (X25519,))
        offered = parse_client_hello(_hello_record(bytes(second.received))).key_share_groups
        self.assertEqual(offered[1:], (X25519MLKEM768, X25519))
        for conn, seen in ((first, classic), (second, pq)):
            real = parse_server_answer(bytes(conn.sent))
            assert isinstance(real, Observation)
            # The site may add an alert once the probe has hung up.
            self.assertEqual(dataclasses.replace(real, app_data_len=seen.app_data_len), seen)
            self.assertGreaterEqual(real.app_data_len, seen.app_data_len)
        return classic, pq

    async def _pq_site(self) -> None:
        classic, pq = await self._both_hellos(self._site())
        self.assertEqual((classic.group, pq.group), (X25519, X25519MLKEM768))
        # OpenSSL's encrypted extensions differ between the two answers.
        self.assertNotEqual(classic.app_data_len, pq.app_data_len)
        self.assertEqual(classic.cipher_suite, pq.cipher_suite)

    def test_site_that_prefers_mlkem(self) -> Deferred[None]:
        return ensureDeferred(self._pq_site())

    if not MLKEM_SITES:
        test_site_that_prefers_mlkem.skip = "no ML-KEM in the bundled OpenSSL"  # type: ignore[attr-defined]

    async def _x25519_site(self) -> None:
        classic, pq = await self._both_hellos(self._site(x25519_only=True))
        self.assertEqual((classic.group, pq.group), (X25519, X25519))
        self.assertIn(pq.cipher_suite, {0x1301, 0x1302, 0x1303})

    def test_site_without_mlkem(self) -> Deferred[None]:
        return ensureDeferred(self._x25519_site())


def _hello_record(flight: bytes) -> bytes:
    """
    The ServerHello record at the start of a flight.
    """
    return flight[: 5 + int.from_bytes(flight[3:5], "big")]


class PostQuantumFlightTests(SynchronousTestCase):
    """
    The answer a site on OpenSSL >= 3.5 gives a hello offering
    X25519MLKEM768, as the proxy builds it.
    """

    def _flight(self, group: int, size: int = 1281) -> tuple[bytes, bytes, bytes]:
        secret, client_random = os.urandom(16), os.urandom(32)
        flight = build_server_hello(
            secret, client_random, os.urandom(32), app_data_len=size, group=group
        )
        return flight, secret, client_random

    def test_mlkem_server_hello(self) -> None:
        flight, secret, client_random = self._flight(X25519MLKEM768)
        hello = _hello_record(flight)
        # 1210 bytes of record, as OpenSSL's, with a 1120-byte share.
        self.assertEqual(len(hello), 5 + 1210)
        at = hello.index(bytes.fromhex("0033046411ec0460"))
        self.assertEqual(len(hello) - (at + 8), MLKEM768_SERVER_SHARE + 6)  # then versions
        self.assertEqual(hello[-6:], bytes.fromhex("002b00020304"))
        self.assertEqual(
            parse_server_answer(flight), Observation(0x1301, True, 1281, X25519MLKEM768)
        )
        # What a client checks holds: the digest, one CCS, one ApplicationData.
        self.assertEqual(check_server_hello(flight, secret, client_random), len(flight))

    def test_x25519_server_hello_unchanged(self) -> None:
        flight, _, _ = self._flight(X25519)
        self.assertEqual(len(_hello_record(flight)), 5 + 122)
        self.assertEqual(parse_server_answer(flight), Observation(0x1301, True, 1281, X25519))

    def test_no_share_for_other_groups(self) -> None:
        self.assertRaises(ValueError, self._flight, 0x0017)

    def test_hello_retry_request_is_not_an_answer(self) -> None:
        flight = bytearray(self._flight(X25519)[0])
        flight[11:43] = bytes.fromhex(
            "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
        )
        self.assertRaises(TLSError, parse_server_answer, bytes(flight))

    def test_client_key_share_groups(self) -> None:
        secret = os.urandom(16)
        for mlkem, expected in ((False, (X25519,)), (True, (X25519MLKEM768, X25519))):
            record = build_client_hello(secret, DOMAIN, 1, mlkem=mlkem, consistent_grease=True)
            groups = parse_client_hello(record).key_share_groups
            self.assertEqual(groups[1:], expected)
            self.assertEqual(groups[0] & 0x0F0F, 0x0A0A)  # GREASE first
            match = verify_client_hello(record, [("x", secret)])
            assert match is not None
            self.assertEqual(match.key_share_groups, groups)

    def test_duplicate_key_share_is_malformed(self) -> None:
        record = build_client_hello(os.urandom(16), DOMAIN, 1)
        at = record.index(b"\x00\x33\x00")
        size = int.from_bytes(record[at + 2 : at + 4], "big")
        ext = record[at : at + 4 + size]
        doubled = record[:at] + ext + record[at:]
        # Fix the three enclosing lengths.
        body = bytearray(doubled)
        body[3:5] = (len(body) - 5).to_bytes(2, "big")
        body[6:9] = (len(body) - 9).to_bytes(3, "big")
        ext_len_at = 9 + 2 + 32 + 1 + 32
        ext_len_at += 2 + int.from_bytes(body[ext_len_at : ext_len_at + 2], "big") + 2
        old = int.from_bytes(body[ext_len_at : ext_len_at + 2], "big")
        body[ext_len_at : ext_len_at + 2] = (old + len(ext)).to_bytes(2, "big")
        self.assertRaises(TLSError, parse_client_hello, bytes(body))

    def test_mlkem_key_is_well_formed(self) -> None:
        """
        Every 12-bit coefficient of the ML-KEM key is below q, or an
        OpenSSL >= 3.5 site refuses the hello (illegal_parameter).
        """
        key = mlkem768_public_key()
        self.assertEqual(len(key), 1184)
        for at in range(0, 1152, 3):
            packed = int.from_bytes(key[at : at + 3], "little")
            self.assertLess(packed & 0xFFF, 3329)
            self.assertLess(packed >> 12, 3329)
        try:
            from cryptography.hazmat.primitives.asymmetric import mlkem
        except ImportError:
            return
        mlkem.MLKEM768PublicKey.from_public_bytes(key)


class ProfileAnswerTests(SynchronousTestCase):
    """
    Which measured answer a hello gets: the site's answer to a hello of its
    shape, with the site's group only when the client offered it.
    """

    classic = [Observation(0x1302, False, 1309), Observation(0x1302, False, 1309)]
    pq = [Observation(0x1302, False, 1281, X25519MLKEM768)] * 2
    grease = 0x3A3A

    def test_from_observations(self) -> None:
        profile = TLSProfile.from_observations(self.classic, self.pq)
        self.assertEqual(
            profile,
            TLSProfile(
                (1309, 1309),
                0x1302,
                False,
                X25519,
                TLSProfile((1281, 1281), 0x1302, False, X25519MLKEM768),
            ),
        )
        self.assertRaises(ValueError, TLSProfile.from_observations, [], [])
        # Only the current hello answered: its sizes serve both, x25519 for the classic one.
        only = TLSProfile.from_observations([], self.pq)
        self.assertEqual((only.sizes, only.group), ((1281, 1281), X25519))
        self.assertEqual(only.pq, TLSProfile((1281, 1281), 0x1302, False, X25519MLKEM768))

    def test_answer(self) -> None:
        profile = TLSProfile.from_observations(self.classic, self.pq)
        tdlib = (self.grease, X25519MLKEM768, X25519)
        answer = profile.answer(tdlib)
        self.assertEqual(
            (answer.group, answer.sizes, answer.pq), (X25519MLKEM768, (1281,) * 2, None)
        )
        classic = profile.answer((self.grease, X25519))
        self.assertEqual((classic.group, classic.sizes), (X25519, (1309,) * 2))
        # 0x11ec only listed, no share of it: the classic answer.
        self.assertEqual(profile.answer(()).group, X25519)

    def test_site_that_picks_x25519(self) -> None:
        pq = [Observation(0x1301, True, 1290, X25519)]
        profile = TLSProfile.from_observations(self.classic, pq)
        answer = profile.answer((self.grease, X25519MLKEM768, X25519))
        self.assertEqual(
            (answer.group, answer.sizes, answer.cipher_suite), (X25519, (1290,), 0x1301)
        )

    def test_unmeasured_pq_answer(self) -> None:
        profile = TLSProfile((3000,), 0x1301, True)
        answer = profile.answer((X25519MLKEM768, X25519))
        self.assertEqual((answer.group, answer.sizes), (X25519, (3000,)))

    def test_group_never_one_the_client_did_not_offer(self) -> None:
        odd = TLSProfile((3000,), 0x1301, True, 0x0017, TLSProfile((3000,), 0x1301, True, 0x0017))
        self.assertEqual(odd.answer((X25519MLKEM768, X25519, 0x0017)).group, X25519)

    def test_json_round_trip(self) -> None:
        for profile in (
            TLSProfile.from_observations(self.classic, self.pq),
            TLSProfile((1, 16384), 0x1303, True),
        ):
            self.assertEqual(TLSProfile.from_json(profile.to_json()), profile)

    def test_json_refused(self) -> None:
        good = TLSProfile.from_observations(self.classic, self.pq).to_json()
        bad: list[object] = [
            None,
            [],
            {},
            {**good, "sizes": []},
            {**good, "sizes": [0]},
            {**good, "sizes": [16385]},
            {**good, "sizes": [True]},
            {**good, "sizes": "1309"},
            {**good, "cipher_suite": "1302"},
            {**good, "cipher_suite": 1 << 16},
            {**good, "key_share_first": 1},
            {**good, "group": None},
            {**good, "pq": {**good}},  # nested twice
            {**good, "pq": 5},
        ]
        for data in bad:
            with self.subTest(data=data):
                self.assertRaises(ValueError, TLSProfile.from_json, data)


class _Events:
    """
    The events one logger emitted.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def at(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] is level]


class ProfileStoreTests(SynchronousTestCase):
    """
    The profiles file in the state directory: written whole, read back, and
    never fatal.
    """

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = folder / PROFILE_FILE
        self.store = ProfileStore(self.path)
        self.logged = _Events()
        self.store.log = Logger(observer=self.logged)

    def test_round_trip(self) -> None:
        profiles = {
            "example.com": TLSProfile(
                (1309,), 0x1302, False, X25519, TLSProfile((1281,), 0x1302, False, X25519MLKEM768)
            ),
            "b.example": TLSProfile((3000, 3100), 0x1301, True),
        }
        self.store.save(profiles)
        self.assertEqual(ProfileStore(self.path).load(), profiles)
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)
        self.assertFalse(self.path.with_name(PROFILE_FILE + ".tmp").exists())
        self.assertEqual(self.logged.events, [])

    def test_missing_file(self) -> None:
        self.assertEqual(self.store.load(), {})
        self.assertEqual(self.logged.events, [])

    def test_corrupt_files(self) -> None:
        good = {"version": 1, "profiles": {"a": TLSProfile((5,), 0x1301, True).to_json()}}
        for content in (
            b"",
            b"{",
            b"\xff\xfe",
            b"[]",
            json.dumps({**good, "version": 2}).encode(),
            json.dumps({"version": 1}).encode(),
            json.dumps({"version": 1, "profiles": {"a": {"sizes": []}}}).encode(),
            b"[" * 100_000,
            b" " * (2 << 20),
        ):
            self.path.write_bytes(content)
            self.logged.events.clear()
            self.assertEqual(self.store.load(), {}, content[:20])
            (warning,) = self.logged.at(LogLevel.warn)
            self.assertIn(str(self.path), warning)
        self.path.write_text(json.dumps(good))
        self.assertEqual(set(self.store.load()), {"a"})

    def test_unreadable_file(self) -> None:
        self.path.mkdir()  # reading a directory fails
        self.assertEqual(self.store.load(), {})
        self.assertEqual(len(self.logged.at(LogLevel.warn)), 1)

    def test_failed_save_warns_once(self) -> None:
        store = ProfileStore(self.path.parent / "missing" / PROFILE_FILE)
        store.log = Logger(observer=self.logged)
        profiles = {"a": TLSProfile((5,), 0x1301, True)}
        store.save(profiles)
        store.save(profiles)
        self.assertEqual(len(self.logged.at(LogLevel.warn)), 1)
        (self.path.parent / "missing").mkdir()
        store.save(profiles)
        self.assertEqual(store.load(), profiles)
        (self.path.parent / "missing" / PROFILE_FILE).unlink()
        (self.path.parent / "missing").rmdir()
        store.save(profiles)
        self.assertEqual(len(self.logged.at(LogLevel.warn)), 2)


class _StubProber:
    """
    Records every probe; the test answers them.
    """

    timeout = 5.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, Deferred[Observation]]] = []

    def probe(
        self, endpoint: Any, domain: str, preamble: bytes = b"", mlkem: bool = False
    ) -> Deferred[Observation]:
        d: Deferred[Observation] = Deferred()
        self.calls.append((domain, mlkem, d))
        return d

    def pending(self) -> list[tuple[str, bool, Deferred[Observation]]]:
        return [call for call in self.calls if not call[2].called]

    def answer(self, classic: int = 1309, pq: int = 1281) -> None:
        for _, mlkem, d in self.pending():
            if mlkem:
                d.callback(Observation(0x1302, False, pq, X25519MLKEM768))
            else:
                d.callback(Observation(0x1302, False, classic))

    def fail(self, error: Exception) -> None:
        for _, _, d in self.pending():
            d.errback(Failure(error))


EE_DOMAIN = parse_secret("ee" + "e5" * 16 + DOMAIN.encode().hex(), "x")


class ProfileServiceTests(SynchronousTestCase):
    """
    The measuring service on a clock: backoff while the site is down, one
    warning per outage, the profiles kept in the state directory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.core = ProxyCore(
            Settings(secrets=(EE_DOMAIN,), mask_host=Address(LOCAL, 9)), self.clock
        )
        self.logged = _Events()

    def service(self, state: bool = True, **options: Any) -> tuple[ProfileService, _StubProber]:
        options.setdefault("retry_policy", backoffPolicy(2.0, 300.0, 2.0, jitter=lambda: 0.0))
        service = ProfileService(self.core, state_dir=self.folder if state else None, **options)
        service.log = Logger(observer=self.logged)
        prober = _StubProber()
        service.prober = prober  # type: ignore[assignment]
        service.startService()
        self.addCleanup(service.stopService)
        service.start_loop()
        return service, prober

    def delays(self) -> list[float]:
        now = self.clock.seconds()
        return sorted(call.getTime() - now for call in self.clock.getDelayedCalls())

    def retries(self, service: ProfileService) -> list[float]:
        now = self.clock.seconds()
        calls = self.clock.getDelayedCalls()
        return sorted(c.getTime() - now for c in calls if c.func == service._retry)

    def test_measures_both_hellos(self) -> None:
        service, prober = self.service(probes=3)
        self.assertEqual(Counter(mlkem for _, mlkem, _ in prober.calls), {False: 3, True: 3})
        prober.answer()
        profile = self.core.tls_profiles[DOMAIN]
        self.assertEqual(
            profile,
            TLSProfile.from_observations(
                [Observation(0x1302, False, 1309)] * 3,
                [Observation(0x1302, False, 1281, X25519MLKEM768)] * 3,
            ),
        )
        self.assertEqual(service.rounds, 1)
        # Nothing but the hourly round is due.
        self.assertEqual(self.delays(), [15.0, 3600.0])
        self.assertEqual(self.logged.at(LogLevel.warn), [])

    def test_unreachable_site_is_measured_again_with_backoff(self) -> None:
        service, prober = self.service(probes=1)
        waited = []
        for attempt in range(12):
            self.assertEqual(len(prober.pending()), 2, attempt)
            prober.fail(ConnectionRefusedError())
            (retry,) = self.retries(service)
            waited.append(retry)
            self.clock.advance(retry)
        # Seconds at first, minutes later, never more than five.
        self.assertEqual(waited[:4], [2.0, 4.0, 8.0, 16.0])
        self.assertEqual(waited[-1], 300.0)
        (warning,) = self.logged.at(LogLevel.warn)
        self.assertIn(DOMAIN, warning)
        self.assertIn("generic sizes", warning)
        self.assertEqual(self.logged.at(LogLevel.info), [])
        self.assertEqual(service.outages, {DOMAIN: 12})
        # Back: one line says so, and no retry is left.
        prober.answer()
        back = [line for line in self.logged.at(LogLevel.info) if "again" in line]
        self.assertEqual(len(back), 1)
        self.assertIn("12 failed", back[0])
        self.assertEqual(service.outages, {})
        self.assertEqual(self.retries(service), [])
        # A second outage warns again.
        service.refresh()
        prober.fail(TimeoutError())
        self.assertEqual(len(self.logged.at(LogLevel.warn)), 2)
        self.assertIn("last measured answer", self.logged.at(LogLevel.warn)[-1])

    def test_default_backoff_is_seconds_to_minutes(self) -> None:
        service = ProfileService(self.core)
        self.assertTrue(2.0 <= service.retry_policy(0) < 3.0)
        self.assertTrue(300.0 <= service.retry_policy(50) < 301.0)

    def test_site_that_answers_badly_is_not_down(self) -> None:
        service, prober = self.service(probes=1)
        prober.fail(TLSError("the server did not answer with TLS 1.3"))
        self.assertEqual(self.logged.at(LogLevel.warn), [])
        self.assertEqual(service.outages, {})
        self.assertEqual(self.delays(), [15.0, 3600.0])

    def test_one_measurement_at_a_time(self) -> None:
        service, prober = self.service(probes=1)
        prober.fail(ConnectionRefusedError())
        self.clock.advance(2.0)
        self.assertEqual(len(prober.pending()), 2)
        service.refresh()  # a reload, while the retry's probes are out
        self.assertEqual(len(prober.pending()), 2)
        prober.fail(ConnectionRefusedError())
        self.assertEqual(self.retries(service), [4.0])

    def test_front_failure_gets_the_site_measured(self) -> None:
        """
        A handshake that found the mask host down between rounds: the site
        is measured within the watch interval, not at the next round.
        """
        _, prober = self.service(probes=1)
        prober.answer()
        self.clock.advance(15.0)
        self.assertEqual(prober.pending(), [])
        self.core.stats.upstream_failures["mask-host"] += 1
        self.clock.advance(15.0)
        self.assertEqual(len(prober.pending()), 2)
        prober.fail(ConnectionRefusedError())
        self.assertEqual(len(self.logged.at(LogLevel.warn)), 1)
        # While it is known to be down, more failures add no measurements:
        # the backoff has it.
        self.core.stats.upstream_failures["mask-host"] += 5
        self.clock.advance(1.0)
        self.assertEqual(prober.pending(), [])
        self.clock.advance(1.0)
        self.assertEqual(len(prober.pending()), 2)

    def test_probes_that_fail_at_once(self) -> None:
        service, prober = self.service(probes=1)
        prober.fail(ConnectionRefusedError())
        prober.probe = lambda *a, **k: fail(ConnectionRefusedError())  # type: ignore[method-assign]
        for delay in (2.0, 4.0, 8.0):
            self.assertEqual(self.retries(service), [delay])
            self.clock.advance(delay)
        self.assertEqual(service.outages, {DOMAIN: 4})

    def test_probes_out_end_with_the_service(self) -> None:
        service, prober = self.service(probes=1)
        service.stopService()
        self.assertEqual(prober.pending(), [])
        self.assertTrue(all(d.called for _, _, d in prober.calls))
        self.assertEqual(self.logged.at(LogLevel.warn), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retries_end_with_the_service(self) -> None:
        service, prober = self.service(probes=1)
        prober.fail(ConnectionRefusedError())
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_of_a_domain_no_longer_served(self) -> None:
        service, prober = self.service(probes=1)
        prober.fail(ConnectionRefusedError())
        other = parse_secret("ee" + "e5" * 16 + b"other.example".hex(), "x")
        self.core.settings = dataclasses.replace(self.core.settings, secrets=(other,))
        self.clock.advance(2.0)
        self.assertEqual({domain for domain, _, _ in prober.pending()}, set())
        self.assertEqual(service.outages, {})

    def test_profile_kept_across_restarts(self) -> None:
        service, prober = self.service(probes=2)
        prober.answer(classic=1400, pq=1372)
        measured = self.core.tls_profiles[DOMAIN]
        self.assertTrue((self.folder / PROFILE_FILE).exists())
        service.stopService()
        # A new start, with the site down: the saved answer, not generic sizes.
        self.core = ProxyCore(self.core.settings, self.clock)
        service, prober = self.service()
        self.assertEqual(self.core.tls_profiles, {DOMAIN: measured})
        prober.fail(ConnectionRefusedError())
        self.assertEqual(self.core.tls_profiles, {DOMAIN: measured})
        self.assertIn("last measured answer", self.logged.at(LogLevel.warn)[0])
        # Measured again: replaced, and saved.
        self.clock.advance(2.0)
        prober.answer(classic=1500, pq=1472)
        self.assertEqual(self.core.tls_profiles[DOMAIN].sizes, (1500, 1500, 1500))
        saved = ProfileStore(self.folder / PROFILE_FILE).load()
        self.assertEqual(saved, self.core.tls_profiles)

    def test_saved_profiles_of_other_domains_are_left_out(self) -> None:
        ProfileStore(self.folder / PROFILE_FILE).save(
            {"other.example": TLSProfile((5,), 0x1301, True)}
        )
        self.service()
        self.assertEqual(self.core.tls_profiles, {})

    def test_corrupt_file_is_not_fatal(self) -> None:
        (self.folder / PROFILE_FILE).write_text("{not json")
        store_log = _Events()
        ProfileStore.log = Logger(observer=store_log)
        self.addCleanup(setattr, ProfileStore, "log", Logger())
        _, prober = self.service()
        self.assertEqual(self.core.tls_profiles, {})
        self.assertEqual(len(store_log.at(LogLevel.warn)), 1)
        prober.answer()
        self.assertEqual(set(ProfileStore(self.folder / PROFILE_FILE).load()), {DOMAIN})

    def test_without_a_state_directory(self) -> None:
        _, prober = self.service(state=False)
        prober.answer()
        self.assertEqual(list(self.folder.iterdir()), [])
