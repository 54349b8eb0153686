"""
A fleet: two proxy processes standing for two hosts, sharing a real
``redis-server`` (``--shared-state``). A replay sent to the other host is
caught, a user's limits and quota hold across both, and Redis going away
stops nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from mtproxy_tw.testing import connect_client
from mtproxy_tw.testing.clients import ObfuscatedClient, connect_raw
from mtproxy_tw.testing.proxyprocess import ProxyProcess, free_port
from mtproxy_tw.testing.redisserver import RedisServer
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import parse_secret

from .processes import ProcessCase

reactor: Any = _reactor
ALICE = parse_secret("alice=dd" + "5a" * 16, "x")


class FleetTests(ProcessCase):
    def setUp(self) -> None:
        self.redis = RedisServer.start_or_skip(self.mktemp())
        self.addCleanup(self.redis.stop)
        super().setUp()

    async def host(self, config: str = "", *extra: str) -> tuple[ProxyProcess, int]:
        state = Path(self.mktemp())
        state.mkdir(parents=True)
        port = free_port()
        args = [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--dc",
            f"2=127.0.0.1:{self.dc_port}",
            "--state-dir",
            str(state),
            "--public-host",
            "proxy.example",
            "--drain-timeout",
            "1",
            "--stats-interval",
            "0",
            "--no-mask",
            "--shared-state",
            f"redis://127.0.0.1:{self.redis.port}/0",
            *extra,
        ]
        if config:
            (state / "proxy.toml").write_text(config)
            args += ["--config", str(state / "proxy.toml")]
        else:
            args += ["--secret", f"alice={ALICE.hex()}"]
        proxy = ProxyProcess(reactor, args)
        self.addCleanup(proxy.kill)
        await self.until(proxy, lambda: "tg://proxy" in proxy.log)
        return proxy, port

    async def connect(self, port: int) -> ObfuscatedClient:
        return self.track(await connect_client(reactor, "127.0.0.1", port, ALICE))

    async def _replay(self) -> None:
        (a, a_port), (b, b_port) = await self.host(), await self.host()
        init = generate_init(TAG_PADDED, 2, secret=ALICE.key)
        first = self.track(await connect_raw(reactor, "127.0.0.1", a_port, init.wire))
        await deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(first.lost.called, a.log)
        again = self.track(await connect_raw(reactor, "127.0.0.1", b_port, init.wire))
        await again.lost.addTimeout(5, reactor)
        self.assertFalse(first.lost.called)
        # Redis gone: both hosts keep serving, on their own state.
        self.redis.stop()
        for port in (a_port, b_port):
            self.assertTrue(await self.echo(await self.connect(port)))
        for proxy in (a, b):
            await self.until(proxy, lambda p=proxy: "unreachable" in p.log)
            self.assertNotIn("Traceback", proxy.log)

    def test_a_replay_to_another_host_is_caught(self) -> Deferred[None]:
        return ensureDeferred(self._replay())

    async def _limits(self) -> None:
        config = f'[users.alice]\nsecret = "{ALICE.hex()}"\nmax_connections = 2\nquota = "100K"\n'
        (a, a_port), (b, b_port) = await self.host(config), await self.host(config)
        on_a, on_b = await self.connect(a_port), await self.connect(b_port)
        self.assertTrue(await self.echo(on_a))
        self.assertTrue(await self.echo(on_b))
        # Two held, one on each host: a third is refused on either.
        for port in (a_port, b_port):
            self.assertFalse(await self.echo(await self.connect(port)))
        # Each host alone moves less than the quota; together more.
        for _ in range(4):
            self.assertTrue(await self.echo(on_a, 10_000))
            self.assertTrue(await self.echo(on_b, 10_000))
        await on_a.lost.addTimeout(10, reactor)
        await on_b.lost.addTimeout(10, reactor)
        for proxy in (a, b):
            await self.until(proxy, lambda p=proxy: "quota" in p.log)
        for port in (a_port, b_port):
            self.assertFalse(await self.echo(await self.connect(port)))

    def test_limits_and_quota_hold_across_hosts(self) -> Deferred[None]:
        return ensureDeferred(self._limits())

    async def _workers(self) -> None:
        config = f'[users.alice]\nsecret = "{ALICE.hex()}"\nmax_connections = 2\n'
        (a, a_port), (b, b_port) = (
            await self.host(config, "--workers", "2"),
            await self.host(config),
        )
        await self.until(a, lambda: len(a.children()) == 2 and "worker 2 started" in a.log)
        # A host of two workers is one member of the fleet: its workers'
        # claims go through its parent to Redis.
        on_a, on_b = await self.connect(a_port), await self.connect(b_port)
        self.assertTrue(await self.echo(on_a), a.log)
        self.assertTrue(await self.echo(on_b), b.log)
        for port in (a_port, a_port, b_port):
            self.assertFalse(await self.echo(await self.connect(port)))
        self.assertNotIn("Traceback", a.log)

    def test_a_host_with_workers_is_one_member(self) -> Deferred[None]:
        return ensureDeferred(self._workers())
