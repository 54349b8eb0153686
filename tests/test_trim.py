"""
Memory after load: freed memory is handed back once a burst is over, and
never look after look under a steady load.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.services.memory import (
    GROWTH_BYTES,
    INTERVAL,
    TrimPolicy,
    TrimService,
    current_rss,
    malloc_trim,
)

MB = 1 << 20


class Process:
    """
    A fake process: its load and size, set by the test; a trim gives back
    what is free.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.moved = 0
        self.size = 50 * MB
        self.free = 0
        self.trimmed = 0

    def load(self) -> tuple[int, int]:
        return self.connections, self.moved

    def rss(self) -> int:
        return self.size

    def trim(self) -> bool:
        self.trimmed += 1
        self.size -= self.free
        freed, self.free = self.free, 0
        return freed > 0

    def burst(self, connections: int, moved: int, grown: int) -> None:
        self.connections = connections
        self.moved += moved
        self.size += grown


class TrimPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.process = Process()
        self.policy = TrimPolicy(self.process.load, self.process.rss, self.process.trim)
        self.assertFalse(self.policy.check())  # the first look only counts

    def test_trims_once_after_a_burst(self) -> None:
        p = self.process
        for _ in range(10):  # a steady load, the process grown: never a trim
            p.burst(1000, 500 * MB, 8 * MB)
            self.assertFalse(self.policy.check())
        p.free = 70 * MB
        p.burst(0, 0, 0)  # over
        self.assertTrue(self.policy.check())
        self.assertEqual((p.trimmed, p.size), (1, 60 * MB))
        for _ in range(10):  # quiet: nothing more to do
            self.assertFalse(self.policy.check())
        self.assertEqual(p.trimmed, 1)

    def test_cycles_are_collected_before_the_trim(self) -> None:
        """
        An idle process allocates too little for the collector to run: the
        closed connections' cycles are collected first, then trimmed.
        """
        p = self.process
        order: list[str] = []

        def trim() -> bool:
            order.append("trim")
            return p.trim()

        policy = TrimPolicy(p.load, p.rss, trim, collect=lambda: order.append("collect"))
        policy.check()
        p.burst(1000, 500 * MB, 80 * MB)
        policy.check()
        p.free = 70 * MB
        p.burst(0, 0, 0)
        self.assertTrue(policy.check())
        self.assertEqual(order, ["collect", "trim"])

    def test_bytes_falling_with_the_connections_open(self) -> None:
        p = self.process
        p.burst(2000, 800 * MB, 40 * MB)
        self.policy.check()
        p.burst(2000, 100 * MB, 0)  # idle connections hold on
        self.assertTrue(self.policy.check())

    def test_connections_falling(self) -> None:
        p = self.process
        p.burst(4000, 0, 40 * MB)
        self.policy.check()
        p.burst(2000, 0, 0)
        self.assertFalse(self.policy.check())  # half: still a load
        p.burst(1000, 0, 0)
        self.assertTrue(self.policy.check())

    def test_not_grown_is_no_trim(self) -> None:
        """
        A fall with the process no bigger than after the last trim (or at
        start) is left alone: nothing much to hand back.
        """
        p = self.process
        p.burst(100, 50 * MB, GROWTH_BYTES - 1)
        self.policy.check()
        p.burst(0, 0, 0)
        self.assertFalse(self.policy.check())
        self.assertEqual(p.trimmed, 0)

    def test_not_glibc(self) -> None:
        p = self.process
        policy = TrimPolicy(p.load, p.rss, lambda: None)
        policy.check()
        p.burst(1000, 500 * MB, 100 * MB)
        policy.check()
        p.burst(0, 0, 0)
        self.assertFalse(policy.check())
        self.assertEqual(policy.trims, 0)


class TrimServiceTests(SynchronousTestCase):
    def test_looks_every_interval(self) -> None:
        p = Process()
        clock = Clock()
        service = TrimService(TrimPolicy(p.load, p.rss, p.trim), clock)
        service.startService()
        self.addCleanup(service.stopService)
        p.burst(1000, 500 * MB, 100 * MB)
        p.free = 90 * MB
        clock.advance(INTERVAL)
        self.assertEqual(p.trimmed, 0)
        p.burst(0, 0, 0)
        clock.advance(INTERVAL)
        self.assertEqual(p.trimmed, 1)


class RealProcessTests(SynchronousTestCase):
    def test_this_process(self) -> None:
        """
        glibc's malloc_trim runs here (or says it cannot); the size reads.
        """
        self.assertIn(malloc_trim(), (True, False, None))
        rss = current_rss()
        if rss is not None:
            self.assertGreater(rss, MB)
