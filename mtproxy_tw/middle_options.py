"""
Middle-proxy mode from the resolved options: its settings
(:func:`middle_settings_from_options`, called in ``postOptions``) and the
service they build (:func:`build_middle`, called in ``makeService``).
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from mtproxy_tw.config import values
from mtproxy_tw.middle.address import ExternalAddress
from mtproxy_tw.middle.fetch import upstream_http_client
from mtproxy_tw.middle.settings import MiddleSettings
from mtproxy_tw.middle.telegramconfig import TelegramConfig
from mtproxy_tw.middle.upstream import MiddleProxy
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.interfaces import MiddleUpstream

__all__ = ["build_middle", "middle_settings_from_options", "parse_size"]

log = Logger()

#: ``1048576``, ``512K``, ``8M``, ``1G`` (binary multiples) to bytes.
parse_size = values.size


def middle_settings_from_options(options: Mapping[str, Any]) -> MiddleSettings | None:
    """
    Middle-proxy settings from resolved options (see
    :mod:`mtproxy_tw.config.cli`); None when clients go to the DCs directly.

    :raises usage.UsageError: one line naming the option at fault.
    """
    ad_tag = options.get("ad-tag")
    upstream = options.get("upstream")
    if upstream is None:
        upstream = "middle" if ad_tag is not None else "direct"
    pool_min, pool_max = options["middle-pool-min"], options["middle-pool-max"]
    if pool_max < pool_min:
        raise usage.UsageError("--middle-pool-max: must not be below --middle-pool-min")
    if upstream != "middle":  # direct, or through another MTProxy (a BackProxy)
        if ad_tag is not None:
            log.warn("--upstream {kind}: the ad tag is not sent in direct mode", kind=upstream)
        return None
    timeout = options.get("connect-timeout")
    return MiddleSettings(
        ad_tag=ad_tag,
        nat_ips=tuple(options.get("nat-ip") or ()),
        ip_lookup_url=options["ip-lookup-url"],
        proxy_config_url=options["proxy-config-url"],
        proxy_config_v6_url=options["proxy-config-v6-url"],
        proxy_secret_url=options["proxy-secret-url"],
        config_refresh=options["config-refresh"],
        pool_min=pool_min,
        pool_max=pool_max,
        clients_per_connection=options["middle-clients-per-connection"],
        client_buffer_cap=options["client-buffer-cap"],
        direct_fallback=bool(options.get("direct-fallback")) or ad_tag is None,
        prefer_ipv6=bool(options.get("prefer-ipv6")),
        handshake_timeout=float(timeout) if timeout is not None else 10.0,
        upstream_proxy_for_config=bool(options.get("upstream-proxy-for-config")),
    )


def telegram_config(
    upstreams: Any,
    settings: MiddleSettings,
    state_dir: Path | None,
    reactor: Any,
    *,
    http_client: Any = None,
    fetching: bool = True,
) -> tuple[TelegramConfig, Any]:
    """
    Telegram's config as the options say where to download it from, and
    the HTTP client for the external-address look-up.
    """
    lookup_client = config_client = http_client
    if upstreams is not None and http_client is None:
        # The middle proxies see the upstream's egress: it is looked up through it.
        lookup_client = upstream_http_client(reactor, upstreams)
        if settings.upstream_proxy_for_config:
            config_client = lookup_client
    config = TelegramConfig(
        reactor,
        state_dir=state_dir,
        config_url=settings.proxy_config_url,
        config_v6_url=settings.proxy_config_v6_url,
        secret_url=settings.proxy_secret_url,
        refresh=settings.config_refresh,
        timeout=settings.http_timeout,
        http_client=config_client,
        fetching=fetching,
    )
    return config, lookup_client


def build_middle(
    core: ProxyCore,
    settings: MiddleSettings,
    state_dir: Path | None,
    reactor: Any,
    *,
    http_client: Any = None,
    random: _random.Random | None = None,
    fetching: bool = True,
) -> tuple[IService, MiddleUpstream]:
    """
    The config refresher and the middle-proxy upstream, as one service.

    Set ``core.middle`` to the upstream and add the service to the
    application; ``http_client`` (a treq ``HTTPClient``) is for tests.
    ``fetching=False``: the config is taken from the workers' parent
    (:meth:`TelegramConfig.take`), not downloaded.
    """
    upstreams = core.upstreams
    config, lookup_client = telegram_config(
        upstreams, settings, state_dir, reactor, http_client=http_client, fetching=fetching
    )
    external = ExternalAddress(
        reactor,
        settings.nat_ips,
        settings.ip_lookup_url,
        lookup_client,
        settings.http_timeout,
        via=upstreams.describe() if upstreams is not None else None,
    )
    upstream = MiddleProxy(core, settings, config, external=external, random=random)
    top = MultiService()
    config.setServiceParent(top)
    upstream.setServiceParent(top)
    return top, upstream
