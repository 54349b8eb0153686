"""
A Telegram middle proxy for tests.

:class:`FakeMiddleProxy` plays the server side of PROTOCOL.md section 8 on
a loopback port (or in memory, over ``twisted.test.iosim``): it checks the
nonce (clock included) and the handshake with the same key derivation a
real middle proxy uses, then answers every RPC_PROXY_REQ as a fake DC would
(the MTProto key-exchange steps TDLib sends, download requests, and an echo
of everything else) in RPC_PROXY_ANS. It records the ad tags, client
addresses and conn ids it saw, sends RPC_SIMPLE_ACK for requests flagged
QUICKACK, and can be told to drop its connections, stop reading, reject
handshakes or ping.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw.middle.telegramconfig import DEFAULT_PROXY_SECRET
from mtproxy_tw.testing._reactor import default_reactor
from mtproxy_tw.testing.fakedc import FakeDC, FakeDCProtocol
from mtproxy_tw.wire import rpc

__all__ = ["FAKE_PID", "FakeMEProtocol", "FakeMiddleProxy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The process id the fake answers with.
FAKE_PID = rpc.ProcessId(ipaddress.IPv4Address("127.0.0.2"), 8888, 4242, 1_700_000_000)


class _VirtualDC(FakeDCProtocol):
    """
    The fake DC behind one conn_id: its answers go out as RPC_PROXY_ANS.
    """

    def __init__(self, me: FakeMEProtocol, conn_id: int) -> None:
        super().__init__(me.factory.dc)
        self.me = me
        self.conn_id = conn_id

    def send(self, payload: bytes) -> None:
        if not self._closed:
            self.me.send_answer(self.conn_id, payload)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None

    def resumeProducing(self) -> None:
        self.paused = False
        if not self._closed and self.downloading and self._pump_call is None:
            self._pump()

    def end(self) -> None:
        self.stopProducing()
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None


@implementer(IPushProducer)
class FakeMEProtocol(Protocol):
    """
    One RPC connection accepted by the fake middle proxy.

    :ivar state: ``nonce``, ``handshake``, ``ready`` or ``closed``.
    :ivar virtual: the fake DC of every live conn_id.
    :ivar lost: fires when the connection is closed.
    """

    log = Logger()
    transport: Any

    def __init__(self, factory: FakeMiddleProxy) -> None:
        self.factory = factory
        self.state = "nonce"
        self.virtual: dict[int, _VirtualDC] = {}
        self.pongs: list[int] = []
        self.paused = False
        self.lost: Deferred[None] = Deferred()
        self._decoder = rpc.FrameDecoder()
        self._encoder = rpc.FrameEncoder()

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.transport.registerProducer(self, True)

    def _write(self, data: bytes) -> None:
        if self.state != "closed":
            self.transport.write(data)

    def send(self, *payloads: bytes) -> None:
        if self.state == "ready":
            self._write(self._encoder.encode(*payloads))

    def send_answer(self, conn_id: int, data: bytes, flags: int = 0) -> None:
        self.send(rpc.build_proxy_ans(conn_id, data, flags))

    def _drop(self, why: str) -> None:
        # A real middle proxy drops a bad handshake without a word.
        self.factory.handshake_failures[why] += 1
        self.state = "closed"
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        factory = self.factory
        try:
            self._decoder.feed(data)
            for payload in self._decoder.frames():
                if self.state == "ready":
                    self._message(payload)
                elif self.state == "nonce":
                    self._nonce(payload)
                elif self.state == "handshake":
                    self._handshake(payload)
                if self.state == "closed":
                    return
        except rpc.RPCError as e:
            if self.state == "ready":
                factory.protocol_errors.append(str(e))
                self.state = "closed"
                self.transport.abortConnection()
            else:
                self._drop("keys")

    def _nonce(self, payload: bytes) -> None:
        factory = self.factory
        now = int(factory.clock.seconds() + factory.clock_offset)
        try:
            theirs = rpc.parse_nonce(payload, factory.secret, now=now)
        except rpc.RPCError as e:
            self._drop("clock" if "skew" in str(e) else "nonce")
            return
        own = os.urandom(16)
        self._write(self._encoder.encode(rpc.build_nonce(factory.secret, now & 0xFFFFFFFF, own)))
        peer, host = self.transport.getPeer(), self.transport.getHost()
        client_ip = factory.client_ip if factory.client_ip is not None else peer.host
        keys = rpc.derive_keys(
            secret=factory.secret,
            nonce_srv=own,
            nonce_clt=theirs.nonce,
            client_ts=theirs.crypto_ts,
            client_addr=(client_ip, factory.client_port or peer.port),
            server_addr=(host.host, host.port),
            server_side=True,
        )
        self._decoder.set_key(keys.decrypt.key, keys.decrypt.iv)
        self._encoder.set_key(keys.encrypt.key, keys.encrypt.iv)
        self.state = "handshake"

    def _handshake(self, payload: bytes) -> None:
        factory = self.factory
        hs = rpc.parse_handshake(payload)
        factory.handshakes.append(hs)
        if factory.reject_handshake is not None:
            self._write(
                self._encoder.encode(rpc.build_handshake_error(factory.reject_handshake, FAKE_PID))
            )
            self.state = "closed"
            self.transport.loseConnection()
            return
        self._write(self._encoder.encode(rpc.build_handshake(FAKE_PID, hs.sender_pid)))
        self.state = "ready"
        factory.ready_count += 1

    def _message(self, payload: bytes) -> None:
        factory = self.factory
        msg = rpc.parse_message(payload)
        if isinstance(msg, rpc.ProxyReq):
            factory.requests += 1
            factory.flags.append(msg.flags)
            factory.ad_tags.append(msg.ad_tag)
            factory.client_addrs.append(msg.client_addr)
            factory.proxy_addrs.append(msg.proxy_addr)
            factory.conn_ids.add(msg.conn_id)
            virtual = self.virtual.get(msg.conn_id)
            if virtual is None:
                virtual = self.virtual[msg.conn_id] = _VirtualDC(self, msg.conn_id)
                factory.virtual_dcs.append(virtual)
                if self.paused:
                    virtual.pauseProducing()
            if msg.flags & rpc.FLAG_QUICKACK and factory.quick_acks:
                self.send(rpc.build_simple_ack(msg.conn_id, factory.ack_token(msg.data)))
            virtual.packet_received(msg.data)
        elif isinstance(msg, rpc.CloseConn):
            factory.closed_conn_ids.append(msg.conn_id)
            virtual = self.virtual.pop(msg.conn_id, None)
            if virtual is not None:
                virtual.end()
        elif isinstance(msg, rpc.Ping):
            factory.pings += 1
            self.send(rpc.build_pong(msg.ping_id))
        elif isinstance(msg, rpc.Pong):
            self.pongs.append(msg.ping_id)
        else:
            factory.other_messages.append(payload)

    # -- what a test can do

    def close_ext(self, conn_id: int) -> None:
        """
        End one client's session from the middle proxy's side.
        """
        virtual = self.virtual.pop(conn_id, None)
        if virtual is not None:
            virtual.end()
        self.send(rpc.build_close_ext(conn_id))

    def ping(self, ping_id: int) -> None:
        self.send(rpc.build_ping(ping_id))

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    # -- IPushProducer: stop answering while the proxy does not read

    def pauseProducing(self) -> None:
        self.paused = True
        for virtual in self.virtual.values():
            virtual.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        for virtual in list(self.virtual.values()):
            virtual.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = "closed"
        for virtual in self.virtual.values():
            virtual.end()
        self.virtual.clear()
        self.lost.callback(None)


class FakeMiddleProxy(Factory):
    """
    A Telegram middle proxy for tests.

    :param secret: the proxy secret it shares with the proxy.
    :param clock_offset: seconds added to its clock (a skewed proxy clock
        makes it drop the nonce, as a real one does).
    :param client_ip: the address it believes the proxy has (simulates NAT:
        when it differs from the proxy's external address, the keys do not
        agree and the handshake fails).
    :param reject_handshake: answer RPC_HANDSHAKE_ERROR with this code.

    :ivar connections: every connection, in order.
    :ivar ready_count: handshakes completed.
    :ivar handshake_failures: handshakes dropped, by reason (``clock``,
        ``nonce``, ``keys``).
    :ivar ad_tags, client_addrs, proxy_addrs, flags: one entry per RPC_PROXY_REQ.
    :ivar conn_ids: every conn_id seen; ``closed_conn_ids``: RPC_CLOSE_CONN received.
    """

    noisy = False

    def __init__(
        self,
        secret: bytes = DEFAULT_PROXY_SECRET,
        reactor: IReactorTime | None = None,
        *,
        quick_acks: bool = True,
        clock_offset: float = 0.0,
        client_ip: str | None = None,
        reject_handshake: int | None = None,
    ) -> None:
        self.secret = secret
        self.clock: IReactorTime = reactor if reactor is not None else default_reactor()
        self.dc = FakeDC(self.clock)
        self.quick_acks = quick_acks
        self.clock_offset = clock_offset
        self.client_ip = client_ip
        #: The port it believes the proxy connects from, where it is not the
        #: peer's (a SOCKS5 server that reports no bound port of its own).
        self.client_port: int | None = None
        self.reject_handshake = reject_handshake
        self.connections: list[FakeMEProtocol] = []
        self.ready_count = 0
        self.handshake_failures: Counter[str] = Counter()
        self.handshakes: list[rpc.Handshake] = []
        self.requests = 0
        self.flags: list[int] = []
        self.ad_tags: list[bytes | None] = []
        self.client_addrs: list[tuple[IPAddress, int]] = []
        self.proxy_addrs: list[tuple[IPAddress, int]] = []
        self.conn_ids: set[int] = set()
        self.closed_conn_ids: list[int] = []
        self.virtual_dcs: list[_VirtualDC] = []
        self.pings = 0
        self.protocol_errors: list[str] = []
        self.other_messages: list[bytes] = []

    def buildProtocol(self, addr: Any) -> FakeMEProtocol:
        return FakeMEProtocol(self)

    @staticmethod
    def ack_token(data: bytes) -> bytes:
        """
        The quick-ack token sent for a packet (top bit set, as Telegram's).
        """
        word = int.from_bytes(data[:4].ljust(4, b"\0"), "little") | 0x80000000
        return word.to_bytes(4, "little")

    def live(self) -> list[FakeMEProtocol]:
        return [c for c in self.connections if not c.lost.called]

    def ready(self) -> list[FakeMEProtocol]:
        return [c for c in self.live() if c.state == "ready"]

    def mtproto_requests(self) -> list[int]:
        """
        MTProto handshake constructors answered, over all clients.
        """
        return [r for v in self.virtual_dcs for r in v.requests]

    def drop_all(self) -> Deferred[None]:
        """
        Abort every connection; fires once they are all closed.
        """
        live = self.live()
        for conn in live:
            conn.transport.abortConnection()
        return _all(conn.lost for conn in live)

    def close_all(self) -> Deferred[None]:
        return self.drop_all()


def _all(ds: Any) -> Deferred[None]:
    pending = list(ds)
    if not pending:
        return succeed(None)
    return gatherResults(pending).addCallback(lambda _: None)
