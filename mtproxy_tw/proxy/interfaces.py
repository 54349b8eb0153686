"""
What the client protocol expects of the objects around it: its transport
and, in middle-proxy mode, the upstream that gives it a session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IAddress, IPushProducer

if TYPE_CHECKING:
    pass

__all__ = ["MiddleSession", "MiddleUpstream", "Transport"]


class Transport(TypingProtocol):
    """
    What the relay uses of a TCP transport: writing, closing, and both
    sides of streaming flow control.
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class MiddleSession(TypingProtocol):
    """
    One client's place on a shared middle-proxy connection: the middle leg.

    It is fed the client's decrypted transport stream (frames still in the
    client's own framing) and told when the client goes away; it calls the
    client's :meth:`~ClientProtocol.deliver`, ``buffered``,
    ``pause_reading``, ``resume_reading`` and ``session_closed``.
    """

    def feed(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class MiddleUpstream(TypingProtocol):
    """
    Opens middle-proxy sessions; see :mod:`mtproxy_tw.middle.upstream`.
    """

    def attach(self, client: Any, dc: int, tag: bytes) -> MiddleSession:
        """
        A session for ``client`` (the client's middle leg,
        :class:`mtproxy_tw.proxy.middleleg.MiddleLeg`).
        """
