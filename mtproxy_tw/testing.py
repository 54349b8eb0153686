"""
Test doubles for the proxy, shipped with the package.

- :class:`FakeDC` plays a Telegram data centre on a loopback port: it accepts
  the proxy's obfuscated2 init (no secret), answers the first two steps of
  the MTProto auth-key handshake well enough to take TDLib two round trips
  deep, echoes every other packet, and streams a large download on request.
- :class:`ObfuscatedClient` speaks to the proxy as a Telegram app would,
  with a secret, a protocol tag and a DC id; :class:`RawClient` sends raw
  bytes (bad inits, replays, garbage).
- :func:`tdlib_test_proxy` runs TDLib's own ``testProxy`` through the proxy.

Typical use in a trial test::

    dc = FakeDC()
    port = reactor.listenTCP(0, dc, interface="127.0.0.1")
    ...
    client = await connect_client(reactor, "127.0.0.1", proxy_port, secret, dc=2)
    assert await client.request(b"ping") == b"ping"
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers import CipherContext
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.wire.obfuscated2 import (
    INIT_LENGTH,
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    InitiatorStreams,
    accept_init,
    generate_init,
)
from mtproxy_tw.wire.secrets import Mode, Secret
from mtproxy_tw.wire.transports import (
    AbridgedCodec,
    Codec,
    IntermediateCodec,
    PaddedIntermediateCodec,
    TransportError,
)

__all__ = [
    "DOWNLOAD_CHUNK",
    "DOWNLOAD_MAGIC",
    "PQ",
    "REQ_DH_PARAMS",
    "REQ_PQ_MULTI",
    "TDLIB_FINGERPRINT",
    "TEST_MAX_PACKET",
    "FakeConfigServer",  # noqa: F822 (loaded lazily, see __getattr__)
    "FakeDC",
    "FakeDCProtocol",
    "FakeMiddleProxy",  # noqa: F822
    "FakeSite",
    "ObfuscatedClient",
    "PacketQueue",
    "RawClient",
    "buffered_bytes",
    "connect_client",
    "connect_raw",
    "download_chunk",
    "download_request",
    "make_codec",
    "tdlib_test_proxy",
]

#: Codecs of the doubles accept packets up to this size (the proxy itself
#: does not parse frames in direct mode, so tests may send 1 MiB payloads
#: plus padding).
TEST_MAX_PACKET = 16 << 20

#: A packet whose payload starts with this, followed by ``u32le`` N, makes
#: the fake DC send N bytes back (see :func:`download_chunk`).
DOWNLOAD_MAGIC = b"DOWNLOAD"
#: Payload size of each download packet (the last one may be shorter).
DOWNLOAD_CHUNK = 64 * 1024

#: The fingerprint of TDLib's built-in production RSA key.
TDLIB_FINGERPRINT = 0xD09D1D85DE64FD85
#: A ``pq`` TDLib can factor: 1229739323 * 1402015859 (both prime).
PQ = 0x17ED48941A08F981

REQ_PQ_MULTI = 0xBE7E8EF1
REQ_DH_PARAMS = 0xD712E4BE
RES_PQ = 0x05162463
SERVER_DH_PARAMS_OK = 0xD0E8075C
VECTOR = 0x1CB5C415

_u32 = struct.Struct("<I")
_CODECS: dict[bytes, type[Codec]] = {
    TAG_ABRIDGED: AbridgedCodec,
    TAG_INTERMEDIATE: IntermediateCodec,
    TAG_PADDED: PaddedIntermediateCodec,
}


def make_codec(tag: bytes, max_packet: int = TEST_MAX_PACKET) -> Codec:
    """
    A fresh codec for a protocol tag, accepting packets up to ``max_packet``.
    """
    try:
        cls = _CODECS[tag]
    except KeyError:
        raise TransportError("unknown protocol tag") from None
    return cls(max_packet)


def download_chunk(index: int, size: int = DOWNLOAD_CHUNK) -> bytes:
    """
    The payload of download packet number ``index`` (``size`` a multiple of 4).

    Every 4-byte word is ``u32le(index)``, so a reordered, dropped or
    corrupted packet is noticed.
    """
    return _u32.pack(index & 0xFFFFFFFF) * (size // 4)


def download_request(size: int) -> bytes:
    """
    The payload that asks a :class:`FakeDC` for a download of ``size`` bytes.
    """
    if size % 4:
        raise ValueError("a download is whole 4-byte words")
    return DOWNLOAD_MAGIC + _u32.pack(size)


def buffered_bytes(transport: object) -> int:
    """
    Bytes a Twisted TCP transport holds in its own write buffer.
    """
    return _twisted.buffered(transport)


def _tl_bytes(data: bytes) -> bytes:
    """
    TL serialization of ``bytes``/``string``.
    """
    size = len(data)
    head = bytes([size]) if size <= 253 else b"\xfe" + size.to_bytes(3, "little")
    out = head + data
    return out + b"\0" * (-len(out) % 4)


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- the fake DC


@implementer(IPushProducer)
class FakeDCProtocol(Protocol):
    """
    One connection from the proxy to the fake DC.

    It is its own transport's streaming producer: while the transport's
    write buffer is full it reads nothing and sends no download packets, so
    an echo or a download of any size stays bounded in memory.

    :ivar tag: the protocol tag of the init (``None`` before it arrived).
    :ivar dc: the DC id written in the init.
    :ivar packets: number of packets received after the init.
    :ivar requests: MTProto constructors answered, in order.
    :ivar paused: whether the transport is holding us back right now.
    :ivar pauses: how many times it did.
    :ivar sent: payload bytes of all download packets sent so far.
    :ivar lost: fires when the connection is closed.
    """

    log = Logger()
    transport: ITCPTransport

    def __init__(self, factory: FakeDC) -> None:
        self.factory = factory
        self.tag: bytes | None = None
        self.dc: int | None = None
        self.bytes_received = 0
        self.packets = 0
        self.requests: list[int] = []
        self.paused = False
        self.pauses = 0
        self.sent = 0
        self.server_nonce: bytes | None = None
        self.lost: Deferred[None] = Deferred()
        self._buffer = bytearray()
        self._decryptor: CipherContext | None = None
        self._encryptor: CipherContext | None = None
        self._codec: Codec | None = None
        self._download_left = 0
        self._download_index = 0
        self._pump_call: IDelayedCall | None = None
        self._closed = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        IConsumer(self.transport).registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self.factory.bytes_received += len(data)
        if self._decryptor is None:
            self._buffer += data
            if len(self._buffer) < INIT_LENGTH:
                return
            init = bytes(self._buffer[:INIT_LENGTH])
            data = bytes(self._buffer[INIT_LENGTH:])
            self._buffer = bytearray()
            accepted = accept_init(init, None)
            if accepted is None:
                self.factory.bad_inits += 1
                self.transport.loseConnection()
                return
            self.tag, self.dc = accepted.tag, accepted.dc
            self.factory.seen.append((accepted.tag, accepted.dc))
            self._decryptor, self._encryptor = accepted.decryptor, accepted.encryptor
            self._codec = make_codec(accepted.tag, self.factory.max_packet)
            if not data:
                return
        assert self._codec is not None
        try:
            packets = self._codec.feed(self._decryptor.update(data))
        except TransportError as e:
            self.log.info("fake DC: {error}", error=e)
            self.transport.loseConnection()
            return
        for packet in packets:
            self.packets += 1
            self.packet_received(packet.payload)

    def packet_received(self, payload: bytes) -> None:
        """
        Answer one packet: MTProto handshake, download request, or echo.
        """
        answer = self._mtproto(payload)
        if answer is not None:
            self.send(answer)
        elif payload.startswith(DOWNLOAD_MAGIC) and len(payload) >= len(DOWNLOAD_MAGIC) + 4:
            (size,) = _u32.unpack_from(payload, len(DOWNLOAD_MAGIC))
            self._download_left += size
            self._pump()
        else:
            self.send(payload)

    def send(self, payload: bytes) -> None:
        """
        Frame, encrypt and send one packet.
        """
        if self._closed:
            return
        assert self._codec is not None and self._encryptor is not None
        self.transport.write(self._encryptor.update(self._codec.encode(payload)))

    def _mtproto(self, payload: bytes) -> bytes | None:
        """
        The answer to an unencrypted MTProto handshake message, if it is one.

        Parsed by constructor: TDLib pads inside and after the body.
        """
        if len(payload) < 24 or payload[:8] != bytes(8):
            return None
        body = payload[20:]
        (constructor,) = _u32.unpack_from(body)
        if constructor == REQ_PQ_MULTI and len(body) >= 20:
            nonce = body[4:20]
            self.server_nonce = os.urandom(16)
            answer = (
                _u32.pack(RES_PQ)
                + nonce
                + self.server_nonce
                + _tl_bytes(PQ.to_bytes(8, "big"))
                + _u32.pack(VECTOR)
                + _u32.pack(1)
                + struct.pack("<Q", TDLIB_FINGERPRINT)
            )
        elif constructor == REQ_DH_PARAMS and len(body) >= 36:
            nonce, server_nonce = body[4:20], body[20:36]
            answer = (
                _u32.pack(SERVER_DH_PARAMS_OK) + nonce + server_nonce + _tl_bytes(os.urandom(592))
            )
        else:
            return None
        self.requests.append(constructor)
        return bytes(8) + struct.pack("<QI", self._msg_id(), len(answer)) + answer

    def _msg_id(self) -> int:
        now = self.factory.reactor.seconds()
        return (int(now * (1 << 32)) & ~3) | 1

    # -- download, and IPushProducer

    def _pump(self) -> None:
        self._pump_call = None
        budget = 16
        while self._download_left > 0 and not self.paused and not self._closed and budget:
            size = min(DOWNLOAD_CHUNK, self._download_left)
            self._download_left -= size
            self.sent += size
            payload = download_chunk(self._download_index, size)
            self._download_index += 1
            budget -= 1
            self.send(payload)
        if self._download_left > 0 and not self.paused and not self._closed:
            self._pump_call = self.factory.reactor.callLater(0, self._pump)

    @property
    def downloading(self) -> bool:
        """
        Whether download bytes remain to be sent.
        """
        return self._download_left > 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        IPushProducer(self.transport).pauseProducing()
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None

    def resumeProducing(self) -> None:
        self.paused = False
        if self._closed:
            return
        IPushProducer(self.transport).resumeProducing()
        if self._download_left > 0 and self._pump_call is None:
            self._pump()

    def stopProducing(self) -> None:
        self._closed = True
        self._download_left = 0

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._download_left = 0
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        self.lost.callback(None)


class FakeDC(Factory):
    """
    A Telegram DC on a loopback port, for direct-mode tests.

    :ivar connections: every :class:`FakeDCProtocol`, in connection order.
    :ivar seen: ``(tag, dc)`` of every valid init, in order.
    :ivar bytes_received: bytes received on all connections, inits included.
    :ivar bad_inits: inits whose tag did not decrypt (closed at once).
    """

    noisy = False

    def __init__(self, reactor: IReactorTime | None = None, max_packet: int = TEST_MAX_PACKET):
        self.reactor: IReactorTime = reactor if reactor is not None else _default_reactor()
        self.max_packet = max_packet
        self.connections: list[FakeDCProtocol] = []
        self.seen: list[tuple[bytes, int]] = []
        self.bytes_received = 0
        self.bad_inits = 0

    def buildProtocol(self, addr: Any) -> FakeDCProtocol:
        return FakeDCProtocol(self)

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    def live(self) -> list[FakeDCProtocol]:
        """
        The connections not closed yet.
        """
        return [c for c in self.connections if not c.lost.called]


# -- clients


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


class _Given(Factory):
    """
    A factory for exactly one, already built, protocol.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


