"""
This host's public address: the one middle-proxy mode uses (``--nat-ip`` or
the look-up URL), and whether each fake-TLS domain resolves to it (a censor
can cheaply compare the SNI's DNS answer with the address connected to).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw.doctor.context import Context
from mtproxy_tw.doctor.net import is_ip, resolve
from mtproxy_tw.doctor.result import Result, Status, reason
from mtproxy_tw.middle.address import ExternalAddress
from mtproxy_tw.wire.dcs import parse_address

__all__ = ["Public", "check_domains", "check_external", "external_address", "public_address"]


@dataclass(frozen=True)
class Public:
    """
    Addresses of this host and where they were learnt; ``error`` when none.
    """

    addresses: list[str] = field(default_factory=list)
    source: str = ""
    error: str | None = None


@implementer(ILogObserver)
class _Errors:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if "error" in event:
            self.seen.append(str(event["error"]))


def _same(addresses: list[str]) -> set[str]:
    """
    Addresses in one spelling (an IPv4-mapped IPv6 address as IPv4).
    """
    seen = set()
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        seen.add(str(ip))
    return seen


async def external_address(ctx: Context) -> Public:
    """
    The external address middle-proxy mode would use behind NAT: the
    ``--nat-ip`` addresses, else the answer of ``--ip-lookup-url``.
    """
    url = ctx.options["ip-lookup-url"]
    external = ExternalAddress(
        ctx.reactor, ctx.options["nat-ip"] or (), url, ctx.http_client, ctx.timeout
    )
    if external.nat:
        return Public([str(ip) for ip in external.nat.values()], "--nat-ip")
    errors = _Errors()
    external.log = Logger(observer=errors)
    await external.lookup()
    found = [str(ip) for ip in external.looked_up.values()]
    if found:
        return Public(found, url)
    return Public([], url, errors.seen[0] if errors.seen else "no address in the answer")


def check_external(public: Public) -> Result:
    name = "external address"
    if public.source == "--nat-ip":
        return Result(Status.OK, name, f"{', '.join(public.addresses)} (--nat-ip)")
    if public.error is None:
        return Result(
            Status.OK,
            name,
            f"{', '.join(public.addresses)} (from {public.source}); middle proxies use it "
            "when this host's own address is private",
        )
    return Result(
        Status.WARN,
        name,
        f"cannot learn it from {public.source} ({public.error}); behind NAT the middle "
        "proxies refuse the handshake: set --nat-ip",
    )


def _host_of(public_host: str) -> str:
    """
    The host of ``--public-host`` (which may carry a port).
    """
    if is_ip(public_host):
        return public_host
    try:
        return parse_address(public_host, 443).host
    except ValueError:
        return public_host


async def public_address(ctx: Context, external: Public | None) -> Public:
    """
    The address the links send clients to: ``--public-host`` (resolved),
    else the external address.
    """
    given = ctx.options["public-host"]
    if not given:
        return external if external is not None else await external_address(ctx)
    host = _host_of(str(given))
    if is_ip(host):
        return Public([host], "--public-host")
    try:
        found = await resolve(ctx.reactor, host, ctx.timeout)
    except Exception as e:
        return Public([], f"--public-host {host}", str(e) or type(e).__name__)
    if not found:
        return Public([], f"--public-host {host}", f"{host} does not resolve")
    return Public(found, f"--public-host {host}")


async def check_domains(ctx: Context, public: Public) -> list[Result]:
    """
    Each fake-TLS domain resolves to this host's public address.
    """
    if not ctx.settings.tls_enabled:
        return []
    results = []
    for domain in sorted(ctx.settings.tls_domains):
        name = f"dns {domain}"
        try:
            found = await resolve(ctx.reactor, domain, ctx.timeout)
        except Exception:
            results.append(Result(Status.WARN, name, reason(Failure(), ctx.timeout)))
            continue
        if not found:
            results.append(Result(Status.WARN, name, "does not resolve"))
            continue
        shown = ", ".join(found)
        if public.error is not None:
            detail = f"resolves to {shown}; this host's public address is unknown ({public.error})"
            results.append(Result(Status.WARN, name, detail + ": give --public-host"))
        elif _same(found) & _same(public.addresses):
            results.append(Result(Status.OK, name, f"resolves to {shown}, this host"))
        else:
            here = ", ".join(public.addresses)
            results.append(
                Result(
                    Status.WARN,
                    name,
                    f"resolves to {shown}, not to this host ({here}, {public.source}): a "
                    "censor comparing the SNI's address with the one connected to can tell",
                )
            )
    return results
