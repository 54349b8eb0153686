"""
Clients of the proxy, as a test drives them.

- :class:`ObfuscatedClient` speaks to the proxy as a Telegram app would,
  with a secret, a protocol tag and a DC id;
- :class:`RawClient` sends raw bytes (bad inits, replays, garbage);
- :class:`PacketQueue` hands received packets to whoever waits for them.

:func:`connect_client`, :func:`connect_raw` and :func:`connect_protocol`
connect them over TCP; :class:`mtproxy_tw.testing.memory.MemoryProxy`
connects the same protocols in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IProtocol,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mtproxy_tw.testing.fakedc import TEST_MAX_PACKET, make_codec
from mtproxy_tw.wire.obfuscated2 import (
    TAG_INTERMEDIATE,
    TAG_PADDED,
    InitiatorStreams,
    generate_init,
)
from mtproxy_tw.wire.secrets import Mode, Secret
from mtproxy_tw.wire.transports import TransportError

__all__ = [
    "ObfuscatedClient",
    "PacketQueue",
    "RawClient",
    "connect_client",
    "connect_protocol",
    "connect_raw",
    "make_client",
]

P = TypeVar("P", bound=IProtocol)


class RawClient(Protocol):
    """
    Sends fixed bytes on connect and records whatever comes back.

    :ivar received: all bytes received.
    :ivar lost: fires when the connection is closed.
    """

    transport: ITCPTransport

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.received = bytearray()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class PacketQueue:
    """
    Received packets, handed to :meth:`receive` callers in arrival order.

    A test client mixes it in, calls :meth:`deliver` for each packet and
    :meth:`fail_waiting` when its connection is lost, and defines ``send``.
    """

    def __init__(self) -> None:
        self.reason: Failure | None = None
        self._packets: list[bytes] = []
        self._waiting: list[Deferred[bytes]] = []

    def send(self, payload: bytes) -> None:
        raise NotImplementedError

    def deliver(self, payload: bytes) -> None:
        if self._waiting:
            self._waiting.pop(0).callback(payload)
        else:
            self._packets.append(payload)

    def fail_waiting(self, reason: Failure) -> None:
        self.reason = reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(reason)

    def receive(self) -> Deferred[bytes]:
        """
        The next packet; fails with the reason if the connection closes first.
        """
        if self._packets:
            return succeed(self._packets.pop(0))
        if self.reason is not None:
            return fail(self.reason)
        d: Deferred[bytes] = Deferred()
        self._waiting.append(d)
        return d

    def request(self, payload: bytes) -> Deferred[bytes]:
        """
        Send a packet and wait for the next one (the fake DC's echo).
        """
        self.send(payload)
        return self.receive()


class ObfuscatedClient(PacketQueue, Protocol):
    """
    A client of the proxy: obfuscated2 with a secret, then one transport.

    Packets are delivered to :meth:`receive` callers in order, or to
    :attr:`on_packet` when it is set (for streams too large to queue).

    :ivar bytes_received: raw bytes received from the proxy.
    :ivar lost: fires when the connection is closed.
    """

    transport: ITCPTransport

    def __init__(
        self,
        key: bytes | None,
        tag: bytes,
        dc: int,
        init: InitiatorStreams | None = None,
        max_packet: int = TEST_MAX_PACKET,
    ) -> None:
        super().__init__()
        self.tag = tag
        self.dc = dc
        self.init = init if init is not None else generate_init(tag, dc, secret=key)
        self.codec = make_codec(tag, max_packet)
        self.bytes_received = 0
        self.on_packet: Callable[[bytes], None] | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.init.wire)

    def send(self, payload: bytes) -> None:
        """
        Frame and encrypt one packet.
        """
        self.send_stream(self.codec.encode(payload))

    def send_stream(self, data: bytes) -> None:
        """
        Encrypt and send bytes of the transport stream as they are.
        """
        self.transport.write(self.init.encryptor.update(data))

    def pause(self) -> None:
        """
        Stop reading from the socket (a slow reader).
        """
        IPushProducer(self.transport).pauseProducing()

    def resume(self) -> None:
        IPushProducer(self.transport).resumeProducing()

    def close(self) -> Deferred[None]:
        """
        Close the connection; fires once it is closed.
        """
        if not self.lost.called:
            self.transport.loseConnection()
        return self.lost

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        try:
            packets = self.codec.feed(self.init.decryptor.update(data))
        except TransportError:
            self.transport.abortConnection()
            return
        for packet in packets:
            if self.on_packet is not None:
                self.on_packet(packet.payload)
            else:
                self.deliver(packet.payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.fail_waiting(reason)
        self.lost.callback(None)


def connect_protocol(reactor: Any, host: str, port: int, protocol: P) -> Deferred[P]:
    """
    Connect ``protocol`` over TCP to ``host:port`` (an IP literal, v4 or v6);
    fires with ``protocol`` once connected.
    """
    endpoint: IStreamClientEndpoint
    if ":" in host:
        endpoint = TCP6ClientEndpoint(reactor, host, port)  # type: ignore[no-untyped-call]
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port)

    def connected(_: object) -> P:
        return protocol

    connecting: Deferred[IProtocol] = connectProtocol(endpoint, protocol)
    return connecting.addCallback(connected)


def make_client(
    secret: Secret | bytes | None,
    tag: bytes | None = None,
    dc: int = 2,
    init: InitiatorStreams | None = None,
) -> ObfuscatedClient:
    """
    An :class:`ObfuscatedClient` for ``secret``, not connected yet.

    :param secret: a :class:`Secret` or its 16 bytes.
    :param tag: the protocol tag; by default padded intermediate for a
        ``dd``/``ee`` secret and intermediate for a classic one, as TDLib.
    :param init: a prepared init (to replay one); else a fresh one.
    """
    key = secret.key if isinstance(secret, Secret) else secret
    if tag is None:
        classic = isinstance(secret, Secret) and secret.kind is Mode.CLASSIC
        tag = TAG_INTERMEDIATE if classic else TAG_PADDED
    return ObfuscatedClient(key, tag, dc, init=init)


def connect_client(
    reactor: Any,
    host: str,
    port: int,
    secret: Secret | bytes | None,
    tag: bytes | None = None,
    dc: int = 2,
    init: InitiatorStreams | None = None,
) -> Deferred[ObfuscatedClient]:
    """
    Connect an :class:`ObfuscatedClient` (see :func:`make_client`) to the
    proxy at ``host:port``.
    """
    return connect_protocol(reactor, host, port, make_client(secret, tag, dc, init))


def connect_raw(reactor: Any, host: str, port: int, data: bytes = b"") -> Deferred[RawClient]:
    """
    Connect a :class:`RawClient` that sends ``data`` first.
    """
    client = RawClient(data)
    return connect_protocol(reactor, host, port, client)
