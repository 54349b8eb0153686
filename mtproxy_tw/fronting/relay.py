"""
The front leg: a connection that failed its handshake, spliced to the mask
host so that a probe sees the real site (PROTOCOL.md section 5).

Every byte already read goes first, then both directions are relayed with
flow control, and half-closes pass through as in a plain TCP relay: a probe
sees the site's own FIN, at the site's own time.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw import _twisted
from mtproxy_tw.proxy.legs import HalfCloseableLeg, Leg, close_peer

__all__ = ["FrontRelay", "FrontedClient"]


class FrontedClient(Protocol):
    """
    What the front leg uses of the client protocol.
    """

    transport: Any
    bytes_in: int
    bytes_out: int

    @property
    def closed(self) -> bool: ...
    def front_closed(self) -> None: ...
    def front_failed(self, why: str) -> None: ...


class FrontRelay:
    """
    One client's connection to the mask host; the client stays paused
    until the site is connected.
    """

    log = Logger()

    def __init__(
        self, client: FrontedClient, endpoint: IStreamClientEndpoint, first: list[bytes]
    ) -> None:
        self.client = client
        self._pending = first
        self._leg: Leg | None = None
        self._client_eof = False
        self._site_eof = False
        client.transport.pauseProducing()
        self._connecting: Any = connectProtocol(endpoint, HalfCloseableLeg(self))
        self._connecting.addErrback(self._unreachable)

    @property
    def leg(self) -> Leg | None:
        return self._leg

    def from_client(self, data: bytes) -> None:
        self.client.bytes_in += len(data)
        if self._leg is None:
            self._pending.append(data)
        else:
            _twisted.write(self._leg.transport, data)

    # -- the client's side

    def client_read_closed(self) -> None:
        self._client_eof = True
        if self._site_eof:
            self._close_pair()
        elif self._leg is not None:
            self._leg.transport.loseWriteConnection()

    def client_lost(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        leg, self._leg = self._leg, None
        if leg is not None and not leg.lost:
            close_peer(leg.transport)
        self._pending = []

    # -- LegOwner: the site's side

    def leg_connected(self, leg: Leg) -> None:
        self._connecting = None
        client = self.client
        if client.closed:
            leg.transport.loseConnection()
            return
        if _same_address(leg.transport.getPeer(), client.transport.getHost()):
            self.log.error("the mask host is this proxy's own listening address; not fronting")
            leg.transport.abortConnection()
            client.front_failed("mask-loop")
            return
        self._leg = leg
        leg.transport.write(b"".join(self._pending))
        self._pending = []
        leg.transport.registerProducer(client.transport, True)
        client.transport.registerProducer(leg.transport, True)
        if self._client_eof:
            leg.transport.loseWriteConnection()
        else:
            client.transport.resumeProducing()

    def leg_data(self, data: bytes) -> None:
        self.client.bytes_out += len(data)
        _twisted.write(self.client.transport, data)

    def leg_read_closed(self) -> None:
        self._site_eof = True
        if self._client_eof:
            self._close_pair()
        elif not self.client.closed:
            self.client.transport.loseWriteConnection()

    def leg_lost(self, leg: Leg) -> None:
        if leg is not self._leg:
            return
        self._leg = None
        if not self.client.closed:
            self.client.transport.unregisterProducer()
            self.client.front_closed()

    def _close_pair(self) -> None:
        if self._leg is not None:
            close_peer(self._leg.transport)
        if not self.client.closed:
            self.client.transport.unregisterProducer()
            self.client.front_closed()

    def _unreachable(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self.client.closed:
            return
        self.log.debug("mask host unreachable: {error}", error=failure.getErrorMessage())
        self.client.front_failed("mask-host")


def _same_address(a: Any, b: Any) -> bool:
    return (getattr(a, "host", 1), getattr(a, "port", 1)) == (
        getattr(b, "host", 2),
        getattr(b, "port", 2),
    )
