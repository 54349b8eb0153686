"""
Telegram's middle-proxy list and proxy secret, kept fresh (PROTOCOL.md section 9).

:class:`TelegramConfig` is a service that downloads getProxyConfig,
getProxyConfigV6 and getProxySecret every ``refresh`` seconds. A download
that fails or does not parse never replaces the last good copy; good copies
are saved in the state directory and loaded at start, so a proxy whose
network cannot reach core.telegram.org still starts with what it had. The
built-in snapshots are the last resort. Start-up never waits for a download.

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

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.wire.proxyconfig import (
    FALLBACK_CONFIG_V4,
    FALLBACK_CONFIG_V6,
    ConfigError,
    ProxyConfig,
    parse_proxy_config,
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
    :ivar secret: the proxy secret (getProxySecret); never logged.
    :ivar sources: where each of the three came from: ``built-in``, ``cache``
        or ``download``.
    :ivar clock_skew: server time minus local time at the last answer with a
        ``Date`` header, in seconds; None before one.
    :ivar failures: failed downloads (or parses) per kind.
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
        self.sources = dict.fromkeys(self.KINDS, "built-in")
        self.clock_skew: float | None = None
        self.failures: Counter[str] = Counter()
        self.rounds = 0
        #: Called with the kind after each change (for logging or tests).
        self.listeners: list[Callable[[str], None]] = []
        self._loop: LoopingCall | None = None
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
                self._apply(kind, data)
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

    def _apply(self, kind: str, data: bytes) -> bool:
        """
        Parse and install one body; returns whether it changed anything.

        :raises ConfigError: the body is unusable; nothing changed.
        """
        if kind == "secret":
            secret = validate_proxy_secret(data)
            changed = secret != self.secret
            self.secret = secret
            return changed
        config = parse_proxy_config(data)
        if kind == "config":
            changed = config != self.config_v4
            self.config_v4 = config
        else:
            changed = config != self.config_v6
            self.config_v6 = config
        return changed

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
        loop = self._loop = LoopingCall(self._refresh_quietly)
        loop.clock = self.reactor
        loop.start(self.refresh_interval, now=True).addErrback(
            lambda f: self.log.failure("the config refresh loop stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._inflight is not None:
            self._inflight.cancel()

    def next_round(self) -> Deferred[None]:
        """
        Fires when the refresh round in progress (or the next one) completes.
        """
        d: Deferred[None] = Deferred()
        self._round_waiters.append(d)
        return d

    def _refresh_quietly(self) -> Deferred[None]:
        d = self.refresh()
        d.addErrback(lambda f: self.log.failure("config refresh failed", f))
        return d

    def refresh(self) -> Deferred[None]:
        """
        Download all three now; each that succeeds and parses replaces the old one.
        """
        kinds = self.KINDS
        fetches = [
            fetch(self.http_client, self.urls[kind], clock=self.reactor, timeout=self.timeout)
            for kind in kinds
        ]
        dl: Deferred[Any] = DeferredList(fetches, consumeErrors=True)
        self._inflight = dl

        def done(results: list[tuple[bool, Any]]) -> None:
            self._inflight = None
            try:
                self._round_done(dict(zip(kinds, results, strict=True)))
            finally:
                self.rounds += 1
                waiters, self._round_waiters = self._round_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        return dl.addCallback(done)

    def _round_done(self, results: dict[str, tuple[bool, Any]]) -> None:
        times: list[float] = []
        for kind, (ok, result) in results.items():
            if ok:
                self._downloaded(kind, result)
                if result.server_time is not None:
                    times.append(result.server_time)
            else:
                self.failures[kind] += 1
                self.log.warn(
                    "downloading {url} failed ({error}); keeping the {source} copy",
                    url=self.urls[kind],
                    error=_describe(result),
                    source=self.sources[kind],
                )
        if times:
            self._check_clock(max(times))

    def _downloaded(self, kind: str, fetched: Fetched) -> None:
        try:
            changed = self._apply(kind, fetched.body)
        except ConfigError as e:
            self.failures[kind] += 1
            self.log.warn(
                "{url} sent an unusable answer ({error}); keeping the {source} copy",
                url=self.urls[kind],
                error=e,
                source=self.sources[kind],
            )
            return
        fresh = self.sources[kind] != "download"
        self.sources[kind] = "download"
        if changed or fresh:
            self._save(kind, fetched.body)
        if changed:
            self.log.info("{kind} updated from {url}", kind=kind, url=self.urls[kind])
            for listener in list(self.listeners):
                try:
                    listener(kind)
                except Exception:
                    self.log.failure("a config listener failed")

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
