"""
Named users with limits, end to end in memory: every limit reached, the
refused connection fronted (as any bad handshake), counted, and a user cut
mid-connection once over quota or past expiry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.config.users import Limits, UserSpec
from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.services.usage import UsageService
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import FakeDC, FakeSite, make_client
from mtproxy_tw.testing.memory import MemoryProxy
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.secrets import parse_secret

ALICE = parse_secret("alice=dd" + "a7" * 16, "x")
BOB = parse_secret("bob=dd" + "b8" * 16, "x")
SITE = Address("127.0.0.1", 8443)


def _payload(size: int) -> bytes:
    return b"\x01" + os.urandom(size - 1)


class UserLimitTests(SynchronousTestCase):
    def proxy(self, *users: UserSpec, limits: Limits | None = None) -> MemoryProxy:
        secrets = tuple(s for u in users for s in u.secrets)
        proxy = MemoryProxy(Settings(secrets=secrets, mask=True, mask_host=SITE))
        self.dc = FakeDC(proxy.reactor)
        proxy.serve_dc(2, self.dc)
        self.site = FakeSite("example.com", tls=False)
        proxy.serve(SITE.host, SITE.port, self.site.factory)
        proxy.core.users = Registry(users, limits or Limits())
        return proxy

    def client(self, proxy: MemoryProxy, secret: Any = ALICE, ip: str = "127.0.0.1") -> Any:
        client = make_client(secret)
        proxy.accept(client, IPv4Address("TCP", ip, 40000))
        proxy.flush()
        return client

    def works(self, proxy: MemoryProxy, client: Any) -> bool:
        payload = _payload(64)
        got: list[object] = []
        client.request(payload).addBoth(got.append)
        proxy.flush()
        return got == [payload]

    def assertFronted(self, proxy: MemoryProxy, limit: str, count: int = 1) -> None:
        stats = proxy.core.stats
        self.assertEqual(stats.fronted[f"limit-{limit}"], count)
        self.assertEqual(stats.limited[limit], count)
        self.assertEqual(stats.limit_rejections()[limit], count)
        # The site saw the refused client's bytes, as it sees any bad one.
        self.assertEqual(len(self.site.connections), count)

    def test_max_connections(self) -> None:
        proxy = self.proxy(UserSpec("alice", (ALICE,), max_connections=1))
        first = self.client(proxy)
        self.assertTrue(self.works(proxy, first))
        second = self.client(proxy)
        self.assertFalse(self.works(proxy, second))
        self.assertFronted(proxy, "connections")
        self.assertEqual(len(self.dc.connections), 1)
        # The limit is on connections at once: one closing lets one in.
        first.transport.loseConnection()
        proxy.flush()
        self.assertTrue(self.works(proxy, self.client(proxy)))

    def test_max_ips(self) -> None:
        proxy = self.proxy(UserSpec("alice", (ALICE,), max_ips=2))
        self.assertTrue(self.works(proxy, self.client(proxy, ip="127.0.0.2")))
        self.assertTrue(self.works(proxy, self.client(proxy, ip="127.0.0.3")))
        self.assertTrue(self.works(proxy, self.client(proxy, ip="127.0.0.2")))
        self.assertFalse(self.works(proxy, self.client(proxy, ip="127.0.0.4")))
        self.assertFronted(proxy, "ips")

    def test_disabled(self) -> None:
        proxy = self.proxy(UserSpec("alice", (ALICE,), enabled=False), UserSpec("bob", (BOB,)))
        self.assertFalse(self.works(proxy, self.client(proxy)))
        self.assertTrue(self.works(proxy, self.client(proxy, BOB)))
        self.assertFronted(proxy, "disabled")

    def test_denied_and_per_ip(self) -> None:
        limits = Limits(max_connections_per_ip=1, deny=(_net("127.0.0.9/32"),))
        proxy = self.proxy(UserSpec("alice", (ALICE,)), limits=limits)
        self.assertFalse(self.works(proxy, self.client(proxy, ip="127.0.0.9")))
        self.assertFronted(proxy, "denied")
        self.assertTrue(self.works(proxy, self.client(proxy, ip="127.0.0.5")))
        self.assertFalse(self.works(proxy, self.client(proxy, ip="127.0.0.5")))
        self.assertEqual(proxy.core.stats.limited["per_ip"], 1)

    def test_expiry_refuses_and_cuts_on_the_clock(self) -> None:
        now = 1_700_000_000.0  # where the memory network's clock starts
        proxy = self.proxy(UserSpec("alice", (ALICE,), expires=now + 100))
        self.assertEqual(proxy.reactor.seconds(), now)
        usage = self.usage(proxy)
        live = self.client(proxy)
        self.assertTrue(self.works(proxy, live))
        proxy.reactor.advance(101)
        proxy.flush()
        self.assertTrue(live.lost.called)
        self.assertFalse(self.works(proxy, self.client(proxy)))
        self.assertEqual(proxy.core.stats.fronted["limit-expired"], 1)
        usage.stopService()

    def test_quota_cuts_mid_connection(self) -> None:
        proxy = self.proxy(UserSpec("alice", (ALICE,), quota=10_000))
        usage = self.usage(proxy)
        live = self.client(proxy)
        self.assertTrue(self.works(proxy, live))
        for _ in range(3):
            live.request(_payload(4000))
            proxy.flush()
        proxy.reactor.advance(1.5)
        proxy.flush()
        self.assertTrue(live.lost.called)
        self.assertGreaterEqual(proxy.core.users.used("alice"), 10_000)
        self.assertFalse(self.works(proxy, self.client(proxy)))
        self.assertEqual(proxy.core.stats.limited["quota"], 2)
        usage.stopService()

    def usage(self, proxy: MemoryProxy) -> UsageService:
        registry = proxy.core.users
        assert registry is not None

        def live() -> Any:
            return ((c, c.user, c.bytes_in + c.bytes_out) for c in list(proxy.core.clients))

        path = Path(self.mktemp())
        path.mkdir()
        service = UsageService(registry, live, path, proxy.reactor)
        service.startService()
        return service


def _net(text: str) -> Any:
    import ipaddress

    return ipaddress.ip_network(text)
