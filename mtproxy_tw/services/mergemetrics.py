"""
The metrics of ``--workers N``: one exposition for the whole proxy.

Each worker process is a full proxy with its own registry; the parent
gathers their expositions, adds its own (its process's collector), and
answers one text in which the samples with the same name and labels are
combined: summed (counters, histograms, summaries, and the gauges that
count something: connections, bytes, memory), or, for the gauges every
process reports alike (settings, timestamps, flags: :data:`NOT_ADDITIVE`),
the largest.

A worker's text that is not an exposition (undecodable, unparseable,
empty, or whose types disagree with the other texts') is left out, and
:class:`Merged` says which texts were used.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mtproxy_tw.wire.throttle import Throttle

__all__ = [
    "CONTENT_TYPE",
    "GATHER_TIMEOUT",
    "NOT_ADDITIVE",
    "Merged",
    "MergedMetricsResource",
    "answering",
    "merge",
    "merge_expositions",
]

#: The text format :func:`~prometheus_client.exposition.generate_latest`
#: writes, as prometheus_client's own resource labels it by default.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The families (or sample names) whose samples are the same in every
#: process, or are a state rather than a count: the largest is kept, a sum
#: would mean nothing.
NOT_ADDITIVE = frozenset(
    {
        # An info: the running version, 1 in every process.
        "mtproxy_build_info",
        # A setting (--max-connections), read from the same options by all.
        "mtproxy_max_connections",
        # Seconds since Telegram's config was fetched: the oldest copy in use.
        "mtproxy_config_age_seconds",
        # A difference of clocks, measured alike by every process.
        "mtproxy_clock_skew_seconds",
        # A flag (1: every middle proxy of the DC unreachable): 1 if any says so.
        "mtproxy_middle_pool_down",
        # A number of the DC's middle proxies (the endpoint list is the same
        # for all): a sum could exceed the list.
        "mtproxy_middle_endpoints_backing_off",
        # Bytes left of a quota the processes share, not one each.
        "mtproxy_user_quota_remaining_bytes",
        # A limit of the system (RLIMIT_NOFILE), the same for all.
        "mtproxy_process_max_fds",
        # A timestamp: the latest (re)start, after which summed counters may
        # have dropped.
        "mtproxy_process_start_time_seconds",
    }
)

#: Name endings of timestamps (prometheus_client's ``_created`` gauges, the
#: convention's ``*_timestamp_seconds``): the largest is kept. Any other
#: gauge, named nowhere here (a new one), is summed.
_TIMESTAMPS = ("_created", "_timestamp_seconds")

_ANSWERING = "mtproxy_workers_answering"

#: Seconds :class:`MergedMetricsResource` waits for the workers' texts.
GATHER_TIMEOUT = 10.0

#: (sample name, sorted labels)
_Key = tuple[str, tuple[tuple[str, str], ...]]


def _additive(family: Metric, sample: str) -> bool:
    if family.type not in ("gauge", "unknown", "info", "stateset"):
        return True
    if family.name in NOT_ADDITIVE or sample in NOT_ADDITIVE:
        return False
    if family.type in ("info", "stateset"):
        return False
    return not any(name.endswith(_TIMESTAMPS) for name in (family.name, sample))


def _parse(text: bytes) -> list[Metric] | None:
    """
    The families of one exposition; ``None`` for a text that is not one.
    """
    try:
        families = list(text_string_to_metric_families(text.decode("utf-8")))
    except Exception:
        # The parser's errors are of no one type (ValueError, IndexError,
        # KeyError...): whatever it raises, the text is unusable.
        return None
    for family in families:
        for sample in family.samples:
            if not isinstance(sample.value, (int, float)):
                return None
    return families or None


def _shapes(families: Iterable[Metric]) -> dict[tuple[str, str], tuple[str, str]]:
    """
    What a text says each family and sample is: the family's name and type.
    """
    shapes: dict[tuple[str, str], tuple[str, str]] = {}
    for family in families:
        shapes[("family", family.name)] = (family.name, family.type)
        for sample in family.samples:
            shapes[("sample", sample.name)] = (family.name, family.type)
    return shapes


@dataclass(frozen=True)
class Merged:
    """
    The merge of some expositions.

    :ivar families: the combined families, in the order first seen.
    :ivar used: the indices of the texts merged; the others were left out.
    """

    families: list[Metric]
    used: tuple[int, ...]

    def render(self, extra: Iterable[Metric] = ()) -> bytes:
        """
        The text exposition of :attr:`families` and then ``extra``.
        """
        return generate_latest(_Families([*self.families, *extra]))


class _Families:
    """
    A collector of fixed families, for ``generate_latest``.
    """

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(texts: Sequence[bytes]) -> Merged:
    """
    Combine ``texts``, leaving out those that are not expositions.

    Where texts disagree on what a name is (a counter here, a gauge there),
    the most texts win (the first of them on a tie) and the others are left
    out: the processes run the same code, so a text that disagrees is a
    broken one.
    """
    parsed = [(i, families) for i, text in enumerate(texts) if (families := _parse(text))]
    shapes = [(i, families, _shapes(families)) for i, families in parsed]
    votes: dict[tuple[str, str], Counter[tuple[str, str]]] = {}
    for _, _, shape in shapes:
        for what, said in shape.items():
            votes.setdefault(what, Counter())[said] += 1
    # most_common keeps the first seen among equals.
    winners = {what: count.most_common(1)[0][0] for what, count in votes.items()}
    merged: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    used: list[int] = []
    for i, families, shape in shapes:
        if any(winners[what] != said for what, said in shape.items()):
            continue
        used.append(i)
        for family in families:
            if family.name not in merged:
                # The first text's own family: its samples are replaced below.
                merged[family.name] = family
                values[family.name] = {}
            sums = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                value = float(sample.value)
                if key not in sums:
                    sums[key] = value
                elif _additive(family, sample.name):
                    sums[key] += value
                else:
                    sums[key] = _largest(sums[key], value)
    for name, family in merged.items():
        family.samples = [
            Sample(sample, dict(labels), value) for (sample, labels), value in values[name].items()
        ]
    return Merged(list(merged.values()), tuple(used))


def _largest(a: float, b: float) -> float:
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return max(a, b)


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """
    One exposition of ``texts`` combined (see :func:`merge`).
    """
    return merge(texts).render()


def answering(count: int) -> Metric:
    """
    The ``mtproxy_workers_answering`` gauge.
    """
    gauge = GaugeMetricFamily(
        _ANSWERING,
        "Worker processes whose metrics this scrape includes.",
    )
    gauge.add_metric((), count)
    return gauge


class MergedMetricsResource(Resource):
    """
    ``/metrics`` of the parent of ``--workers``: the workers' expositions
    (what ``gather`` answers, within ``timeout`` seconds) and ``local``'s,
    merged; only ``local``'s if gathering fails, and always
    ``mtproxy_workers_answering``.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        gather: Callable[[], Deferred[list[bytes]]],
        local: Any,
        reactor: Any = None,
        timeout: float = GATHER_TIMEOUT,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = installed
        self.gather = gather
        self.local = local
        self.reactor = reactor
        self.timeout = timeout
        self._failures = Throttle(60.0)

    def render_GET(self, request: Request) -> Any:
        gathering: Deferred[list[bytes]] = maybeDeferred(self.gather)
        gathering.addTimeout(self.timeout, self.reactor)
        gone: list[bool] = []

        def away(reason: Failure) -> None:
            gone.append(True)
            gathering.cancel()

        request.notifyFinish().addErrback(away)
        gathering.addErrback(self._failed, gone)
        gathering.addCallback(self._answer, request, gone)
        gathering.addErrback(self._broken, request, gone)
        return NOT_DONE_YET

    def _failed(self, reason: Failure, gone: list[bool]) -> list[bytes]:
        if not gone:
            count = self._failures.hit(self.reactor.seconds())
            if count is not None:
                timeout = reason.check(defer.TimeoutError)
                why = "timed out" if timeout else reason.getErrorMessage()
                self.log.info(
                    "metrics: the workers' metrics could not be gathered ({why}; {count} "
                    "time(s) in the last minute): answering the parent's own",
                    why=why,
                    count=count,
                )
        return []

    def _answer(
        self, texts: list[bytes], request: Request, gone: list[bool]
    ) -> Deferred[None] | None:
        if gone:
            return None
        texts = [text for text in texts if isinstance(text, bytes)]
        # Off the reactor's thread where it has a pool, as prometheus_client's
        # own resource formats: parsing thousands of lines takes a while.
        if IReactorThreads.providedBy(self.reactor):
            pool = self.reactor.getThreadPool()
            merging = deferToThreadPool(self.reactor, pool, self._body, texts)
        else:
            merging = maybeDeferred(self._body, texts)
        return merging.addCallback(self._write, request, gone)

    def _body(self, texts: list[bytes]) -> bytes:
        merged = merge([*texts, generate_latest(self.local)])
        workers = sum(1 for i in merged.used if i < len(texts))
        # Ours alone, whatever a text says.
        families = [f for f in merged.families if f.name != _ANSWERING]
        return Merged(families, merged.used).render([answering(workers)])

    def _write(self, body: bytes, request: Request, gone: list[bool]) -> None:
        if gone:
            return
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def _broken(self, reason: Failure, request: Request, gone: list[bool]) -> None:
        self.log.failure("metrics: merging the workers' metrics failed", reason)
        if not gone:
            request.setResponseCode(500)
            request.finish()
