"""
The doctor's network primitives: a timed TCP connect and a name look-up,
each with a deadline.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["client_endpoint", "connect_time", "is_ip", "resolve"]


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    An endpoint toward ``host:port``; IP literals skip name resolution.
    """
    if not is_ip(host):
        return HostnameEndpoint(reactor, host, port, timeout)
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout)


class _Held(Protocol):
    """
    A connection that only waits to be closed.
    """

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


async def connect_time(reactor: Any, host: str, port: int, timeout: float) -> float:
    """
    Seconds a TCP connection to ``host:port`` took to open; it is closed
    again before this returns.

    :raises Exception: the connection failed or took over ``timeout``.
    """
    start = reactor.seconds()
    connecting = connectProtocol(client_endpoint(reactor, host, port, timeout), _Held())
    held = await connecting.addTimeout(timeout, reactor)
    elapsed: float = reactor.seconds() - start
    assert held.transport is not None
    held.transport.abortConnection()  # type: ignore[attr-defined]
    await held.lost
    return elapsed


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.found:
            self.found.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.found)


async def resolve(reactor: Any, name: str, timeout: float) -> list[str]:
    """
    The addresses ``name`` resolves to (IPv4 and IPv6), through the
    reactor's resolver; empty when it does not resolve.
    """
    if is_ip(name):
        return [name]
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, name)
    return await receiver.done.addTimeout(timeout, reactor)
