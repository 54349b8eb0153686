"""
The middle-proxy upstream: the service the relay hands its clients to
(``core.middle``), with a :class:`~mtproxy_tw.middle.pool.DCPool` per DC.
"""

from __future__ import annotations

import random as _random
from collections import Counter

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtproxy_tw.middle.address import ExternalAddress
from mtproxy_tw.middle.connection import MEConnection
from mtproxy_tw.middle.pool import DCPool
from mtproxy_tw.middle.session import ClientSession, MiddleClient
from mtproxy_tw.middle.settings import ConfigSource, MiddleSettings
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.proxyconfig import Endpoint

__all__ = ["MiddleProxy"]


class MiddleProxy(Service):
    """
    The middle-proxy upstream (``core.middle``): a pool per DC.

    :ivar counters: events worth counting (``buffer-cap``,
        ``direct-fallback``, ``unavailable``, ``wait-timeout``,
        ``handshake-rejected``).
    """

    log = Logger()

    def __init__(
        self,
        core: ProxyCore,
        settings: MiddleSettings,
        config: ConfigSource,
        *,
        external: ExternalAddress | None = None,
        random: _random.Random | None = None,
    ) -> None:
        self.core = core
        self.reactor = core.reactor
        self.settings = settings
        self.config = config
        self.external = external or ExternalAddress(
            core.reactor, settings.nat_ips, settings.ip_lookup_url, timeout=settings.http_timeout
        )
        self.random = random or _random.Random()
        self.pools: dict[int, DCPool] = {}
        self.counters: Counter[str] = Counter()
        self.start_time = int(core.reactor.seconds()) & 0xFFFFFFFF
        self._stopped: Deferred[None] | None = None
        self._rejections_logged: set[tuple[Endpoint, str]] = set()

    def cluster(self, dc: int) -> int:
        """
        The config cluster a client DC id goes to (unknown ids: the default one).
        """
        source = self.config
        config = source.config_v6 if self.settings.prefer_ipv6 else source.config_v4
        if dc != 0 and dc in config.clusters:
            return dc
        other = source.config_v4 if self.settings.prefer_ipv6 else source.config_v6
        if dc != 0 and dc in other.clusters:
            return dc
        return config.default_dc

    def pool(self, dc: int) -> DCPool:
        key = self.cluster(dc)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = DCPool(self, key)
        return pool

    def attach(self, client: MiddleClient, dc: int, tag: bytes) -> ClientSession:
        """
        A session for a client that completed its handshake.
        """
        session = ClientSession(self, client, dc, tag)
        if self._stopped is not None:
            session._fail("the proxy is shutting down")
            return session
        self.pool(dc).acquire(session)
        return session

    def handshake_accepted(self, conn: MEConnection) -> None:
        """
        A middle proxy accepted the handshake: a new proxy secret is proven.
        """
        if conn.secret != self.config.secret:
            self.config.secret_accepted(conn.secret)

    def handshake_rejected(
        self, conn: MEConnection, detail: str, cause: str, *, secret_suspect: bool = False
    ) -> None:
        """
        A handshake failed; ``secret_suspect``: in a way a wrong proxy secret causes.

        If the connection tried a proxy secret other than the one in use and
        the failure points at it (and not at a local clock known to be off),
        that secret is reported refused and the endpoint is not blamed.
        """
        self.counters["handshake-rejected"] += 1
        self.core.stats.upstream_failures["middle-handshake"] += 1
        skew = self.config.clock_skew
        clock_off = skew is not None and abs(skew) > rpc.MAX_CLOCK_SKEW + 1
        if (
            secret_suspect
            and conn.secret != self.config.secret
            and not (cause == "clock" and clock_off)
        ):
            conn.secret_refused = True
            self.config.secret_refused(
                conn.secret, f"{conn.endpoint[0]}:{conn.endpoint[1]}: {detail}"
            )
            return
        external = str(conn.external) if conn.external is not None else "unknown"
        clock = "the local clock" + (f" (off by {skew:+.0f} s)" if skew is not None else "")
        if cause == "clock":
            likely = f"{clock} or the proxy secret"
        elif cause == "secret":
            likely = "the proxy secret (getProxySecret) does not match the middle proxy's"
        elif cause == "ip":
            likely = (
                f"the external address {external} used in the key derivation "
                "(set --nat-ip to the public address)"
            )
        else:
            likely = f"the external address {external} or {clock}"
        key = (conn.endpoint, likely)
        log = self.log.warn if key not in self._rejections_logged else self.log.debug
        self._rejections_logged.add(key)
        log(
            "middle proxy {host}:{port} rejected the handshake ({detail}); likely cause: {likely}",
            host=conn.endpoint[0],
            port=conn.endpoint[1],
            detail=detail,
            likely=likely,
        )
        if cause in ("ip", "protocol"):
            self.external.forget()

    def startService(self) -> None:
        super().startService()
        self._stopped = None
        mode = "with an ad tag" if self.settings.ad_tag is not None else "without an ad tag"
        self.log.info("clients go through Telegram's middle proxies ({mode})", mode=mode)

    def stopService(self) -> Deferred[None]:
        """
        Stop opening connections; wait for the clients to leave (bounded), then close.
        """
        super().stopService()
        done: Deferred[None] = Deferred()
        self._stopped = done
        for pool in self.pools.values():
            pool.stop()
        deadline = self.reactor.seconds() + self.core.settings.drain_timeout + 1.0

        def check() -> None:
            live = sum(len(p.connections) + len(p._attempts) for p in self.pools.values())
            if not live:
                poll.stop()
            elif self.reactor.seconds() >= deadline:
                for pool in self.pools.values():
                    pool.abort()

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(0.05).addCallback(lambda _: done.callback(None))
        return done
