"""
The shared state in memory: the counters against a model, the embedded
state, the workers' AMP channel over an in-memory connection, the fleet's
host id, and the usage service adding up through a shared state.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.config.users import Limits, UserSpec
from mtproxy_tw.processes import host_id
from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.services.usage import USAGE_FILE, UsageService
from mtproxy_tw.shared.amp import Chunked, Metrics, MiddleConfig, RemoteState, StateServer
from mtproxy_tw.shared.base import Claim
from mtproxy_tw.shared.local import Counters, LocalState
from mtproxy_tw.wire.replay import ReplayCache
from mtproxy_tw.wire.secrets import Mode, Secret


def hang_up(protocol: Any) -> None:
    assert protocol.transport is not None
    protocol.transport.loseConnection()


def result(d: Deferred[Any]) -> Any:
    """
    What an already fired ``d`` holds.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the deferred has not fired"
    return box[0]


# -- the counters against a model

_PLAIN = ["ip:a", "ip:b", "global"]
_MEMBERED = ["ips:alice", "ips:bob"]
_HOLDERS = ["h0", "h1", "h2", "h3"]
_limits = st.one_of(st.none(), st.integers(min_value=0, max_value=3))
_plain_claim = st.builds(
    Claim, name=st.sampled_from(["per_ip", "max-connections"]),
    counter=st.sampled_from(_PLAIN), limit=_limits,
)  # fmt: skip
_member_claim = st.builds(
    Claim, name=st.just("ips"), counter=st.sampled_from(_MEMBERED), limit=_limits,
    member=st.sampled_from(["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]),
)  # fmt: skip
# Several claims of one call may name the same counter: each counts those before it.
_claims = st.lists(st.one_of(_plain_claim, _member_claim), max_size=4)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(_HOLDERS), _claims),
        st.tuples(st.just("release"), st.sampled_from([*_HOLDERS, "unknown"]), st.just([])),
    ),
    max_size=40,
)


class _Model:
    """
    The claims held, as a list: what the counters should answer.
    """

    def __init__(self) -> None:
        self.held: list[tuple[str, str, str | None]] = []

    def count(self, counter: str) -> int:
        entries = [(h, m) for h, c, m in self.held if c == counter]
        if counter in _MEMBERED:
            return len({m for _, m in entries})
        return len(entries)

    def has_member(self, counter: str, member: str | None) -> bool:
        return any(c == counter and m == member for _, c, m in self.held)

    def refused(self, claim: Claim) -> bool:
        if claim.limit is None:
            return False
        if claim.member is not None and self.has_member(claim.counter, claim.member):
            return False
        return self.count(claim.counter) >= claim.limit

    def first_refused(self, claims: list[Claim]) -> str | None:
        """
        The name of the first claim refused, those before it taken.
        """
        held = list(self.held)
        try:
            for claim in claims:
                if self.refused(claim):
                    return claim.name
                self.held.append(("(this call)", claim.counter, claim.member))
            return None
        finally:
            self.held = held

    def snapshot(self) -> dict[str, int]:
        counts = {c: self.count(c) for c in _PLAIN + _MEMBERED}
        return {c: n for c, n in counts.items() if n}


class CountersModelTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_operations)
    def test_against_a_list_of_held_claims(self, operations: list[Any]) -> None:
        counters = Counters()
        model = _Model()
        for op, holder, claims in operations:
            before = counters.snapshot()
            if op == "release":
                released = counters.release(holder)
                mine = [(c, m) for h, c, m in model.held if h == holder]
                self.assertEqual(sorted(released, key=repr), sorted(mine, key=repr))
                model.held = [e for e in model.held if e[0] != holder]
                if holder == "unknown":
                    self.assertEqual(released, [])
                    self.assertEqual(counters.snapshot(), before)
            else:
                expected = model.first_refused(claims)
                already = [model.has_member(c.counter, c.member) for c in claims]
                refused = counters.acquire(holder, claims)
                self.assertEqual(refused, expected)
                if refused is not None:
                    # all or nothing: a refusal takes no claim
                    self.assertEqual(counters.snapshot(), before)
                    continue
                model.held.extend((holder, c.counter, c.member) for c in claims)
                # The last claim of each counter saw every one before it.
                last = {c.counter: (i, c) for i, c in enumerate(claims)}
                for i, claim in last.values():
                    earlier = {c.member for c in claims[:i] if c.counter == claim.counter}
                    if claim.member is not None and (already[i] or claim.member in earlier):
                        continue  # a member already counted always passes
                    if claim.limit is not None:
                        self.assertLessEqual(counters.count(claim.counter), claim.limit)
            self.assertEqual(counters.snapshot(), model.snapshot())
        for holder in counters.holders():
            counters.release(holder)
        self.assertEqual(counters.snapshot(), {})
        self.assertEqual(counters.holders(), [])

    def test_claims_of_one_call_on_one_counter_count_each_other(self) -> None:
        counters = Counters()
        one = Claim("per_ip", "ip:a", 1)
        self.assertEqual(counters.acquire("a", [one, one]), "per_ip")
        self.assertEqual(counters.snapshot(), {})
        first, second = (Claim("ips", "ips:alice", 1, member=m) for m in ("1.1.1.1", "2.2.2.2"))
        self.assertEqual(counters.acquire("a", [first, second]), "ips")
        self.assertIsNone(counters.acquire("a", [first, first]))  # one member, counted once
        self.assertEqual(counters.count("ips:alice"), 1)

    def test_a_member_already_held_passes_a_full_counter(self) -> None:
        counters = Counters()
        claim = Claim("ips", "ips:alice", 1, member="1.1.1.1")
        self.assertIsNone(counters.acquire("a", [claim]))
        self.assertIsNone(counters.acquire("b", [claim]))
        other = Claim("ips", "ips:alice", 1, member="2.2.2.2")
        self.assertEqual(counters.acquire("c", [other]), "ips")
        self.assertEqual(counters.count("ips:alice"), 1)
        counters.release("a")
        self.assertEqual(counters.count("ips:alice"), 1)  # b still holds it
        counters.release("b")
        self.assertEqual(counters.snapshot(), {})

    def test_a_refusal_names_the_first_full_claim_and_takes_nothing(self) -> None:
        counters = Counters()
        counters.acquire("a", [Claim("per_ip", "ip:a", 1)])
        refused = counters.acquire("b", [Claim("global", "global", 5), Claim("per_ip", "ip:a", 1)])
        self.assertEqual(refused, "per_ip")
        self.assertEqual(counters.snapshot(), {"ip:a": 1})
        self.assertEqual(counters.held("b"), [])


# -- the embedded state


class LocalStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.state = LocalState(ReplayCache(self.clock, 100, 60.0), usage={"alice": 10})

    def test_seen_is_the_replay_cache(self) -> None:
        self.assertFalse(result(self.state.seen(b"k" * 16)))
        self.assertTrue(result(self.state.seen(b"k" * 16)))
        self.assertFalse(result(self.state.seen(b"j" * 16)))
        self.clock.advance(61)
        self.assertFalse(result(self.state.seen(b"k" * 16)))

    def test_add_usage_answers_totals_and_ignores_nothing_moved(self) -> None:
        totals = result(self.state.add_usage({"alice": 5, "bob": 7, "carol": 0, "dave": -3}))
        self.assertEqual(totals, {"alice": 15, "bob": 7})
        self.assertEqual(result(self.state.add_usage({})), {"alice": 15, "bob": 7})
        totals["alice"] = 0  # an answer is a copy
        self.assertEqual(self.state.usage["alice"], 15)

    def test_acquire_and_release(self) -> None:
        claim = Claim("connections", "user:alice", 1)
        self.assertIsNone(result(self.state.acquire("a", [claim])))
        self.assertEqual(result(self.state.acquire("b", [claim])), "connections")
        self.state.release("b")
        self.state.release("nobody")
        self.assertEqual(self.state.counters.snapshot(), {"user:alice": 1})
        self.state.release("a")
        self.assertEqual(self.state.counters.snapshot(), {})


# -- the workers' channel


class _Recording(LocalState):
    def __init__(self, clock: Clock) -> None:
        super().__init__(ReplayCache(clock, 100, 60.0))
        self.released: list[str] = []
        self.claims: list[list[Claim]] = []

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        self.claims.append(list(claims))
        return super().acquire(holder, claims)

    def release(self, holder: str) -> None:
        self.released.append(holder)
        super().release(holder)


