"""
The proxy's address as the middle proxies see it: it enters the key
derivation of every RPC connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, TypeAlias

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.config.schema import default
from mtproxy_tw.middle.fetch import default_http_client, fetch

__all__ = ["ANY_V4", "DEFAULT_IP_LOOKUP_URL", "ExternalAddress", "IPAddress", "ip_port"]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_IP_LOOKUP_URL: str = default("ip-lookup-url")

#: 0.0.0.0: the address of a non-IP endpoint, and of an IPv6 one in a process id.
ANY_V4 = ipaddress.IPv4Address(0)


def _ip(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def ip_port(addr: IAddress) -> tuple[IPAddress, int]:
    """
    ``(ip, port)`` of a Twisted address; 0.0.0.0:0 for non-IP ones.
    """
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return ANY_V4, 0
    try:
        return _ip(host), port
    except ValueError:
        return ANY_V4, 0


def _is_public(ip: IPAddress) -> bool:
    return ip.is_global


class ExternalAddress:
    """
    The proxy's address as a middle proxy sees it (it enters the key derivation).

    Order: the ``--nat-ip`` of the connection's IP version; the local
    address if it is public; the result of an HTTP look-up; the local
    address. A middle proxy on a private or loopback address sees the local
    address itself.
    """

    log = Logger()
    RETRY_AFTER = 60.0

    def __init__(
        self,
        reactor: Any,
        nat_ips: Iterable[IPAddress] = (),
        lookup_url: str = DEFAULT_IP_LOOKUP_URL,
        http_client: Any = None,
        timeout: float = 10.0,
        via: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.nat: dict[int, IPAddress] = {}
        for ip in nat_ips:
            self.nat.setdefault(ip.version, ip)
        self.lookup_url = lookup_url
        self.http_client = http_client
        self.timeout = timeout
        self.looked_up: dict[int, IPAddress] = {}
        self._waiters: list[Deferred[None]] | None = None
        self._failed_at: float | None = None
        self._said: tuple[IPAddress, str] | None = None
        #: The upstream proxies the look-up goes through, for the log.
        self.via = via

    def public(self, version: int) -> IPAddress | None:
        """
        The known public address of this IP version, without looking it up.
        """
        return self.nat.get(version) or self.looked_up.get(version)

    def for_connection(
        self, local: IPAddress, peer: IPAddress, tunnelled: bool = False
    ) -> Deferred[IPAddress]:
        """
        The address to use in the key derivation of a connection ``local`` -> ``peer``.

        ``tunnelled``: made through an upstream SOCKS5 server, ``local``
        being the address it reported connecting from; the look-up (made
        through the same upstream) then applies whatever ``peer`` is.
        """
        if tunnelled:
            return self._tunnelled(local)
        if not _is_public(peer):
            return succeed(local)
        known = self.nat.get(local.version)
        if known is not None:
            return succeed(known)
        if _is_public(local):
            return succeed(local)
        if local.version in self.looked_up:
            return succeed(self.looked_up[local.version])
        return self.lookup().addCallback(lambda _: self.looked_up.get(local.version, local))

    def _tunnelled(self, bound: IPAddress) -> Deferred[IPAddress]:
        def chosen(_: object) -> IPAddress:
            if bound.version in self.nat:
                ip, source = self.nat[bound.version], "--nat-ip"
            elif _is_public(bound):
                ip, source = bound, "the address the upstream proxy reported"
            elif bound.version in self.looked_up:
                ip, source = self.looked_up[bound.version], f"looked up at {self.lookup_url}"
            else:
                ip, source = bound, "the address the upstream proxy reported; no look-up"
            if self._said != (ip, source):
                self._said = (ip, source)
                self.log.info(
                    "through the upstream proxy, the middle proxies see {ip} ({source})",
                    ip=str(ip),
                    source=source,
                )
            return ip

        if bound.version in self.nat or _is_public(bound) or bound.version in self.looked_up:
            return succeed(chosen(None))
        return self.lookup().addCallback(chosen)

    def forget(self) -> None:
        """
        Drop the looked-up address (after a handshake failure it may be stale).
        """
        self.looked_up.clear()
        self._failed_at = None

    def lookup(self) -> Deferred[None]:
        """
        Ask ``lookup_url`` for our address; never fails (a failure is logged).
        """
        d: Deferred[None] = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        now = self.reactor.seconds()
        if self._failed_at is not None and now - self._failed_at < self.RETRY_AFTER:
            return succeed(None)
        self._waiters = [d]
        if self.http_client is None:
            self.http_client = default_http_client(self.reactor)
        fetching = fetch(
            self.http_client, self.lookup_url, clock=self.reactor, timeout=self.timeout, limit=256
        )
        fetching.addCallbacks(self._found, self._failed).addBoth(self._finished)
        return d

    def _found(self, fetched: Any) -> None:
        try:
            ip = _ip(fetched.body.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            self._failed(Failure(ValueError("the answer is not an IP address")))
            return
        self.looked_up[ip.version] = ip
        self._failed_at = None
        via = f" through the upstream proxy {self.via}" if self.via else ""
        self.log.info(
            "external address (from {url}{via}): {ip}", url=self.lookup_url, via=via, ip=str(ip)
        )

    def _failed(self, failure: Failure) -> None:
        self._failed_at = self.reactor.seconds()
        self.log.warn(
            "cannot learn the external address from {url} ({error}); "
            "the middle proxies may reject the handshake: set --nat-ip",
            url=self.lookup_url,
            error=failure.getErrorMessage() or repr(failure.value),
        )

    def _finished(self, result: object) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(None)
