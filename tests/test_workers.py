"""
``--workers N`` with real processes on loopback: connections spread over
the workers, and what must hold across the proxy holds across them.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater

from mtproxy_tw.testing import connect_client
from mtproxy_tw.testing.clients import connect_raw
from mtproxy_tw.testing.proxyprocess import (
    ProxyProcess,
    children,
    free_port,
    listening_pids,
    socket_owners,
)
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import parse_secret

from .processes import ProcessCase

reactor: Any = _reactor
ALICE = parse_secret("alice=dd" + "5a" * 16, "x")
BOB = parse_secret("bob=dd" + "6b" * 16, "x")
ERIN = parse_secret("erin=ee" + "e5" * 16 + b"example.com".hex(), "x")


class _WorkersCase(ProcessCase):
    def setUp(self) -> None:
        super().setUp()
        self.state = Path(self.mktemp())
        self.state.mkdir()

    async def start(
        self, *extra: str, config: str = "", own_group: bool = False
    ) -> tuple[Any, ProxyProcess, int]:
        port = free_port()
        args = [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--workers",
            "2",
            "--dc",
            f"2=127.0.0.1:{self.dc_port}",
            "--state-dir",
            str(self.state),
            "--public-host",
            "proxy.example",
            "--drain-timeout",
            "1",
            "--stats-interval",
            "0",
            *extra,
        ]
        if config:
            path = self.state / "proxy.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        elif "--secrets-file" not in extra:
            args += ["--secret", f"alice={ALICE.hex()}"]
        tree = ProxyProcess(reactor, args, own_group=own_group)
        self.addCleanup(tree.kill)
        await tree.until(lambda: len(re.findall(r"worker \d started", tree.log)) == 2)
        await tree.until(lambda: len(listening_pids(tree.children(), port)) == 2)
        return tree.process, tree, port

    async def spread_clients(
        self, process: Any, port: int, count: int, make: Any
    ) -> list[tuple[Any, int]]:
        """
        Connect until both workers hold some of ``count`` connections.
        """
        workers = children(process.pid)
        held: list[tuple[Any, int]] = []
        for _ in range(200):
            try:
                client = self.track(await make())
            except ConnectError:
                # Refused by a full limit (aborted) before this side's reactor
                # saw the connection made: the connect itself fails.
                continue
            local = client.transport.getHost().port
            owner = socket_owners(workers, port).get(local)
            if owner is None and not client.lost.called:
                await deferLater(reactor, 0.05, lambda: None)
                owner = socket_owners(workers, port).get(local)
            held.append((client, owner))
            if len(held) >= count and len({o for _, o in held} - {None}) == 2:
                break
        self.assertEqual(len({o for _, o in held} - {None}), 2, "never reached the second worker")
        return held


class WorkersTests(_WorkersCase):
    async def _spread(self) -> None:
        process, tree, port = await self.start()
        workers = children(process.pid)
        self.assertEqual(len(workers), 2, tree.log)
        # Each worker's own figure, and which worker says it.
        for n in (1, 2):
            await self.until(tree, lambda n=n: f"worker {n}: --max-connections " in tree.log)
        self.assertNotRegex(tree.log, r"\] --max-connections \d")
        clients = [
            self.track(await connect_client(reactor, "127.0.0.1", port, ALICE)) for _ in range(60)
        ]
        for client in clients:
            self.assertTrue(await self.echo(client))
        owners = socket_owners(workers, port)
        served = [owners.get(c.transport.getHost().port) for c in clients]
        self.assertNotIn(None, served)
        for pid in workers:
            share = served.count(pid) / len(served)
            self.assertTrue(0.2 <= share <= 0.8, f"worker {pid} took {share:.0%}")
        for client in clients:
            client.transport.loseConnection()
        # SIGTERM: every worker drains and the tree ends.
        process.signalProcess("TERM")
        code, sig = await tree.ended.addTimeout(20, reactor)
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], tree.log)
        for pid in workers:
            self.assertFalse(Path(f"/proc/{pid}").exists(), tree.log)
        self.assertNotIn("Traceback", tree.log)
        self.assertEqual(len(re.findall(r"Main loop terminated", tree.log)), 3, tree.log)
        # No line per connection: not the DC legs' factories, not the channels.
        self.assertNotIn("Starting factory", tree.log)
        self.assertNotIn("connection established", tree.log)

    def test_connections_spread_and_sigterm_stops_all(self) -> Deferred[None]:
        return ensureDeferred(self._spread())

    async def _group(self) -> None:
        import shutil

        if shutil.which("setsid") is None:
            raise self.skipTest("setsid is not installed")
        _process, tree, port = await self.start(own_group=True)
        client = self.track(await connect_client(reactor, "127.0.0.1", port, ALICE))
        self.assertTrue(await self.echo(client))
        # As systemd stops a unit (and timeout(1) its command): SIGTERM to
        # every process at once, and again; each stops once, no traceback.
        tree.signal_group(signal.SIGTERM)
        tree.signal_group(signal.SIGTERM)
        await tree.ended.addTimeout(20, reactor)
        self.assertNotIn("Traceback", tree.log)
        self.assertNotIn("#critical", tree.log)
        self.assertEqual(len(re.findall(r"Main loop terminated", tree.log)), 3, tree.log)

    def test_a_signal_to_the_whole_group_stops_each_once(self) -> Deferred[None]:
        return ensureDeferred(self._group())

    async def _orphans(self) -> None:
        process, tree, _port = await self.start()
        workers = children(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        await tree.ended
        # Their channel to the parent closes: each worker stops by itself.
        deadline = reactor.seconds() + 30
        while any(_alive(pid) for pid in workers):
            if reactor.seconds() > deadline:
                self.fail(f"the workers outlived their parent:\n{tree.log}")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIn("the parent is gone; stopping", tree.log)

    def test_workers_stop_when_the_parent_is_killed(self) -> Deferred[None]:
        return ensureDeferred(self._orphans())


class SharedAcrossWorkersTests(_WorkersCase):
    async def _replay(self) -> None:
        process, tree, port = await self.start("--no-mask")
        first = generate_init(TAG_PADDED, 2, secret=ALICE.key)
        held = await self.spread_clients(
            process, port, 8, lambda: connect_raw(reactor, "127.0.0.1", port)
        )
        for client, _ in held:
            client.write(first.wire)
        # Exactly one of them is let through, on whichever worker it was:
        # the others are replays, closed, whatever worker they reached.
        await self.until(tree, lambda: sum(c.lost.called for c, _ in held) >= len(held) - 1)
        await deferLater(reactor, 0.5, lambda: None)
        open_ones = [c for c, _ in held if not c.lost.called]
        self.assertEqual(len(open_ones), 1, tree.log)

    def test_replay_to_another_worker_is_caught(self) -> Deferred[None]:
        return ensureDeferred(self._replay())

    async def start_fronting(self) -> tuple[Any, Any, ProxyProcess, int]:
        """
        Two workers with ERIN's fake-TLS secret, fronting a FakeSite.
        """
        from mtproxy_tw.testing.fakesite import FakeSite

        site = FakeSite("example.com")
        site_port = site.listen(reactor)
        self.addCleanup(site.close)
        process, tree, port = await self.start(
            "--secret",
            f"erin={ERIN.hex()}",
            "--mask-host",
            f"127.0.0.1:{site_port.getHost().port}",
        )
        return site, process, tree, port

    async def _tls_replay(self) -> None:
        import time

        from mtproxy_tw.wire import faketls

        site, process, tree, port = await self.start_fronting()
        hello = faketls.build_client_hello(ERIN.key, "example.com", int(time.time()))
        held = await self.spread_clients(
            process, port, 4, lambda: connect_raw(reactor, "127.0.0.1", port)
        )
        for client, _ in held:
            client.write(hello)

        # One gets the proxy's answer; every other copy, whichever worker
        # it reached, goes to the site, byte for byte (the site's other
        # connections are the workers measuring its answer).
        def fronted() -> int:
            return sum(bytes(c.received) == hello for c in site.connections)

        await self.until(tree, lambda: fronted() == len(held) - 1)

        # The fronted copies get the site's own answer, whatever it is (to
        # this test hello, an alert), and the one let through the proxy's.
        def answers() -> list[bytes]:
            return sorted(bytes(c.sent) for c in site.connections if bytes(c.received) == hello)

        await self.until(
            tree,
            lambda: (
                all(answers())
                and sorted(bytes(c.received) for c, _ in held if bytes(c.received) in answers())
                == answers()
            ),
        )
        ours = [c for c, _ in held if bytes(c.received) not in answers()]
        self.assertEqual(len(ours), 1)
        self.assertEqual(bytes(ours[0].received[:3]), b"\x16\x03\x03")
        self.assertNotIn("Traceback", tree.log)

    def test_replayed_hello_to_another_worker_is_fronted(self) -> Deferred[None]:
        return ensureDeferred(self._tls_replay())

    async def _measured_once(self) -> None:
        site, process, tree, port = await self.start_fronting()
        await self.until(tree, lambda: "TLS answer of example.com" in tree.log)
        await self.until(tree, lambda: all(c.lost.called for c in site.connections))
        # One round of probes (3 of each hello shape), by the parent, not
        # one per worker: the site sees the proxy's host measure it once.
        self.assertEqual(len(site.connections), 6, tree.log)
        self.assertEqual(tree.log.count("TLS answer of example.com"), 1, tree.log)
        # Both workers answer hellos with the measured shape: a first
        # flight of the site's record sizes.
        import time

        from mtproxy_tw.wire import faketls

        held = await self.spread_clients(
            process, port, 2, lambda: connect_raw(reactor, "127.0.0.1", port)
        )
        for client, _ in held:
            client.write(faketls.build_client_hello(ERIN.key, "example.com", int(time.time())))
        # (Without the parent's answers, each worker would pick a size at
        # random, and the two would not meet.)
        await self.until(
            tree,
            lambda: (
                all(len(c.received) > 200 for c, _ in held)
                and len({len(c.received) for c, _ in held}) == 1
            ),
        )

    def test_the_fronted_site_is_measured_once_for_every_worker(self) -> Deferred[None]:
        return ensureDeferred(self._measured_once())

    async def _user_limit(self) -> None:
        config = f'[users.alice]\nsecret = "{ALICE.hex()}"\nmax_connections = 3\n'
        process, tree, port = await self.start("--no-mask", config=config)
        held = await self.spread_clients(
            process, port, 6, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        answered = [await self.echo(client) for client, _ in held]
        self.assertEqual(answered.count(True), 3, tree.log)
        # One let go: its slot is free again, whichever worker takes the next.
        winner = next(c for (c, _), ok in zip(held, answered, strict=True) if ok)
        winner.transport.loseConnection()
        await winner.lost
        await deferLater(reactor, 0.3, lambda: None)
        again = self.track(await connect_client(reactor, "127.0.0.1", port, ALICE))
        self.assertTrue(await self.echo(again), tree.log)
        late = self.track(await connect_client(reactor, "127.0.0.1", port, ALICE))
        self.assertFalse(await self.echo(late), tree.log)
        self.assertIn("refused alice", tree.log)

    def test_user_connection_limit_holds_across_workers(self) -> Deferred[None]:
        return ensureDeferred(self._user_limit())

    async def _per_address(self) -> None:
        config = "[limits]\nmax_connections_per_ip = 3\n"
        process, tree, port = await self.start(
            "--no-mask", "--secret", f"alice={ALICE.hex()}", config=config
        )
        held = await self.spread_clients(
            process, port, 6, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        answered = [await self.echo(client) for client, _ in held]
        self.assertEqual(answered.count(True), 3, tree.log)

    async def _cap(self) -> None:
        process, tree, port = await self.start("--no-mask", "--max-connections", "3")
        held = await self.spread_clients(
            process, port, 6, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        answered = [await self.echo(client) for client, _ in held]
        self.assertEqual(answered.count(True), 3, tree.log)

    def test_max_connections_holds_across_workers(self) -> Deferred[None]:
        return ensureDeferred(self._cap())

    def test_address_limit_holds_across_workers(self) -> Deferred[None]:
        return ensureDeferred(self._per_address())

    async def _quota(self) -> None:
        config = f'[users.alice]\nsecret = "{ALICE.hex()}"\nquota = "100K"\n'
        process, tree, port = await self.start("--no-mask", config=config)
        held = await self.spread_clients(
            process, port, 2, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        # One connection on each worker, each moving 60 KB: under the quota
        # alone, over it together.
        one_each = {owner: client for client, owner in held}
        self.assertEqual(len(one_each), 2)
        for client in one_each.values():
            for _ in range(3):
                self.assertTrue(await self.echo(client, 10_000), tree.log)
        for client in one_each.values():
            await client.lost.addTimeout(10, reactor)
        await self.until(tree, lambda: "quota" in tree.log)

    async def _usage_at_stop(self) -> None:
        import json

        config = f'[users.alice]\nsecret = "{ALICE.hex()}"\n'
        process, tree, port = await self.start(config=config)
        held = await self.spread_clients(
            process, port, 2, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        for client, _ in held:
            self.assertTrue(await self.echo(client, 10_000), tree.log)
        # Stopped at once, before any second's count: the workers' last
        # counts reach the parent, which saves them; no error on the way.
        process.signalProcess("TERM")
        await tree.ended.addTimeout(20, reactor)
        usage = json.loads((self.state / "usage.json").read_text())["bytes"]
        self.assertGreaterEqual(usage.get("alice", 0), 20_000 * len(held), tree.log)
        self.assertNotIn("Traceback", tree.log)
        self.assertNotIn("#critical", tree.log)

    def test_usage_counted_until_the_stop(self) -> Deferred[None]:
        return ensureDeferred(self._usage_at_stop())

    def test_quota_holds_across_workers(self) -> Deferred[None]:
        return ensureDeferred(self._quota())

    async def _restart(self) -> None:
        process, tree, port = await self.start()
        workers = children(process.pid)
        held = await self.spread_clients(
            process, port, 2, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        victim = held[0][1]
        survivors = [c for c, owner in held if owner != victim]
        os.kill(victim, signal.SIGKILL)
        await self.until(tree, lambda: "was killed by signal 9" in tree.log)
        await self.until(
            tree,
            lambda: len(children(process.pid)) == 2 and victim not in children(process.pid),
        )
        await self.until(tree, lambda: len(re.findall(r"worker \d started", tree.log)) == 3)
        # The other worker's clients never noticed.
        for client in survivors:
            self.assertTrue(await self.echo(client), tree.log)
        self.assertEqual(len(set(children(process.pid)) & set(workers)), 1)
        # And the new worker serves.
        await self.until(tree, lambda: len(listening_pids(children(process.pid), port)) == 2)
        fresh = [
            self.track(await connect_client(reactor, "127.0.0.1", port, ALICE)) for _ in range(10)
        ]
        for client in fresh:
            self.assertTrue(await self.echo(client), tree.log)

    def test_a_killed_worker_is_started_again(self) -> Deferred[None]:
        return ensureDeferred(self._restart())

    async def _sighup(self) -> None:
        secrets = self.state / "secrets"
        secrets.write_text(f"alice={ALICE.hex()}\n")
        process, tree, port = await self.start("--secrets-file", str(secrets))
        secrets.write_text(f"alice={ALICE.hex()}\nbob={BOB.hex()}\n")
        process.signalProcess("HUP")
        await self.until(tree, lambda: tree.log.count("bob: tg://proxy") >= 1)
        await self.until(tree, lambda: "SIGHUP: reloading 2 workers" in tree.log)
        await deferLater(reactor, 1.0, lambda: None)
        held = await self.spread_clients(
            process, port, 6, lambda: connect_client(reactor, "127.0.0.1", port, BOB)
        )
        for client, _ in held:
            self.assertTrue(await self.echo(client), tree.log)

    def test_sighup_reloads_every_worker(self) -> Deferred[None]:
        return ensureDeferred(self._sighup())


class MetricsAcrossWorkersTests(_WorkersCase):
    async def _metrics(self) -> None:
        import treq

        metrics_port = free_port()
        process, _tree, port = await self.start(
            "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"
        )
        workers = children(process.pid)
        clients = [
            self.track(await connect_client(reactor, "127.0.0.1", port, ALICE)) for _ in range(30)
        ]
        for client in clients:
            self.assertTrue(await self.echo(client))
        owners = socket_owners(workers, port)
        self.assertEqual(len(set(owners.values())), 2, "one worker took every connection")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = (
            await (await treq.get(url, persistent=False).addTimeout(10, reactor)).text()
        ).splitlines()
        self.assertIn("mtproxy_workers_answering 2.0", text)
        accepted = [line for line in text if line.startswith("mtproxy_accepted_total{")]
        self.assertEqual(accepted, ['mtproxy_accepted_total{user="alice"} 30.0'], text)

    def test_one_scrape_sums_every_worker(self) -> Deferred[None]:
        return ensureDeferred(self._metrics())


class MiddleAcrossWorkersTests(_WorkersCase):
    async def _middle(self) -> None:
        from mtproxy_tw.middle.telegramconfig import DEFAULT_PROXY_SECRET
        from mtproxy_tw.testing.fakeconfig import FakeConfigServer, config_text
        from mtproxy_tw.testing.fakemiddle import FakeMiddleProxy

        me = FakeMiddleProxy(DEFAULT_PROXY_SECRET, reactor)
        me_port = reactor.listenTCP(0, me, interface="127.0.0.1")
        self.addCleanup(me_port.stopListening)
        self.addCleanup(lambda: me.drop_all().addTimeout(10, reactor))
        body = config_text({dc: [("127.0.0.1", me_port.getHost().port)] for dc in (2, -2, 4)})
        site = FakeConfigServer(reactor, config_v4=body, config_v6=body)
        site_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(site_port.stopListening)
        self.addCleanup(site.idle)
        url = site.url(site_port.getHost().port, "")
        process, tree, port = await self.start(
            "--ad-tag",
            "ab" * 16,
            "--proxy-config-url",
            url + "getProxyConfig",
            "--proxy-config-v6-url",
            url + "getProxyConfigV6",
            "--proxy-secret-url",
            url + "getProxySecret",
            "--ip-lookup-url",
            url + "ip",
        )
        held = await self.spread_clients(
            process, port, 6, lambda: connect_client(reactor, "127.0.0.1", port, ALICE)
        )
        for client, _ in held:
            self.assertTrue(await self.echo(client), tree.log)
        # Downloaded once, by the parent, for both workers.
        self.assertEqual(site.requests["/getProxyConfig"], 1, tree.log)
        self.assertEqual(site.requests["/getProxySecret"], 1, tree.log)

    def test_telegram_config_is_fetched_once_for_every_worker(self) -> Deferred[None]:
        return ensureDeferred(self._middle())


def _alive(pid: int) -> bool:
    """
    Whether ``pid`` runs (a zombie waiting for its new parent does not).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
