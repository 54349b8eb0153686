"""
Command-line options of middle-proxy mode, and the service they build.

Meant to be merged into ``mtproxy_tw.tap.Options``::

    class Options(MiddleOptionsMixin, usage.Options):
        optFlags = [...] + MIDDLE_FLAGS
        optParameters = [...] + MIDDLE_PARAMETERS

then ``middle_settings_from_options(options)`` in ``postOptions`` (it
raises ``UsageError`` naming the option) and :func:`build_middle` in
``makeService``.
"""

from __future__ import annotations

import ipaddress
import random as _random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from mtproxy_tw._options import count, number
from mtproxy_tw.middle import DEFAULT_IP_LOOKUP_URL, ExternalAddress, MiddleProxy, MiddleSettings
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.interfaces import MiddleUpstream
from mtproxy_tw.telegramconfig import (
    PROXY_CONFIG_URL,
    PROXY_CONFIG_V6_URL,
    PROXY_SECRET_URL,
    TelegramConfig,
)

__all__ = [
    "MIDDLE_FLAGS",
    "MIDDLE_PARAMETERS",
    "MiddleOptionsMixin",
    "build_middle",
    "middle_settings_from_options",
    "parse_size",
]

log = Logger()

_DEFAULTS = MiddleSettings()

#: ``usage.Options.optFlags`` entries.
MIDDLE_FLAGS: list[list[Any]] = [
    [
        "direct-fallback",
        None,
        "When every middle proxy of a DC is unreachable, carry its clients to the DC "
        "directly (without the ad tag). Always on without --ad-tag.",
    ],
]

#: ``usage.Options.optParameters`` entries (values validated by
#: :func:`middle_settings_from_options`).
MIDDLE_PARAMETERS: list[list[Any]] = [
    [
        "ad-tag",
        None,
        None,
        "Ad tag from @MTProxybot (32 hex digits); turns middle-proxy mode on.",
    ],
    [
        "upstream",
        None,
        None,
        "middle or direct: how clients reach Telegram (default: middle with --ad-tag, "
        "else direct).",
    ],
    [
        "ip-lookup-url",
        None,
        DEFAULT_IP_LOOKUP_URL,
        "URL answering the proxy's public address, used when it is behind NAT and no "
        "--nat-ip is given.",
    ],
    ["proxy-config-url", None, PROXY_CONFIG_URL, "Where to fetch the IPv4 middle proxies."],
    ["proxy-config-v6-url", None, PROXY_CONFIG_V6_URL, "Where to fetch the IPv6 middle proxies."],
    ["proxy-secret-url", None, PROXY_SECRET_URL, "Where to fetch the middle-proxy secret."],
    [
        "config-refresh",
        None,
        str(int(_DEFAULTS.config_refresh)),
        "Seconds between downloads of the middle-proxy config and secret.",
    ],
    [
        "middle-pool-min",
        None,
        str(_DEFAULTS.pool_min),
        "Connections kept to the middle proxies of each DC in use.",
    ],
    [
        "middle-pool-max",
        None,
        str(_DEFAULTS.pool_max),
        "Most connections to the middle proxies of one DC.",
    ],
    [
        "middle-clients-per-connection",
        None,
        str(_DEFAULTS.clients_per_connection),
        "Clients per middle-proxy connection before the pool opens another.",
    ],
    [
        "client-buffer-cap",
        None,
        "8M",
        "Bytes queued toward one slow client in middle-proxy mode before it is closed "
        "(suffixes K, M, G).",
    ],
]

_HEX32 = re.compile(r"[0-9A-Fa-f]{32}")
_SIZE = re.compile(r"([0-9]+)([KMG]?)(?:i?B)?", re.IGNORECASE)


class MiddleOptionsMixin:
    """
    The repeatable ``--nat-ip`` option (stored as a list under ``"nat-ip"``).
    """

    def opt_nat_ip(self, text: str) -> None:
        """ADDRESS: the proxy's public IPv4 or IPv6 address, as the middle proxies see it
        (repeatable; default: detected)."""
        ip = _nat_ip(text)
        addresses: list[Any] = self.setdefault("nat-ip", [])  # type: ignore[attr-defined]
        if any(a.version == ip.version for a in addresses):
            raise usage.UsageError(f"--nat-ip: more than one IPv{ip.version} address")
        addresses.append(ip)


