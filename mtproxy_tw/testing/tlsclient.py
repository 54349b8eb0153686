"""
A Telegram app's fake-TLS connection, for tests of ``ee`` secrets.

:class:`FakeTLSClient` makes the connection the way TDLib does: a signed
ClientHello, a check of the proxy's answer, then ChangeCipherSpec and the
obfuscated2 stream inside ``17 03 03`` records. It works over TCP
(:func:`mtproxy_tw.testing.clients.connect_protocol`) or in memory
(:mod:`mtproxy_tw.testing.memory`).
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from mtproxy_tw.testing._reactor import default_reactor
from mtproxy_tw.testing.clients import PacketQueue
from mtproxy_tw.testing.fakedc import buffered_bytes, make_codec
from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.faketls import NeedMore, TLSError, build_client_hello, check_server_hello
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, generate_init

__all__ = ["CCS", "TDLIB_RECORD", "FakeTLSClient", "records"]

#: The ChangeCipherSpec record a client sends before its first data.
CCS = b"\x14\x03\x03\x00\x01\x01"
#: The largest record payload TDLib sends (``MAX_TLS_PACKET_LENGTH``).
TDLIB_RECORD = 2878


def records(data: bytes, size: int) -> bytes:
    """
    ``data`` as ApplicationData records of at most ``size`` bytes, as a
    client sends them.
    """
    out = bytearray()
    for pos in range(0, len(data), size):
        chunk = data[pos : pos + size]
        out += b"\x17\x03\x03" + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out)


class FakeTLSClient(PacketQueue, Protocol):
    """
    A Telegram app's fake-TLS connection, the way TDLib makes it.

    It sends a ClientHello signed with ``key``, checks the proxy's flight,
    then sends ``14 03 03 00 01 01`` and the obfuscated2 init (padded
    intermediate) followed by packets, all inside ``17 03 03`` records of at
    most :attr:`record_size` bytes. What comes back is read out of the
    records, decrypted and unframed into packets.

    :param timestamp: the hello's timestamp; by default ``reactor.seconds()``
        (the clock the proxy checks it against, in memory too).
    :param hello: a ClientHello to send instead of a fresh one.

    :ivar answered: fires with the ServerHello flight, or fails with the
        :class:`TLSError` that the flight raised.
    :ivar record_sizes: the payload size of every record received after it.
    :ivar bad_records: record headers that were not ``17 03 03`` and at most
        16401 bytes long, a full TLS 1.3 record (the connection is aborted at
        the first one).
    """

    transport: Any

    def __init__(
        self,
        key: bytes,
        domain: str = "example.com",
        dc: int = 2,
        *,
        mlkem: bool = False,
        timestamp: int | None = None,
        hello: bytes | None = None,
        record_size: int = TDLIB_RECORD,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor if reactor is not None else default_reactor()
        self.key = key
        if hello is None:
            ts = int(self.reactor.seconds()) if timestamp is None else timestamp
            hello = build_client_hello(key, domain, ts, mlkem=mlkem)
        self.hello = hello
        self.client_random = hello[11:43]
        self.init = generate_init(TAG_PADDED, dc, secret=key)
        self.codec = make_codec(TAG_PADDED)
        self.record_size = record_size
        self.received = bytearray()
        self.flight: bytes | None = None
        self.answered: Deferred[bytes] = Deferred()
        self.record_sizes: list[int] = []
        self.bad_records: list[bytes] = []
        self.lost: Deferred[None] = Deferred()
        self.started = False
        self._buffer = bytearray()

    # -- connection

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.hello)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._buffer += data
        if self.flight is None:
            try:
                end = check_server_hello(bytes(self._buffer), self.key, self.client_random)
            except TLSError as e:
                self.answered.errback(e)
                self.transport.abortConnection()
                return
            if isinstance(end, NeedMore):
                return
            self.flight = bytes(self._buffer[:end])
            del self._buffer[:end]
            self.answered.callback(self.flight)
        self._read_records()

    def _read_records(self) -> None:
        buf = self._buffer
        pos = 0
        payloads = []
        while len(buf) - pos >= 5:
            header = bytes(buf[pos : pos + 5])
            size = int.from_bytes(header[3:], "big")
            if header[:3] != b"\x17\x03\x03" or not 0 < size <= faketls.MAX_OUTGOING_PAYLOAD:
                self.bad_records.append(header)
                self.transport.abortConnection()
                return
            if len(buf) - pos < 5 + size:
                break
            self.record_sizes.append(size)
            payloads.append(bytes(buf[pos + 5 : pos + 5 + size]))
            pos += 5 + size
        del buf[:pos]
        if not payloads:
            return
        for packet in self.codec.feed(self.init.decryptor.update(b"".join(payloads))):
            self.deliver(packet.payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answered.called:
            self.answered.errback(reason)
        self.fail_waiting(reason)
        self.lost.callback(None)

    # -- sending

    def wire(self, payload: bytes | None = None, record_size: int | None = None) -> bytes:
        """
        The bytes that send one packet (none: just the init, first time),
        in records; the first call adds the ChangeCipherSpec and the init.
        """
        stream = b""
        if payload is not None:
            stream = self.init.encryptor.update(self.codec.encode(payload))
        head = b""
        if not self.started:
            self.started = True
            head = CCS
            stream = self.init.wire + stream
        return head + records(stream, record_size or self.record_size)

    def start(self) -> None:
        self.transport.write(self.wire())

    def send(self, payload: bytes, record_size: int | None = None) -> None:
        self.transport.write(self.wire(payload, record_size))

    async def send_in_pieces(self, data: bytes, cuts: list[int]) -> None:
        """
        Write ``data`` cut at ``cuts``, each piece flushed to the socket
        before the next is written, so the proxy reads them separately
        (over TCP, on a running reactor).
        """
        reactor = self.reactor
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
        for start, end in itertools.pairwise(bounds):
            self.transport.write(data[start:end])
            deadline = reactor.seconds() + 5.0
            while buffered_bytes(self.transport) and reactor.seconds() < deadline:
                await deferLater(reactor, 0, lambda: None)
            # One more turn for the proxy to read what just left.
            await deferLater(reactor, 0, lambda: None)
