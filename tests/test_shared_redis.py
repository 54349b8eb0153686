"""
The fleet's shared state on a real redis-server: two RedisState objects with
different host ids stand for two proxy hosts.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw.config.values import RedisURL, shared_state
from mtproxy_tw.shared.base import Claim
from mtproxy_tw.shared.ledger import UsageLedger, give_back
from mtproxy_tw.shared.local import Counters, LocalState
from mtproxy_tw.shared.redis import RedisState
from mtproxy_tw.shared.redisscripts import ACQUIRE, RELEASE, USAGE
from mtproxy_tw.testing.redisserver import RedisServer
from mtproxy_tw.wire.replay import ReplayCache
from tests.logs import at_least_warnings, observe

reactor: Any = _reactor


def conns(limit: int, user: str = "alice") -> Claim:
    return Claim("connections", f"user:{user}", limit)


def ips(limit: int, address: str, user: str = "alice") -> Claim:
    return Claim("ips", f"ips:{user}", limit, member=address)


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    """
    Poll ``check`` until it holds; fail after ``within`` seconds.
    """
    deadline = reactor.seconds() + within
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.02, lambda: None)


class FleetTestCase(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.server = RedisServer.start_or_skip(self.mktemp())
        self.addCleanup(self.server.stop)
        self.events = observe(self)

    async def host(self, name: str, *, heartbeat: float = 5.0, timeout: float = 2.0) -> RedisState:
        fallback = LocalState(ReplayCache(reactor, window=60.0))
        state = RedisState(
            reactor, self.server.url(), name, fallback, timeout=timeout, heartbeat=heartbeat
        )
        self.addCleanup(state.stop)
        await state.start()
        return state

    def hget(self, key: str, field: str) -> object:
        return self.server.command("HGET", "mtproxy:" + key, field)

    def warnings(self) -> list[str]:
        return at_least_warnings(self.events)

    def infos(self, text: str) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e["log_level"] == LogLevel.info and text in formatEvent(e)
        ]


class FleetTests(FleetTestCase):
    def test_replay_across_hosts(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            self.assertFalse(await a.seen(b"k" * 32))
            self.assertTrue(await b.seen(b"k" * 32))
            self.assertTrue(await a.seen(b"k" * 32))
            self.assertFalse(await b.seen(b"j" * 32))
            ttl = self.server.command("PTTL", "mtproxy:r:" + (b"k" * 32).hex())
            assert isinstance(ttl, int)
            self.assertTrue(0 < ttl <= 60000, ttl)

        return ensureDeferred(run())

    def test_connection_limit(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            self.assertIsNone(await a.acquire("a1", [conns(3)]))
            self.assertIsNone(await a.acquire("a2", [conns(3)]))
            self.assertIsNone(await b.acquire("b1", [conns(3)]))
            self.assertEqual(await b.acquire("b2", [conns(3)]), "connections")
            self.assertEqual(await a.acquire("a3", [conns(3)]), "connections")
            a.release("a1")
            await a.add_usage({})  # after the release, on the same connection
            self.assertIsNone(await b.acquire("b2", [conns(3)]))
            self.assertEqual(self.hget("p:user:alice", "a"), "1")
            self.assertEqual(self.hget("p:user:alice", "b"), "2")
            self.assertEqual(self.warnings(), [])

        return ensureDeferred(run())

    def test_address_limit(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            self.assertIsNone(await a.acquire("a1", [ips(2, "10.0.0.1")]))
            self.assertIsNone(await b.acquire("b1", [ips(2, "10.0.0.2")]))
            self.assertEqual(await b.acquire("b2", [ips(2, "10.0.0.3")]), "ips")
            # an address already counted anywhere in the fleet passes
            self.assertIsNone(await a.acquire("a2", [ips(2, "10.0.0.2")]))
            b.release("b1")
            await b.add_usage({})
            self.assertEqual(await b.acquire("b2", [ips(2, "10.0.0.3")]), "ips")
            a.release("a2")
            await a.add_usage({})
            self.assertIsNone(await b.acquire("b2", [ips(2, "10.0.0.3")]))

        return ensureDeferred(run())

    def test_all_or_nothing(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            local = Claim("max-connections", "global", 10, fleet=False)
            first = [local, conns(5), ips(1, "10.0.0.1")]
            self.assertIsNone(await a.acquire("a1", first))
            second = [local, conns(5), ips(1, "10.0.0.2")]
            self.assertEqual(await b.acquire("b1", second), "ips")
            self.assertEqual(await a.acquire("a2", second), "ips")
            self.assertIsNone(self.hget("p:user:alice", "b"))
            self.assertEqual(self.hget("p:user:alice", "a"), "1")
            self.assertEqual(
                a.fallback.counters.snapshot(), {"global": 1, "user:alice": 1, "ips:alice": 1}
            )
            self.assertEqual(b.fallback.counters.snapshot(), {})
            # a second call for the same holder, refused, keeps the first
            self.assertEqual(await a.acquire("a1", [conns(5), ips(1, "10.0.0.3")]), "ips")
            self.assertEqual(
                a.fallback.counters.held("a1"), [(c.counter, c.member) for c in first]
            )

        return ensureDeferred(run())

    def test_claims_of_one_call_on_one_key_count_each_other(self) -> Any:
        async def run() -> None:
            a = await self.host("a")
            self.assertEqual(await a.acquire("a1", [conns(1), conns(1)]), "connections")
            self.assertIsNone(self.hget("p:user:alice", "a"))
            two = [ips(1, "10.0.0.1"), ips(1, "10.0.0.2")]
            self.assertEqual(await a.acquire("a2", two), "ips")
            self.assertIsNone(await a.acquire("a3", [ips(1, "10.0.0.1"), ips(1, "10.0.0.1")]))
            self.assertIsNone(await a.acquire("a4", [conns(2), conns(2)]))
            self.assertEqual(self.hget("p:user:alice", "a"), "2")

        return ensureDeferred(run())

    def test_local_claims_per_host(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            local = Claim("max-connections", "global", 1, fleet=False)
            self.assertIsNone(await a.acquire("a1", [local]))
            self.assertIsNone(await b.acquire("b1", [local]))
            self.assertEqual(await a.acquire("a2", [local]), "max-connections")
            self.assertEqual(self.server.command("KEYS", "mtproxy:*global*"), [])

        return ensureDeferred(run())

    def test_usage_adds_up(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            self.assertEqual(await a.add_usage({"alice": 10}), {"alice": 10})
            self.assertEqual(await b.add_usage({"alice": 5, "bob": 1}), {"alice": 15, "bob": 1})
            self.assertEqual(await a.add_usage({"bob": 0}), {"alice": 15, "bob": 1})

        return ensureDeferred(run())

    def test_dead_host_holds_nothing(self) -> Any:
        """
        A host whose heartbeat expired no longer holds slots: its fields are
        ignored, and dropped.
        """

        async def run() -> None:
            b = await self.host("b")
            self.server.command("SET", "mtproxy:h:ghost", "1", "PX", 300)
            self.server.command("HSET", "mtproxy:p:user:alice", "ghost", 1)
            self.assertEqual(await b.acquire("b1", [conns(1)]), "connections")
            await until(lambda: self.server.command("EXISTS", "mtproxy:h:ghost") == 0)
            self.assertIsNone(await b.acquire("b1", [conns(1)]))
            self.assertIsNone(self.hget("p:user:alice", "ghost"))

        return ensureDeferred(run())

    def test_heartbeat_lost_then_rewritten(self) -> Any:
        """
        A live host counted dead (its heartbeat gone) writes its holdings
        back at its next beat.
        """

        async def run() -> None:
            a, b = await self.host("a", heartbeat=0.1), await self.host("b")
            self.assertIsNone(await a.acquire("a1", [conns(1)]))
            self.server.command("DEL", "mtproxy:h:a")
            self.assertIsNone(await b.acquire("b1", [conns(1)]))
            self.assertIsNone(self.hget("p:user:alice", "a"))
            await until(lambda: self.hget("p:user:alice", "a") == "1")
            self.assertEqual(await b.acquire("b2", [conns(2)]), "connections")

        return ensureDeferred(run())

    def test_released_before_answered(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            asking = a.acquire("a1", [conns(1)])
            a.release("a1")
            await asking
            await a.add_usage({})
            self.assertIsNone(self.hget("p:user:alice", "a"))
            self.assertIsNone(await b.acquire("b1", [conns(1)]))
            self.assertEqual(a.fallback.counters.snapshot(), {})

        return ensureDeferred(run())

    def test_stop_hands_back(self) -> Any:
        async def run() -> None:
            a, b = await self.host("a"), await self.host("b")
            self.assertIsNone(await a.acquire("a1", [conns(1)]))
            await a.add_usage({"alice": 1})
            await a.stop()
            self.assertEqual(self.server.command("EXISTS", "mtproxy:h:a"), 0)
            self.assertIsNone(await b.acquire("b1", [conns(1)]))

        return ensureDeferred(run())


class ScriptTests(FleetTestCase):
    def test_usage_batch_counted_once(self) -> None:
        """
        A batch sent again (its answer was lost) is not counted twice.
        """
        keys = ["mtproxy:u", "mtproxy:s"]
        for _ in range(2):
            self.server.command("EVAL", USAGE, 2, *keys, "a", "run:1", "alice", 5)
        self.server.command("EVAL", USAGE, 2, *keys, "b", "run:1", "alice", 1)
        total = self.server.command("EVAL", USAGE, 2, *keys, "a", "run:2", "alice", 1)
        self.assertEqual(total, ["alice", "7"])

    def test_older_connection_changes_nothing(self) -> Any:
        """
        A release or claim still queued from a connection this host has
        replaced (its answer timed out) does not touch the counts.
        """

        async def run() -> None:
            a = await self.host("a")
            self.assertIsNone(await a.acquire("a1", [conns(5)]))
            key, field = "mtproxy:p:user:alice", "a"
            self.server.command("EVAL", RELEASE, 0, "a", "mtproxy:", "old", key, field)
            claim = ["connections", 5, "", "p"]
            self.server.command("EVAL", ACQUIRE, 1, key, "a", "mtproxy:", 15000, "old", *claim)
            self.assertEqual(self.hget("p:user:alice", "a"), "1")

        return ensureDeferred(run())


class OutageTests(FleetTestCase):
    def test_down_at_start(self) -> Any:
        async def run() -> None:
            self.server.stop()
            started = reactor.seconds()
            a = await self.host("a", heartbeat=0.1)
            self.assertLess(reactor.seconds() - started, 2.0)
            (warning,) = self.warnings()
            self.assertIn(f"shared state {self.server.url()} unreachable", warning)
            self.assertIn("using this host's own state until it is back", warning)
            self.assertFalse(await a.seen(b"k" * 32))
            self.assertTrue(await a.seen(b"k" * 32))
            self.assertIsNone(await a.acquire("a1", [conns(1)]))
            self.assertEqual(await a.acquire("a2", [conns(1)]), "connections")
            self.assertEqual(await a.add_usage({"alice": 3}), {"alice": 3})
            await deferLater(reactor, 0.35, lambda: None)  # attempts to reconnect
            self.assertEqual(len(self.warnings()), 1)

            self.server.restart()
            await until(lambda: self.server.command("HGET", "mtproxy:u", "alice") == "3")
            await until(lambda: self.hget("p:user:alice", "a") == "1")
            await until(lambda: len(self.infos("is back")) == 1)
            self.assertEqual(len(self.warnings()), 1)

        return ensureDeferred(run())

    def test_unanswered_then_back(self) -> Any:
        """
        Redis frozen mid-way: answers come from this host's state within
        the timeout, with one warning; once it answers again, this host's
        holdings and usage are in Redis, counted once.
        """

        async def run() -> None:
            a = await self.host("a", heartbeat=0.2, timeout=0.3)
            self.assertIsNone(await a.acquire("a1", [conns(3)]))
            self.assertEqual(await a.add_usage({"alice": 5}), {"alice": 5})
            self.server.pause()
            started = reactor.seconds()
            self.assertIsNone(await a.acquire("a2", [conns(3)]))
            self.assertLess(reactor.seconds() - started, 0.3 + 0.4)
            self.assertEqual(len(self.warnings()), 1)
            self.assertFalse(await a.seen(b"k" * 32))
            self.assertEqual(await a.add_usage({"alice": 2}), {"alice": 7})
            self.assertIsNone(await a.acquire("a3", [conns(3)]))
            self.assertEqual(await a.acquire("a4", [conns(3)]), "connections")
            a.release("a1")
            await deferLater(reactor, 0.7, lambda: None)  # attempts to reconnect
            self.assertEqual(len(self.warnings()), 1)
            self.server.resume()
            await until(lambda: self.server.command("HGET", "mtproxy:u", "alice") == "7")
            await until(lambda: self.hget("p:user:alice", "a") == "2")
            await until(lambda: len(self.infos("is back")) == 1)
            self.assertEqual(await a.add_usage({"alice": 1}), {"alice": 8})
            await until(lambda: self.server.command("HGET", "mtproxy:u", "alice") == "8")
            self.assertEqual(len(self.warnings()), 1)

        return ensureDeferred(run())

    def test_restarted_server(self) -> Any:
        async def run() -> None:
            a = await self.host("a", heartbeat=0.1)
            self.assertIsNone(await a.acquire("a1", [ips(2, "10.0.0.1")]))
            await a.add_usage({"alice": 4})
            self.server.stop()
            self.assertIsNone(await a.acquire("a2", [ips(2, "10.0.0.2")]))
            self.assertEqual(await a.add_usage({"alice": 1}), {"alice": 5})
            self.server.restart()  # empty: saves nothing
            await until(lambda: self.hget("m:ips:alice", "a\n10.0.0.2") == "1")
            self.assertEqual(self.hget("m:ips:alice", "a\n10.0.0.1"), "1")
            await until(lambda: self.server.command("HGET", "mtproxy:u", "alice") == "1")
            self.assertEqual(len(self.warnings()), 1)

        return ensureDeferred(run())

    def test_password_never_logged(self) -> Any:
        async def run() -> None:
            self.server.command("CONFIG", "SET", "requirepass", "s3cret-pw")
            url = self.server.url()._replace(password="wrong-pw")
            fallback = LocalState(ReplayCache(reactor))
            a = RedisState(reactor, url, "a", fallback)
            self.addCleanup(a.stop)
            await a.start()
            self.assertIsNone(await a.acquire("a1", [conns(1)]))
            text = " ".join(formatEvent(e) for e in self.events)
            self.assertIn("unreachable", text)
            self.assertNotIn("wrong-pw", text)
            self.assertNotIn("s3cret-pw", text)
            self.assertEqual(len(self.warnings()), 1)
            b = RedisState(reactor, url._replace(password="s3cret-pw", db=1), "b", fallback)
            self.addCleanup(b.stop)
            await b.start()
            self.assertFalse(await b.seen(b"k" * 32))
            self.assertTrue(await b.seen(b"k" * 32))
            self.assertEqual(len(self.warnings()), 1)

        return ensureDeferred(run())


class LedgerTests(SynchronousTestCase):
    def test_batch_resent_until_counted(self) -> None:
        ledger = UsageLedger({"alice": 10})
        ledger.add({"alice": 1, "bob": -3})
        first = ledger.next_batch()
        ledger.add({"alice": 2})
        self.assertEqual(ledger.next_batch(), first)  # not confirmed: the same
        self.assertEqual(ledger.view(), {"alice": 13})
        ledger.counted(first[0], {"alice": 11})
        self.assertEqual(ledger.view(), {"alice": 13})
        self.assertNotEqual(ledger.next_batch()[0], first[0])

    def test_give_back_part(self) -> None:
        counters = Counters()
        counters.take("h", [conns(2)])
        counters.take("h", [ips(2, "10.0.0.1")])
        give_back(counters, "h", [ips(2, "10.0.0.1")])
        self.assertEqual(counters.held("h"), [("user:alice", None)])
        give_back(counters, "h", [conns(2)])
        self.assertEqual(counters.holders(), [])


class SharedStateURLTests(SynchronousTestCase):
    """
    ``--shared-state``: :func:`~mtproxy_tw.config.values.shared_state`.
    """

    def test_accepted(self) -> None:
        cases = {
            "redis://cache": RedisURL("cache", 6379, 0, None),
            " redis://cache:6380/2 ": RedisURL("cache", 6380, 2, None),
            "redis://:pw@10.0.0.5/3": RedisURL("10.0.0.5", 6379, 3, "pw"),
            "redis://[::1]:7000/": RedisURL("::1", 7000, 0, None),
            # Percent-encoded: the password as Redis is to be given it.
            "redis://:p%40ss%2Fw%3Ard%25@cache/1": RedisURL("cache", 6379, 1, "p@ss/w:rd%"),
        }
        for text, expected in cases.items():
            self.assertEqual(tuple(shared_state(text)), tuple(expected), text)
        self.assertEqual(str(shared_state("redis://[::1]:7000")), "redis://[::1]:7000/0")

    def test_refused(self) -> None:
        for text in [
            "http://cache:6379/0",
            "cache:6379",
            "redis://",
            "redis://:pw@",
            "redis://cache/zero",
            "redis://cache:port/0",
            "redis://cache:99999/0",
            "redis://cache/0?timeout=1",
            "redis://[::1/0",
            "redis://admin:pw@cache/0",
            "redis://admin@cache/0",
        ]:
            with self.assertRaises(ValueError, msg=text):
                shared_state(text)

    @settings(max_examples=200, deadline=None)
    @given(
        st.text(string.ascii_letters + string.digits + "-._~", min_size=8, max_size=30),
        st.text(max_size=30),
    )
    def test_password_never_shown(self, password: str, rest: str) -> None:
        """
        Neither a refusal nor the parsed URL, as text or repr, shows the
        password.
        """
        assume(password not in rest)
        try:
            url = shared_state(f"redis://:{password}@{rest}")
        except ValueError as e:
            self.assertNotIn(password, str(e))
            return
        self.assertIn(password, url.password or "")
        self.assertNotIn(password, str(url))
        self.assertNotIn(password, repr(url))