class _Worker:
    def __init__(self, case: ChannelTests, prefix: str, **kwargs: Any) -> None:
        self.lost: list[str] = []
        self.remote, self.server, self.pump = connectedServerAndClient(
            lambda: StateServer(case.state, prefix, lambda: self.lost.append(prefix)),
            lambda: RemoteState(**kwargs),
        )

    def call(self, d: Deferred[Any]) -> Any:
        self.pump.flush()
        return result(d)


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = _Recording(self.clock)

    def worker(self, prefix: str = "1.1:", **kwargs: Any) -> _Worker:
        return _Worker(self, prefix, **kwargs)

    def test_seen_through_the_wire_across_workers(self) -> None:
        one, two = self.worker("1.1:"), self.worker("2.1:")
        self.assertIs(one.call(one.remote.seen(b"k" * 16)), False)
        self.assertIs(one.call(one.remote.seen(b"k" * 16)), True)
        self.assertIs(two.call(two.remote.seen(b"k" * 16)), True)
        self.assertIs(two.call(two.remote.seen(b"j" * 16)), False)

    def test_claims_travel_whole(self) -> None:
        one = self.worker()
        claims = [
            Claim("per_ip", "ip:1.2.3.4", None),
            Claim("max-connections", "global", 10, fleet=False),
            Claim("ips", "ips:alice", 2, member="1.2.3.4"),
        ]
        self.assertIsNone(one.call(one.remote.acquire("c", claims)))
        self.assertEqual(self.state.claims, [claims])

    def test_acquire_refusal_and_release_through_the_wire(self) -> None:
        one = self.worker()
        claim = Claim("connections", "user:alice", 1)
        self.assertIsNone(one.call(one.remote.acquire("a", [claim])))
        self.assertEqual(one.call(one.remote.acquire("b", [claim])), "connections")
        self.assertEqual(self.state.counters.holders(), ["1.1:a"])
        one.remote.release("a")
        one.pump.flush()
        self.assertEqual(self.state.counters.snapshot(), {})
        self.assertIsNone(one.call(one.remote.acquire("b", [claim])))

    def test_a_release_of_what_was_not_taken_changes_nothing(self) -> None:
        one = self.worker()
        claim = Claim("connections", "user:alice", 1)
        one.call(one.remote.acquire("a", [claim]))
        one.call(one.remote.acquire("b", [claim]))  # refused
        one.remote.release("b")
        one.remote.release("never")
        one.pump.flush()
        self.assertEqual(self.state.released, [])
        self.assertEqual(self.state.counters.holders(), ["1.1:a"])

    def test_prefixes_keep_equal_holder_names_apart(self) -> None:
        one, two = self.worker("1.1:"), self.worker("2.1:")
        claim = Claim("max-connections", "global", 2)
        self.assertIsNone(one.call(one.remote.acquire("c", [claim])))
        self.assertIsNone(two.call(two.remote.acquire("c", [claim])))
        self.assertEqual(sorted(self.state.counters.holders()), ["1.1:c", "2.1:c"])
        self.assertEqual(self.state.counters.count("global"), 2)
        two.remote.release("c")
        two.pump.flush()
        self.assertEqual(self.state.counters.holders(), ["1.1:c"])

    def test_a_lost_channel_releases_its_claims_and_only_then(self) -> None:
        one, two = self.worker("1.1:"), self.worker("2.1:")
        claim = Claim("connections", "user:alice", None)
        for holder in ("a", "b"):
            one.call(one.remote.acquire(holder, [claim]))
        two.call(two.remote.acquire("a", [claim]))
        self.assertEqual(self.state.counters.count("user:alice"), 3)
        self.assertEqual(one.lost, [])
        hang_up(one.remote)
        one.pump.flush()
        self.assertEqual(one.lost, ["1.1:"])
        self.assertEqual(self.state.counters.holders(), ["2.1:a"])
        self.assertEqual(sorted(self.state.released), ["1.1:a", "1.1:b"])
        self.assertEqual(two.lost, [])

    def test_a_claim_answered_after_the_channel_is_lost_is_given_back(self) -> None:
        # A backend that answers later (a fleet's server): the worker dies
        # while its claim is on the way.
        answers: list[Deferred[str | None]] = []

        def later(holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
            answers.append(Deferred())
            return answers[-1]

        self.patch(self.state, "acquire", later)
        one = self.worker()
        one.remote.acquire("a", [Claim("connections", "user:alice", None)])
        one.pump.flush()
        hang_up(one.remote)
        one.pump.flush()
        self.assertEqual(self.state.released, [])
        answers[0].callback(None)
        self.assertEqual(self.state.released, ["1.1:a"])

    def test_the_worker_hears_its_parent_is_gone(self) -> None:
        lost: list[bool] = []
        one = self.worker(lost=lambda: lost.append(True))
        hang_up(one.server)
        one.pump.flush()
        self.assertEqual(lost, [True])
        one.remote.release("a")  # nothing to send it on: ignored
        one.pump.flush()

    def test_add_usage_adds_up_across_workers(self) -> None:
        one, two = self.worker("1.1:"), self.worker("2.1:")
        self.assertEqual(one.call(one.remote.add_usage({"alice": 5})), {"alice": 5})
        totals = two.call(two.remote.add_usage({"alice": 3, "bob": 0}))
        self.assertEqual(totals, {"alice": 8})

    def test_metrics_longer_than_an_amp_value(self) -> None:
        big = os.urandom(200_000)
        one = self.worker(metrics=lambda: big)
        answer = one.call(one.server.callRemote(Metrics))
        self.assertEqual(answer["text"], big)

    def test_middle_config_reaches_the_worker_whole(self) -> None:
        got: list[tuple[str, bytes]] = []
        one = self.worker(middle_config=lambda kind, body: got.append((kind, body)))
        body = os.urandom(200_000)
        one.call(one.server.callRemote(MiddleConfig, kind="proxy-secret", body=body))
        self.assertEqual(got, [("proxy-secret", body)])

    def test_chunked_edges(self) -> None:
        argument = Chunked()
        for size in (0, 1, 60_000, 60_001, 180_000):
            value = os.urandom(size)
            strings: dict[bytes, bytes] = {}
            argument.toBox(b"v", strings, {"v": value}, None)
            self.assertTrue(all(len(s) <= 0xFFFF for s in strings.values()))
            objects: dict[str, Any] = {}
            argument.fromBox(b"v", strings, objects, None)
            self.assertEqual(objects["v"], value)


# -- the fleet's host id


class HostIdTests(SynchronousTestCase):
    def directory(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path

    def test_stable_for_a_directory_and_apart_for_two(self) -> None:
        one, two = self.directory(), self.directory()
        first = host_id(one)
        self.assertTrue(first.startswith(socket.gethostname() + "-"))
        self.assertEqual(host_id(one), first)
        self.assertNotEqual(host_id(two), first)
        self.assertEqual(host_id(two), host_id(two))

    def test_garbage_is_replaced(self) -> None:
        for garbage in (b"not an id!\n", b"\xff\xfe\x00", b""):
            path = self.directory()
            (path / "host-id").write_bytes(garbage)
            made = host_id(path)
            kept = (path / "host-id").read_text("ascii").strip()
            self.assertTrue(kept.isalnum())
            self.assertEqual(made, f"{socket.gethostname()}-{kept}")
            self.assertEqual(host_id(path), made)


# -- usage added up through a shared state


class _Conn:
    def __init__(self) -> None:
        self.total = 0

    def cut(self, reason: str) -> None:
        pass


class _Totals(LocalState):
    def __init__(self, usage: Mapping[str, int]) -> None:
        super().__init__(ReplayCache(Clock()), usage=usage)
        self.sent: list[dict[str, int]] = []

    def add_usage(self, deltas: Mapping[str, int]) -> Deferred[dict[str, int]]:
        self.sent.append(dict(deltas))
        return super().add_usage(deltas)


class SharedUsageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        key = bytes.fromhex("0123456789abcdef0123456789abcdef")
        spec = UserSpec("alice", (Secret("alice", key, Mode.SECURE),))
        self.registry = Registry((spec,), Limits())
        self.conn = _Conn()
        self.registry.attach_address(self.conn, "127.0.0.1")
        self.registry.attach_user(self.conn, "alice")
        # what the other workers counted already
        self.shared = _Totals({"alice": 1_000})

    def service(self, **kwargs: Any) -> UsageService:
        service = UsageService(
            self.registry,
            lambda: [(self.conn, "alice", self.conn.total)],
            self.dir,
            self.clock,
            shared=self.shared,
            **kwargs,
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def test_each_tick_sends_the_deltas_and_takes_the_totals(self) -> None:
        self.service()
        self.shared.sent.clear()  # the tick at start
        self.conn.total = 100
        self.clock.advance(1)
        self.assertEqual(self.shared.sent, [{"alice": 100}])
        self.assertEqual(self.registry.used("alice"), 1_100)
        self.conn.total = 150
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.shared.sent, [{"alice": 100}, {"alice": 50}, {}])
        self.assertEqual(self.registry.used("alice"), 1_150)
        self.assertEqual(self.shared.usage, {"alice": 1_150})

    def test_the_final_stop_shares_the_last_deltas(self) -> None:
        service = self.service()
        self.conn.total = 70
        self.clock.advance(1)
        self.conn.total = 90
        self.shared.sent.clear()
        service.stopService()
        self.assertEqual(self.shared.sent, [{"alice": 20}])
        self.assertEqual(self.shared.usage, {"alice": 1_090})
        self.assertEqual(self.registry.used("alice"), 1_090)

    def test_not_saving_writes_no_file(self) -> None:
        service = self.service(saving=False, save_interval=1.0)
        for total in (10, 20, 30):
            self.conn.total = total
            self.clock.advance(1)
        service.stopService()
        self.assertFalse((self.dir / USAGE_FILE).exists())
        self.assertEqual(os.listdir(self.dir), [])

    def test_saving_writes_the_file(self) -> None:
        # the counterpart of the test above: the same run, saving
        service = self.service(save_interval=1.0)
        self.conn.total = 10
        self.clock.advance(1)
        service.stopService()
        self.assertTrue((self.dir / USAGE_FILE).exists())
