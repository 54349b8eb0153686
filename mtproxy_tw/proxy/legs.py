"""
The proxy's own connections on behalf of one client: to a DC (direct mode)
or to the mask host (fronting).

Both are the same :class:`Leg`, doing what
:mod:`twisted.protocols.portforward` does: the client stays paused until the
leg is up, each side then produces for the other, and losing either side
closes the other. A leg only reports to its owner, the client protocol,
through :class:`LegOwner`.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted

__all__ = ["FLUSH_GRACE", "HalfCloseableLeg", "Leg", "LegClient", "LegOwner", "close_peer"]


class LegOwner(Protocol):
    """
    What a leg tells the client protocol it belongs to.
    """

    def leg_connected(self, leg: Leg) -> None: ...
    def leg_data(self, data: bytes) -> None: ...
    def leg_read_closed(self) -> None: ...
    def leg_lost(self, leg: Leg) -> None: ...


class LegClient(Protocol):
    """
    What every leg uses of the client protocol it serves: its transport,
    its byte counters (the idle timer, metrics and quotas read them), and
    whether it is gone.
    """

    transport: Any
    bytes_in: int
    bytes_out: int

    @property
    def closed(self) -> bool: ...


class Leg(TwistedProtocol):
    """
    One outbound connection for one client.
    """

    transport: Any

    def __init__(self, owner: LegOwner) -> None:
        self.owner = owner
        self.lost = False

    def connectionMade(self) -> None:
        self.owner.leg_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.owner.leg_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.owner.leg_lost(self)


@implementer(IHalfCloseableProtocol)
class HalfCloseableLeg(Leg):
    """
    A leg whose end of stream is passed on as a half-close (the mask host:
    a probe must see the site's own FIN).
    """

    def readConnectionLost(self) -> None:
        self.owner.leg_read_closed()

    def writeConnectionLost(self) -> None:
        pass


#: Seconds a peer whose client is gone gets to take what is still queued
#: toward it before it is aborted.
FLUSH_GRACE = 5.0


def close_peer(transport: Any, clock: Any = None, grace: float = FLUSH_GRACE) -> None:
    """
    Close the other side of a pair whose client is gone.

    What is still queued toward it (a client's last request) is flushed,
    but a peer that stopped reading would keep the socket open forever, so
    a write buffer not drained within ``grace`` seconds is dropped: the
    connection is aborted. Without a ``clock`` it is aborted at once.
    """
    transport.unregisterProducer()
    if not _twisted.buffered(transport):
        transport.loseConnection()
    elif clock is None:
        transport.abortConnection()
    else:
        transport.loseConnection()
        clock.callLater(grace, transport.abortConnection)
