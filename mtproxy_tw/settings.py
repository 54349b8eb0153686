"""
The proxy's runtime settings, built from the resolved options; their
defaults are the options' own (:mod:`mtproxy_tw.config.schema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtproxy_tw.config.schema import default
from mtproxy_tw.wire.chain import BackProxy
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.secrets import Mode, Secret
from mtproxy_tw.wire.socks5 import UpstreamProxy

__all__ = ["UNRESOLVED_CONNECTIONS", "Settings"]

#: The connection limit of settings whose ``auto`` no proxy service has
#: worked out (a core used on its own, as in the tests).
UNRESOLVED_CONNECTIONS = 10000


@dataclass(frozen=True)
class Settings:
    """
    Everything the listeners and relays need to know.

    Replaced as a whole on reload; connections keep the one they started
    with.
    """

    secrets: tuple[Secret, ...]
    modes: frozenset[Mode] = default("modes")
    dcs: DCTable = field(default_factory=DCTable)
    fast_mode: bool = True
    #: Splice the download direction when it is a copy (``--no-splice``: never).
    splice: bool = True
    #: ``--upstream mtproxy://...``: direct mode goes through this back proxy.
    upstream: BackProxy | None = None
    handshake_timeout: float = default("handshake-timeout")
    idle_timeout: float = default("idle-timeout")
    connect_timeout: float = default("connect-timeout")
    #: ``None`` (``auto``): the proxy fills in what its open-file limit
    #: holds when it starts (:class:`~mtproxy_tw.services.proxy.ProxyService`).
    max_connections: int | None = default("max-connections")
    #: Connections still in their handshake at once; ``None``: a quarter
    #: of ``max_connections`` (at least 16).
    max_handshakes: int | None = None
    replay_capacity: int = default("replay-capacity")
    replay_window: float = default("replay-window")
    drain_timeout: float = default("drain-timeout")
    state_dir: Path | None = None
    #: Extra fake-TLS domains, beyond those inside ``ee`` secrets.
    extra_tls_domains: frozenset[str] = frozenset()
    #: Front bad classic/dd inits too; ``None``: when an ``ee`` secret exists.
    mask: bool | None = None
    mask_host: Address | None = None
    mask_proxy_protocol: bool = False
    #: TCP MSS announced on the listeners (``--mss-clamp``); ``None``: the kernel's.
    mss_clamp: int | None = None
    #: Send the ServerHello in a TCP segment of its own.
    split_server_hello: bool = False
    tls_time_skew: float = default("tls-time-skew")
    #: Seconds between stats lines in the log; 0 turns them off.
    stats_interval: float = default("stats-interval")
    #: SOCKS5 servers every connection toward Telegram goes through, in turn.
    upstream_proxies: tuple[UpstreamProxy, ...] = ()

    @property
    def connection_cap(self) -> int:
        """
        How many client connections may be open at once; before the proxy
        has worked out ``auto``, :data:`UNRESOLVED_CONNECTIONS`.
        """
        if self.max_connections is None:
            return UNRESOLVED_CONNECTIONS
        return self.max_connections

    @property
    def handshake_cap(self) -> int:
        """
        How many connections may be in their handshake at once.
        """
        if self.max_handshakes is not None:
            return self.max_handshakes
        return max(16, self.connection_cap // 4)

    @property
    def tls_domains(self) -> frozenset[str]:
        """
        Every domain a fake-TLS client may name, lower case.
        """
        inside = {s.domain for s in self.secrets if s.domain is not None}
        return frozenset(d.lower() for d in inside | self.extra_tls_domains)

    @property
    def tls_enabled(self) -> bool:
        return Mode.TLS in self.modes and any(s.kind is Mode.TLS for s in self.secrets)

    @property
    def masking(self) -> bool:
        """
        Whether bad non-TLS handshakes are fronted.
        """
        if self.mask is None:
            return any(s.kind is Mode.TLS for s in self.secrets)
        return self.mask

    def mask_target(self, sni: str | None) -> Address | None:
        """
        Where a failed handshake goes: the mask host, else the SNI's
        configured domain (or the first domain) on port 443.
        """
        if self.mask_host is not None:
            return self.mask_host
        domains = self.tls_domains
        if sni is not None and sni.lower() in domains:
            return Address(sni.lower(), 443)
        if domains:
            return Address(sorted(domains)[0], 443)
        return None
