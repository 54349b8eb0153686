"""
The state one running proxy shares between its connections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from mtproxy_tw.fronting.profile import TLSProfile
from mtproxy_tw.proxy.socks import Upstreams, plain_endpoint
from mtproxy_tw.proxy.stats import Stats
from mtproxy_tw.settings import Settings
from mtproxy_tw.shared.base import SharedState
from mtproxy_tw.shared.local import LocalState
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.replay import ReplayCache
from mtproxy_tw.wire.throttle import Throttle

if TYPE_CHECKING:
    from mtproxy_tw.proxy.client import ClientProtocol
    from mtproxy_tw.proxy.interfaces import MiddleUpstream
    from mtproxy_tw.proxy.users import Registry

__all__ = ["ProxyCore"]


class ProxyCore:
    """
    Settings, replay cache, counters and the set of live client connections.

    :ivar reactor: provides ``IReactorTCP`` and ``IReactorTime``; injected
        so tests can use a ``MemoryReactorClock``.
    """

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.replay = ReplayCache(reactor, settings.replay_capacity, settings.replay_window)
        #: What holds across the proxy's processes and hosts: by default
        #: this process's own replay cache.
        self.shared: SharedState = LocalState(self.replay)
        self._holders = 0
        self.stats = Stats()
        self.clients: set[ClientProtocol] = set()
        #: Clients still in their handshake, oldest first.
        self.handshaking: dict[ClientProtocol, None] = {}
        self._limit_warning = Throttle(60.0)
        self.draining = False
        #: Set when clients go through Telegram's middle proxies.
        self.middle: MiddleUpstream | None = None
        #: Named users with limits (from the config file's [users] and
        #: [limits] tables), or None.
        self.users: Registry | None = None
        #: Measured TLS answers of the fronted sites, by domain.
        self.tls_profiles: dict[str, TLSProfile] = {}
        #: Set when the mask host turned out to be this proxy itself.
        self.mask_disabled = False
        self._upstreams: Upstreams | None = None

    def admit(self, client: ClientProtocol) -> bool:
        """
        Take a new client in, or refuse it (``False``).

        When the connection limit or the handshake cap is full, the oldest
        connection still in its handshake makes room; a new client is only
        refused when every slot holds an established connection. Either
        way a warning says so, at most once a minute, with a count.
        """
        settings = self.settings
        if self.draining:
            self.stats.rejected["draining"] += 1
            return False
        full = None
        if len(self.clients) >= settings.connection_cap:
            full = "max-connections"
        elif len(self.handshaking) >= settings.handshake_cap:
            full = "max-handshakes"
        if full is not None:
            oldest = next(iter(self.handshaking), None)
            if oldest is None:
                self.stats.rejected["limit"] += 1
                self._limit_hit(full, "refused")
                return False
            self._limit_hit(full, "replaced the oldest handshake for")
            oldest.evict()
        self.clients.add(client)
        self.handshaking[client] = None
        self.stats.active += 1
        return True

    def holder(self) -> str:
        """
        A new name for a connection's claims, unique in this process.
        """
        self._holders += 1
        return str(self._holders)

    def handshake_over(self, client: ClientProtocol) -> None:
        """
        ``client`` is past its handshake (or gone): it no longer holds a
        handshake slot.
        """
        self.handshaking.pop(client, None)

    def forget(self, client: ClientProtocol) -> None:
        """
        ``client`` is gone.
        """
        self.handshaking.pop(client, None)
        if client in self.clients:
            self.clients.remove(client)
            self.stats.active -= 1

    def _limit_hit(self, limit: str, what: str) -> None:
        count = self._limit_warning.hit(self.reactor.seconds())
        if count is not None:
            self.log.warn(
                "--{limit} is full: {what} {count} new connection(s) in the last minute",
                limit=limit,
                what=what,
                count=count,
            )

    def endpoint(self, address: Address) -> IStreamClientEndpoint:
        """
        An endpoint toward Telegram at ``address``: through the upstream
        SOCKS5 servers when there are any (``--upstream-proxy``).
        """
        upstreams = self.upstreams
        if upstreams is not None:
            return upstreams.endpoint(address.host, address.port)
        return self.local_endpoint(address)

    def local_endpoint(self, address: Address) -> IStreamClientEndpoint:
        """
        A direct endpoint toward ``address`` (the mask host: fronting never
        goes through an upstream); IP literals skip name resolution.
        """
        return plain_endpoint(
            self.reactor, address.host, address.port, self.settings.connect_timeout
        )

    @property
    def upstreams(self) -> Upstreams | None:
        """
        The upstream SOCKS5 servers in use, kept (with their backoff) while
        the settings name the same ones.
        """
        proxies = self.settings.upstream_proxies
        if not proxies:
            return None
        if self._upstreams is None or self._upstreams.proxies != proxies:
            self._upstreams = Upstreams(self.reactor, proxies, self.settings.connect_timeout)
        return self._upstreams
