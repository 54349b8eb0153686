from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.replay import ReplayCache


class ReplayCacheTests(SynchronousTestCase):
    def test_replay(self) -> None:
        cache = ReplayCache(Clock())
        self.assertFalse(cache.check_and_add(b"a"))
        self.assertTrue(cache.check_and_add(b"a"))
        self.assertFalse(cache.check_and_add(b"b"))

    def test_capacity(self) -> None:
        cache = ReplayCache(Clock(), capacity=2)
        for key in (b"a", b"b", b"c"):
            cache.check_and_add(key)
        self.assertEqual(len(cache), 2)
        self.assertFalse(cache.check_and_add(b"a"))  # the oldest went first
        self.assertTrue(cache.check_and_add(b"c"))

    def test_window(self) -> None:
        clock = Clock()
        cache = ReplayCache(clock, window=10)
        cache.check_and_add(b"a")
        clock.advance(9)
        self.assertTrue(cache.check_and_add(b"a"))
        clock.advance(1)
        self.assertFalse(cache.check_and_add(b"a"))
        clock.advance(11)
        cache.check_and_add(b"z")
        self.assertEqual(len(cache), 1)

    def test_bad_capacity(self) -> None:
        self.assertRaises(ValueError, ReplayCache, Clock(), 0)
