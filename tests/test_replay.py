from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.replay import (
    ReplayCache,
    decode_snapshot,
    encode_snapshot,
    snapshot_size_limit,
)

keys = st.binary(min_size=0, max_size=255)
times = st.floats(allow_nan=False, allow_infinity=False)
entry_lists = st.lists(st.tuples(keys, times), max_size=40)


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

    def test_additions_count_new_keys_only(self) -> None:
        cache = ReplayCache(Clock())
        cache.check_and_add(b"a")
        cache.check_and_add(b"a")
        cache.check_and_add(b"b")
        self.assertEqual(cache.additions, 2)


class EntriesRestoreTests(SynchronousTestCase):
    def test_entries_oldest_first_inside_the_window(self) -> None:
        clock = Clock()
        cache = ReplayCache(clock, window=10)
        cache.check_and_add(b"a")
        clock.advance(4)
        cache.check_and_add(b"b")
        clock.advance(3)
        cache.check_and_add(b"c")
        self.assertEqual(cache.entries(), [(b"a", 0.0), (b"b", 4.0), (b"c", 7.0)])
        clock.advance(4)  # a is 11 s old
        self.assertEqual(cache.entries(), [(b"b", 4.0), (b"c", 7.0)])

    def test_restored_keys_are_replays(self) -> None:
        clock = Clock()
        clock.advance(1000)
        cache = ReplayCache(clock, window=100)
        held = cache.restore([(b"old", 850.0), (b"a", 950.0), (b"b", 990.0)])
        self.assertEqual(held, 2)
        self.assertEqual(cache.entries(), [(b"a", 950.0), (b"b", 990.0)])
        self.assertTrue(cache.check_and_add(b"a"))
        self.assertTrue(cache.check_and_add(b"b"))
        self.assertFalse(cache.check_and_add(b"old"))
        self.assertEqual(cache.additions, 1)  # restoring adds nothing new
        # Each expires when its own window ends.
        clock.advance(51)
        self.assertFalse(cache.check_and_add(b"a"))
        self.assertTrue(cache.check_and_add(b"b"))

    def test_restore_keeps_the_newest_capacity(self) -> None:
        clock = Clock()
        clock.advance(100)
        cache = ReplayCache(clock, capacity=2, window=1000)
        cache.restore([(b"c", 30.0), (b"a", 10.0), (b"b", 20.0)])
        self.assertEqual(cache.entries(), [(b"b", 20.0), (b"c", 30.0)])

    def test_restore_merges_with_what_is_there(self) -> None:
        clock = Clock()
        clock.advance(100)
        cache = ReplayCache(clock, capacity=3, window=1000)
        cache.check_and_add(b"now")
        cache.restore([(b"x", 50.0), (b"now", 40.0), (b"y", 60.0), (b"z", 5.0)])
        # "now" keeps its later time; z, the oldest, makes room.
        self.assertEqual(cache.entries(), [(b"x", 50.0), (b"y", 60.0), (b"now", 100.0)])

    def test_future_times_count_as_now(self) -> None:
        clock = Clock()
        clock.advance(100)
        cache = ReplayCache(clock, window=10)
        cache.restore([(b"a", 10_000.0), (b"nan", float("nan"))])
        self.assertEqual(cache.entries(), [(b"a", 100.0)])
        cache.check_and_add(b"b")
        clock.advance(10)
        self.assertEqual(cache.entries(), [])  # both expire, none blocks the other

    @given(entry_lists, st.integers(1, 8), st.floats(1, 100))
    @settings(max_examples=150)
    def test_restore_bounds(
        self, entries: list[tuple[bytes, float]], capacity: int, window: float
    ) -> None:
        clock = Clock()
        clock.advance(50)
        cache = ReplayCache(clock, capacity=capacity, window=window)
        held = cache.restore(entries)
        kept = cache.entries()
        self.assertEqual(held, len(kept))
        self.assertLessEqual(held, capacity)
        self.assertEqual(len({key for key, _ in kept}), held)
        seen = [t for _, t in kept]
        self.assertEqual(seen, sorted(seen))
        self.assertTrue(all(50 - window < t <= 50 for t in seen))


