"""
Telegram's middle-proxy list and proxy secret, kept fresh (PROTOCOL.md section 9).

:class:`TelegramConfig` is a service that downloads getProxyConfig,
getProxyConfigV6 and getProxySecret every ``refresh`` seconds. A download
replaces nothing until it is validated for what it is: a config must parse
and list middle proxies for its default DC; a proxy secret must be
Telegram's length of binary key material (not an error page). A new proxy
secret is only a *candidate* until a middle proxy accepts a handshake made
with it (:meth:`TelegramConfig.secret_accepted`); a refusal
(:meth:`TelegramConfig.secret_refused`) drops it and the proven one stays.

Good copies are saved in the state directory
(:class:`~mtproxy_tw.middle.cache.ConfigCache`) and loaded at start (through
the same checks). The built-in snapshots are the last resort.
Start-up never waits for a download. After a round with a failed or
refused download the round is retried with an exponential backoff (from
:data:`RETRY_INITIAL` seconds up to ``refresh``), reset after a good round.

The ``Date`` header of every answer is checked against the local clock
(:class:`~mtproxy_tw.middle.clock.ClockCheck`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mtproxy_tw.config.schema import default
from mtproxy_tw.middle.cache import ConfigCache
from mtproxy_tw.middle.clock import ClockCheck
from mtproxy_tw.middle.fetch import Fetched, default_http_client, describe, fetch
from mtproxy_tw.wire.proxyconfig import (
    FALLBACK_CONFIG_V4,
    FALLBACK_CONFIG_V6,
    ConfigError,
    ProxyConfig,
    validate_proxy_config,
    validate_proxy_secret,
)

__all__ = [
    "DEFAULT_PROXY_SECRET",
    "PROXY_CONFIG_URL",
    "PROXY_CONFIG_V6_URL",
    "PROXY_SECRET_URL",
    "RETRY_FACTOR",
    "RETRY_INITIAL",
    "TelegramConfig",
]

PROXY_CONFIG_URL: str = default("proxy-config-url")
PROXY_CONFIG_V6_URL: str = default("proxy-config-v6-url")
PROXY_SECRET_URL: str = default("proxy-secret-url")


#: The getProxySecret body as published (and embedded by other proxies).
DEFAULT_PROXY_SECRET = bytes.fromhex(
    "c4f9faca9678e6bb48ad6c7e2ce5c0d24430645d554addeb55419e034da62721"
    "d046eaab6e52ab14a95a443ecfb3463e79a05a66612adf9caeda8be9a80da698"
    "6fb0a6ff387af84d88ef3a6413713e5c3377f6e1a3d47d99f5e0c56eece8f05c"
    "54c490b079e31bef82ff0ee8f2b0a32756d249c5f21269816cb7061b265db212"
)

#: Seconds before the first retry of a failed round; each further failure
#: multiplies it by RETRY_FACTOR, up to the refresh interval.
RETRY_INITIAL = 5.0
RETRY_FACTOR = 2.0


class TelegramConfig(Service):
    """
    The current middle-proxy lists and proxy secret, refreshed in the background.

    :ivar config_v4: the IPv4 middle proxies (getProxyConfig).
    :ivar config_v6: the IPv6 middle proxies (getProxyConfigV6).
    :ivar secret: the proxy secret in use (getProxySecret); never logged.
    :ivar candidate: a downloaded proxy secret that differs from ``secret``
        and has not been tried yet; new middle-proxy connections use it, and
        the first handshake decides (:meth:`secret_accepted`,
        :meth:`secret_refused`). None when there is none.
    :ivar sources: where each of the three in use came from: ``built-in``,
        ``cache`` or ``download``.
    :ivar clock_skew: server time minus local time at the last answer with a
        ``Date`` header, in seconds; None before one.
    :ivar failures: failed, refused or unusable downloads per kind.
    :ivar rounds: completed refresh rounds.
    :ivar updated: when each kind in use was last downloaded (or confirmed by
        a download), or when its cached copy was saved; absent while built in.
    """

    log = Logger()
    KINDS = ("config", "config_v6", "secret")

    def __init__(
        self,
        reactor: Any,
        *,
        state_dir: Path | None = None,
        config_url: str = PROXY_CONFIG_URL,
        config_v6_url: str = PROXY_CONFIG_V6_URL,
        secret_url: str = PROXY_SECRET_URL,
        refresh: float = 3600.0,
        timeout: float = 10.0,
        http_client: Any = None,
        fetching: bool = True,
    ) -> None:
        # fetching=False: a worker, taking what its parent downloads (take).
        self.reactor = reactor
        self.fetching = fetching
        self.state_dir = state_dir
        self.cache = ConfigCache(state_dir)
        self.urls = {"config": config_url, "config_v6": config_v6_url, "secret": secret_url}
        self.refresh_interval = refresh
        self.timeout = timeout
        self._http_client = http_client
        self.config_v4: ProxyConfig = FALLBACK_CONFIG_V4
        self.config_v6: ProxyConfig = FALLBACK_CONFIG_V6
        self.secret: bytes = DEFAULT_PROXY_SECRET
        self.candidate: bytes | None = None
        self.sources = dict.fromkeys(self.KINDS, "built-in")
        self.clock_skew: float | None = None
        self.failures: Counter[str] = Counter()
        self.rounds = 0
        self.updated: dict[str, float] = {}
        #: Called with the kind after each change (for logging or tests).
        self.listeners: list[Callable[[str], None]] = []
        #: Called with the kind and body of each valid download (the
        #: workers' parent hands them on).
        self.downloads: list[Callable[[str, bytes], None]] = []
        self._next: IDelayedCall | None = None
        #: Scheduled rounds that failed in a row (0: the next one is a refresh).
        self._attempt = 0
        self._retry_delay = backoffPolicy(min(RETRY_INITIAL, refresh), refresh, RETRY_FACTOR)
        #: kind -> (reason, when) of the last warning about it in a failing streak.
        self._warned: dict[str, tuple[str, float]] = {}
        #: A candidate secret a middle proxy refused, and when.
        self._refused: tuple[bytes, float] | None = None
        self._inflight: Deferred[Any] | None = None
        self._round_waiters: list[Deferred[None]] = []
        self._clock = ClockCheck(reactor)

    @property
    def http_client(self) -> Any:
        if self._http_client is None:
            self._http_client = default_http_client(self.reactor)
        return self._http_client

    # -- the cache
    def load_cached(self) -> None:
        """
        Use the copies saved by earlier runs; a missing or bad file is skipped.

        A cached file goes through the same checks as a download.
        """
        for kind in self.KINDS:
            data = self.cache.read(kind)
            if data is None:
                continue
            try:
                self._install(kind, self._validate(kind, data))
            except ConfigError as e:
                path = str(self.cache.path(kind))
                self.log.warn("ignoring the cached {path}: {error}", path=path, error=e)
                continue
            self.sources[kind] = "cache"
            saved = self.cache.path(kind)
            with contextlib.suppress(OSError):
                self.updated[kind] = saved.stat().st_mtime if saved else self.reactor.seconds()

    @staticmethod
    def _validate(kind: str, data: bytes) -> Any:
        """
        The usable value of one body: a ProxyConfig, or the secret bytes.

        :raises ConfigError: the body is not what it should be.
        """
        if kind == "secret":
            return validate_proxy_secret(data)
        return validate_proxy_config(data)

    def _install(self, kind: str, value: Any) -> bool:
        """
        Put a validated value in use; returns whether it changed anything.
        """
        if kind == "secret":
            changed = value != self.secret
            self.secret = value
        elif kind == "config":
            changed = value != self.config_v4
            self.config_v4 = value
        else:
            changed = value != self.config_v6
            self.config_v6 = value
        return bool(changed)

    def _changed(self, kind: str) -> None:
        self.log.info("{kind} updated from {url}", kind=kind, url=self.urls[kind])
        for listener in list(self.listeners):
            try:
                listener(kind)
            except Exception:
                self.log.failure("a config listener failed")

    # -- the proxy secret: a download is a candidate until a middle proxy accepts it

    def secret_accepted(self, secret: bytes) -> None:
        """
        A middle proxy accepted a handshake made with ``secret``.

        If it is the candidate, it becomes the secret in use and is saved.
        """
        if self.candidate is None or secret != self.candidate:
            return
        self.candidate = None
        self._install("secret", secret)
        self.sources["secret"] = "download"
        self.cache.save("secret", secret)
        self._changed("secret")

    def secret_refused(self, secret: bytes, reason: str) -> None:
        """
        A middle proxy refused a handshake made with ``secret``, likely because of it.

        If it is the candidate, it is dropped (with a warning) and the secret
        in use stays; the same download is not tried again for a refresh interval.
        """
        if self.candidate is None or secret != self.candidate:
            return
        self.candidate = None
        self._refused = (secret, self.reactor.seconds())
        self.failures["secret"] += 1
        self.log.warn(
            "a middle proxy refused the proxy secret downloaded from {url} ({reason}); "
            "keeping the {source} one",
            url=self.urls["secret"],
            reason=reason,
            source=self.sources["secret"],
        )

    def _new_secret(self, secret: bytes) -> None:
        """
        A valid proxy secret was downloaded: keep it as the candidate if it is new.
        """
        if secret == self.secret:
            if self.candidate is not None:
                self.log.info(
                    "{url} publishes the proxy secret in use again; "
                    "dropping the one not yet tried",
                    url=self.urls["secret"],
                )
                self.candidate = None
            if self.sources["secret"] != "download":
                self.sources["secret"] = "download"
                self.cache.save("secret", secret)
            return
        if secret == self.candidate:
            return
        refused = self._refused
        if (
            refused is not None
            and refused[0] == secret
            and self.reactor.seconds() - refused[1] < self.refresh_interval
        ):
            return
        self.candidate = secret
        self.log.info(
            "new proxy secret from {url}; it replaces the {source} one "
            "once a middle proxy accepts a handshake with it",
            url=self.urls["secret"],
            source=self.sources["secret"],
        )

    # -- the service

    def startService(self) -> None:
        super().startService()
        self.load_cached()
        self.log.info(
            "middle-proxy config from {config}, IPv6 config from {config_v6}, "
            "proxy secret from {secret}; refreshing every {interval} s",
            interval=self.refresh_interval,
            **self.sources,
        )
        self._attempt = 0
        if self.fetching:
            self._scheduled_round()

    def take(self, kind: str, body: bytes) -> None:
        """
        A body downloaded elsewhere (by the workers' parent): checked and
        used as a download of this process's own would be.
        """
        if kind in self.KINDS:
            self._downloaded(kind, Fetched(body, None), retry=False)

    def stopService(self) -> None:
        super().stopService()
        call, self._next = self._next, None
        if call is not None and call.active():
            call.cancel()
        if self._inflight is not None:
            self._inflight.cancel()

    def next_round(self) -> Deferred[None]:
        """
        Fires when the refresh round in progress (or the next one) completes.
        """
        d: Deferred[None] = Deferred()
        self._round_waiters.append(d)
        return d

    def _scheduled_round(self) -> None:
        self._next = None
        d = self._refresh(scheduled=True)
        d.addErrback(lambda f: self.log.failure("config refresh failed", f))

    def _schedule(self, ok: bool) -> None:
        """
        After a scheduled round: the next refresh, or a retry after a failure.
        """
        if not self.running:
            return
        if ok:
            self._attempt = 0
            delay = self.refresh_interval
        else:
            delay = min(self._retry_delay(self._attempt), self.refresh_interval)
            self._attempt += 1
            self.log.info("not every download succeeded; retrying in {delay:.0f} s", delay=delay)
        self._next = self.reactor.callLater(delay, self._scheduled_round)

    def refresh(self) -> Deferred[None]:
        """
        Download all three now; each that succeeds and is valid replaces the old one.

        (A new proxy secret becomes the candidate.) This does not move the
        scheduled rounds.
        """
        return self._refresh(scheduled=False)

    def _refresh(self, scheduled: bool) -> Deferred[None]:
        retry = scheduled and self._attempt > 0
        kinds = self.KINDS
        fetches = [
            fetch(self.http_client, self.urls[kind], clock=self.reactor, timeout=self.timeout)
            for kind in kinds
        ]
        dl: Deferred[Any] = DeferredList(fetches, consumeErrors=True)
        self._inflight = dl

        def done(results: list[tuple[bool, Any]]) -> None:
            self._inflight = None
            ok = False
            try:
                ok = self._round_done(dict(zip(kinds, results, strict=True)), retry)
            finally:
                self.rounds += 1
                if scheduled:
                    self._schedule(ok)
                waiters, self._round_waiters = self._round_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        return dl.addCallback(done)

    def _round_done(self, results: dict[str, tuple[bool, Any]], retry: bool) -> bool:
        """
        Use what a round brought; returns whether every download was good.
        """
        times: list[float] = []
        good = True
        for kind, (ok, result) in results.items():
            if ok:
                good = self._downloaded(kind, result, retry) and good
                if result.server_time is not None:
                    times.append(result.server_time)
            else:
                good = False
                self.failures[kind] += 1
                error = describe(result)
                self._warn(
                    kind,
                    error,
                    retry,
                    "downloading {url} failed ({error}); keeping the {source} copy",
                )
        if times:
            self.clock_skew = self._clock.compare(max(times))
        return good

    def _warn(self, kind: str, error: str, retry: bool, text: str) -> None:
        """
        Log a failed or refused download: a warning once per refresh, not per retry.

        A retry that fails as the last warning said, within a refresh
        interval of it, is logged at info level.
        """
        now = self.reactor.seconds()
        last = self._warned.get(kind)
        if (
            retry
            and last is not None
            and last[0] == error
            and now - last[1] < self.refresh_interval
        ):
            log = self.log.info
        else:
            log = self.log.warn
            self._warned[kind] = (error, now)
        log(text, url=self.urls[kind], error=error, source=self.sources[kind])

    def _downloaded(self, kind: str, fetched: Fetched, retry: bool) -> bool:
        try:
            value = self._validate(kind, fetched.body)
        except ConfigError as e:
            self.failures[kind] += 1
            self._warn(
                kind,
                str(e),
                retry,
                "{url} sent an unusable answer ({error}); keeping the {source} copy",
            )
            return False
        self._warned.pop(kind, None)
        self.updated[kind] = self.reactor.seconds()
        for listener in list(self.downloads):
            listener(kind, fetched.body)
        if kind == "secret":
            self._new_secret(value)
            return True
        changed = self._install(kind, value)
        fresh = self.sources[kind] != "download"
        self.sources[kind] = "download"
        if changed or fresh:
            self.cache.save(kind, fetched.body)
        if changed:
            self._changed(kind)
        return True
