"""
The direct-mode fallback of a middle-proxy client (``direct_fallback``): its
DC reached straight, with obfuscated2 and without the ad tag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.connecting import connect_protocol
from mtproxy_tw.wire import obfuscated2

if TYPE_CHECKING:
    from mtproxy_tw.middle.session import ClientSession

__all__ = ["DirectLeg"]


@implementer(IPushProducer)
class DirectLeg(Protocol):
    """
    Direct-mode fallback for one client: obfuscated2 to the DC, no ad tag.
    """

    transport: Any

    def __init__(self, session: ClientSession, first: bytes) -> None:
        self.session = session
        upstream = session.upstream
        self.init = obfuscated2.generate_init(session.tag, session.dc)
        self._pending: list[bytes] | None = [self.init.wire, self.init.encryptor.update(first)]
        self._closed = False
        address, _ = upstream.core.settings.dcs.lookup(session.dc)
        self._connecting: Deferred[DirectLeg] | None = connect_protocol(
            upstream.core.endpoint(address), self
        )
        self._connecting.addErrback(self._failed)

    def send(self, data: bytes) -> None:
        data = self.init.encryptor.update(data)
        if self._pending is not None:
            self._pending.append(data)
        else:
            _twisted.write(self.transport, data)

    def connectionMade(self) -> None:
        self._connecting = None
        if self._closed:
            self.transport.loseConnection()
            return
        pending, self._pending = self._pending or [], None
        self.transport.registerProducer(self, True)
        _twisted.write(self.transport, b"".join(pending))

    def dataReceived(self, data: bytes) -> None:
        if not self._closed:
            self.session.deliver(self.init.decryptor.update(data))

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not failure.check(CancelledError):
            self.session._fail(f"DC unreachable in direct fallback: {failure.getErrorMessage()}")

    def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._closed:
            self._closed = True
            self.session._fail("the DC closed the direct connection")

    # The DC connection's write buffer is full: stop reading the client.
    def pauseProducing(self) -> None:
        self.session._pause("direct")

    def resumeProducing(self) -> None:
        self.session._resume("direct")

    def stopProducing(self) -> None:
        pass
