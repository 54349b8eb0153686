"""
One RPC connection to a middle proxy, shared by many clients.

Its lifecycle is an explicit state machine (:class:`~mtproxy_tw.middle.states.State`);
every state has one handler for incoming frames, set only by
:meth:`MEConnection._to`::

    CONNECTING ─our RPC_NONCE─▶ NONCE ─our RPC_HANDSHAKE─▶ HANDSHAKE ─theirs─▶ READY

CONNECTING covers the TCP connection and learning the external address that
enters the key derivation. Any state goes to CLOSED when we abort the
connection or it is lost; :meth:`MEConnection.connectionLost` then reports
to the pool according to the state the connection was closed in
(:attr:`MEConnection.closed_in`).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.middle.address import ANY_V4, IPAddress, ip_port
from mtproxy_tw.middle.states import NEXT, State
from mtproxy_tw.proxy.socks import tunnel_addresses
from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.proxyconfig import Endpoint

if TYPE_CHECKING:
    from mtproxy_tw.middle.pool import DCPool
    from mtproxy_tw.middle.session import ClientSession

__all__ = ["MEConnection", "State"]

_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")
_PROXY_ANS_TYPE = _u32.pack(rpc.RPC_PROXY_ANS)

#: A frame's payload: perhaps a view of the read it came in, valid during the call.
_Frame: TypeAlias = "bytes | memoryview"
#: Frames of one read, and the sessions they touched (flushed after the read).
_Handler: TypeAlias = "Callable[[_Frame, dict[ClientSession, None]], None]"


def _ignore(payload: _Frame, touched: dict[ClientSession, None]) -> None:
    pass


@implementer(IPushProducer)
class MEConnection(Protocol):
    """
    One TCP RPC connection to a middle proxy, shared by many clients.

    :ivar state: where it is in its lifecycle (:class:`State`).
    """

    log = Logger()
    transport: Any

    def __init__(self, pool: DCPool, endpoint: Endpoint, secret: bytes) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.secret = secret
        self.upstream = pool.upstream
        self.state = State.CONNECTING
        #: The state the connection was in when it entered CLOSED.
        self.closed_in: State | None = None
        self.sessions: dict[int, ClientSession] = {}
        self.paused = False
        self.ready_at: float | None = None
        self.last_received = 0.0
        self.external: IPAddress | None = None
        self.failure_reason: str | None = None
        #: The handshake failed because of an untried proxy secret (no backoff).
        self.secret_refused = False
        #: conn_ids closed lately: late answers for them are dropped quietly.
        self._recently_closed: dict[int, None] = {}
        self._on_frame: _Handler = _ignore
        self._encoder = rpc.FrameEncoder()
        self._decoder = rpc.FrameDecoder()
        self._timer: IDelayedCall | None = None
        #: Payloads for one write, and the call that writes them.
        self._queued: list[rpc.Pieces] = []
        self._flush_call: IDelayedCall | None = None
        self._sender_pid: rpc.ProcessId | None = None
        self._crypto_ts = 0
        self._nonce = b""
        self._client_addr: tuple[IPAddress, int] = (ANY_V4, 0)
        self._server_addr: tuple[IPAddress, int] = (ANY_V4, 0)

    @property
    def load(self) -> int:
        return len(self.sessions)

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def dead(self) -> bool:
        """
        Aborted or lost: nothing more is read or sent.
        """
        return self.state is State.CLOSED

    def __repr__(self) -> str:
        host, port = self.endpoint
        return f"<MEConnection {host}:{port} {self.state.value} {len(self.sessions)} clients>"

    def _to(self, state: State, handler: _Handler = _ignore) -> None:
        """
        Enter ``state``; incoming frames go to ``handler`` from now on.
        """
        if state not in NEXT[self.state]:
            raise RuntimeError(f"{self.state.name} -> {state.name}")
        if state is State.CLOSED:
            self.closed_in = self.state
        self.state = state
        self._on_frame = handler

    # -- handshake

    def connectionMade(self) -> None:
        reactor = self.upstream.reactor
        self.pool.connections.add(self)
        self.last_received = reactor.seconds()
        transport: Any = self.transport
        _twisted.no_delay(transport)
        _twisted.set_read_size(transport)
        transport.registerProducer(self, True)
        self._timer = reactor.callLater(
            self.upstream.settings.handshake_timeout, self._handshake_timed_out
        )
        # Through an upstream SOCKS5 server, the addresses the middle proxy sees.
        tunnel = tunnel_addresses(transport)
        host, peer = tunnel or (transport.getHost(), transport.getPeer())
        local, self._server_addr = ip_port(host), ip_port(peer)
        self._client_addr = local
        self.upstream.external.for_connection(
            local[0], self._server_addr[0], tunnelled=tunnel is not None
        ).addCallback(self._send_nonce).addErrback(self._nonce_failed)

    def _nonce_failed(self, failure: Failure) -> None:
        self.log.failure("cannot start the handshake with a middle proxy", failure)
        self.failure_reason = "internal error"
        self.abort()

    def _send_nonce(self, external: IPAddress) -> None:
        if self.state is not State.CONNECTING:
            return
        self.external = external
        self._client_addr = (external, self._client_addr[1])
        self._crypto_ts = int(self.upstream.reactor.seconds()) & 0xFFFFFFFF
        self._nonce = os.urandom(16)
        self._to(State.NONCE, self._got_nonce)
        self._write(
            self._encoder.encode(rpc.build_nonce(self.secret, self._crypto_ts, self._nonce))
        )

    def _got_nonce(self, payload: _Frame, touched: dict[ClientSession, None]) -> None:
        now = int(self.upstream.reactor.seconds())
        try:
            theirs = rpc.parse_nonce(bytes(payload), self.secret, now=now)
        except rpc.RPCError as e:
            skew = "skew" in str(e)
            self._reject(f"bad RPC_NONCE: {e}", "clock" if skew else "secret", not skew)
            return
        keys = rpc.derive_keys(
            secret=self.secret,
            nonce_srv=theirs.nonce,
            nonce_clt=self._nonce,
            client_ts=self._crypto_ts,
            client_addr=self._client_addr,
            server_addr=self._server_addr,
        )
        self._decoder.set_key(keys.decrypt.key, keys.decrypt.iv)
        self._encoder.set_key(keys.encrypt.key, keys.encrypt.iv)
        external, server = self._client_addr[0], self._server_addr[0]
        self._sender_pid = rpc.ProcessId(
            external if isinstance(external, ipaddress.IPv4Address) else ANY_V4,
            self._client_addr[1],
            os.getpid() & 0xFFFF,
            self.upstream.start_time,
        )
        peer_pid = rpc.ProcessId(
            server if isinstance(server, ipaddress.IPv4Address) else ANY_V4,
            self._server_addr[1],
            0,
            0,
        )
        self._to(State.HANDSHAKE, self._got_handshake)
        self._write(self._encoder.encode(rpc.build_handshake(self._sender_pid, peer_pid)))

    def _got_handshake(self, payload: _Frame, touched: dict[ClientSession, None]) -> None:
        try:
            rpc.parse_handshake(bytes(payload), expected_peer_pid=self._sender_pid)
        except rpc.HandshakeRejected as e:
            cause = "ip" if e.code in (-4, -6) else "protocol"
            self._reject(
                f"RPC_HANDSHAKE_ERROR {e.code} ({rpc.HANDSHAKE_ERRORS.get(e.code)})", cause
            )
            return
        except rpc.RPCError as e:
            self._reject(f"bad RPC_HANDSHAKE: {e}", "protocol")
            return
        self._cancel_timer()
        self._to(State.READY, self._message)
        now = self.upstream.reactor.seconds()
        self.ready_at = now
        interval = self.upstream.settings.ping_interval
        self._timer = self.upstream.reactor.callLater(interval, self._ping)
        self.upstream.handshake_accepted(self)
        self.pool.connection_ready(self)

    def _reject(self, detail: str, cause: str, secret_suspect: bool = False) -> None:
        """
        The middle proxy refused us (or we it): one line naming the likely cause.

        ``secret_suspect``: the failure is one a wrong proxy secret causes.
        """
        if self.failure_reason is None:
            self.failure_reason = detail
            self.upstream.handshake_rejected(self, detail, cause, secret_suspect=secret_suspect)
        self.abort()

    def abort(self) -> None:
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.failure_reason = "no handshake in time"
        self.abort()

    # -- data

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            # Bytes that were on their way when we aborted.
            return
        self.last_received = self.upstream.reactor.seconds()
        decoder = self._decoder
        touched: dict[ClientSession, None] = {}
        try:
            decoder.feed(data)
            for payload in decoder.views():
                self._on_frame(payload, touched)
                if self.dead:
                    break
        except rpc.RPCError as e:
            if self.state is State.READY:
                self.log.warn(
                    "middle proxy {host}:{port} broke the protocol: {error}",
                    host=self.endpoint[0],
                    port=self.endpoint[1],
                    error=e,
                )
                self.abort()
            else:
                # Garbage after the nonce exchange: the keys do not agree.
                self._reject(f"unreadable answer ({e})", "ip", secret_suspect=True)
        finally:
            for session in touched:
                session.flush()

    def _message(self, payload: _Frame, touched: dict[ClientSession, None]) -> None:
        if payload[:4] == _PROXY_ANS_TYPE and len(payload) >= 16:
            (conn_id,) = _u64.unpack_from(payload, 8)
            session = self.sessions.get(conn_id)
            if session is None:
                self._unknown(conn_id)
                return
            session.answer(payload)
            touched[session] = None
            return
        msg = rpc.parse_message(bytes(payload))
        if isinstance(msg, rpc.SimpleAck):
            session = self.sessions.get(msg.conn_id)
            if session is None:
                self._unknown(msg.conn_id)
                return
            session.quick_ack(msg.token)
            touched[session] = None
        elif isinstance(msg, rpc.CloseExt):
            session = self.sessions.pop(msg.conn_id, None)
            self._remember_closed(msg.conn_id)
            if session is not None:
                touched.pop(session, None)
                session.ended_by_me()
        elif isinstance(msg, rpc.Ping):
            self.send([rpc.build_pong(msg.ping_id)])
        elif isinstance(msg, rpc.Pong):
            pass
        else:
            self.log.debug(
                "ignoring a message of type {type:#010x} from a middle proxy",
                type=_u32.unpack_from(payload)[0],
            )

    def _unknown(self, conn_id: int) -> None:
        if conn_id in self._recently_closed:
            return
        self._remember_closed(conn_id)
        self.send([rpc.build_close_conn(conn_id)])

    def _remember_closed(self, conn_id: int) -> None:
        recent = self._recently_closed
        recent[conn_id] = None
        if len(recent) > 1024:
            del recent[next(iter(recent))]

    def send(self, payloads: list[bytes]) -> None:
        self.send_pieces([(payload,) for payload in payloads])

    def send_pieces(self, payloads: list[rpc.Pieces]) -> None:
        """
        Queue payloads (ready state only): all queued from the events of one
        reactor wake-up, by every client here, go out in one write after them.
        """
        if self.state is State.READY:
            self._queued += payloads
            if self._flush_call is None:
                self._flush_call = self.upstream.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        queued, self._queued = self._queued, []
        if queued and self.state is State.READY:
            self._write(self._encoder.encode_pieces(queued))

    def _write(self, data: bytes) -> None:
        _twisted.write(self.transport, data)

    # -- sessions

    def attach(self, session: ClientSession) -> int:
        """
        Add a session; returns its conn_id, unique on this connection.
        """
        while True:
            conn_id = self.upstream.random.getrandbits(64)
            if conn_id and conn_id not in self.sessions:
                break
        self.sessions[conn_id] = session
        return conn_id

    def detach(self, session: ClientSession, tell_me: bool) -> None:
        if self.sessions.get(session.conn_id) is session:
            del self.sessions[session.conn_id]
            self._remember_closed(session.conn_id)
            if tell_me:
                self.send([rpc.build_close_conn(session.conn_id)])
        if not self.sessions:
            # The pool may close an emptied connection at once.
            self.flush()
        self.pool.session_left(self)

    # -- keepalive

    def _ping(self) -> None:
        settings = self.upstream.settings
        reactor = self.upstream.reactor
        self._timer = None
        if reactor.seconds() - self.last_received > settings.ping_timeout:
            self.log.info(
                "middle proxy {host}:{port} silent for {seconds:.0f} s, reconnecting",
                host=self.endpoint[0],
                port=self.endpoint[1],
                seconds=reactor.seconds() - self.last_received,
            )
            self.abort()
            return
        self.send([rpc.build_ping(self.upstream.random.getrandbits(64))])
        self._timer = reactor.callLater(settings.ping_interval, self._ping)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- IPushProducer: our transport's write buffer

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        for session in list(self.sessions.values()):
            session.me_paused()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        for session in list(self.sessions.values()):
            session.me_resumed()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.state is not State.CLOSED:
            self._to(State.CLOSED)
        was = self.closed_in
        self.pool.connections.discard(self)
        self._cancel_timer()
        self.flush()  # only cancels: nothing is written once closed
        sessions, self.sessions = self.sessions, {}
        for session in sessions.values():
            session.lost()
        if was is State.READY:
            self.pool.connection_lost(self, reason)
        else:
            if self.failure_reason is None:
                self.failure_reason = _closed_during(was, reason)
                if was is State.NONCE or was is State.HANDSHAKE:
                    # Dropped without a word: a middle proxy does that to a
                    # key_select it does not know, or to keys that disagree.
                    cause = "clock" if was is State.NONCE else "ip"
                    self.upstream.handshake_rejected(
                        self, self.failure_reason, cause, secret_suspect=True
                    )
            self.pool.connect_failed(
                self.endpoint, self.failure_reason, back_off=not self.secret_refused
            )


_CLOSED_DURING: dict[State | None, str] = {
    State.CONNECTING: "before the handshake",
    State.NONCE: "after our RPC_NONCE",
    State.HANDSHAKE: "after our RPC_HANDSHAKE",
}


def _closed_during(state: State | None, reason: Failure) -> str:
    what = _CLOSED_DURING.get(state, "during the handshake")
    return f"connection closed {what} ({reason.getErrorMessage()})"
