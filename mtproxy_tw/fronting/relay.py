"""
The front leg: a connection that failed its handshake, spliced to the mask
host so that a probe sees the real site (PROTOCOL.md section 5).

Every byte already read goes first, then both directions are relayed with
flow control, and half-closes pass through as in a plain TCP relay: a probe
sees the site's own FIN, at the site's own time. While the mask host cannot
be reached, the client is closed as a TLS server too busy to answer closes:
after a short wait, with a FIN.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw import _twisted
from mtproxy_tw.connecting import connect_protocol
from mtproxy_tw.proxy.legs import HalfCloseableLeg, Leg, LegClient, close_peer

__all__ = ["SITE_DOWN_CLOSE", "FrontRelay", "FrontedClient"]

#: Seconds (a range, drawn from uniformly) after which a client is closed,
#: with a FIN, when the mask host cannot be reached; what it sends meanwhile
#: is read and dropped, so the close is not a reset.
SITE_DOWN_CLOSE = (1.0, 3.0)


class FrontedClient(LegClient, Protocol):
    """
    What the front leg uses of the client protocol.
    """

    #: Its ``reactor`` is the clock.
    core: Any

    def front_closed(self) -> None: ...
    def front_failed(self, why: str) -> None: ...
    def shadow_answered(self) -> None: ...


class FrontRelay:
    """
    One client's connection to the mask host; the client stays paused
    until the site is connected.

    A *shadow* relay is opened while the handshake is still undecided: the
    client keeps being read (and its bytes are copied to the site), but the
    site's answer is withheld until :meth:`release` (the handshake failed:
    the client gets the site's answer at the site's own time) or
    :meth:`drop` (it succeeded: the site's connection goes, unseen). A site
    that answers or closes before then has decided the bytes are not a
    valid request, and the client is told (``shadow_answered``).
    """

    log = Logger()

    #: Site bytes held back while the handshake is undecided, at most.
    WITHHELD_MAX = 64 * 1024

    def __init__(
        self,
        client: FrontedClient,
        endpoint: IStreamClientEndpoint,
        first: list[bytes],
        shadow: bool = False,
    ) -> None:
        self.client = client
        self._pending = first
        self._leg: Leg | None = None
        self._client_eof = False
        self._site_eof = False
        self.shadow = shadow
        self._withheld: list[bytes] = []
        self._withheld_size = 0
        self._site_lost = False
        self._unreachable_seen = False
        self._closing: Any = None
        if not shadow:
            client.transport.pauseProducing()
        self._connecting: Any = connect_protocol(endpoint, HalfCloseableLeg(self))
        self._connecting.addErrback(self._unreachable)

    def release(self) -> None:
        """
        The handshake failed: relay from now on, starting with what the site
        already said (and how it already closed).
        """
        self.shadow = False
        client = self.client
        if self._unreachable_seen:
            self._site_down()
            return
        leg = self._leg
        if leg is None:
            if self._connecting is None:  # connected and already gone
                self._deliver_withheld()
                client.front_closed()
            else:
                client.transport.pauseProducing()
            return
        leg.transport.registerProducer(client.transport, True)
        client.transport.registerProducer(leg.transport, True)
        self._deliver_withheld()
        leg.transport.resumeProducing()
        if self._site_eof:
            self.leg_read_closed()

    def drop(self) -> None:
        """
        The handshake succeeded: the site's connection goes, unseen.
        """
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        leg, self._leg = self._leg, None
        if leg is not None and not leg.lost:
            leg.transport.abortConnection()
        self._pending = []
        self._withheld = []

    def _deliver_withheld(self) -> None:
        withheld, self._withheld = self._withheld, []
        for data in withheld:
            self.leg_data(data)

    @property
    def leg(self) -> Leg | None:
        return self._leg

    def from_client(self, data: bytes) -> None:
        self.client.bytes_in += len(data)
        if self._unreachable_seen:
            return
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
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        leg, self._leg = self._leg, None
        if leg is not None and not leg.lost:
            close_peer(leg.transport, self.client.core.reactor)
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
        if self.shadow:
            return
        leg.transport.registerProducer(client.transport, True)
        client.transport.registerProducer(leg.transport, True)
        if self._client_eof:
            leg.transport.loseWriteConnection()
        else:
            client.transport.resumeProducing()

    def leg_data(self, data: bytes) -> None:
        if self.shadow:
            self._withheld.append(data)
            self._withheld_size += len(data)
            if self._withheld_size > self.WITHHELD_MAX and self._leg is not None:
                self._leg.transport.pauseProducing()
            self.client.shadow_answered()
            return
        self.client.bytes_out += len(data)
        _twisted.write(self.client.transport, data)

    def leg_read_closed(self) -> None:
        self._site_eof = True
        if self.shadow:
            self.client.shadow_answered()
            return
        if self._client_eof:
            self._close_pair()
        elif not self.client.closed:
            self.client.transport.loseWriteConnection()

    def leg_lost(self, leg: Leg) -> None:
        if leg is not self._leg:
            return
        self._leg = None
        if self.shadow:
            self._site_lost = True
            self.client.shadow_answered()
            return
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
        self._unreachable_seen = True
        self._pending = []
        if self.shadow:
            return
        self._site_down()

    def _site_down(self) -> None:
        """
        Close the client after a short wait, reading (and dropping) what it
        sends meanwhile so that the close is a FIN.
        """
        client = self.client
        if client.closed or self._closing is not None:
            return
        client.transport.resumeProducing()
        delay = random.uniform(*SITE_DOWN_CLOSE)
        self._closing = client.core.reactor.callLater(delay, self._close_down)

    def _close_down(self) -> None:
        if not self.client.closed:
            self.client.front_failed("mask-host")


def _same_address(a: Any, b: Any) -> bool:
    return (getattr(a, "host", 1), getattr(a, "port", 1)) == (
        getattr(b, "host", 2),
        getattr(b, "port", 2),
    )
