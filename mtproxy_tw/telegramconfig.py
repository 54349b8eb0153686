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

Good copies are saved in the state directory and loaded at start (through
the same checks), so a proxy whose network cannot reach core.telegram.org
still starts with what it had. The built-in snapshots are the last resort.
Start-up never waits for a download. After a round with a failed or
refused download the round is retried with an exponential backoff (from
:data:`RETRY_INITIAL` seconds up to ``refresh``), reset after a good round.

The ``Date`` header of every answer is compared with the local clock: a
middle proxy rejects a handshake from a clock more than 30 s off, and fake
TLS checks client timestamps against it, so a large skew is logged.
"""

from __future__ import annotations

import email.utils
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.wire.proxyconfig import (
    FALLBACK_CONFIG_V4,
    FALLBACK_CONFIG_V6,
    ConfigError,
    ProxyConfig,
    validate_proxy_config,
    validate_proxy_secret,
)
from mtproxy_tw.wire.rpc import MAX_CLOCK_SKEW

__all__ = [
    "CONFIG_FILE",
    "CONFIG_V6_FILE",
    "DEFAULT_PROXY_SECRET",
    "PROXY_CONFIG_URL",
    "PROXY_CONFIG_V6_URL",
    "PROXY_SECRET_URL",
    "RETRY_INITIAL",
    "SECRET_FILE",
    "FetchError",
    "Fetched",
    "TelegramConfig",
    "default_http_client",
    "fetch",
]

PROXY_CONFIG_URL = "https://core.telegram.org/getProxyConfig"
PROXY_CONFIG_V6_URL = "https://core.telegram.org/getProxyConfigV6"
PROXY_SECRET_URL = "https://core.telegram.org/getProxySecret"

#: Cached copies in the state directory.
CONFIG_FILE = "proxy-config.txt"
CONFIG_V6_FILE = "proxy-config-v6.txt"
SECRET_FILE = "proxy-secret.bin"

#: The getProxySecret body as published (and embedded by other proxies).
DEFAULT_PROXY_SECRET = bytes.fromhex(
    "c4f9faca9678e6bb48ad6c7e2ce5c0d24430645d554addeb55419e034da62721"
    "d046eaab6e52ab14a95a443ecfb3463e79a05a66612adf9caeda8be9a80da698"
    "6fb0a6ff387af84d88ef3a6413713e5c3377f6e1a3d47d99f5e0c56eece8f05c"
    "54c490b079e31bef82ff0ee8f2b0a32756d249c5f21269816cb7061b265db212"
)

#: Largest body accepted from any of the URLs.
MAX_BODY = 1 << 20
#: Fake TLS accepts client timestamps this far from the local clock (section 13.2).
FAKE_TLS_WINDOW = 300
#: Seconds before the first retry of a failed round; each further failure
#: multiplies it by RETRY_FACTOR, up to the refresh interval.
RETRY_INITIAL = 5.0
RETRY_FACTOR = 2.0


class FetchError(Exception):
    """
    A download failed: HTTP status, size, or the connection.
    """


@dataclass(frozen=True, slots=True)
class Fetched:
    """
    A downloaded body and the server's clock (``Date`` header) if it sent one.
    """

    body: bytes
    server_time: float | None


def default_http_client(reactor: Any) -> Any:
    """
    A treq client whose HTTPS connections verify certificates (the Agent default).
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    return HTTPClient(Agent(reactor))


def _server_time(headers: Any) -> float | None:
    values = headers.getRawHeaders(b"date") or []
    for value in values:
        try:
            return email.utils.parsedate_to_datetime(value.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError):
            continue
    return None


def fetch(
    http_client: Any, url: str, *, clock: IReactorTime, timeout: float, limit: int = MAX_BODY
) -> Deferred[Fetched]:
    """
    GET ``url`` with a treq-like client; fails unless the answer is 200 and small.

    ``timeout`` covers the whole exchange, body included.
    """
    import treq

    async def run() -> Fetched:
        response = await http_client.get(url, unbuffered=True, reactor=clock)
        if response.code != 200:
            response.deliverBody(_Discard())
            raise FetchError(f"HTTP status {response.code}")
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:
                raise FetchError(f"body larger than {limit} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return Fetched(b"".join(chunks), _server_time(response.headers))

    d: Deferred[Fetched] = ensureDeferred(run())
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    timer = clock.callLater(timeout, expire)

    def finished(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            raise FetchError(f"timed out after {timeout:g} s")
        return result

    return d.addBoth(finished)


class _Discard(Protocol):
    """
    A body protocol that drops the connection instead of reading the body.
    """

    transport: Any

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


def _describe(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    return failure.getErrorMessage() or repr(failure.value)


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
    ) -> None:
        self.reactor = reactor
        self.state_dir = state_dir
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
        #: Called with the kind after each change (for logging or tests).
        self.listeners: list[Callable[[str], None]] = []
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
        self._skew_warned = False

    @property
    def http_client(self) -> Any:
        if self._http_client is None:
            self._http_client = default_http_client(self.reactor)
        return self._http_client

    # -- the cache

    def _path(self, kind: str) -> Path | None:
        if self.state_dir is None:
            return None
        name = {"config": CONFIG_FILE, "config_v6": CONFIG_V6_FILE, "secret": SECRET_FILE}
        return self.state_dir / name[kind]

    def load_cached(self) -> None:
        """
        Use the copies saved by earlier runs; a missing or bad file is skipped.

        A cached file goes through the same checks as a download.
        """
        for kind in self.KINDS:
            path = self._path(kind)
            if path is None:
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                self.log.warn("cannot read {path}: {error}", path=str(path), error=e.strerror)
                continue
            try:
                self._install(kind, self._validate(kind, data))
            except ConfigError as e:
                self.log.warn("ignoring the cached {path}: {error}", path=str(path), error=e)
                continue
            self.sources[kind] = "cache"

    def _save(self, kind: str, data: bytes) -> None:
        path = self._path(kind)
        if path is None:
            return
        temporary = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except OSError as e:
            self.log.warn("cannot save {path}: {error}", path=str(path), error=e.strerror)

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
        self._save("secret", secret)
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
                self._save("secret", secret)
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
        self._scheduled_round()

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
                error = _describe(result)
                self._warn(
                    kind,
                    error,
                    retry,
                    "downloading {url} failed ({error}); keeping the {source} copy",
                )
        if times:
            self._check_clock(max(times))
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
        if kind == "secret":
            self._new_secret(value)
            return True
        changed = self._install(kind, value)
        fresh = self.sources[kind] != "download"
        self.sources[kind] = "download"
        if changed or fresh:
            self._save(kind, fetched.body)
        if changed:
            self._changed(kind)
        return True

    def _check_clock(self, server_time: float) -> None:
        # The Date header has a resolution of one second.
        skew = server_time - self.reactor.seconds()
        self.clock_skew = skew
        if abs(skew) <= MAX_CLOCK_SKEW + 1:
            if self._skew_warned:
                self.log.info("the local clock agrees with Telegram's again")
            self._skew_warned = False
            return
        self._skew_warned = True
        effects = "middle proxies will reject the handshake"
        if abs(skew) > FAKE_TLS_WINDOW:
            effects += " and fake-TLS clients will be refused"
        self.log.warn(
            "the local clock is {skew:.0f} s {direction} Telegram's: {effects}; fix the clock",
            skew=abs(skew),
            direction="behind" if skew > 0 else "ahead of",
            effects=effects,
        )
