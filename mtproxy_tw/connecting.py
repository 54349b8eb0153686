"""
``connectProtocol`` without its log lines.

Twisted's ``connectProtocol`` wraps the protocol in a factory that logs
"Starting factory" and "Stopping factory" at info level for every
connection: two lines per client toward Telegram. :func:`connect_protocol`
is the same call with a quiet factory.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory

__all__ = ["connect_protocol"]

P = TypeVar("P", bound=IProtocol)


class _OneShot(Factory):
    noisy = False

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: P) -> Deferred[P]:
    """
    Connect ``protocol`` through ``endpoint``; fires with it once connected.
    """
    connecting: Deferred[Any] = endpoint.connect(_OneShot(protocol))
    return connecting
