"""
The replay cache across restarts: the store on a Clock, its place in the
proxy service, and a replayed handshake fronted by a restarted proxy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw import tap
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.services.replaystore import REPLAY_FILE, SAVE_INTERVAL, ReplayStore
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import FakeSite
from mtproxy_tw.wire.obfuscated2 import TAG_INTERMEDIATE, generate_init
from mtproxy_tw.wire.replay import ReplayCache, decode_snapshot, encode_snapshot
from tests.logs import at_least_warnings, observe
from tests.test_fronting import EE, FrontingHarness
from tests.test_integration import CLASSIC


def saved(path: Path) -> list[tuple[bytes, float]]:
    snapshot = decode_snapshot(path.read_bytes())
    assert snapshot.error is None, snapshot.error
    return snapshot.entries


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = observe(self)
        self.clock = Clock()
        self.clock.advance(10_000)
        self.cache = ReplayCache(self.clock, capacity=4, window=300)
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / REPLAY_FILE
        self.store = ReplayStore(lambda: self.cache, self.path, self.clock)

    def test_load_at_start_skips_expired(self) -> None:
        self.path.write_bytes(
            encode_snapshot([(b"expired", 9_700.0), (b"a", 9_950.0), (b"b", 9_990.0)])
        )
        self.store.startService()
        self.assertEqual(self.cache.entries(), [(b"a", 9_950.0), (b"b", 9_990.0)])
        self.assertTrue(self.cache.check_and_add(b"a"))
        self.assertFalse(self.cache.check_and_add(b"expired"))
        self.assertEqual(at_least_warnings(self.events), [])
        self.store.stopService()

    def test_load_keeps_at_most_capacity(self) -> None:
        entries = [(bytes([i]), 9_950.0 + i) for i in range(10)]
        self.path.write_bytes(encode_snapshot(entries))
        self.store.startService()
        self.assertEqual(self.cache.entries(), entries[-4:])
        self.store.stopService()

    def test_periodic_save(self) -> None:
        self.store.startService()
        self.assertFalse(self.path.exists())  # nothing to save yet
        self.cache.check_and_add(b"a")
        self.clock.advance(SAVE_INTERVAL - 1)
        self.assertFalse(self.path.exists())
        self.clock.advance(1)
        self.assertEqual(saved(self.path), [(b"a", 10_000.0)])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.dir), [REPLAY_FILE])  # no temporary file left
        # Nothing new: no write.
        self.path.unlink()
        self.clock.advance(SAVE_INTERVAL)
        self.assertFalse(self.path.exists())
        self.cache.check_and_add(b"b")
        self.clock.advance(SAVE_INTERVAL)
        self.assertEqual([key for key, _ in saved(self.path)], [b"a", b"b"])
        self.store.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_save_on_stop(self) -> None:
        self.store.startService()
        self.cache.check_and_add(b"a")
        self.clock.advance(1)
        self.cache.check_and_add(b"b")
        self.assertIsNone(self.successResultOf(self.store.stopService()))
        self.assertFalse(self.store.running)
        self.assertEqual(saved(self.path), [(b"a", 10_000.0), (b"b", 10_001.0)])

    def test_file_holds_at_most_capacity(self) -> None:
        self.store.startService()
        for i in range(9):
            self.cache.check_and_add(bytes([i]) * 48)
        self.store.stopService()
        self.assertEqual(len(saved(self.path)), 4)

    def test_missing_file_is_an_empty_cache(self) -> None:
        self.store.startService()
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(at_least_warnings(self.events), [])
        self.store.stopService()
        self.assertFalse(self.path.exists())

    def _unusable(self, why: str) -> None:
        self.store.startService()
        self.assertEqual(len(self.cache), 0)
        (warning,) = at_least_warnings(self.events)
        self.assertIn(why, warning)
        self.assertIn("starts empty", warning)
        self.clock.advance(SAVE_INTERVAL * 3)
        self.store.stopService()
        self.assertEqual(len(at_least_warnings(self.events)), 1)

    def test_corrupt_file(self) -> None:
        data = bytearray(encode_snapshot([(b"a", 9_990.0)]))
        data[12] ^= 0xFF
        self.path.write_bytes(bytes(data))
        self._unusable("checksum mismatch")
        self.assertEqual(saved(self.path), [])  # replaced by a whole snapshot

    def test_truncated_file(self) -> None:
        self.path.write_bytes(encode_snapshot([(b"a", 9_990.0), (b"b", 9_991.0)])[:-7])
        self._unusable("not a usable replay cache")

    def test_garbage_file(self) -> None:
        self.path.write_bytes(b"GET / HTTP/1.1\r\n")
        self._unusable("not a replay cache snapshot")

    def test_oversized_file(self) -> None:
        entries = [(bytes([i]) * 255, 9_990.0) for i in range(5)]
        self.path.write_bytes(encode_snapshot(entries) + b"\x00" * 64)
        self._unusable("larger than 4 entries")

    def test_unreadable_file(self) -> None:
        self.path.mkdir()
        self.store.startService()
        self.cache.check_and_add(b"a")
        self.clock.advance(SAVE_INTERVAL * 3)  # each save fails too
        self.store.stopService()
        lines = at_least_warnings(self.events)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("cannot read", lines[0])
        self.assertIn("cannot save the replay cache", lines[1])

    def test_failed_saves_warn_once_until_one_works(self) -> None:
        self.dir.rmdir()
        self.store.startService()
        self.cache.check_and_add(b"a")
        self.clock.advance(SAVE_INTERVAL)
        self.clock.advance(SAVE_INTERVAL)
        self.assertEqual(len(at_least_warnings(self.events)), 1)
        self.dir.mkdir()
        self.clock.advance(SAVE_INTERVAL)
        self.assertEqual(saved(self.path), [(b"a", 10_000.0)])
        self.assertTrue(any("again" in formatEvent(e) for e in self.events))
        self.store.stopService()

    def test_the_current_cache_is_saved(self) -> None:
        self.store.startService()
        self.cache = ReplayCache(self.clock)  # the owner replaced it
        self.cache.check_and_add(b"new")
        self.store.stopService()
        self.assertEqual(saved(self.path), [(b"new", 10_000.0)])


class Busy:
    """
    A client that keeps the drain waiting until it is forgotten.
    """

    def activity(self) -> int:
        return 0

    def close_if_idle(self, before: int) -> bool:
        return False


class ProxyServiceTests(SynchronousTestCase):
    def service(self, state_dir: Path | None) -> tuple[ProxyService, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        reactor.advance(10_000)
        settings = Settings(secrets=(CLASSIC,), state_dir=state_dir, stats_interval=0)
        service = ProxyService(settings, reactor, ["tcp:0:interface=127.0.0.1"])
        service.open_file_limit = lambda: (1 << 20, 1 << 20)
        return service, reactor

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / REPLAY_FILE

    def test_kept_in_the_state_dir(self) -> None:
        self.path.write_bytes(encode_snapshot([(b"before", 9_990.0)]))
        service, _ = self.service(self.dir)
        service.startService()
        self.assertTrue(service.core.replay.check_and_add(b"before"))
        service.core.replay.check_and_add(b"during")
        self.successResultOf(service.stopService())
        self.assertEqual([key for key, _ in saved(self.path)], [b"before", b"during"])

    def test_no_state_dir_no_file(self) -> None:
        service, _ = self.service(None)
        self.assertIsNone(service.replay_store)
        service.startService()
        service.core.replay.check_and_add(b"a")
        self.successResultOf(service.stopService())
        self.assertEqual(os.listdir(self.dir), [])

    def test_saved_from_the_current_core(self) -> None:
        service, reactor = self.service(self.dir)
        service.startService()
        service.reload(Settings(secrets=(CLASSIC, EE), state_dir=self.dir))
        service.core.replay.check_and_add(b"after-reload")
        # Whatever a reload does to the core, the one in use is saved.
        service.core = ProxyCore(service.settings, reactor)
        service.core.replay.check_and_add(b"new-core")
        self.successResultOf(service.stopService())
        self.assertEqual([key for key, _ in saved(self.path)], [b"new-core"])

    def test_handshakes_ending_while_draining_are_saved(self) -> None:
        service, reactor = self.service(self.dir)
        service.startService()
        busy = cast(Any, Busy())
        service.core.clients.add(busy)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(service.replay_store and service.replay_store.running)
        service.core.replay.check_and_add(b"late")
        service.core.clients.discard(busy)
        reactor.advance(0.25)
        self.successResultOf(stopped)
        self.assertEqual([key for key, _ in saved(self.path)], [b"late"])

    def test_make_service_uses_the_state_dir(self) -> None:
        options = tap.Options()
        options.parseOptions(["--state-dir", str(self.dir), "--secret", "dd" + "5a" * 16])
        top = tap.makeService(options, MemoryReactorClock())
        assert isinstance(top, MultiService)
        proxy = next(s for s in top if isinstance(s, ProxyService))
        assert proxy.replay_store is not None
        self.assertEqual(proxy.replay_store.path, self.dir / REPLAY_FILE)


class RestartTests(FrontingHarness):
    """
    A handshake accepted before a restart is fronted when replayed after it.
    """

    async def _up(self, site: FakeSite, **options: Any) -> None:
        await self.start(site=site, state_dir=self.state, **options)

    async def _restart(self, site: FakeSite, **options: Any) -> None:
        await self.no_clients()
        await self.service.stopService()
        self.assertTrue(self.replay_file.exists())
        await self._up(site, **options)

    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        self.state.mkdir(parents=True)
        self.replay_file = self.state / REPLAY_FILE

    async def _hello(self) -> None:
        site = await self.site()
        await self._up(site)
        first = await self.answered()
        self.assertEqual(await self.within(first.request(b"ping")), b"ping")
        first.transport.abortConnection()
        await self.within(first.lost)
        await self._restart(site)
        client = await self.raw(first.hello)
        conn = await self.reaches_site(site, first.hello)
        await self.sees_site(client, conn)
        self.assertEqual(self.stats.fronted, {"tls-replay": 1})
        self.assertEqual(self.dc_connections(), 0)
        # A fresh hello is still served.
        fresh = await self.answered()
        self.assertEqual(await self.within(fresh.request(b"ping")), b"ping")
        self.assertEqual(self.stats.accepted, {"erin": 1})

    def test_replayed_hello_after_restart(self) -> Deferred[None]:
        return self.run_async(self._hello())

    async def _init(self) -> None:
        site = await self.site()
        await self._up(site, secrets=(EE, CLASSIC))
        init = generate_init(TAG_INTERMEDIATE, 2, secret=CLASSIC.key)
        first = await self.client(CLASSIC, TAG_INTERMEDIATE, 2, init=init)
        self.assertEqual(await self.within(first.request(b"ping")), b"ping")
        first.transport.abortConnection()
        await self.within(first.lost)
        await self._restart(site, secrets=(EE, CLASSIC))
        data = init.wire + os.urandom(36)
        client = await self.raw(data)
        conn = await self.reaches_site(site, data)
        await self.sees_site(client, conn)
        self.assertEqual(self.stats.fronted, {"replay": 1})
        self.assertEqual(self.stats.accepted, {})
        self.assertEqual(self.dc_connections(), 0)

    def test_replayed_init_after_restart(self) -> Deferred[None]:
        return self.run_async(self._init())
