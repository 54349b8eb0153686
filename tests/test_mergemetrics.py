"""
The metrics of ``--workers``: the workers' expositions merged into one
(:mod:`mtproxy_tw.services.mergemetrics`), and served by the parent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mtproxy_tw.config.values import networks
from mtproxy_tw.services import collector
from mtproxy_tw.services.mergemetrics import (
    CONTENT_TYPE,
    NOT_ADDITIVE,
    MergedMetricsResource,
    merge,
    merge_expositions,
)
from mtproxy_tw.services.metrics import MetricsService
from tests.test_integration import reactor

#: (sample name, sorted labels) -> value
Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition(*families: Metric) -> bytes:
    return generate_latest(_Fixed(list(families)))


def values(text: bytes) -> Values:
    found: Values = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, key
            found[key] = sample.value
    return found


def value(text: bytes, name: str, **labels: str) -> float:
    return values(text)[(name, tuple(sorted(labels.items())))]


def worker(n: int) -> bytes:
    """
    What worker ``n`` (1, 2...) exports: its numbers are multiples of ``n``.
    """
    accepted = CounterMetricFamily("mtproxy_accepted", "Handshakes.", labels=["user"])
    accepted.add_metric(["alice"], 10 * n)
    accepted.add_metric([f"only{n}"], n)
    connections = GaugeMetricFamily("mtproxy_client_connections", "Open.", labels=["user", "mode"])
    connections.add_metric(["alice", "secure"], 3 * n)
    connections.add_metric(["alice", "classic"], n)
    limit = GaugeMetricFamily("mtproxy_max_connections", "Limit.")
    limit.add_metric([], 1000 + n)
    age = GaugeMetricFamily("mtproxy_config_age_seconds", "Age.", labels=["kind"])
    age.add_metric(["config"], 60 * n)
    info = InfoMetricFamily("mtproxy_build", "Build.")
    info.add_metric([], {"version": "1.0"})
    latency = HistogramMetricFamily("mtproxy_latency_seconds", "Latency.", labels=["dc"])
    latency.add_metric(["2"], [("0.1", n), ("1.0", 2 * n), ("+Inf", 3 * n)], sum_value=n / 2)
    sizes = SummaryMetricFamily("mtproxy_sizes", "Sizes.", count_value=n, sum_value=100 * n)
    rss = GaugeMetricFamily("mtproxy_process_resident_memory_bytes", "RSS.")
    rss.add_metric([], 1e6 * n)
    started = GaugeMetricFamily("mtproxy_process_start_time_seconds", "Start.")
    started.add_metric([], 1_700_000_000 + n)
    created = GaugeMetricFamily("mtproxy_other_created", "Created.")
    created.add_metric([], 1_700_000_000 + n)
    unknown = GaugeMetricFamily("mtproxy_something_new", "Not known here.")
    unknown.add_metric([], 5 * n)
    return exposition(
        accepted, connections, limit, age, info, latency, sizes, rss, started, created, unknown
    )


#: The samples of :func:`worker` that take the largest.
LARGEST = {
    "mtproxy_max_connections",
    "mtproxy_build_info",
    "mtproxy_config_age_seconds",
    "mtproxy_process_start_time_seconds",
    "mtproxy_other_created",
}


class MergeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.one, self.two = worker(1), worker(2)
        self.merged = merge_expositions([self.one, self.two])

    def test_counters_with_equal_labels_are_summed(self) -> None:
        self.assertEqual(value(self.merged, "mtproxy_accepted_total", user="alice"), 30)

    def test_distinct_labels_stay_apart(self) -> None:
        self.assertEqual(value(self.merged, "mtproxy_accepted_total", user="only1"), 1)
        self.assertEqual(value(self.merged, "mtproxy_accepted_total", user="only2"), 2)
        self.assertEqual(
            value(self.merged, "mtproxy_client_connections", user="alice", mode="secure"), 9
        )
        self.assertEqual(
            value(self.merged, "mtproxy_client_connections", user="alice", mode="classic"), 3
        )

    def test_histograms_and_summaries_are_summed(self) -> None:
        merged = self.merged
        for le, expected in [("0.1", 3), ("1.0", 6), ("+Inf", 9)]:
            self.assertEqual(
                value(merged, "mtproxy_latency_seconds_bucket", dc="2", le=le), expected
            )
        self.assertEqual(value(merged, "mtproxy_latency_seconds_count", dc="2"), 9)
        self.assertEqual(value(merged, "mtproxy_latency_seconds_sum", dc="2"), 1.5)
        self.assertEqual(value(merged, "mtproxy_sizes_count"), 3)
        self.assertEqual(value(merged, "mtproxy_sizes_sum"), 300)

    def test_additive_and_unknown_gauges_are_summed(self) -> None:
        self.assertEqual(value(self.merged, "mtproxy_process_resident_memory_bytes"), 3e6)
        self.assertEqual(value(self.merged, "mtproxy_something_new"), 15)

    def test_settings_timestamps_and_infos_take_the_largest(self) -> None:
        merged = self.merged
        self.assertEqual(value(merged, "mtproxy_max_connections"), 1002)
        self.assertEqual(value(merged, "mtproxy_config_age_seconds", kind="config"), 120)
        self.assertEqual(value(merged, "mtproxy_build_info", version="1.0"), 1)
        self.assertEqual(value(merged, "mtproxy_process_start_time_seconds"), 1_700_000_002)
        self.assertEqual(value(merged, "mtproxy_other_created"), 1_700_000_002)
        # The other way round too.
        merged = merge_expositions([self.two, self.one])
        self.assertEqual(value(merged, "mtproxy_max_connections"), 1002)

    def test_every_non_additive_gauge_takes_the_largest(self) -> None:
        def text(n: float) -> bytes:
            families = []
            for name in sorted(NOT_ADDITIVE):
                gauge = GaugeMetricFamily(name, "x", labels=["dc"])
                gauge.add_metric(["2"], n)
                families.append(gauge)
            return exposition(*families)

        merged = merge_expositions([text(3), text(float("nan")), text(7), text(-1)])
        for name in NOT_ADDITIVE:
            self.assertEqual(value(merged, name, dc="2"), 7, name)

    def test_the_non_additive_names_are_exported(self) -> None:
        source = Path(collector.__file__).read_text("utf-8")
        exported = set(re.findall(r'"(mtproxy_[a-z0-9_]+)"', source))
        exported |= {f"{name}_info" for name in exported}
        process = CollectorRegistry()
        ProcessCollector(namespace="mtproxy", registry=process)
        exported |= {family.name for family in process.collect()}
        self.assertEqual(sorted(NOT_ADDITIVE - exported), [])

    def test_samples_in_one_text_only_are_kept(self) -> None:
        extra = GaugeMetricFamily("mtproxy_upstream_connections", "Up.", labels=["kind", "dc"])
        extra.add_metric(["middle", "4"], 2)
        merged = merge_expositions([self.one, exposition(extra)])
        self.assertEqual(value(merged, "mtproxy_upstream_connections", kind="middle", dc="4"), 2)
        self.assertEqual(value(merged, "mtproxy_accepted_total", user="alice"), 10)

    def test_the_merge_parses_again(self) -> None:
        expected = values(self.one)
        for key, number in values(self.two).items():
            if key[0] in LARGEST:
                expected[key] = max(expected[key], number)
            else:
                expected[key] = expected.get(key, 0) + number
        self.assertEqual(values(self.merged), expected)
        # The types survive too.
        types = {f.name: f.type for f in text_string_to_metric_families(self.merged.decode())}
        self.assertEqual(types["mtproxy_accepted"], "counter")
        self.assertEqual(types["mtproxy_latency_seconds"], "histogram")
        self.assertEqual(types["mtproxy_sizes"], "summary")
        self.assertEqual(types["mtproxy_build_info"], "gauge")
        # And merging a merge with nothing changes nothing.
        self.assertEqual(merge_expositions([self.merged]), self.merged)

    def test_bad_texts_are_left_out_and_said(self) -> None:
        conflicting = exposition(GaugeMetricFamily("mtproxy_accepted", "Not a counter.", 1))
        bad = [b"", b"\xff\xfe", b"mtproxy_accepted_total{user= 3\n", b"  \n", conflicting]
        merged = merge([self.one, *bad, self.two])
        self.assertEqual(merged.used, (0, len(bad) + 1))
        self.assertEqual(values(merged.render()), values(self.merged))
        self.assertEqual(merge([]).used, ())
        self.assertEqual(values(merge([b"garbage {"]).render()), {})

    def test_the_most_texts_say_what_a_name_is(self) -> None:
        conflicting = exposition(GaugeMetricFamily("mtproxy_accepted", "Not a counter.", 1))
        self.assertEqual(merge([conflicting, self.one, self.two]).used, (1, 2))
        # On a tie the first wins.
        self.assertEqual(merge([conflicting, self.one]).used, (0,))


def _spliced(good: bytes) -> st.SearchStrategy[bytes]:
    """
    ``good`` cut short, or with bytes put in or taken out somewhere.
    """
    return st.tuples(
        st.integers(0, len(good)), st.integers(0, len(good)), st.binary(max_size=40)
    ).map(lambda t: good[: min(t[0], t[1])] + t[2] + good[max(t[0], t[1]) :])


_garbage = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    _spliced(worker(3)),
)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(garbage=_garbage, position=st.integers(0, 2))
    def test_one_bad_text_never_breaks_the_others(self, garbage: bytes, position: int) -> None:
        good = [worker(1), worker(2)]
        texts = list(good)
        texts.insert(position, garbage)
        merged = merge(texts)
        rendered = merged.render()
        found = values(rendered)  # it parses again
        alone = values(merge_expositions(good))
        for key in alone:
            self.assertIn(key, found)
        others = [i for i in range(3) if i != position]
        self.assertEqual([i for i in merged.used if i != position], others)
        if position not in merged.used:
            self.assertEqual(found.keys(), alone.keys())
            for key, number in alone.items():
                self.assertTrue(found[key] == number or math.isnan(number), key)


def _local() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(namespace="mtproxy", registry=registry)
    return registry


def _render(resource: MergedMetricsResource) -> DummyRequest:
    request = DummyRequest([b""])
    request.method = b"GET"
    self_result = resource.render(request)
    assert self_result is NOT_DONE_YET
    return request


def _body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


class ResourceTests(SynchronousTestCase):
    def test_two_workers_are_summed_with_the_parent(self) -> None:
        resource = MergedMetricsResource(
            lambda: succeed([worker(1), worker(2)]), _local(), Clock()
        )
        request = _render(resource)
        self.assertEqual(request.finished, 1)
        body = _body(request)
        self.assertEqual(value(body, "mtproxy_accepted_total", user="alice"), 30)
        self.assertEqual(value(body, "mtproxy_workers_answering"), 2)
        # The parent's own process, added to the workers'.
        self.assertGreater(value(body, "mtproxy_process_resident_memory_bytes"), 3e6)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [CONTENT_TYPE.encode()]
        )
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-length"), [str(len(body)).encode()]
        )

    def test_a_bad_worker_text_is_not_counted_as_answering(self) -> None:
        # A text that says how many answer has no say.
        says = GaugeMetricFamily("mtproxy_workers_answering", "x", 7)
        texts = [worker(1), b"\x00{", exposition(says)]
        resource = MergedMetricsResource(lambda: succeed(texts), _local(), Clock())
        body = _body(_render(resource))
        self.assertEqual(value(body, "mtproxy_workers_answering"), 2)
        self.assertEqual(value(body, "mtproxy_accepted_total", user="alice"), 10)

    def _parent_only(self, body: bytes) -> None:
        self.assertEqual(value(body, "mtproxy_workers_answering"), 0)
        self.assertGreater(value(body, "mtproxy_process_resident_memory_bytes"), 0)
        self.assertNotIn(b"mtproxy_accepted", body)

    def test_a_failed_gather_answers_the_parent_own(self) -> None:
        resource = MergedMetricsResource(
            lambda: fail(RuntimeError("no channel")), _local(), Clock()
        )
        request = _render(resource)
        self.assertEqual(request.finished, 1)
        self._parent_only(_body(request))

    def test_a_gather_that_raises_answers_the_parent_own(self) -> None:
        def gather() -> Deferred[list[bytes]]:
            raise RuntimeError("no channel")

        self._parent_only(_body(_render(MergedMetricsResource(gather, _local(), Clock()))))

    def test_a_gather_that_never_answers_times_out(self) -> None:
        clock = Clock()
        pending: list[Deferred[list[bytes]]] = []

        def gather() -> Deferred[list[bytes]]:
            pending.append(Deferred())
            return pending[-1]

        resource = MergedMetricsResource(gather, _local(), clock, timeout=5)
        request = _render(resource)
        clock.advance(4.9)
        self.assertEqual(request.finished, 0)
        self.assertEqual(request.written, [])
        clock.advance(0.2)
        self.assertEqual(request.finished, 1)
        self._parent_only(_body(request))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_request_gone_away_cancels_the_gather(self) -> None:
        clock = Clock()
        cancelled: list[bool] = []

        def gather() -> Deferred[list[bytes]]:
            return Deferred(lambda d: cancelled.append(True))

        request = _render(MergedMetricsResource(gather, _local(), clock))
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [True])
        self.assertEqual(request.written, [])
        self.assertEqual(request.finished, 0)
        self.assertEqual(clock.getDelayedCalls(), [])


class ServiceTests(TestCase):
    """
    The parent's ``MetricsService``, scraped over loopback.
    """

    def start(self, gather: Any, allow: Iterable[str] = ()) -> MetricsService:
        metrics = MetricsService(
            None, "tcp:0:interface=127.0.0.1", networks(list(allow)), reactor, gather=gather
        )
        self.site = metrics.factory
        self.wrapper = WrappingFactory(metrics.factory)
        metrics.factory = self.wrapper  # type: ignore[assignment]
        metrics.startService()
        self.addCleanup(self._closed)
        self.addCleanup(metrics.stopService)
        return metrics

    async def _closed(self) -> None:
        deadline = reactor.seconds() + 5
        while self.wrapper.protocols:
            self.assertLess(reactor.seconds(), deadline, "the metrics connections stay open")
            await deferLater(reactor, 0.002, lambda: None)

    async def get(self, metrics: MetricsService, path: str, bind: str) -> tuple[int, bytes]:
        assert metrics.port is not None
        host = (await metrics.port).getHost()
        assert isinstance(host, IPv4Address)
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool, bindAddress=(bind, 0))
        response = await HTTPClient(agent).get(f"http://127.0.0.1:{host.port}{path}")
        body = await response.content()
        await pool.closeCachedConnections()
        return response.code, body

    async def _scrape(self) -> None:
        metrics = self.start(lambda: succeed([worker(1), worker(2)]), allow=["127.0.0.1/32"])
        self.assertIsNone(metrics.collector)
        code, body = await self.get(metrics, "/metrics", "127.0.0.1")
        self.assertEqual(code, 200)
        self.assertEqual(value(body, "mtproxy_accepted_total", user="alice"), 30)
        self.assertEqual(value(body, "mtproxy_workers_answering"), 2)
        code, body = await self.get(metrics, "/metrics", "127.0.0.2")
        self.assertEqual(code, 403)
        self.assertNotIn(b"mtproxy_", body)
        code, _ = await self.get(metrics, "/other", "127.0.0.1")
        self.assertEqual(code, 404)

    async def _thread(self) -> None:
        metrics = self.start(lambda: succeed([worker(1)]))
        resource = self.site.resource.children[b"metrics"]
        assert isinstance(resource, MergedMetricsResource)
        threads: list[bool] = []
        body = resource._body

        def recording(texts: list[bytes]) -> bytes:
            threads.append(threadable.isInIOThread())
            return body(texts)

        resource._body = recording  # type: ignore[method-assign]
        code, text = await self.get(metrics, "/metrics", "127.0.0.1")
        self.assertEqual(code, 200)
        self.assertEqual(value(text, "mtproxy_workers_answering"), 1)
        self.assertEqual(threads, [False])

    def test_the_merge_runs_on_a_pool_thread(self) -> Any:
        return self._as_deferred(self._thread())

    def test_workers_summed_and_guarded(self) -> Any:
        return self._as_deferred(self._scrape())

    def _as_deferred(self, coroutine: Any) -> Any:
        return Deferred.fromCoroutine(coroutine)

    def test_a_proxy_or_gather_is_needed(self) -> None:
        self.assertRaises(
            TypeError, MetricsService, None, "tcp:0:interface=127.0.0.1", networks([]), reactor
        )
