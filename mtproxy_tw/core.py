"""
The state one running proxy shares between its connections.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger

from mtproxy_tw.dcs import Address
from mtproxy_tw.replay import ReplayCache
from mtproxy_tw.settings import Settings
from mtproxy_tw.stats import Stats
from mtproxy_tw.tlsprofile import TLSProfile

if TYPE_CHECKING:
    from mtproxy_tw.relay import ClientProtocol, MiddleUpstream

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
        self.stats = Stats()
        self.clients: set[ClientProtocol] = set()
        self.draining = False
        #: Set when clients go through Telegram's middle proxies.
        self.middle: MiddleUpstream | None = None
        #: Measured TLS answers of the fronted sites, by domain.
        self.tls_profiles: dict[str, TLSProfile] = {}
        #: Set when the mask host turned out to be this proxy itself.
        self.mask_disabled = False

    def endpoint(self, address: Address) -> IStreamClientEndpoint:
        """
        An endpoint toward ``address``; IP literals skip name resolution.
        """
        timeout = self.settings.connect_timeout
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            return HostnameEndpoint(self.reactor, address.host, address.port, timeout)
        if ip.version == 6:
            return TCP6ClientEndpoint(self.reactor, address.host, address.port, timeout)
        return TCP4ClientEndpoint(self.reactor, address.host, address.port, timeout)

    def connect(self, address: Address, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self.endpoint(address).connect(factory)
