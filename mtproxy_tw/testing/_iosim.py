"""
``twisted.test.iosim`` with TCP's flow control and closing rules.

See :mod:`mtproxy_tw.testing.memory`, which exports both classes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

__all__ = ["MemoryPump", "MemoryTransport"]


@implementer(IPushProducer)
class MemoryTransport(iosim.FakeTransport):  # type: ignore[misc]
    """
    One end of a connection in memory.

    :ivar peer: the other end.
    :ivar bufferSize: the most bytes one ``dataReceived`` gets, and the
        write-buffer size above which a streaming producer is paused
        (``FileDescriptor.bufferSize``).
    :ivar reading: ``False`` while paused (``pauseProducing``).
    :ivar producerPaused: whether this transport paused its producer.
    :ivar producer_pauses: how many times it called the producer's
        ``pauseProducing``.
    :ivar read_pauses: how many times this transport was paused.
    :ivar aborted: whether ``abortConnection`` was called.
    """

    bufferSize = 1 << 16

    def __init__(
        self,
        protocol: Any,
        isServer: bool,
        hostAddress: IAddress | None = None,
        peerAddress: IAddress | None = None,
    ) -> None:
        super().__init__(protocol, isServer, hostAddress, peerAddress)
        self.peer: MemoryTransport | None = None
        self.reading = True
        self.producerPaused = False
        self.producer_pauses = 0
        self.read_pauses = 0
        self.aborted = False
        self.write_closing = False
        self.write_closed = False
        self.read_closed = False
        self._out = bytearray()

    def buffered(self) -> int:
        """
        Bytes written and not yet moved to the peer.
        """
        return len(self._out)

    # -- ITransport

    def write(self, data: bytes) -> None:
        if self.disconnected or self.aborted or self.write_closing or not data:
            return
        self._out += data
        if (
            self.producer is not None
            and self.streamingProducer
            and len(self._out) > self.bufferSize
        ):
            self.producerPaused = True
            self.producer_pauses += 1
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        del self._out[:]

    def loseWriteConnection(self) -> None:
        self.write_closing = True

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        raise NotImplementedError("wrap the protocol in TLSMemoryBIOFactory instead")

    # -- IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer "
                f"{self.producer} was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self.producerPaused = False
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producerPaused = False

    # -- IPushProducer: reading

    def pauseProducing(self) -> None:
        self.reading = False
        self.read_pauses += 1

    def resumeProducing(self) -> None:
        if not self.disconnecting:
            self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- what the pump calls

    def getOutBuffer(self) -> bytes | None:
        """
        Everything waiting, whatever the peer does (``iosim.IOPump``'s
        interface; :class:`MemoryPump` uses :meth:`take`).
        """
        data = self.take(len(self._out))
        return data or None

    def take(self, size: int) -> bytes:
        """
        Up to ``size`` waiting bytes; resumes the producer once none wait.
        """
        data = bytes(self._out[:size])
        del self._out[:size]
        if not self._out and self.producer is not None and self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()
        return data

    def can_read(self) -> bool:
        return self.reading and not self.disconnecting and not self.read_closed


class MemoryPump(iosim.IOPump):  # type: ignore[misc]
    """
    Moves bytes between two :class:`MemoryTransport` as TCP would: only to
    an end that reads, at most its ``bufferSize`` at a time; a close takes
    effect once the closing end's buffer is empty (an abort at once), and
    then both ends lose the connection, their producers stopped first.
    """

    clientIO: MemoryTransport
    serverIO: MemoryTransport

    def pump(self, debug: bool = False, advanceClock: bool = True) -> bool:
        if advanceClock:
            self.clock.advance(0)
        ends = ((self.clientIO, self.serverIO), (self.serverIO, self.clientIO))
        if self.clientIO.disconnected:
            return False
        for end, _ in ends:
            # A pull producer is asked for more at every turn, as iosim does.
            if end.producer is not None and not end.streamingProducer:
                end.producer.resumeProducing()
        moved = False
        for source, sink in ends:
            if source.aborted or not sink.can_read() or not source.buffered():
                continue
            data = source.take(sink.bufferSize)
            moved = True
            sink.bufferReceived(data)
            if source.disconnected:
                return True
        if moved:
            return True
        for end, other in ends:
            if end.disconnecting and (end.aborted or not end.buffered() or other.disconnecting):
                self._disconnect(end, other)
                return True
        for end, other in ends:
            if end.write_closing and not end.write_closed and not end.buffered():
                self._half_close(end, other)
                return True
        return False

    def _half_close(self, end: MemoryTransport, other: MemoryTransport) -> None:
        end.write_closed = True
        writer = IHalfCloseableProtocol(end.protocol, None)
        reader = IHalfCloseableProtocol(other.protocol, None)
        if reader is None or other.write_closed:
            # An end that cannot half-close loses the connection at EOF.
            self._disconnect(end, other)
            return
        if writer is not None:
            writer.writeConnectionLost()
        other.read_closed = True
        reader.readConnectionLost()

    def _disconnect(self, end: MemoryTransport, other: MemoryTransport) -> None:
        """
        ``end`` closed: both ends lose the connection, ``other`` first.
        """
        for transport in (end, other):
            transport.disconnecting = True
            transport.disconnected = True
            transport.reading = False
        reasons: tuple[tuple[MemoryTransport, Exception], ...] = (
            ((other, ConnectionLost()), (end, ConnectionAborted()))
            if end.aborted
            else ((other, ConnectionDone()), (end, ConnectionDone()))
        )
        for transport, reason in reasons:
            producer, transport.producer = transport.producer, None
            if producer is not None:
                producer.stopProducing()
            transport.protocol.connectionLost(Failure(reason))
