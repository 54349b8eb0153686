"""
The checks toward Telegram: its config answers (and their ``Date``, for the
clock), the data centres, and the middle proxies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.python.failure import Failure

from mtproxy_tw.doctor.context import Context
from mtproxy_tw.doctor.net import connect_time
from mtproxy_tw.doctor.result import Result, Status, reason
from mtproxy_tw.middle.cache import ConfigCache
from mtproxy_tw.middle.fetch import describe, fetch
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.proxyconfig import (
    FALLBACK_CONFIG_V4,
    FALLBACK_CONFIG_V6,
    ConfigError,
    Endpoint,
    ProxyConfig,
    validate_proxy_config,
    validate_proxy_secret,
)
from mtproxy_tw.wire.rpc import MAX_CLOCK_SKEW

__all__ = [
    "CLOCK_WARN",
    "KINDS",
    "Download",
    "check_clock",
    "check_dcs",
    "check_download",
    "check_middle_proxies",
    "download",
    "middle_configs",
]

#: Seconds of skew past which the clock check warns (the Date header has
#: a resolution of one second).
CLOCK_WARN = 5.0

#: kind -> (check name, option of its URL)
KINDS = {
    "config": ("proxy config", "proxy-config-url"),
    "config_v6": ("proxy config v6", "proxy-config-v6-url"),
    "secret": ("proxy secret", "proxy-secret-url"),
}


@dataclass(frozen=True)
class Download:
    """
    One answer of Telegram's config site, or why there is none.

    :ivar received: the local clock when the answer came.
    """

    kind: str
    url: str
    body: bytes | None
    error: str | None
    server_time: float | None = None
    received: float = 0.0


async def download(ctx: Context, kind: str) -> Download:
    url: str = ctx.options[KINDS[kind][1]]
    try:
        fetched = await fetch(ctx.http_client, url, clock=ctx.reactor, timeout=ctx.timeout)
    except Exception:
        return Download(kind, url, None, describe(Failure()))
    return Download(kind, url, fetched.body, None, fetched.server_time, ctx.reactor.seconds())


def _validate(kind: str, body: bytes) -> Any:
    return validate_proxy_secret(body) if kind == "secret" else validate_proxy_config(body)


def check_download(got: Download) -> Result:
    """
    The answer is there and is what it should be.
    """
    name = KINDS[got.kind][0]
    if got.body is None:
        return Result(Status.FAIL, name, f"{got.url}: {got.error}")
    try:
        value = _validate(got.kind, got.body)
    except ConfigError as e:
        return Result(Status.FAIL, name, f"{got.url}: {e}")
    if got.kind == "secret":
        return Result(Status.OK, name, f"{got.url}: {len(value)} bytes of key material")
    count = len({ep for eps in value.clusters.values() for ep in eps})
    proxies = "1 middle proxy" if count == 1 else f"{count} middle proxies"
    return Result(Status.OK, name, f"{got.url}: {proxies} for {len(value.clusters)} DC ids")


def check_clock(ctx: Context, answers: Sequence[Download]) -> Result:
    """
    The local clock against the ``Date`` of Telegram's answers.
    """
    name = "clock"
    # Date is rounded down to the second: the middle of that second is the
    # best guess of the server's clock.
    dated = [
        (a.server_time + 0.5 - a.received, a.url) for a in answers if a.server_time is not None
    ]
    if not dated:
        if all(a.body is None for a in answers):
            failed = "; ".join(f"{a.url}: {a.error}" for a in answers)
            return Result(Status.WARN, name, f"no answer to compare with ({failed})")
        return Result(Status.WARN, name, "Telegram's answers carry no Date header")
    skew, url = max(dated)
    off = abs(skew)
    if off <= CLOCK_WARN:
        return Result(Status.OK, name, f"within {max(off, 1.0):.0f} s of the Date of {url}")
    direction = "behind" if skew > 0 else "ahead of"
    detail = f"{off:.0f} s {direction} the Date of {url}"
    if ctx.middle is not None:
        limit, effect = float(MAX_CLOCK_SKEW), "middle proxies refuse the handshake"
    elif ctx.settings.tls_enabled:
        limit, effect = ctx.settings.tls_time_skew, "fake-TLS clients are refused"
    else:
        return Result(Status.WARN, name, f"{detail}; fix the clock (NTP)")
    if off > limit:
        return Result(Status.FAIL, name, f"{detail}: {effect} past {limit:g} s; fix the clock")
    return Result(Status.WARN, name, f"{detail}; {effect} past {limit:g} s; fix the clock")


def _ids(dcs: Iterable[int]) -> str:
    return ", ".join(str(dc) for dc in sorted(dcs, key=lambda dc: (abs(dc), dc < 0)))


async def _reach(ctx: Context, host: str, port: int) -> tuple[float | None, str]:
    try:
        elapsed = await connect_time(ctx.reactor, host, port, ctx.timeout)
    except Exception:
        return None, reason(Failure(), ctx.timeout)
    return elapsed, f"connected in {elapsed * 1000:.1f} ms"


async def _reach_all(
    ctx: Context, addresses: list[tuple[str, int]]
) -> list[tuple[float | None, str]]:
    reached: list[tuple[float | None, str]] = await gatherResults(
        [ensureDeferred(_reach(ctx, host, port)) for host, port in addresses]
    )
    return reached


async def check_dcs(ctx: Context) -> list[Result]:
    """
    Each DC address of the table (DCs 1..5, their media DCs, every
    ``--dc``) takes a TCP connection.
    """
    table: DCTable = ctx.settings.dcs
    ids = {sign * n for n in range(1, 6) for sign in (1, -1)} | set(table.overrides)
    by_address: dict[Address, list[int]] = {}
    for dc in sorted(ids, key=lambda dc: (abs(dc), dc < 0)):
        by_address.setdefault(table.lookup(dc)[0], []).append(dc)
    reached = await _reach_all(ctx, [(a.host, a.port) for a in by_address])
    bad = Status.FAIL
    note = ""
    if ctx.middle is not None:
        bad, note = Status.WARN, " (in middle-proxy mode only the direct fallback uses it)"
    results = []
    for (address, dcs), (elapsed, detail) in zip(by_address.items(), reached, strict=True):
        status = Status.OK if elapsed is not None else bad
        suffix = "" if elapsed is not None else note
        results.append(Result(status, f"dc {_ids(dcs)}", f"{address}: {detail}{suffix}"))
    return results


def middle_configs(
    state_dir: Path, answers: Sequence[Download]
) -> tuple[ProxyConfig, ProxyConfig, str]:
    """
    The IPv4 and IPv6 middle-proxy lists the proxy would start with: the
    downloaded ones, else the cached copies, else the built-in tables; and
    where they came from.
    """
    got = {a.kind: a for a in answers}
    cache = ConfigCache(state_dir)
    found: dict[str, ProxyConfig] = {}
    sources: list[str] = []
    for kind, fallback in (("config", FALLBACK_CONFIG_V4), ("config_v6", FALLBACK_CONFIG_V6)):
        downloaded = got[kind].body if kind in got else None
        for source, body in (("downloaded", downloaded), ("cached", cache.read(kind))):
            if body is None:
                continue
            try:
                found[kind] = validate_proxy_config(body)
            except ConfigError:
                continue
            sources.append(source)
            break
        else:
            found[kind] = fallback
            sources.append("built-in")
    return found["config"], found["config_v6"], "/".join(dict.fromkeys(sources))


def _endpoints(first: ProxyConfig, second: ProxyConfig) -> dict[Endpoint, list[int]]:
    """
    The middle proxies the pools use, with the DC ids of each (as
    :meth:`mtproxy_tw.middle.pool.DCPool.endpoints` picks them).
    """
    by_endpoint: dict[Endpoint, list[int]] = {}
    for dc in sorted(set(first.clusters) | set(second.clusters), key=lambda d: (abs(d), d < 0)):
        config = first if dc in first.clusters else second
        for endpoint in config.clusters[dc]:
            by_endpoint.setdefault(endpoint, []).append(dc)
    return by_endpoint


async def check_middle_proxies(
    ctx: Context, v4: ProxyConfig, v6: ProxyConfig, source: str
) -> list[Result]:
    """
    Each middle proxy takes a TCP connection. One that does not is a
    failure when no other middle proxy of one of its DCs does either.
    """
    prefer_v6 = ctx.middle is not None and ctx.middle.prefer_ipv6
    endpoints = _endpoints(*((v6, v4) if prefer_v6 else (v4, v6)))
    reached = await _reach_all(ctx, list(endpoints))
    up = set()
    for dcs, (elapsed, _) in zip(endpoints.values(), reached, strict=True):
        if elapsed is not None:
            up.update(dcs)
    results = []
    for ((host, port), dcs), (elapsed, detail) in zip(endpoints.items(), reached, strict=True):
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if elapsed is not None:
            status = Status.OK
        elif all(dc in up for dc in dcs):
            status, detail = Status.WARN, f"{detail}; the others of its DCs answer"
        else:
            status = Status.FAIL
        results.append(
            Result(status, f"middle proxy {shown}", f"{detail} (dc {_ids(dcs)}, {source} config)")
        )
    return results
