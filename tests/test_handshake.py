"""
The handshake machine alone: bytes and a time in, a decision out, with no
transport, reactor or clock.
"""

from __future__ import annotations

import os
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.proxy.handshake import Accept, Consult, Front, Handshake, NeedMore, Reject
from mtproxy_tw.settings import Settings
from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import Mode, parse_secret

DD = parse_secret("alice=dd" + "a7" * 16, "x")
EE = parse_secret("erin=ee" + "e5" * 16 + b"example.com".hex(), "x")
SITE = Address("127.0.0.1", 4431)


class Replays:
    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def check_and_add(self, key: bytes) -> bool:
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def machine(*secrets: object, replay: Replays | None = None, **options: object) -> Handshake:
    policy = Settings(secrets=secrets or (DD,), **options)  # type: ignore[arg-type]
    return Handshake(policy, replay or Replays(), size=lambda: 3000)


class ObfuscatedInitTests(SynchronousTestCase):
    def test_valid_init_in_pieces(self) -> None:
        shake = machine()
        init = generate_init(TAG_PADDED, 2, secret=DD.key)
        self.assertEqual(shake.feed(init.wire[:30], 0), NeedMore())
        decision = shake.feed(init.wire[30:] + b"rest", 0)
        assert isinstance(decision, Accept)
        self.assertEqual((decision.secret, decision.init.dc, decision.rest), (DD, 2, b"rest"))
        self.assertIsNone(decision.records)
        self.assertRaises(RuntimeError, shake.feed, b"x", 0)

    def test_transport_the_secret_does_not_admit(self) -> None:
        init = generate_init(TAG_ABRIDGED, 2, secret=DD.key)
        decision = machine().feed(init.wire, 0)
        self.assertEqual(decision, Reject("transport-not-allowed", user="alice"))

    def test_bad_init_fronted_when_masking(self) -> None:
        data = os.urandom(64)
        decision = machine(mask=True, mask_host=SITE).feed(data, 0)
        self.assertEqual(decision, Front("bad-init", data, SITE))

    def test_replay(self) -> None:
        replay = Replays()
        init = generate_init(TAG_PADDED, 2, secret=DD.key)
        self.assertIsInstance(machine(replay=replay).feed(init.wire, 0), Accept)
        self.assertEqual(machine(replay=replay).feed(init.wire, 0), Reject("replay"))

    def test_http_sniffed(self) -> None:
        request = b"GET / HTTP/1.1\r\n"
        decision = machine(mask=True, mask_host=SITE).feed(request, 0)
        self.assertEqual(decision, Front("http", request, SITE))

    def test_timeout(self) -> None:
        shake = machine(mask=True, mask_host=SITE)
        shake.feed(b"\x00" * 10, 0)
        self.assertEqual(shake.timed_out(), Front("handshake-timeout", b"\x00" * 10, SITE))


class FakeTLSTests(SynchronousTestCase):
    def test_hello_then_init(self) -> None:
        now = time.time()
        shake = machine(EE)
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        decision = shake.feed(hello, now)
        assert isinstance(decision, NeedMore)
        self.assertGreater(len(decision.reply), 3000)
        init = generate_init(TAG_PADDED, 2, secret=EE.key)
        decision = shake.feed(faketls.wrap_records(init.wire + b"ping"), now)
        assert isinstance(decision, Accept)
        self.assertEqual((decision.secret, decision.rest, decision.reply), (EE, b"ping", b""))
        self.assertIsNotNone(decision.records)

    def test_hello_and_init_together(self) -> None:
        now = time.time()
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        init = generate_init(TAG_PADDED, 2, secret=EE.key)
        decision = machine(EE).feed(hello + faketls.wrap_records(init.wire), now)
        assert isinstance(decision, Accept)
        self.assertTrue(decision.reply)

    def test_failures_are_fronted_to_the_site(self) -> None:
        now = time.time()
        cases = {
            "tls-bad-digest": faketls.build_client_hello(bytes(16), "example.com", int(now)),
            "tls-unknown-sni": faketls.build_client_hello(EE.key, "other.example", int(now)),
            "tls-stale": faketls.build_client_hello(EE.key, "example.com", int(now) - 4000),
        }
        for reason, hello in cases.items():
            decision = machine(EE).feed(hello, now)
            self.assertEqual(decision, Front(reason, hello, Address("example.com", 443)))

    def test_replayed_hello(self) -> None:
        now = time.time()
        replay = Replays()
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        self.assertIsInstance(machine(EE, replay=replay).feed(hello, now), NeedMore)
        decision = machine(EE, replay=replay, mask_host=SITE).feed(hello, now)
        self.assertEqual(decision, Front("tls-replay", hello, SITE))

    def test_not_tls_with_only_tls_mode(self) -> None:
        decision = machine(EE, modes=frozenset({Mode.TLS}), mask_host=SITE).feed(b"\x01\x02", 0)
        self.assertEqual(decision, Front("not-tls", b"\x01\x02", SITE))

    def test_bad_init_after_hello_is_rejected(self) -> None:
        now = time.time()
        shake = machine(EE)
        shake.feed(faketls.build_client_hello(EE.key, "example.com", int(now)), now)
        decision = shake.feed(faketls.wrap_records(os.urandom(64)), now)
        self.assertEqual(decision, Reject("tls-bad-init"))

    def test_timeout_after_hello_is_rejected(self) -> None:
        now = time.time()
        shake = machine(EE)
        shake.feed(faketls.build_client_hello(EE.key, "example.com", int(now)), now)
        self.assertEqual(shake.timed_out(), Reject("handshake-timeout"))


class AnyBytesTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=800), max_size=6), st.booleans())
    def test_never_raises_and_stays_bounded(self, chunks: list[bytes], tls: bool) -> None:
        shake = machine(DD, EE, mask_host=SITE)
        if tls:
            chunks = [b"\x16\x03\x01\x02\x00", *chunks]
        for chunk in chunks:
            decision = shake.feed(chunk, 0)
            self.assertLessEqual(shake.buffered, 17000 + 64 + len(chunk))
            if not isinstance(decision, NeedMore):
                return
        self.assertIsInstance(shake.timed_out(), (Front, Reject))


class AdmissionFollowsSecretsTests(SynchronousTestCase):
    def test_ee_only_fronts_non_tls_at_once(self) -> None:
        """
        With only ee secrets no 64-byte init can be valid: a few random
        bytes are fronted at once, as a TLS server closes on a bad header.
        """
        data = os.urandom(10).replace(b"\x16", b"\x17")
        decision = machine(EE, mask_host=SITE).feed(data, 0)
        self.assertEqual(decision, Front("bad-init", data, SITE))

    def test_mixed_secrets_wait_for_an_init(self) -> None:
        self.assertEqual(machine(DD, EE, mask_host=SITE).feed(b"\x01" * 10, 0), NeedMore())

    def test_short_tls_hello_is_fronted_without_masking(self) -> None:
        """
        A real TLS client's short hello (under 512 bytes) is a fake-TLS
        failure, fronted even with masking off.
        """
        hello = b"\x16\x03\x01\x01\x2c\x01\x00\x01\x28\x03\x03" + os.urandom(289)
        for secrets in ((EE,), (DD, EE)):
            decision = machine(*secrets, mask=False).feed(hello, 0)
            self.assertEqual(
                decision, Front("tls-short-hello", hello, Address("example.com", 443))
            )


class LimitTests(SynchronousTestCase):
    """
    A client that proves its key but is refused by a limit is treated as a
    failed handshake: fronted where fronting is on, never answered.
    """

    def test_obfuscated2_client_over_a_limit(self) -> None:
        init = generate_init(TAG_PADDED, 2, secret=DD.key)
        shake = Handshake(
            Settings(secrets=(DD,), mask=True, mask_host=SITE),
            Replays(),
            admit=lambda secret: "quota",
        )
        self.assertEqual(
            shake.feed(init.wire, 0), Front("limit-quota", init.wire, SITE, user="alice")
        )

    def test_fake_tls_client_over_a_limit_gets_no_answer(self) -> None:
        now = time.time()
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        shake = Handshake(Settings(secrets=(EE,)), Replays(), admit=lambda secret: "expired")
        decision = shake.feed(hello, now)
        self.assertEqual(
            decision, Front("limit-expired", hello, Address("example.com", 443), user="erin")
        )

    def test_refused_address_whatever_it_sends(self) -> None:
        init = generate_init(TAG_PADDED, 2, secret=DD.key)
        shake = Handshake(
            Settings(secrets=(DD,), mask=True, mask_host=SITE), Replays(), refused="denied"
        )
        self.assertEqual(
            shake.feed(init.wire[:10], 0), Front("limit-denied", init.wire[:10], SITE)
        )

    def test_transport_not_allowed_is_fronted_with_the_user(self) -> None:
        init = generate_init(TAG_ABRIDGED, 2, secret=DD.key)
        decision = machine(mask=True, mask_host=SITE).feed(init.wire, 0)
        self.assertEqual(decision, Front("transport-not-allowed", init.wire, SITE, user="alice"))


def consulting(*secrets: object, **options: object) -> Handshake:
    """
    A machine without a replay store of its own: it asks (Consult).
    """
    policy = Settings(secrets=secrets or (DD,), **options)  # type: ignore[arg-type]
    return Handshake(policy, None, size=lambda: 3000)


