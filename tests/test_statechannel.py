"""
The workers' claims channel: its framing (pure) and its two ends wired in
memory to a shared state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.shared.base import Claim
from mtproxy_tw.shared.channel import ClaimsClient, ClaimsServer
from mtproxy_tw.shared.local import LocalState
from mtproxy_tw.wire import statechannel as wire
from mtproxy_tw.wire.replay import ReplayCache

field = st.text(
    alphabet=st.characters(blacklist_characters="\t\n", blacklist_categories=("Cs",)), max_size=20
)
claims = st.lists(
    st.tuples(field, field, st.none() | st.integers(0, 10**6), st.none() | field, st.booleans()),
    max_size=4,
)


class FramingTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([wire.SEEN, wire.ACQUIRE, wire.RELEASE]), st.binary(max_size=300)
            ),
            max_size=8,
        ),
        st.lists(st.integers(1, 50), min_size=1, max_size=10),
    )
    def test_requests_however_cut(
        self, frames: list[tuple[bytes, bytes]], cuts: list[int]
    ) -> None:
        stream = b"".join(wire.request(op, payload) for op, payload in frames)
        reader = wire.FrameReader(requests=True)
        got: list[tuple[bytes, bytes]] = []
        i = 0
        while i < len(stream):
            step = cuts[i % len(cuts)]
            got += reader.feed(stream[i : i + step])
            i += step
        self.assertEqual(got, frames)

    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_answers(self, answers: list[bytes]) -> None:
        reader = wire.FrameReader(requests=False)
        stream = b"".join(wire.answer(a) for a in answers)
        self.assertEqual([p for _, p in reader.feed(stream)], answers)

    def test_garbage_is_refused(self) -> None:
        with self.assertRaises(wire.ChannelError):
            wire.FrameReader(requests=True).feed(b"X\x00\x00\x01a")
        with self.assertRaises(wire.ChannelError):
            wire.FrameReader(requests=True).feed(b"S\xff\xff\xff")
        with self.assertRaises(wire.ChannelError):
            wire.decode_claims(b"holder\nonly\ttwo")
        with self.assertRaises(wire.ChannelError):
            wire.encode_claims("a\tb", [])

    @settings(max_examples=200, deadline=None)
    @given(field, claims)
    def test_claims_round_trip(self, holder: str, fields: list[wire.ClaimFields]) -> None:
        self.assertEqual(wire.decode_claims(wire.encode_claims(holder, fields)), (holder, fields))

    @given(st.binary(max_size=200))
    def test_any_claims_bytes_decode_or_are_refused(self, data: bytes) -> None:
        with contextlib.suppress(wire.ChannelError):
            wire.decode_claims(data)


class Later(LocalState):
    """
    A LocalState whose replay answers wait for the test (as Redis's would).
    """

    def __init__(self) -> None:
        super().__init__(ReplayCache(Clock()))
        self.later: list[tuple[Deferred[bool], bool]] = []

    def seen(self, key: bytes) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.later.append((d, self.replay.check_and_add(key)))
        return d

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        return succeed(self.counters.acquire(holder, claims))


class ChannelTests(SynchronousTestCase):
    def pair(
        self, state: LocalState, prefix: str = "1.1:"
    ) -> tuple[ClaimsClient, ClaimsServer, object]:
        server = ClaimsServer(state, prefix)
        client = ClaimsClient()
        pump = connect(server, makeFakeServer(server), client, makeFakeClient(client))
        return client, server, pump

    def test_seen_acquire_release(self) -> None:
        state = LocalState(ReplayCache(Clock()))
        client, _, pump = self.pair(state)
        first, again = client.seen(b"k" * 48), client.seen(b"k" * 48)
        claim = [Claim("connections", "user:alice", 1), Claim("ips", "ips:alice", 1, "1.2.3.4")]
        one, two = client.acquire("7", claim), client.acquire("8", claim)
        pump.flush()  # type: ignore[attr-defined]
        self.assertEqual(
            [self.successResultOf(d) for d in (first, again, one, two)],
            [False, True, None, "connections"],
        )
        self.assertEqual(state.counters.snapshot(), {"user:alice": 1, "ips:alice": 1})
        client.release("7")
        pump.flush()  # type: ignore[attr-defined]
        self.assertEqual(state.counters.snapshot(), {})

    def test_answers_keep_the_order_asked(self) -> None:
        state = Later()
        client, _, pump = self.pair(state)
        slow = client.seen(b"a" * 48)
        fast = client.acquire("1", [Claim("connections", "user:bob", 5)])
        pump.flush()  # type: ignore[attr-defined]
        self.assertNoResult(fast)  # its answer waits behind the first
        d, seen = state.later.pop()
        d.callback(seen)
        pump.flush()  # type: ignore[attr-defined]
        self.assertFalse(self.successResultOf(slow))
        self.assertIsNone(self.successResultOf(fast))

    def test_a_lost_channel_releases_everything(self) -> None:
        state = LocalState(ReplayCache(Clock()))
        client, _server, pump = self.pair(state)
        client.acquire("1", [Claim("per_ip", "ip:1.2.3.4", 3)])
        pump.flush()  # type: ignore[attr-defined]
        self.assertEqual(state.counters.snapshot(), {"ip:1.2.3.4": 1})
        lost: list[bool] = []
        client.on_lost = lambda: lost.append(True)
        client.transport.loseConnection()
        pump.flush()  # type: ignore[attr-defined]
        self.assertEqual(state.counters.snapshot(), {})
        self.assertEqual(lost, [True])
        # Asking a closed channel fails at once.
        self.failureResultOf(client.seen(b"x"), ConnectionError)

    def test_two_workers_holders_stay_apart(self) -> None:
        state = LocalState(ReplayCache(Clock()))
        one, _, pump_one = self.pair(state, "1.1:")
        two, _, pump_two = self.pair(state, "2.1:")
        claim = [Claim("connections", "user:alice", 2)]
        one.acquire("5", claim)
        two.acquire("5", claim)
        pump_one.flush()  # type: ignore[attr-defined]
        pump_two.flush()  # type: ignore[attr-defined]
        self.assertEqual(state.counters.snapshot(), {"user:alice": 2})
        one.release("5")
        pump_one.flush()  # type: ignore[attr-defined]
        self.assertEqual(state.counters.snapshot(), {"user:alice": 1})

    def test_garbage_from_a_worker_closes_its_channel(self) -> None:
        state = LocalState(ReplayCache(Clock()))
        client, _server, pump = self.pair(state)
        client.acquire("1", [Claim("per_ip", "ip:a", 3)])
        pump.flush()  # type: ignore[attr-defined]
        client.transport.write(b"Zgarbage")
        pump.flush()  # type: ignore[attr-defined]
        self.assertEqual(state.counters.snapshot(), {})
