"""
A Telegram data centre for tests.

:class:`FakeDC` accepts the proxy's obfuscated2 init (no secret), answers
the first two steps of the MTProto auth-key handshake well enough to take
TDLib two round trips deep, echoes every other packet, and streams a large
download on request (:func:`download_request`, checked with
:func:`download_chunk`). It works on a loopback port or in memory
(:mod:`mtproxy_tw.testing.memory`).
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.hazmat.primitives.ciphers import CipherContext
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.testing._reactor import default_reactor
from mtproxy_tw.wire.obfuscated2 import (
    INIT_LENGTH,
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    accept_init,
)
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
    "FakeDC",
    "FakeDCProtocol",
    "buffered_bytes",
    "download_chunk",
    "download_request",
    "make_codec",
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
        self.reactor: IReactorTime = reactor if reactor is not None else default_reactor()
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