class ConsultTests(SynchronousTestCase):
    """
    Without a replay store the machine asks the shared state, holding what
    arrives meanwhile, and goes on whichever way the verdict goes.
    """

    def test_init_waits_for_the_verdict_and_keeps_what_came_meanwhile(self) -> None:
        shake = consulting()
        init = generate_init(TAG_PADDED, 2, secret=DD.key)
        decision = shake.feed(init.wire + b"ab", 0)
        self.assertEqual(decision, Consult(init.wire[8:56], DD))
        self.assertTrue(shake.consulting)
        self.assertEqual(shake.feed(b"cd", 0), NeedMore())
        accepted = shake.resume(None)
        assert isinstance(accepted, Accept)
        self.assertEqual((accepted.secret, accepted.rest), (DD, b"abcd"))
        self.assertFalse(shake.consulting)
        self.assertRaises(RuntimeError, shake.resume, None)

    def test_replay_and_limit_verdicts(self) -> None:
        init = generate_init(TAG_PADDED, 2, secret=DD.key)
        shake = consulting(mask=True, mask_host=SITE)
        shake.feed(init.wire, 0)
        shake.feed(b"more", 0)
        self.assertEqual(shake.resume("replay"), Front("replay", init.wire + b"more", SITE))
        shake = consulting()
        shake.feed(init.wire, 0)
        self.assertEqual(shake.resume("connections"), Reject("limit-connections", user="alice"))

    def test_hello_then_init(self) -> None:
        now = time.time()
        shake = consulting(EE)
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        decision = shake.feed(hello, now)
        self.assertEqual(decision, Consult(b"tls:" + hello[11:43], EE))
        answered = shake.resume(None)
        assert isinstance(answered, NeedMore)
        self.assertGreater(len(answered.reply), 3000)
        init = generate_init(TAG_PADDED, 2, secret=EE.key)
        self.assertIsInstance(shake.feed(faketls.wrap_records(init.wire), now), Consult)
        # Records that arrive while consulting come out as plain bytes.
        self.assertEqual(shake.feed(faketls.wrap_records(b"ping"), now), NeedMore())
        accepted = shake.resume(None)
        assert isinstance(accepted, Accept)
        self.assertEqual((accepted.rest, accepted.reply), (b"ping", b""))

    def test_hello_and_init_together_answer_the_flight_with_the_last_verdict(self) -> None:
        now = time.time()
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        init = generate_init(TAG_PADDED, 2, secret=EE.key)
        shake = consulting(EE)
        self.assertIsInstance(shake.feed(hello + faketls.wrap_records(init.wire), now), Consult)
        second = shake.resume(None)
        self.assertEqual(second, Consult(init.wire[8:56], EE))
        accepted = shake.resume(None)
        assert isinstance(accepted, Accept)
        self.assertGreater(len(accepted.reply), 3000)
        # A replayed init after the flight: closed with the flight sent.
        shake = consulting(EE)
        shake.feed(hello + faketls.wrap_records(init.wire), now)
        shake.resume(None)
        refused = shake.resume("replay")
        assert isinstance(refused, Reject)
        self.assertEqual(refused.reason, "replay")
        self.assertGreater(len(refused.reply), 3000)

    def test_replayed_hello_is_fronted_with_everything(self) -> None:
        now = time.time()
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        shake = consulting(EE, mask_host=SITE)
        shake.feed(hello, now)
        shake.feed(b"\x17\x03\x03", now)
        self.assertEqual(
            shake.resume("replay"), Front("tls-replay", hello + b"\x17\x03\x03", SITE)
        )
        shake = consulting(EE, mask_host=SITE)
        shake.feed(hello, now)
        refused = shake.resume("ips")
        self.assertEqual(refused, Front("limit-ips", hello, SITE, "erin"))

    def test_timeouts_while_consulting(self) -> None:
        now = time.time()
        hello = faketls.build_client_hello(EE.key, "example.com", int(now))
        shake = consulting(EE, mask_host=SITE)
        shake.feed(hello, now)
        shake.feed(b"x", now)
        self.assertEqual(shake.timed_out(), Front("handshake-timeout", hello + b"x", SITE))
        shake = consulting(EE)
        shake.feed(hello, now)
        shake.resume(None)
        init = generate_init(TAG_PADDED, 2, secret=EE.key)
        shake.feed(faketls.wrap_records(init.wire), now)
        self.assertEqual(shake.timed_out(), Reject("handshake-timeout"))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.binary(max_size=800), max_size=6),
        st.booleans(),
        st.lists(st.sampled_from([None, "replay", "connections"]), min_size=2, max_size=2),
    )
    def test_any_bytes_and_verdicts(
        self, chunks: list[bytes], tls: bool, verdicts: list[str | None]
    ) -> None:
        now = time.time()
        shake = consulting(DD, EE, mask_host=SITE)
        valid = faketls.build_client_hello(EE.key, "example.com", int(now))
        chunks = [valid, *chunks] if tls else chunks
        answers = iter(verdicts)
        for chunk in chunks:
            decision = shake.feed(chunk, now)
            while isinstance(decision, Consult):
                decision = shake.resume(next(answers, None))
            self.assertLessEqual(shake.buffered, 17000 + 64 + len(chunk) + len(valid))
            if not isinstance(decision, NeedMore):
                return
        self.assertIsInstance(shake.timed_out(), (Front, Reject))