def _connect(reactor: Any, host: str, port: int, protocol: Protocol) -> Deferred[IProtocol]:
    endpoint: IStreamClientEndpoint
    if ":" in host:
        endpoint = TCP6ClientEndpoint(reactor, host, port)  # type: ignore[no-untyped-call]
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port)
    return endpoint.connect(_Given(protocol))


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
    Connect an :class:`ObfuscatedClient` to the proxy at ``host:port``.

    :param secret: a :class:`Secret` or its 16 bytes.
    :param tag: the protocol tag; by default padded intermediate for a
        ``dd``/``ee`` secret and intermediate for a classic one, as TDLib.
    :param init: a prepared init (to replay one); else a fresh one.
    """
    key = secret.key if isinstance(secret, Secret) else secret
    if tag is None:
        classic = isinstance(secret, Secret) and secret.kind is Mode.CLASSIC
        tag = TAG_INTERMEDIATE if classic else TAG_PADDED
    client = ObfuscatedClient(key, tag, dc, init=init)
    return _connect(reactor, host, port, client).addCallback(lambda _: client)


def connect_raw(reactor: Any, host: str, port: int, data: bytes = b"") -> Deferred[RawClient]:
    """
    Connect a :class:`RawClient` that sends ``data`` first.
    """
    client = RawClient(data)
    return _connect(reactor, host, port, client).addCallback(lambda _: client)


# -- TDLib

#: TDLib's receive queue is process-wide and must not be read from two
#: threads at once; this serializes every call of :func:`tdlib_test_proxy`.
_TD_LOCK = threading.Lock()


def _td_call(request: dict[str, Any], timeout: float) -> str:
    import tdjson

    def send(client: int, obj: dict[str, Any]) -> None:
        tdjson.td_send(client, json.dumps(obj).encode())

    with _TD_LOCK:
        tdjson.td_execute(
            json.dumps({"@type": "setLogVerbosityLevel", "new_verbosity_level": 0}).encode()
        )
        client: int = tdjson.td_create_client_id()
        send(client, {**request, "@extra": "test"})
        result = f"no answer from TDLib within {timeout} s"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = tdjson.td_receive(min(0.5, max(0.01, deadline - time.monotonic())))
            if raw is None:
                continue
            event = json.loads(raw)
            if event.get("@client_id") == client and event.get("@extra") == "test":
                result = "ok" if event["@type"] == "ok" else str(event.get("message", event))
                break
        send(client, {"@type": "close"})
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            raw = tdjson.td_receive(0.5)
            if raw is None:
                continue
            event = json.loads(raw)
            state = event.get("authorization_state", {}).get("@type")
            if event.get("@client_id") == client and state == "authorizationStateClosed":
                break
        return result


def tdlib_test_proxy(
    server: str,
    port: int,
    secret_text: str,
    dc_id: int,
    timeout: float = 5.0,
    reactor: Any = None,
) -> Deferred[str]:
    """
    Run TDLib's ``testProxy`` against an MTProto proxy, in a thread.

    Fires with ``"ok"`` or TDLib's error message. Against a :class:`FakeDC`
    the expected message is ``"Failed to fetch server_DH_inner_data"``:
    the handshake got two full round trips deep. ``tdjson`` is imported
    only here, so this module works without it.
    """
    if reactor is None:
        reactor = _default_reactor()
    proxy = {
        "@type": "proxy",
        "server": server,
        "port": port,
        "type": {"@type": "proxyTypeMtproto", "secret": secret_text},
    }
    # TDLib 1.8.6x wraps the address in a "proxy" object; older releases
    # take the same fields at the top level. Unknown fields are ignored.
    request: dict[str, Any] = {
        "@type": "testProxy",
        "proxy": proxy,
        "server": server,
        "port": port,
        "type": proxy["type"],
        "dc_id": dc_id,
        "timeout": timeout,
    }
    d: Deferred[str] = deferToThreadPool(
        reactor, reactor.getThreadPool(), _td_call, request, timeout + 5.0
    )
    return d


# The fake fronted web site lives in its own module; it is part of this API.
from mtproxy_tw._fakesite import FakeSite  # noqa: E402


def __getattr__(name: str) -> Any:
    # The fake middle proxy builds on the fake DC above, so it is loaded on
    # first use rather than imported here (which would be circular).
    if name in ("FakeMiddleProxy", "FakeConfigServer"):
        from mtproxy_tw import _fakemiddle

        return getattr(_fakemiddle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
