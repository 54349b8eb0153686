"""
What ``--metrics`` serves, collected at scrape time.

Nothing is counted for the metrics on the data path: :class:`ProxyCollector`
reads, when scraped, the numbers the proxy keeps anyway (the counters of
:class:`~mtproxy_tw.proxy.stats.Stats`, the byte counts of the live
connections, the middle-proxy pools, Telegram's config).

Labels carry secret *names* (``--secret NAME=...``), never secrets or ad tags.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from twisted.logger import Logger
from twisted.python import threadable

from mtproxy_tw import __version__
from mtproxy_tw.middle.upstream import MiddleProxy
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.states import State
from mtproxy_tw.proxy.stats import Stats
from mtproxy_tw.services.proxy import ProxyService

__all__ = ["ProxyCollector"]

#: Handshake reasons that are replays (fronted or closed).
_REPLAYS = ("replay", "tls-replay")
#: Telegram's files whose age is reported.
_CONFIG_KINDS = ("config", "config_v6")
#: Seconds a scrape waits for the reactor's thread at most.
_WAIT = 30.0


def _counter(name: str, doc: str, labels: Sequence[str], values: Mapping[Any, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key if isinstance(key, tuple) else (key,), value)
    return family


def _gauge(name: str, doc: str, labels: Sequence[str], values: Mapping[Any, float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key if isinstance(key, tuple) else (key,), value)
    return family


class ProxyCollector:
    """
    The proxy's metrics, collected from the objects that hold the numbers.

    It follows ``proxy.core`` as it is at each scrape. Counters stay
    monotonic when a reload puts a new core in place: the counters of every
    core seen are summed (a new core either shares its predecessor's
    :class:`~mtproxy_tw.proxy.stats.Stats` or starts from zero), and the
    connections still held by an old core are counted while they live.

    Scrapes are formatted on a pool thread, but the numbers are read on the
    reactor's (:meth:`collect`); once :meth:`stop` is called a scrape gets
    nothing instead of waiting for a reactor that may be joining the pool.

    :ivar quota_remaining: returns the bytes left to each user with a quota
        (``mtproxy_user_quota_remaining_bytes{user}``); ``None``: no quotas,
        the family is there with no samples.
    """

    log = Logger()

    def __init__(self, proxy: ProxyService, reactor: Any) -> None:
        self.proxy = proxy
        self.reactor = reactor
        self._lock = threading.Lock()
        self._stopped = False
        self._waiting: set[threading.Event] = set()
        self.quota_remaining: Callable[[], Mapping[str, int]] | None = None
        self._cores: weakref.WeakSet[ProxyCore] = weakref.WeakSet()
        #: The counters of every core seen, in the order seen.
        self._stats: list[Stats] = []

    def collect(self) -> list[Metric]:
        """
        Every family, read on the reactor's thread.
        """
        if threadable.ioThread is None or threadable.isInIOThread():
            return self.families()
        done = threading.Event()
        result: list[list[Metric]] = []
        with self._lock:
            if self._stopped:
                return []
            self._waiting.add(done)

        def read() -> None:
            try:
                result.append(self.families())
            except Exception:
                self.log.failure("collecting the metrics failed")
            finally:
                done.set()

        self.reactor.callFromThread(read)
        done.wait(_WAIT)
        with self._lock:
            self._waiting.discard(done)
        return result[0] if result else []

    def start(self) -> None:
        with self._lock:
            self._stopped = False

    def stop(self) -> None:
        """
        Answer scrapes with nothing from now on, those waiting too.
        """
        with self._lock:
            self._stopped = True
            for waiting in self._waiting:
                waiting.set()

    def _follow(self) -> ProxyCore:
        core = self.proxy.core
        if core not in self._cores:
            self._cores.add(core)
        if not any(stats is core.stats for stats in self._stats):
            self._stats.append(core.stats)
        return core

    def _sum(self, pick: Callable[[Stats], Mapping[str, int]]) -> Counter[str]:
        total: Counter[str] = Counter()
        for stats in self._stats:
            total.update(pick(stats))
        return total

    def families(self) -> list[Metric]:
        core = self._follow()
        clients = [client for each in list(self._cores) for client in each.clients]
        settings = core.settings
        rejected = self._sum(lambda s: s.rejected)
        fronted = self._sum(lambda s: s.fronted)

        users = {secret.name for secret in settings.secrets}
        connections: Counter[tuple[str, str]] = Counter()
        for secret in settings.secrets:
            for mode in secret.admits() & settings.modes:
                connections[(secret.name, mode.value)] += 0
        states: Counter[str] = Counter({s.name.lower(): 0 for s in State if s is not State.CLOSED})
        up = self._sum(lambda s: s.user_bytes_in)
        down = self._sum(lambda s: s.user_bytes_out)
        direct: Counter[str] = Counter()
        dc_labels: dict[int | None, str] = {}
        for client in clients:
            states[client.state.name.lower()] += 1
            user = client.user
            if user is None:
                continue
            used = client.mode.value if client.mode is not None else "unknown"
            connections[(user, used)] += 1
            up[user] += client.bytes_in
            down[user] += client.bytes_out
            if client.state is State.RELAYING and client.core.middle is None:
                label = dc_labels.get(client.dc)
                if label is None:
                    label = dc_labels[client.dc] = _dc_label(client)
                direct[label] += 1
        nbytes: dict[tuple[str, str], int] = {}
        for user in users | set(up) | set(down):
            nbytes[(user, "up")] = up[user]
            nbytes[(user, "down")] = down[user]
        accepted = self._sum(lambda s: s.accepted)
        for user in users:
            accepted[user] += 0
        limits = self._sum(lambda s: s.limit_rejections())
        upstream = {("direct", dc): n for dc, n in direct.items()}

        info = InfoMetricFamily("mtproxy_build", "The running mtproxy-tw.")
        info.add_metric([], {"version": __version__})
        families: list[Metric] = [
            info,
            _gauge(
                "mtproxy_client_connections",
                "Accepted client connections open, by user and client mode.",
                ("user", "mode"),
                connections,
            ),
            _gauge(
                "mtproxy_connections",
                "Client connections open, by state (handshaking ones included).",
                ("state",),
                states,
            ),
            _gauge(
                "mtproxy_max_connections",
                "The --max-connections limit.",
                (),
                {(): settings.connection_cap},
            ),
            _counter(
                "mtproxy_client_bytes",
                "Bytes carried for each user's clients (up: from them), open connections too.",
                ("user", "direction"),
                nbytes,
            ),
            _counter(
                "mtproxy_accepted",
                "Handshakes accepted, by user.",
                ("user",),
                accepted,
            ),
            _counter(
                "mtproxy_handshake_failures",
                "Failed handshakes closed without fronting, by reason.",
                ("reason",),
                rejected,
            ),
            _counter(
                "mtproxy_fronted",
                "Failed handshakes handed to the mask host, by reason.",
                ("reason",),
                fronted,
            ),
            _counter(
                "mtproxy_limit_rejections",
                "Connections refused or cut by a limit, by limit.",
                ("limit",),
                limits,
            ),
            _counter(
                "mtproxy_replays",
                "Replayed handshakes (fronted or closed).",
                (),
                {(): sum(rejected[r] + fronted[r] for r in _REPLAYS)},
            ),
            _counter(
                "mtproxy_upstream_failures",
                "Connections to Telegram or the mask host that failed, by reason.",
                ("reason",),
                self._sum(lambda s: s.upstream_failures),
            ),
            _counter(
                "mtproxy_idle_closed",
                "Connections closed for idleness.",
                (),
                {(): sum(s.idle_closed for s in self._stats)},
            ),
        ]
        families += _middle_families(core.middle, upstream, self.reactor.seconds())
        quota = GaugeMetricFamily(
            "mtproxy_user_quota_remaining_bytes",
            "Bytes each user with a quota may still carry.",
            labels=("user",),
        )
        if self.quota_remaining is not None:
            for user, left in sorted(self.quota_remaining().items()):
                quota.add_metric((user,), left)
        families.append(quota)
        return families


def _dc_label(client: Any) -> str:
    """
    The DC a direct client went to: its id when the table knows it (so the
    labels stay few whatever ids clients send), else ``default``.
    """
    if client.dc is None:
        return "default"
    _, known = client.settings.dcs.lookup(client.dc)
    return str(client.dc) if known else "default"


def _middle_families(
    middle: Any, upstream: dict[tuple[str, str], int], now: float
) -> list[Metric]:
    """
    The upstream connections and the middle-proxy pools' health; the
    middle-only families are there with no samples in direct mode.
    """
    pools: dict[tuple[str, str], int] = {}
    waiting: dict[str, int] = {}
    down: dict[str, int] = {}
    backing_off: dict[str, int] = {}
    sessions: dict[str, int] = {}
    events: Mapping[str, int] = {}
    ages: dict[str, float] = {}
    skew: dict[tuple[()], float] = {}
    if isinstance(middle, MiddleProxy):
        for pool in list(middle.pools.values()):
            dc = str(pool.dc)
            ready = len(pool.ready)
            pools[(dc, "ready")] = ready
            pools[(dc, "handshaking")] = max(0, len(pool.connections) - ready)
            pools[(dc, "connecting")] = pool.connecting
            upstream[("middle", dc)] = len(pool.connections)
            waiting[dc] = len(pool.waiting)
            down[dc] = int(pool.down)
            backing_off[dc] = sum(1 for b in pool.backoff.values() if b.until > now)
            sessions[dc] = sum(len(conn.sessions) for conn in pool.connections)
        events = middle.counters
        updated = getattr(middle.config, "updated", {})
        for kind in _CONFIG_KINDS:
            if kind in updated:
                ages[kind] = max(0.0, now - updated[kind])
        if middle.config.clock_skew is not None:
            skew[()] = middle.config.clock_skew
    return [
        _gauge(
            "mtproxy_upstream_connections",
            "Connections to Telegram: direct (client legs to a DC) or middle (RPC "
            "connections to middle proxies), by DC.",
            ("kind", "dc"),
            upstream,
        ),
        _gauge(
            "mtproxy_middle_pool_connections",
            "Middle-proxy connections of each DC's pool, by state.",
            ("dc", "state"),
            pools,
        ),
        _gauge(
            "mtproxy_middle_pool_sessions",
            "Clients carried on each DC's middle-proxy connections.",
            ("dc",),
            sessions,
        ),
        _gauge(
            "mtproxy_middle_pool_waiting_clients",
            "Clients waiting for a middle-proxy connection, by DC.",
            ("dc",),
            waiting,
        ),
        _gauge(
            "mtproxy_middle_pool_down",
            "1 while every middle proxy of the DC is unreachable.",
            ("dc",),
            down,
        ),
        _gauge(
            "mtproxy_middle_endpoints_backing_off",
            "Middle proxies of the DC skipped after failures.",
            ("dc",),
            backing_off,
        ),
        _counter(
            "mtproxy_middle_events",
            "Middle-proxy events: buffer-cap, direct-fallback, unavailable, wait-timeout, "
            "handshake-rejected.",
            ("event",),
            events,
        ),
        _gauge(
            "mtproxy_config_age_seconds",
            "Seconds since Telegram's middle-proxy list in use was downloaded (or its "
            "cached copy saved); none while the built-in one is used.",
            ("kind",),
            ages,
        ),
        _gauge(
            "mtproxy_clock_skew_seconds",
            "Telegram's clock minus the local clock, from the Date of its config answers.",
            (),
            skew,
        ),
    ]