class SnapshotTests(SynchronousTestCase):
    def test_known_bytes(self) -> None:
        data = encode_snapshot([(b"k1", 1.5)])
        body = b"MTRC\x01\x00\x00\x00\x01" + struct.pack(">d", 1.5) + b"\x02k1"
        self.assertEqual(data, body + struct.pack(">I", zlib.crc32(body)))
        self.assertEqual(decode_snapshot(data), ([(b"k1", 1.5)], None))

    def test_empty(self) -> None:
        self.assertEqual(decode_snapshot(encode_snapshot([])), ([], None))

    @given(entry_lists)
    @settings(max_examples=200)
    def test_round_trip(self, entries: list[tuple[bytes, float]]) -> None:
        data = encode_snapshot(entries)
        self.assertEqual(decode_snapshot(data), (entries, None))
        self.assertLessEqual(len(data), snapshot_size_limit(len(entries)))

    def test_unwritable_entries_are_left_out(self) -> None:
        entries = [(b"x" * 256, 1.0), (b"a", float("inf")), (b"b", 2.0)]
        self.assertEqual(decode_snapshot(encode_snapshot(entries)).entries, [(b"b", 2.0)])

    def test_cache_round_trip(self) -> None:
        clock = Clock()
        cache = ReplayCache(clock, capacity=3)
        for key in (b"tls:" + b"r" * 32, b"i" * 48, b"x", b"y"):
            cache.check_and_add(key)
            clock.advance(1)
        snapshot = decode_snapshot(encode_snapshot(cache.entries()))
        self.assertIsNone(snapshot.error)
        self.assertEqual(len(snapshot.entries), 3)  # never more than the capacity
        later = ReplayCache(clock, capacity=3)
        later.restore(snapshot.entries)
        self.assertTrue(later.check_and_add(b"i" * 48))
        self.assertFalse(later.check_and_add(b"tls:" + b"r" * 32))

    @given(entry_lists.filter(bool), st.data())
    @settings(max_examples=200)
    def test_truncated(self, entries: list[tuple[bytes, float]], data: st.DataObject) -> None:
        whole = encode_snapshot(entries)
        cut = data.draw(st.integers(0, len(whole) - 1))
        snapshot = decode_snapshot(whole[:cut])
        self.assertEqual(snapshot.entries, [])
        self.assertIsNotNone(snapshot.error)

    @given(entry_lists, st.data())
    @settings(max_examples=200)
    def test_damaged(self, entries: list[tuple[bytes, float]], data: st.DataObject) -> None:
        whole = bytearray(encode_snapshot(entries))
        at = data.draw(st.integers(0, len(whole) - 1))
        whole[at] ^= data.draw(st.integers(1, 255))
        snapshot = decode_snapshot(bytes(whole))
        self.assertEqual(snapshot.entries, [])
        self.assertIsNotNone(snapshot.error)

    @given(st.binary(max_size=300))
    @settings(max_examples=300)
    def test_garbage_never_raises(self, data: bytes) -> None:
        snapshot = decode_snapshot(data)
        if snapshot.error is None:
            self.assertEqual(encode_snapshot(snapshot.entries), data)
        else:
            self.assertEqual(snapshot.entries, [])

    def _sealed(self, body: bytes) -> bytes:
        return body + struct.pack(">I", zlib.crc32(body))

    def test_errors_say_why(self) -> None:
        record = struct.pack(">dB", 1.0, 1) + b"k"
        cases = {
            b"": "too short",
            self._sealed(b"NOPE\x01\x00\x00\x00\x00"): "not a replay cache",
            self._sealed(b"MTRC\x02\x00\x00\x00\x00"): "unknown version 2",
            encode_snapshot([(b"k", 1.0)])[:-1] + b"\x00": "checksum",
            self._sealed(b"MTRC\x01\x00\x00\x00\x02" + record): "2 records announced, 1",
            self._sealed(b"MTRC\x01\x00\x00\x00\x01" + record[:8] + b"\x09k"): "announced, 0",
            self._sealed(b"MTRC\x01\x00\x00\x00\x00" + record): "10 bytes after",
            self._sealed(
                b"MTRC\x01\x00\x00\x00\x01" + struct.pack(">dB", float("nan"), 1) + b"k"
            ): "not a number",
        }
        for data, why in cases.items():
            entries, error = decode_snapshot(data)
            self.assertEqual(entries, [])
            assert error is not None
            self.assertIn(why, error)
