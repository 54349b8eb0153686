"""
Prometheus metrics (``--metrics ENDPOINT``).

The proxy's own ``CollectorRegistry`` (its
:class:`~mtproxy_tw.services.collector.ProxyCollector` and the process's
collector) is served at ``/metrics`` by prometheus_client's Twisted
``MetricsResource`` through twisted.web; a client address outside
``--metrics-allow`` gets 403 for any path.

The parent of ``--workers`` runs no proxy: given ``gather`` (the workers'
expositions), it serves them merged with its own process's metrics
(:class:`~mtproxy_tw.services.mergemetrics.MergedMetricsResource`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from mtproxy_tw.services.collector import ProxyCollector
from mtproxy_tw.services.mergemetrics import MergedMetricsResource
from mtproxy_tw.services.proxy import Listener, ListenError, ProxyService
from mtproxy_tw.wire.throttle import Throttle

__all__ = ["MetricsService", "ProxyCollector", "scrape_allowed"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def scrape_allowed(request: Request, allowed: Sequence[Network]) -> bool:
    """
    Whether the client of ``request`` may scrape; a UNIX socket may (its
    file's mode decides who reaches it).
    """
    host = getattr(request.getClientAddress(), "host", None)
    if host is None:
        return True
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allowed)


class _Guarded(Resource):
    """
    ``/metrics`` for the allowed addresses; 403 for the others, whatever the path.
    """

    log = Logger()

    def __init__(self, metrics: IResource, allowed: Sequence[Network], reactor: Any) -> None:
        super().__init__()
        self.allowed = tuple(allowed)
        self.reactor = reactor
        self.putChild(b"metrics", metrics)
        self._refusals = Throttle(60.0)

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        if scrape_allowed(request, self.allowed):
            return super().getChildWithDefault(path, request)
        count = self._refusals.hit(self.reactor.seconds())
        if count is not None:
            self.log.info(
                "metrics: refused {count} scrape(s) in the last minute from addresses "
                "outside --metrics-allow (the last from {host})",
                count=count,
                host=getattr(request.getClientAddress(), "host", "?"),
            )
        return pages.forbidden()

    def getChild(self, path: bytes, request: Any) -> Any:
        return pages.notFound()


class _QuietSite(Site):
    """
    A site that writes no access log line per scrape.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


class MetricsService(Listener):
    """
    Serves the metrics of ``proxy`` on the endpoint ``description``; with
    ``gather`` instead (the parent of ``--workers``, no proxy of its own),
    the expositions it answers merged with the registry's.

    :ivar registry: this process's own registry: the proxy's collector
        (none with ``gather``) and the process's (``mtproxy_process_*``:
        CPU, memory, open files).
    """

    collector: ProxyCollector | None

    def __init__(
        self,
        proxy: ProxyService | None,
        description: str,
        allowed: Iterable[Network],
        reactor: Any,
        gather: Callable[[], Deferred[list[bytes]]] | None = None,
    ) -> None:
        # Imported here: it imports the global reactor, which must be
        # installed (by twistd) before.
        from prometheus_client.twisted import MetricsResource

        self.description = description
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ListenError(
                f"--metrics: {description!r} is not a usable endpoint ({e})"
            ) from None
        self.registry = CollectorRegistry()
        metrics: IResource
        if gather is None:
            if proxy is None:
                raise TypeError("MetricsService: a proxy or gather is needed")
            self.collector = ProxyCollector(proxy, reactor)
            self.registry.register(self.collector)
            ProcessCollector(namespace="mtproxy", registry=self.registry)
            metrics = MetricsResource(self.registry)
        else:
            self.collector = None
            ProcessCollector(namespace="mtproxy", registry=self.registry)
            metrics = MergedMetricsResource(gather, self.registry, reactor)
        root = _Guarded(metrics, list(allowed), reactor)
        site: Any = _QuietSite(root, timeout=60)
        super().__init__(endpoint, site)

    def startService(self) -> None:
        if self.collector is not None:
            self.collector.start()
        super().startService()

    def stopService(self) -> Any:
        if self.collector is not None:
            self.collector.stop()
        return super().stopService()

    def listen(self) -> None:
        try:
            super().listen()
        except CannotListenError as e:
            error = e.socketError
            reason = error.strerror if isinstance(error, OSError) else e
            raise ListenError(f"--metrics {self.description}: cannot listen: {reason}") from None
