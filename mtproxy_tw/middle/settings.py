"""
What middle-proxy mode is configured with: :class:`MiddleSettings`, and the
source of the middle-proxy lists and the proxy secret (:class:`ConfigSource`:
the refreshed :class:`~mtproxy_tw.middle.telegramconfig.TelegramConfig`, or
a :class:`StaticConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from mtproxy_tw.config.schema import default
from mtproxy_tw.middle.address import DEFAULT_IP_LOOKUP_URL, IPAddress
from mtproxy_tw.middle.telegramconfig import DEFAULT_PROXY_SECRET
from mtproxy_tw.wire.proxyconfig import FALLBACK_CONFIG_V4, FALLBACK_CONFIG_V6, ProxyConfig

__all__ = ["DEFAULT_IP_LOOKUP_URL", "ConfigSource", "MiddleSettings", "StaticConfig"]


@dataclass(frozen=True)
class MiddleSettings:
    """
    Everything middle-proxy mode needs besides the core's settings.

    :ivar ad_tag: the 16-byte tag from @MTProxybot, sent in every request
        (never logged); None sends requests without one.
    :ivar nat_ips: the proxy's public addresses as the middle proxies see
        them (at most one per IP version is used).
    :ivar pool_min: RPC connections kept per DC once it has had a client.
    :ivar pool_max: most RPC connections per DC.
    :ivar clients_per_connection: load above which a pool opens another
        connection (up to ``pool_max``).
    :ivar client_buffer_cap: bytes a client may have queued toward it
        before it is closed.
    :ivar pending_limit: bytes a client may send before its RPC connection
        is ready; reading from it pauses above that.
    :ivar direct_fallback: clients of a DC whose middle proxies are all
        unreachable go to the DC directly (without the ad tag).
    :ivar wait_timeout: seconds a client waits for an RPC connection.
    """

    ad_tag: bytes | None = field(default=None, repr=False)
    nat_ips: tuple[IPAddress, ...] = ()
    ip_lookup_url: str = default("ip-lookup-url")
    proxy_config_url: str = default("proxy-config-url")
    proxy_config_v6_url: str = default("proxy-config-v6-url")
    proxy_secret_url: str = default("proxy-secret-url")
    config_refresh: float = default("config-refresh")
    http_timeout: float = 10.0
    pool_min: int = default("middle-pool-min")
    pool_max: int = default("middle-pool-max")
    clients_per_connection: int = default("middle-clients-per-connection")
    client_buffer_cap: int = default("client-buffer-cap")
    pending_limit: int = 1 << 20
    direct_fallback: bool = False
    prefer_ipv6: bool = False
    handshake_timeout: float = default("connect-timeout")
    ping_interval: float = 10.0
    ping_timeout: float = 35.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    wait_timeout: float = 15.0
    #: The config and secret downloads go through the upstream proxies too.
    upstream_proxy_for_config: bool = False

    def __post_init__(self) -> None:
        if self.ad_tag is not None and len(self.ad_tag) != 16:
            raise ValueError("the ad tag must be 16 bytes")
        if not 1 <= self.pool_min <= self.pool_max:
            raise ValueError("need 1 <= pool_min <= pool_max")


class ConfigSource(TypingProtocol):
    """
    Where the pools read the middle-proxy lists and the proxy secret.

    Read at every new connection, so a refreshed config applies to new
    connections while existing ones keep going. ``secret`` is the proxy
    secret in use; ``candidate`` (or None) a new one not tried yet: new
    connections use it, and the first handshake made with it is reported
    with :meth:`secret_accepted` or :meth:`secret_refused`.
    """

    @property
    def config_v4(self) -> ProxyConfig: ...
    @property
    def config_v6(self) -> ProxyConfig: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def candidate(self) -> bytes | None: ...
    @property
    def clock_skew(self) -> float | None: ...
    def secret_accepted(self, secret: bytes) -> None: ...
    def secret_refused(self, secret: bytes, reason: str) -> None: ...


@dataclass
class StaticConfig:
    """
    A config source that never changes (tests, or a fixed set of files).
    """

    config_v4: ProxyConfig = FALLBACK_CONFIG_V4
    config_v6: ProxyConfig = FALLBACK_CONFIG_V6
    secret: bytes = field(default=DEFAULT_PROXY_SECRET, repr=False)
    clock_skew: float | None = None
    candidate: bytes | None = field(default=None, init=False, repr=False)

    def secret_accepted(self, secret: bytes) -> None:
        pass

    def secret_refused(self, secret: bytes, reason: str) -> None:
        pass
