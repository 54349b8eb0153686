"""
TelegramConfig: downloads on a clock, keeps the last good copy, caches it,
starts from the cache, and warns about clock skew.

The refresh loop and the timeouts run on a ``Clock``; the HTTP exchanges
with the FakeConfigServer are real, on loopback.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mtproxy_tw.middle.cache import CONFIG_FILE, CONFIG_V6_FILE, SECRET_FILE
from mtproxy_tw.middle.fetch import FetchError, fetch
from mtproxy_tw.middle.telegramconfig import DEFAULT_PROXY_SECRET, TelegramConfig
from mtproxy_tw.testing import FakeConfigServer, config_text
from mtproxy_tw.wire.proxyconfig import FALLBACK_CONFIG_V4, FALLBACK_CONFIG_V6, parse_proxy_config

reactor: Any = _reactor
T = TypeVar("T")

NOW = 1_700_000_000.0
V4 = config_text({2: [("149.154.162.39", 80)], 4: [("91.108.4.136", 8888)]})
V6 = config_text({2: [("2001:67c:4e8:f002::d", 80)]})
SECRET = bytes(range(128, 256))
NEW_V4 = config_text({2: [("149.154.162.40", 8888)]}, default=2)
#: What a misconfigured mirror or a captive portal answers with 200 OK.
ERROR_PAGE = b"<html><body>Service unavailable</body></html>"
PATHS = ("/getProxyConfig", "/getProxyConfigV6", "/getProxySecret")


class ConfigHarness(TestCase):
    timeout = 30

    def run_async(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return ensureDeferred(coro)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.site = FakeConfigServer(self.clock, config_v4=V4, config_v6=V6, secret=SECRET)
        self.listener = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        host = self.listener.getHost()
        assert isinstance(host, IPv4Address)
        self.site_port = host.port
        self.addCleanup(self.listener.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self._close_http)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.state_dir = Path(self.mktemp())
        self.state_dir.mkdir(parents=True)
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def _close_http(self) -> None:
        await self.pool.closeCachedConnections()
        await self.site.idle().addTimeout(10, reactor)

    def config(self, port: int | None = None, **kwargs: Any) -> TelegramConfig:
        port = self.site_port if port is None else port
        config = TelegramConfig(
            self.clock,
            state_dir=self.state_dir,
            config_url=self.site.url(port, "getProxyConfig"),
            config_v6_url=self.site.url(port, "getProxyConfigV6"),
            secret_url=self.site.url(port, "getProxySecret"),
            refresh=600,
            timeout=5,
            http_client=self.http,
            **kwargs,
        )
        self.addCleanup(self._stop_config, config)
        return config

    def _stop_config(self, config: TelegramConfig) -> None:
        if config.running:
            config.stopService()

    async def start(self, config: TelegramConfig) -> None:
        """
        Start the service and wait for the download round it begins with.
        """
        config.startService()
        await self.round(config)

    async def round(self, config: TelegramConfig, advance: float | None = None) -> None:
        """
        Wait for a round (after advancing the clock, if asked); the next one
        is scheduled by then.
        """
        waiting = config.next_round()
        if advance is not None:
            self.clock.advance(advance)
        await waiting.addTimeout(10, reactor)

    async def until(self, predicate: Any) -> None:
        from twisted.internet.task import deferLater

        deadline = reactor.seconds() + 10
        while not predicate():
            self.assertLess(reactor.seconds(), deadline)
            await deferLater(reactor, 0.001, lambda: None)

    def seed(self, v4: bytes = V4, v6: bytes = V6, secret: bytes = SECRET) -> None:
        (self.state_dir / CONFIG_FILE).write_bytes(v4)
        (self.state_dir / CONFIG_V6_FILE).write_bytes(v6)
        (self.state_dir / SECRET_FILE).write_bytes(secret)

    def warnings(self) -> list[dict[str, Any]]:
        return [e for e in self.observer if e["log_level"] == LogLevel.warn]


class RefreshTests(ConfigHarness):
    async def _fetch_at_start(self) -> None:
        config = self.config()
        await self.start(config)
        self.assertEqual(config.config_v4, parse_proxy_config(V4))
        self.assertEqual(config.config_v6, parse_proxy_config(V6))
        # The new secret waits for a middle proxy to accept it.
        self.assertEqual(config.secret, DEFAULT_PROXY_SECRET)
        self.assertEqual(config.candidate, SECRET)
        self.assertFalse((self.state_dir / SECRET_FILE).exists())
        config.secret_accepted(SECRET)
        self.assertEqual(config.secret, SECRET)
        self.assertIsNone(config.candidate)
        self.assertEqual(config.sources, dict.fromkeys(config.KINDS, "download"))
        self.assertEqual((self.state_dir / CONFIG_FILE).read_bytes(), V4)
        self.assertEqual((self.state_dir / CONFIG_V6_FILE).read_bytes(), V6)
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), SECRET)
        mode = stat.S_IMODE(os.stat(self.state_dir / SECRET_FILE).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(self.warnings(), [])

    def test_empty_state_dir_fetches_at_start(self) -> Deferred[None]:
        return self.run_async(self._fetch_at_start())

    async def _periodic(self) -> None:
        config = self.config()
        changes: list[str] = []
        config.listeners.append(changes.append)
        await self.start(config)
        self.assertEqual(self.site.requests["/getProxyConfig"], 1)
        self.site.bodies["/getProxyConfig"] = NEW_V4
        changes.clear()
        self.clock.advance(599)
        self.assertEqual(self.site.requests["/getProxyConfig"], 1)
        await self.round(config, advance=1)
        self.assertEqual(self.site.requests["/getProxyConfig"], 2)
        self.assertEqual(config.config_v4, parse_proxy_config(NEW_V4))
        self.assertEqual(changes, ["config"])
        self.assertEqual((self.state_dir / CONFIG_FILE).read_bytes(), NEW_V4)
        self.assertEqual(config.rounds, 2)

    def test_refreshes_on_the_clock(self) -> Deferred[None]:
        return self.run_async(self._periodic())

    async def _broken(self) -> None:
        config = self.config()
        await self.start(config)
        config.secret_accepted(SECRET)  # as a middle proxy would
        good = (config.config_v4, config.config_v6, config.secret)
        for v4, v6, secret, status in [
            (b"proxy_for 2 nonsense", b"", b"short", 200),
            (b"\xff\xfe", b"# nothing\n", SECRET * 5, 200),
            (NEW_V4, NEW_V4, SECRET[:16], 500),
        ]:
            self.site.bodies.update(
                {"/getProxyConfig": v4, "/getProxyConfigV6": v6, "/getProxySecret": secret}
            )
            for path in ("/getProxyConfig", "/getProxyConfigV6", "/getProxySecret"):
                self.site.status[path] = status
            await config.refresh().addTimeout(10, reactor)
            self.assertEqual((config.config_v4, config.config_v6, config.secret), good)
        self.assertEqual(config.failures, {"config": 3, "config_v6": 3, "secret": 3})
        self.assertEqual((self.state_dir / CONFIG_FILE).read_bytes(), V4)
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), SECRET)
        self.assertEqual(len(self.warnings()), 9)
        for event in self.warnings():
            self.assertNotIn(SECRET.hex(), repr(event))
        # Fixed again: the next round takes it.
        self.site.status.clear()
        self.site.bodies.update(
            {"/getProxyConfig": NEW_V4, "/getProxyConfigV6": V6, "/getProxySecret": SECRET}
        )
        await config.refresh().addTimeout(10, reactor)
        self.assertEqual(config.config_v4, parse_proxy_config(NEW_V4))

    def test_broken_download_keeps_old_config(self) -> Deferred[None]:
        return self.run_async(self._broken())

    async def _stalled(self) -> None:
        config = self.config()
        self.site.stalled.add("/getProxySecret")
        config.startService()
        waiting = config.next_round()
        inflight: Any = config._inflight

        def others_done() -> bool:
            return None not in inflight.resultList[:2]

        await self.until(others_done)
        self.clock.advance(5)  # the timeout
        await waiting.addTimeout(10, reactor)
        self.assertEqual(config.failures, {"secret": 1})
        self.assertEqual(config.sources["secret"], "built-in")
        self.assertEqual(config.sources["config"], "download")
        self.assertTrue(any("timed out" in str(e.get("error")) for e in self.warnings()))
        # The loop goes on.
        self.site.stalled.clear()
        await self.until(lambda: config._next is not None)
        await self.round(config, advance=600)
        self.assertEqual(config.candidate, SECRET)

    def test_stalled_download_times_out(self) -> Deferred[None]:
        return self.run_async(self._stalled())

    async def _listener_raises(self) -> None:
        config = self.config()

        def bad(kind: str) -> None:
            raise RuntimeError("listener failed")

        config.listeners.append(bad)
        await self.start(config)
        config.secret_accepted(SECRET)  # the secret changes once a middle proxy accepts it
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.site.bodies["/getProxyConfig"] = NEW_V4
        await self.round(config, advance=600)
        self.assertEqual(config.config_v4, parse_proxy_config(NEW_V4))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failures_never_stop_the_loop(self) -> Deferred[None]:
        return self.run_async(self._listener_raises())

    async def _stop(self) -> None:
        config = self.config()
        self.site.stalled.update({"/getProxyConfig", "/getProxyConfigV6", "/getProxySecret"})
        config.startService()
        await self.until(lambda: self.site.requests["/getProxySecret"])
        config.stopService()
        self.assertEqual(config.rounds, 1)  # cancelled: counted as failures
        self.assertEqual(config.failures, {"config": 1, "config_v6": 1, "secret": 1})

    def test_stop_cancels_downloads(self) -> Deferred[None]:
        return self.run_async(self._stop())

    async def _limit(self) -> None:
        self.site.bodies["/getProxyConfig"] = b"#" * 5000
        url = self.site.url(self.site_port, "getProxyConfig")
        d = fetch(self.http, url, clock=self.clock, timeout=5, limit=4096)
        with self.assertRaises(FetchError):
            await d.addTimeout(10, reactor)
        fetched = await fetch(self.http, url, clock=self.clock, timeout=5).addTimeout(10, reactor)
        self.assertEqual(len(fetched.body), 5000)
        self.assertEqual(fetched.server_time, NOW)

    def test_body_limit(self) -> Deferred[None]:
        return self.run_async(self._limit())


class StartTests(ConfigHarness):
    async def _cache(self) -> None:
        self.seed()
        await self.listener.stopListening()
        config = self.config()
        await self.start(config)
        self.assertEqual(config.sources, dict.fromkeys(config.KINDS, "cache"))
        self.assertEqual(config.config_v4, parse_proxy_config(V4))
        self.assertEqual(config.secret, SECRET)
        self.assertEqual(config.failures, dict.fromkeys(config.KINDS, 1))

    def test_site_unreachable_uses_cache(self) -> Deferred[None]:
        return self.run_async(self._cache())

    async def _nothing(self) -> None:
        await self.listener.stopListening()
        config = self.config()
        await self.start(config)
        self.assertEqual(config.sources, dict.fromkeys(config.KINDS, "built-in"))
        self.assertEqual(config.config_v4, FALLBACK_CONFIG_V4)
        self.assertEqual(config.config_v6, FALLBACK_CONFIG_V6)
        self.assertEqual(config.secret, DEFAULT_PROXY_SECRET)
        self.assertEqual(len(DEFAULT_PROXY_SECRET), 128)

    def test_nothing_cached_and_unreachable_uses_built_in(self) -> Deferred[None]:
        return self.run_async(self._nothing())

    async def _corrupt(self) -> None:
        self.seed(v4=b"garbage", secret=b"tiny")
        await self.listener.stopListening()
        config = self.config()
        await self.start(config)
        self.assertEqual(config.sources["config"], "built-in")
        self.assertEqual(config.sources["config_v6"], "cache")
        self.assertEqual(config.sources["secret"], "built-in")
        ignored = [e for e in self.warnings() if "ignoring the cached" in e["log_format"]]
        self.assertEqual(len(ignored), 2)

    def test_corrupt_cache_is_ignored(self) -> Deferred[None]:
        return self.run_async(self._corrupt())

    def test_start_does_not_wait(self) -> None:
        self.seed()
        self.site.stalled.update({"/getProxyConfig", "/getProxyConfigV6", "/getProxySecret"})
        config = self.config()
        config.startService()
        self.assertEqual(config.sources, dict.fromkeys(config.KINDS, "cache"))
        self.assertEqual(config.rounds, 0)
        config.stopService()

    def test_no_state_dir(self) -> None:
        config = TelegramConfig(self.clock, state_dir=None, http_client=self.http)
        config.load_cached()
        self.assertEqual(config.sources, dict.fromkeys(config.KINDS, "built-in"))


class ClockTests(ConfigHarness):
    async def _skew(self, offset: float | None) -> list[dict[str, Any]]:
        self.site.date_offset = offset
        config = self.config()
        await self.start(config)
        if offset is not None:
            assert config.clock_skew is not None
            self.assertAlmostEqual(config.clock_skew, offset, delta=1)
        return [e for e in self.warnings() if "clock" in e["log_format"]]

    def test_no_skew(self) -> Deferred[None]:
        async def run() -> None:
            self.assertEqual(await self._skew(0), [])

        return self.run_async(run())

    def test_small_skew_is_fine(self) -> Deferred[None]:
        async def run() -> None:
            self.assertEqual(await self._skew(-20), [])

        return self.run_async(run())

    def test_skew_breaks_the_handshake(self) -> Deferred[None]:
        async def run() -> None:
            (event,) = await self._skew(120)
            self.assertEqual(event["direction"], "behind")
            self.assertIn("middle proxies", event["effects"])
            self.assertNotIn("fake-TLS", event["effects"])

        return self.run_async(run())

    def test_skew_breaks_fake_tls(self) -> Deferred[None]:
        async def run() -> None:
            (event,) = await self._skew(-400)
            self.assertEqual(event["direction"], "ahead of")
            self.assertIn("fake-TLS", event["effects"])

        return self.run_async(run())


class ValidationTests(ConfigHarness):
    """
    A download must be what it claims to be before it replaces anything.
    """

    async def _error_page_secret(self, page: bytes) -> None:
        self.seed()
        self.site.bodies["/getProxySecret"] = page
        config = self.config()
        await self.start(config)
        self.assertEqual(config.secret, SECRET)
        self.assertEqual(config.sources["secret"], "cache")
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), SECRET)
        self.assertEqual(config.failures, {"secret": 1})
        (warning,) = self.warnings()
        self.assertEqual(warning["url"], config.urls["secret"])
        self.assertNotIn(page.decode(), repr(warning))
        self.assertNotIn(SECRET.hex(), repr(warning))
        # A restart loads the good copy.
        config.stopService()
        again = self.config()
        again.load_cached()
        self.assertEqual(again.secret, SECRET)

    def test_error_page_does_not_replace_secret(self) -> Deferred[None]:
        self.assertEqual(len(ERROR_PAGE), 45)
        return self.run_async(self._error_page_secret(ERROR_PAGE))

    def test_text_of_the_right_length_is_refused(self) -> Deferred[None]:
        page = (ERROR_PAGE * 3)[:128]
        return self.run_async(self._error_page_secret(page))

    async def _cached_error_page(self) -> None:
        self.seed(secret=ERROR_PAGE)
        await self.listener.stopListening()
        config = self.config()
        await self.start(config)
        self.assertEqual(config.secret, DEFAULT_PROXY_SECRET)
        self.assertEqual(config.sources["secret"], "built-in")
        self.assertEqual(config.sources["config"], "cache")
        ignored = [e for e in self.warnings() if "ignoring the cached" in e["log_format"]]
        self.assertEqual(len(ignored), 1)
        self.assertIn(SECRET_FILE, ignored[0]["path"])

    def test_cached_error_page_is_ignored(self) -> Deferred[None]:
        return self.run_async(self._cached_error_page())

    async def _no_default_dc(self) -> None:
        self.seed()
        # Parses, but lists nothing for DC 2 (the default without a default line).
        self.site.bodies["/getProxyConfig"] = config_text({4: [("91.108.4.136", 8888)]})
        config = self.config()
        await self.start(config)
        self.assertEqual(config.config_v4, parse_proxy_config(V4))
        self.assertEqual(config.sources["config"], "cache")
        self.assertEqual(config.failures, {"config": 1})
        (warning,) = self.warnings()
        self.assertIn("default", str(warning["error"]))
        self.assertEqual((self.state_dir / CONFIG_FILE).read_bytes(), V4)

    def test_config_without_the_default_dc_is_refused(self) -> Deferred[None]:
        return self.run_async(self._no_default_dc())


class RetryTests(ConfigHarness):
    """
    A failed (or refused) download is retried within seconds, with backoff.
    """

    def retry_delays(self) -> list[float]:
        return [e["delay"] for e in self.observer if "retrying in" in e["log_format"]]

    async def _site_comes_back(self) -> None:
        for path in PATHS:
            self.site.status[path] = 503
        config = self.config()
        await self.start(config)
        self.assertEqual(config.sources, dict.fromkeys(config.KINDS, "built-in"))
        self.site.status.clear()
        await self.round(config, advance=10)
        self.assertEqual(config.rounds, 2)
        self.assertEqual(config.config_v4, parse_proxy_config(V4))
        self.assertEqual(config.sources["config"], "download")
        (delay,) = self.retry_delays()
        self.assertLessEqual(delay, 10)

    def test_failed_start_is_retried_within_seconds(self) -> Deferred[None]:
        return self.run_async(self._site_comes_back())

    async def _backoff(self) -> None:
        for path in PATHS:
            self.site.status[path] = 503
        config = self.config()
        await self.start(config)
        for _ in range(3):
            await self.round(config, advance=self.retry_delays()[-1])
        delays = self.retry_delays()
        self.assertEqual(len(delays), 4)
        self.assertEqual(config.rounds, 4)
        for shorter, longer in itertools.pairwise(delays):
            self.assertLess(shorter, longer)
        self.assertLess(delays[0], 10)
        self.assertLessEqual(delays[-1], 600)
        # One warning per kind for the failed start, not one per attempt.
        self.assertEqual(len(self.warnings()), 3)
        # Back: the next round is a normal refresh, and the backoff starts over.
        self.site.status.clear()
        await self.round(config, advance=delays[-1])
        self.assertEqual(config.sources["config"], "download")
        self.assertEqual(len(self.retry_delays()), 4)
        self.clock.advance(599)
        self.assertEqual(config.rounds, 5)
        self.site.bodies["/getProxySecret"] = ERROR_PAGE
        await self.round(config, advance=1)
        self.assertEqual(config.rounds, 6)
        self.assertEqual(len(self.retry_delays()), 5)
        self.assertLess(self.retry_delays()[-1], 10)

    def test_backoff_grows_and_resets(self) -> Deferred[None]:
        return self.run_async(self._backoff())

    async def _refused_once(self) -> None:
        self.seed()
        self.site.bodies["/getProxySecret"] = ERROR_PAGE
        config = self.config()
        await self.start(config)
        for _ in range(3):
            await self.round(config, advance=self.retry_delays()[-1])
        self.assertEqual(config.rounds, 4)
        self.assertEqual(config.failures, {"secret": 4})
        self.assertEqual(config.secret, SECRET)
        (warning,) = self.warnings()
        self.assertIn("unusable", warning["log_format"])

    def test_refused_download_warns_once_and_is_retried(self) -> Deferred[None]:
        return self.run_async(self._refused_once())