def _nat_ip(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(text, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return text
    try:
        ip = ipaddress.ip_address(str(text).strip().strip("[]"))
    except ValueError:
        raise usage.UsageError(f"--nat-ip: {text!r} is not an IPv4 or IPv6 address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise usage.UsageError(f"--nat-ip: {ip} cannot be a host's address")
    return ip


def parse_size(text: str) -> int:
    """
    ``1048576``, ``512K``, ``8M``, ``1G`` (binary multiples) to bytes.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 8M)")
    number, unit = match.groups()
    return int(number) << {"": 0, "K": 10, "M": 20, "G": 30}[unit.upper()]


def _url(option: str, value: Any) -> str:
    text = str(value)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise usage.UsageError(f"--{option}: {text!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage.UsageError(f"--{option}: use an http:// or https:// URL")
    return text


def middle_settings_from_options(options: Mapping[str, Any]) -> MiddleSettings | None:
    """
    Validate this module's options; None when clients go to the DCs directly.

    :raises usage.UsageError: one line naming the option at fault.
    """
    tag_text = options.get("ad-tag")
    ad_tag: bytes | None = None
    if tag_text is not None:
        tag_text = str(tag_text).strip()
        if not _HEX32.fullmatch(tag_text):
            raise usage.UsageError("--ad-tag: must be 32 hex digits (from @MTProxybot)")
        ad_tag = bytes.fromhex(tag_text)
    upstream = options.get("upstream")
    if upstream is None:
        upstream = "middle" if ad_tag is not None else "direct"
    if upstream not in ("middle", "direct"):
        raise usage.UsageError("--upstream: use middle or direct")
    nat_ips = tuple(_nat_ip(ip) for ip in options.get("nat-ip") or ())
    urls = {
        name: _url(name, options.get(name, default))
        for name, default in (
            ("ip-lookup-url", DEFAULT_IP_LOOKUP_URL),
            ("proxy-config-url", PROXY_CONFIG_URL),
            ("proxy-config-v6-url", PROXY_CONFIG_V6_URL),
            ("proxy-secret-url", PROXY_SECRET_URL),
        )
    }
    refresh = number("config-refresh", options.get("config-refresh", 3600), 1)
    pool_min = count(
        "middle-pool-min", options.get("middle-pool-min", _DEFAULTS.pool_min), high=1000
    )
    pool_max = count(
        "middle-pool-max", options.get("middle-pool-max", _DEFAULTS.pool_max), high=1000
    )
    if pool_max < pool_min:
        raise usage.UsageError("--middle-pool-max: must not be below --middle-pool-min")
    per_connection = count(
        "middle-clients-per-connection",
        options.get("middle-clients-per-connection", _DEFAULTS.clients_per_connection),
        high=1 << 20,
    )
    cap_text = options.get("client-buffer-cap", "8M")
    try:
        cap = cap_text if isinstance(cap_text, int) else parse_size(str(cap_text))
    except ValueError as e:
        raise usage.UsageError(f"--client-buffer-cap: {e}") from None
    if cap < 64 << 10:
        raise usage.UsageError("--client-buffer-cap: must be at least 64K")
    if upstream == "direct":
        if ad_tag is not None:
            log.warn("--upstream direct: the ad tag is not sent in direct mode")
        return None
    timeout = options.get("connect-timeout")
    handshake_timeout = float(timeout) if timeout is not None else _DEFAULTS.handshake_timeout
    return MiddleSettings(
        ad_tag=ad_tag,
        nat_ips=nat_ips,
        ip_lookup_url=urls["ip-lookup-url"],
        proxy_config_url=urls["proxy-config-url"],
        proxy_config_v6_url=urls["proxy-config-v6-url"],
        proxy_secret_url=urls["proxy-secret-url"],
        config_refresh=refresh,
        pool_min=pool_min,
        pool_max=pool_max,
        clients_per_connection=per_connection,
        client_buffer_cap=cap,
        direct_fallback=bool(options.get("direct-fallback")) or ad_tag is None,
        prefer_ipv6=bool(options.get("prefer-ipv6")),
        handshake_timeout=handshake_timeout,
    )


def build_middle(
    core: ProxyCore,
    settings: MiddleSettings,
    state_dir: Path | None,
    reactor: Any,
    *,
    http_client: Any = None,
    random: _random.Random | None = None,
) -> tuple[IService, MiddleUpstream]:
    """
    The config refresher and the middle-proxy upstream, as one service.

    Set ``core.middle`` to the upstream and add the service to the
    application; ``http_client`` (a treq ``HTTPClient``) is for tests.
    """
    config = TelegramConfig(
        reactor,
        state_dir=state_dir,
        config_url=settings.proxy_config_url,
        config_v6_url=settings.proxy_config_v6_url,
        secret_url=settings.proxy_secret_url,
        refresh=settings.config_refresh,
        timeout=settings.http_timeout,
        http_client=http_client,
    )
    external = ExternalAddress(
        reactor, settings.nat_ips, settings.ip_lookup_url, http_client, settings.http_timeout
    )
    upstream = MiddleProxy(core, settings, config, external=external, random=random)
    top = MultiService()
    config.setServiceParent(top)
    upstream.setServiceParent(top)
    return top, upstream
