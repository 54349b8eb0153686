"""
The users' usage service: counted live on a Clock, a user over quota or
past expiry cut mid-connection, and usage kept across restarts.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.config.users import Limits, UserSpec
from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.services.state import StateDir
from mtproxy_tw.services.usage import SAVE_INTERVAL, USAGE_FILE, UsageService
from mtproxy_tw.wire.secrets import Mode, Secret
from tests.logs import at_least_warnings, observe

KEY_A = bytes.fromhex("0123456789abcdef0123456789abcdef")
KEY_B = bytes.fromhex("00112233445566778899aabbccddeeff")


class FakeConnection:
    """
    What the service needs of a client connection: a byte total and cut().
    """

    def __init__(self, user: str | None) -> None:
        self.user = user
        self.total = 0
        self.cuts: list[str] = []

    def cut(self, reason: str) -> None:
        self.cuts.append(reason)


class UsageServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = observe(self)
        self.clock = Clock()
        self.clock.advance(1_000)
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / USAGE_FILE
        self.conns: list[FakeConnection] = []
        self.registry = self.make_registry()

    def make_registry(self) -> Registry:
        return Registry(
            (
                UserSpec("alice", (Secret("alice", KEY_A, Mode.SECURE),), quota=10_000),
                UserSpec("bob", (Secret("bob", KEY_B, Mode.SECURE),), expires=1_100.0),
            ),
            Limits(),
        )

    def live(self) -> list[tuple[FakeConnection, str | None, int]]:
        return [(c, c.user, c.total) for c in self.conns]

    def service(self, registry: Registry | None = None, **kwargs: Any) -> UsageService:
        service = UsageService(
            registry or self.registry, self.live, self.dir, self.clock, **kwargs
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def connect(self, user: str | None, registry: Registry | None = None) -> FakeConnection:
        registry = registry or self.registry
        conn = FakeConnection(user)
        registry.attach_address(conn, "127.0.0.1")
        if user is not None:
            registry.attach_user(conn, user)
        self.conns.append(conn)
        return conn

    def close(self, conn: FakeConnection) -> None:
        self.conns.remove(conn)
        self.registry.detach(conn, conn.total)

    def test_over_quota_cut_within_interval(self) -> None:
        self.service(interval=1.0)
        conn = self.connect("alice")
        other = self.connect("bob")
        plain = self.connect(None)
        conn.total = 9_999
        self.clock.advance(1.0)
        self.assertEqual(conn.cuts, [])
        self.assertEqual(self.registry.used("alice"), 9_999)
        conn.total = 10_000
        plain.total = 10**9
        self.clock.advance(1.0)
        self.assertEqual(conn.cuts, ["quota"])
        self.assertEqual((other.cuts, plain.cuts), ([], []))
        self.assertEqual(self.registry.check_user("alice", "127.0.0.1", 0), "quota")
        # Cut once, not on every tick while it closes.
        self.clock.advance(1.0)
        self.assertEqual(conn.cuts, ["quota"])

    def test_quota_shared_by_connections(self) -> None:
        self.service()
        first, second = self.connect("alice"), self.connect("alice")
        first.total, second.total = 6_000, 4_000
        self.clock.advance(1.0)
        self.assertEqual((first.cuts, second.cuts), (["quota"], ["quota"]))

    def test_expiry_at_the_clock_time(self) -> None:
        self.service()
        conn = self.connect("bob")
        self.clock.advance(99.0)  # 1099
        self.assertEqual(conn.cuts, [])
        self.clock.advance(1.0)  # 1100: the expiry
        self.assertEqual(conn.cuts, ["expired"])

    def test_usage_survives_a_restart(self) -> None:
        service = self.service()
        conn = self.connect("alice")
        conn.total = 3_000
        self.clock.advance(1.0)
        conn.total = 4_500  # not yet seen by a tick: counted at stop
        service.stopService()
        self.assertEqual(json.loads(self.path.read_text())["bytes"], {"alice": 4_500})

        registry = self.make_registry()
        self.assertEqual(registry.used("alice"), 0)
        self.service(registry)
        self.assertEqual(registry.used("alice"), 4_500)
        self.assertEqual(registry.remaining("alice"), 5_500)
        self.assertEqual(at_least_warnings(self.events), [])

    def test_quota_reached_before_a_restart_still_refuses(self) -> None:
        service = self.service()
        conn = self.connect("alice")
        conn.total = 12_000
        self.close(conn)
        service.stopService()
        registry = self.make_registry()
        self.service(registry)
        self.assertEqual(registry.check_user("alice", "127.0.0.1", 0), "quota")

    def test_closed_between_ticks_is_counted(self) -> None:
        self.service()
        conn = self.connect("alice")
        conn.total = 700
        self.close(conn)
        self.clock.advance(1.0)
        self.assertEqual(self.registry.used("alice"), 700)

    def test_periodic_save(self) -> None:
        self.service(save_interval=SAVE_INTERVAL)
        conn = self.connect("alice")
        conn.total = 100
        self.clock.advance(1.0)
        self.assertFalse(self.path.exists())
        self.clock.pump([1.0] * int(SAVE_INTERVAL))
        self.assertEqual(
            json.loads(self.path.read_text()), {"version": 1, "bytes": {"alice": 100}}
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), [USAGE_FILE])

    def test_unchanged_usage_not_rewritten(self) -> None:
        self.path.write_text(json.dumps({"version": 1, "bytes": {"alice": 5}}))
        os.utime(self.path, (1, 1))
        service = self.service()
        self.clock.pump([1.0] * int(SAVE_INTERVAL + 1))
        service.stopService()
        self.assertEqual(os.stat(self.path).st_mtime, 1)

    def test_state_dir_object(self) -> None:
        service = UsageService(self.registry, self.live, StateDir(self.dir), self.clock)
        self.assertEqual(service.path, self.path)

    def test_missing_file_is_no_usage(self) -> None:
        self.service()
        self.assertEqual(self.registry.usage_snapshot(), {})
        self.assertEqual(at_least_warnings(self.events), [])

    def test_unusable_files(self) -> None:
        for data in (
            b"{not json",
            b"\xff\xfe",
            b"[]",
            b'{"version": 2, "bytes": {}}',
            b'{"version": 1}',
            b'{"version": 1, "bytes": {"alice": -1}}',
            b'{"version": 1, "bytes": {"alice": "many"}}',
            b'{"version": 1, "bytes": {"alice": true}}',
            b"[" * 100_000,
        ):
            del self.events[:]
            self.path.write_bytes(data)
            registry = self.make_registry()
            service = UsageService(registry, self.live, self.dir, self.clock)
            service.load()
            self.assertEqual(registry.usage_snapshot(), {}, data[:40])
            (warning,) = at_least_warnings(self.events)
            self.assertEqual(
                warning, f"{self.path} is not a usage file; the users' usage starts from zero"
            )

    def test_unreadable_file(self) -> None:
        self.path.mkdir()
        service = UsageService(self.registry, self.live, self.dir, self.clock)
        service.load()
        (warning,) = at_least_warnings(self.events)
        self.assertIn(f"cannot read {self.path}", warning)

    def test_failed_save_warns_once(self) -> None:
        service = self.service()
        conn = self.connect("alice")
        self.path.mkdir()  # os.replace onto a directory fails
        conn.total = 1
        service.save()
        conn.total = 2
        self.clock.advance(1.0)
        service.save()
        self.assertEqual(len(at_least_warnings(self.events)), 1)
        self.assertIn("cannot save the users' usage", at_least_warnings(self.events)[0])
        self.path.rmdir()
        service.save()
        self.assertEqual(json.loads(self.path.read_text())["bytes"], {"alice": 2})
        self.assertEqual(len(at_least_warnings(self.events)), 1)

    def test_a_failing_cut_does_not_stop_the_loop(self) -> None:
        class Broken(FakeConnection):
            def cut(self, reason: str) -> None:
                raise RuntimeError("boom")

        self.service()
        broken = Broken("alice")
        self.registry.attach_address(broken, "127.0.0.1")
        self.registry.attach_user(broken, "alice")
        self.conns.append(broken)
        broken.total = 20_000
        self.clock.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        conn = self.connect("bob")
        self.clock.advance(100.0)
        self.assertEqual(conn.cuts, ["expired"])
