"""
``--metrics``: scraped over loopback with a real HTTP client (treq) and read
with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.python import threadable
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mtproxy_tw import tap
from mtproxy_tw.config.values import LOOPBACK_NETWORKS, networks
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.stats import LIMITS
from mtproxy_tw.services.collector import ProxyCollector
from mtproxy_tw.services.metrics import MetricsService, scrape_allowed
from mtproxy_tw.services.proxy import ListenError, ProxyService
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_PADDED, generate_init
from tests import test_middle
from tests.test_integration import CLASSIC, SECRETS, SECURE, WRONG, ProxyHarness, reactor
from tests.test_middle import LoopbackHarness

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana" / "mtproxy-tw.json"

Families = dict[str, Any]


def parse(body: str) -> Families:
    return {family.name: family for family in text_string_to_metric_families(body)}


def samples(families: Families, name: str, **labels: str) -> list[Sample]:
    """
    The samples named ``name`` (in any family) whose labels include ``labels``.
    """
    found = []
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                found.append(sample)
    return found


def value(families: Families, name: str, **labels: str) -> float:
    """
    The one sample named ``name`` with exactly ``labels``.
    """
    matching = [s for s in samples(families, name, **labels) if s.labels == labels]
    if len(matching) != 1:
        raise AssertionError(f"{name}{labels}: {len(matching)} samples")
    return float(matching[0].value)


class MetricsMixin:
    """
    Serves ``self.service``'s metrics on loopback and scrapes them.
    """

    service: ProxyService

    async def start_metrics(self, allow: tuple[str, ...] = ()) -> MetricsService:
        case: Any = self
        metrics = MetricsService(
            self.service, "tcp:0:interface=127.0.0.1", networks(list(allow)), reactor
        )
        # Wrapped to see the server side of each scrape close before the end.
        wrapper = WrappingFactory(metrics.factory)
        metrics.factory = wrapper  # type: ignore[assignment]
        metrics.startService()
        case.addCleanup(self._closed, wrapper)
        case.addCleanup(metrics.stopService)
        assert metrics.port is not None
        port = await metrics.port
        host = port.getHost()
        assert isinstance(host, IPv4Address)
        self.metrics_url = f"http://127.0.0.1:{host.port}"
        self.metrics = metrics
        return metrics

    async def _closed(self, wrapper: WrappingFactory) -> None:
        case: Any = self
        await case.until(lambda: not wrapper.protocols, "the metrics connections to close")

    async def get(self, path: str = "/metrics", bind: str | None = None) -> tuple[int, str]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool, bindAddress=(bind, 0) if bind else None)
        response = await HTTPClient(agent).get(self.metrics_url + path)
        body = await response.text("utf-8")
        await pool.closeCachedConnections()
        return response.code, body

    async def scrape(self) -> Families:
        case: Any = self
        code, body = await self.get()
        case.assertEqual(code, 200, body)
        self.last_body = body
        return parse(body)


class DirectMetricsTests(MetricsMixin, ProxyHarness):
    async def _bytes_while_open(self) -> None:
        await self.start()
        await self.start_metrics()
        client = await self.client(CLASSIC, TAG_ABRIDGED, dc=2)
        self.assertEqual(await self.within(client.request(b"\x01" * 1000)), b"\x01" * 1000)
        first = await self.scrape()
        up = value(first, "mtproxy_client_bytes_total", user="alice", direction="up")
        down = value(first, "mtproxy_client_bytes_total", user="alice", direction="down")
        # The connection is open: its bytes count already.
        self.assertGreaterEqual(up, 1000)
        self.assertGreaterEqual(down, 1000)
        self.assertEqual(
            value(first, "mtproxy_client_connections", user="alice", mode="classic"), 1
        )
        self.assertEqual(value(first, "mtproxy_client_connections", user="bob", mode="secure"), 0)
        self.assertEqual(value(first, "mtproxy_upstream_connections", kind="direct", dc="2"), 1)
        self.assertEqual(value(first, "mtproxy_connections", state="relaying"), 1)
        self.assertEqual(value(first, "mtproxy_accepted_total", user="alice"), 1)

        self.assertEqual(await self.within(client.request(b"\x02" * 4000)), b"\x02" * 4000)
        second = await self.scrape()
        self.assertGreaterEqual(
            value(second, "mtproxy_client_bytes_total", user="alice", direction="up"), up + 4000
        )
        moved = value(second, "mtproxy_client_bytes_total", user="alice", direction="down")
        self.assertGreaterEqual(moved, down + 4000)

        await client.close()
        await self.no_clients()
        closed = await self.scrape()
        # Closing moves the bytes from the live connection to the totals.
        self.assertEqual(
            value(closed, "mtproxy_client_bytes_total", user="alice", direction="down"), moved
        )
        self.assertEqual(
            value(closed, "mtproxy_client_connections", user="alice", mode="classic"), 0
        )
        self.assertEqual(samples(closed, "mtproxy_upstream_connections", kind="direct"), [])

    def test_bytes_count_while_open(self) -> Any:
        return self.run_async(self._bytes_while_open())

    async def _modes(self) -> None:
        await self.start()
        await self.start_metrics()
        await self.client(SECURE, TAG_PADDED, dc=2)
        await self.client(CLASSIC, TAG_PADDED, dc=4)
        await self.until(lambda: len(self.service.core.clients) == 2, "two clients")
        await self.until(lambda: self.dc_connections() == 2, "two DC legs")
        families = await self.scrape()
        self.assertEqual(
            value(families, "mtproxy_client_connections", user="bob", mode="secure"), 1
        )
        self.assertEqual(
            value(families, "mtproxy_client_connections", user="alice", mode="secure"), 1
        )
        self.assertEqual(value(families, "mtproxy_upstream_connections", kind="direct", dc="4"), 1)

    def test_modes_and_dcs(self) -> Any:
        return self.run_async(self._modes())

    async def _refusals(self) -> None:
        await self.start(max_handshakes=1)
        await self.start_metrics()
        bad = await self.client(WRONG, TAG_ABRIDGED)
        bad.send(b"ping")
        await self.within(bad.lost)
        init = generate_init(TAG_PADDED, 2, secret=SECURE.key)
        first = await self.client(SECURE, TAG_PADDED, 2, init=init)
        self.assertEqual(await self.within(first.request(b"ping")), b"ping")
        replayed = await self.raw(init.wire + os.urandom(32))
        await self.within(replayed.lost)
        # A handshake left waiting is evicted by the next one (--max-handshakes 1).
        slow = await self.raw(b"\x01")
        await self.raw(b"\x02")
        await self.within(slow.lost)
        families = await self.scrape()
        self.assertEqual(value(families, "mtproxy_handshake_failures_total", reason="bad-init"), 1)
        self.assertEqual(value(families, "mtproxy_replays_total"), 1)
        limits = {
            s.labels["limit"]: s.value for s in samples(families, "mtproxy_limit_rejections_total")
        }
        self.assertEqual(set(limits), set(LIMITS))
        self.assertEqual(limits["handshakes"], 1)
        self.assertEqual(limits["global"], 0)
        self.assertEqual(samples(families, "mtproxy_fronted_total"), [])

    def test_refusals(self) -> Any:
        return self.run_async(self._refusals())

    async def _no_secrets(self) -> None:
        await self.start()
        await self.start_metrics()
        client = await self.client(CLASSIC, TAG_ABRIDGED, dc=2)
        await self.within(client.request(b"\x01" * 8))
        await self.scrape()
        body = self.last_body.lower()
        for secret in SECRETS:
            self.assertIn(f'user="{secret.name}"', body)
            self.assertNotIn(secret.key.hex(), body)

    async def _threads(self) -> None:
        await self.start()
        metrics = await self.start_metrics()
        collector = metrics.collector
        calls: list[tuple[bool, bool]] = []
        collect, families = collector.collect, collector.families

        def on_pool_thread() -> Any:
            calls.append((threadable.isInIOThread(), False))
            return collect()

        def on_reactor_thread() -> Any:
            calls.append((threadable.isInIOThread(), True))
            return families()

        collector.collect = on_pool_thread  # type: ignore[method-assign]
        collector.families = on_reactor_thread  # type: ignore[method-assign]
        families_seen = await self.scrape()
        self.assertIn("mtproxy_client_connections", families_seen)
        # Formatted on a pool thread, read on the reactor's.
        self.assertEqual(calls, [(False, False), (True, True)])

    def test_counters_are_read_on_the_reactor_thread(self) -> Any:
        return self.run_async(self._threads())

    def test_no_secret_in_a_scrape(self) -> Any:
        return self.run_async(self._no_secrets())

    async def _forbidden(self) -> None:
        await self.start()
        await self.start_metrics(allow=("127.0.0.1/32",))
        code, body = await self.get(bind="127.0.0.2")
        self.assertEqual(code, 403)
        self.assertNotIn("mtproxy_", body)
        code, _ = await self.get("/", bind="127.0.0.2")
        self.assertEqual(code, 403)
        code, body = await self.get(bind="127.0.0.1")
        self.assertEqual(code, 200)
        self.assertIn("mtproxy_client_connections", body)
        code, _ = await self.get("/other", bind="127.0.0.1")
        self.assertEqual(code, 404)

    def test_address_outside_allow_gets_403(self) -> Any:
        return self.run_async(self._forbidden())

    async def _default_allow(self) -> None:
        await self.start()
        await self.start_metrics()
        code, _ = await self.get(bind="127.0.0.2")
        self.assertEqual(code, 200)  # loopback, all of it, by default

    def test_default_allows_loopback(self) -> Any:
        return self.run_async(self._default_allow())

    async def _new_core(self) -> None:
        await self.start()
        await self.start_metrics()
        held = await self.client(CLASSIC, TAG_ABRIDGED, dc=2)
        await self.within(held.request(b"\x01" * 800))
        bad = await self.client(WRONG, TAG_ABRIDGED)
        bad.send(b"ping")
        await self.within(bad.lost)
        before = await self.scrape()
        # A reload that puts a new core in place: new connections get it,
        # the held one keeps the old.
        service = self.service
        service.core = ProxyCore(service.core.settings, reactor)
        service.factory.core = service.core
        after = await self.scrape()
        for name, labels in [
            ("mtproxy_client_bytes_total", {"user": "alice", "direction": "up"}),
            ("mtproxy_handshake_failures_total", {"reason": "bad-init"}),
            ("mtproxy_accepted_total", {"user": "alice"}),
        ]:
            self.assertEqual(value(after, name, **labels), value(before, name, **labels))
        self.assertEqual(
            value(after, "mtproxy_client_connections", user="alice", mode="classic"), 1
        )
        await held.close()
        other = await self.client(CLASSIC, TAG_ABRIDGED, dc=2)
        await self.within(other.request(b"\x01" * 800))
        last = await self.scrape()
        self.assertGreaterEqual(
            value(last, "mtproxy_client_bytes_total", user="alice", direction="up"),
            value(after, "mtproxy_client_bytes_total", user="alice", direction="up") + 800,
        )
        self.assertEqual(value(last, "mtproxy_accepted_total", user="alice"), 2)

    def test_counters_stay_monotonic_when_the_core_is_replaced(self) -> Any:
        return self.run_async(self._new_core())

    async def _two(self) -> None:
        await self.start()
        first = await self.start_metrics()
        second = MetricsService(
            self.service, "tcp:0:interface=127.0.0.1", LOOPBACK_NETWORKS, reactor
        )
        self.assertIsNot(first.registry, second.registry)

    def test_each_proxy_has_its_own_registry(self) -> Any:
        return self.run_async(self._two())

    async def _busy(self) -> None:
        await self.start()
        busy = f"tcp:{self.port}:interface=127.0.0.1"  # the proxy's own port
        metrics = MetricsService(self.service, busy, LOOPBACK_NETWORKS, reactor)
        e = self.assertRaises(ListenError, metrics.startService)
        self.assertEqual(str(e), f"--metrics {busy}: cannot listen: Address already in use")

    def test_a_port_in_use_is_one_line(self) -> Any:
        return self.run_async(self._busy())


class MiddleMetricsTests(MetricsMixin, LoopbackHarness):
    async def _middle(self) -> Families:
        await self.start()
        await self.start_metrics()
        client = await self.client(CLASSIC, TAG_ABRIDGED)
        payload = b"\x05" * 64
        self.assertEqual(await self.within(client.request(payload)), payload)
        return await self.scrape()

    async def _pools(self) -> None:
        families = await self._middle()
        self.assertGreaterEqual(
            value(families, "mtproxy_upstream_connections", kind="middle", dc="2"), 1
        )
        self.assertGreaterEqual(
            value(families, "mtproxy_middle_pool_connections", dc="2", state="ready"), 1
        )
        self.assertEqual(value(families, "mtproxy_middle_pool_sessions", dc="2"), 1)
        self.assertEqual(value(families, "mtproxy_middle_pool_down", dc="2"), 0)
        self.assertEqual(samples(families, "mtproxy_upstream_connections", kind="direct"), [])
        self.assertGreaterEqual(
            value(families, "mtproxy_client_bytes_total", user="alice", direction="up"), 64
        )
        age = value(families, "mtproxy_config_age_seconds", kind="config")
        self.assertGreaterEqual(age, 0)
        self.assertLess(age, 60)  # downloaded at start
        self.assertLess(abs(value(families, "mtproxy_clock_skew_seconds")), 2)
        self.assertNotIn(test_middle.AD_TAG.hex(), self.last_body.lower())
        # Telegram's clock runs two minutes ahead in its next answers.
        self.site.date_offset = 120.0
        await self.within(self.config.refresh())
        later = await self.scrape()
        self.assertLess(abs(value(later, "mtproxy_clock_skew_seconds") - 120), 2)

    def test_pools_config_and_clock(self) -> Any:
        return self.run_async(self._pools())

    async def _dashboard(self) -> None:
        families = await self._middle()
        dashboard = json.loads(DASHBOARD.read_text("utf-8"))
        expressions: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, item in node.items():
                    if key in ("expr", "query", "definition") and isinstance(item, str):
                        expressions.append(item)
                    walk(item)
            elif isinstance(node, list):
                for item in node:
                    walk(item)

        walk(dashboard)
        referenced = {n for e in expressions for n in re.findall(r"\bmtproxy_[a-z0-9_]+", e)}
        self.assertGreater(len(referenced), 15)
        known = set(families)
        known |= {s.name for family in families.values() for s in family.samples}
        # A family with no samples yet (a counter's family is named without _total).
        known |= {f"{name}_total" for name, f in families.items() if f.type == "counter"}
        self.assertEqual(sorted(referenced - known), [])

    def test_the_grafana_dashboard_uses_names_the_proxy_exports(self) -> Any:
        return self.run_async(self._dashboard())


class OptionsTests(SynchronousTestCase):
    def test_allow_default_is_loopback(self) -> None:
        options = tap.Options()
        options.parseOptions(["--secret", "a1" * 16])
        self.assertIsNone(options["metrics"])
        self.assertEqual(options["metrics-allow"], LOOPBACK_NETWORKS)

    def test_allow_list(self) -> None:
        options = tap.Options()
        options.parseOptions(
            [
                "--metrics-allow",
                "10.0.0.0/8",
                "--metrics-allow",
                "2001:db8::1",
                "--secret",
                "a1" * 16,
            ]
        )
        self.assertEqual(
            [str(n) for n in options["metrics-allow"]], ["10.0.0.0/8", "2001:db8::1/128"]
        )

    def test_bad_cidr_is_one_line_naming_the_option(self) -> None:
        options = tap.Options()
        e = self.assertRaises(UsageError, options.parseOptions, ["--metrics-allow", "10.0.0.0/33"])
        self.assertTrue(str(e).startswith("--metrics-allow: "), str(e))

    def test_config_file_keys(self) -> None:
        path = Path(self.mktemp())
        path.write_text(
            'metrics = "tcp:9100:interface=127.0.0.1"\nmetrics_allow = ["192.0.2.0/24"]\n'
        )
        options = tap.Options()
        options.parseOptions(["--config", str(path), "--secret", "a1" * 16])
        self.assertEqual(options["metrics"], "tcp:9100:interface=127.0.0.1")
        self.assertEqual([str(n) for n in options["metrics-allow"]], ["192.0.2.0/24"])

    def _service(self, *argv: str) -> Any:
        options = tap.Options()
        options.parseOptions(["--state-dir", self.mktemp(), "--secret", "a1" * 16, *argv])
        return tap.makeService(options, MemoryReactorClock())

    def test_make_service_serves_metrics_when_asked(self) -> None:
        top = self._service("--metrics", "tcp:9100:interface=127.0.0.1")
        (metrics,) = [s for s in top if isinstance(s, MetricsService)]
        proxy = next(s for s in top if isinstance(s, ProxyService))
        self.assertIs(metrics.collector.proxy, proxy)
        self.assertEqual([s for s in self._service() if isinstance(s, MetricsService)], [])

    def test_unusable_endpoint_is_one_line(self) -> None:
        e = self.assertRaises(ListenError, self._service, "--metrics", "nonsense:1")
        self.assertTrue(str(e).startswith("--metrics: "), str(e))


class _Unresponsive:
    """
    A reactor that never runs what a thread hands it (one joining its pool).
    """

    def __init__(self) -> None:
        self.handed: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.handed.append(f)

    def seconds(self) -> float:
        return 0.0


class StopTests(TestCase):
    async def _stop(self) -> None:
        stuck = _Unresponsive()
        collector = ProxyCollector(cast(ProxyService, None), stuck)
        waiting = deferToThread(collector.collect)
        deadline = reactor.seconds() + 5
        while not stuck.handed:
            self.assertLess(reactor.seconds(), deadline, "the scrape never asked the reactor")
            await deferLater(reactor, 0.002, lambda: None)
        collector.stop()
        # The stop wakes the scrape waiting for the reactor, and later ones wait for nothing.
        self.assertEqual(await waiting.addTimeout(5, reactor), [])
        self.assertEqual(await deferToThread(collector.collect), [])
        self.assertEqual(len(stuck.handed), 1)

    def test_stop_releases_a_waiting_scrape(self) -> Any:
        return ensureDeferred(self._stop())


class _Request:
    def __init__(self, address: Any) -> None:
        self.address = address

    def getClientAddress(self) -> Any:
        return self.address


class AllowTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        allowed = networks(["10.0.0.0/8", "2001:db8::/32"])
        cases = [
            (IPv4Address("TCP", "10.1.2.3", 1), True),
            (IPv4Address("TCP", "11.1.2.3", 1), False),
            (IPv6Address("TCP", "2001:db8::5", 1), True),
            (IPv6Address("TCP", "::ffff:10.0.0.1", 1), True),
            (IPv6Address("TCP", "::1", 1), False),
            (UNIXAddress(b"/run/metrics.sock"), True),
        ]
        for address, expected in cases:
            self.assertEqual(scrape_allowed(_Request(address), allowed), expected, address)  # type: ignore[arg-type]

    def test_default(self) -> None:
        allowed = networks([])
        self.assertTrue(scrape_allowed(_Request(IPv6Address("TCP", "::1", 1)), allowed))  # type: ignore[arg-type]
        self.assertTrue(scrape_allowed(_Request(IPv4Address("TCP", "127.0.0.9", 1)), allowed))  # type: ignore[arg-type]
        self.assertFalse(scrape_allowed(_Request(IPv4Address("TCP", "192.0.2.1", 1)), allowed))  # type: ignore[arg-type]
