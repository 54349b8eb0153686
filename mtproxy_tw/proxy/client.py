"""
The client-facing protocol: a thin wiring of the handshake machine, the
legs and the ciphers to one client transport.

Its lifecycle is an explicit state machine (:class:`State`); every state
has one handler for incoming bytes, set only by :meth:`ClientProtocol._to`::

    HANDSHAKING ─accept (direct)─▶ CONNECTING ─leg up─▶ RELAYING ─┐
        │  └──accept (middle)──────────────────────────▶ RELAYING ─┤
        ├─front─▶ FRONTING (:mod:`mtproxy_tw.fronting.relay`) ─────┤
        └─reject──────────────────────────────────────────────────▶ DRAINING ─▶ CLOSED

Any state may go to CLOSED when the client's connection is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers import CipherContext
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.fronting.relay import FrontRelay
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.handshake import Accept, Decision, Front, Handshake, NeedMore
from mtproxy_tw.proxy.interfaces import MiddleSession, MiddleUpstream, Transport
from mtproxy_tw.proxy.legs import Leg, close_peer
from mtproxy_tw.proxy.states import NEXT, State
from mtproxy_tw.wire import faketls, obfuscated2, proxyprotocol

__all__ = ["ClientProtocol", "MiddleSession", "MiddleUpstream", "State"]


def _discard(data: bytes) -> None:
    pass


@implementer(IHalfCloseableProtocol)
class ClientProtocol(Protocol):
    """
    One client: handshake, then a relay to a DC leg, a middle-proxy session
    or the mask host.
    """

    log = Logger()
    transport: Transport  # type: ignore[assignment]

    def __init__(self, core: ProxyCore) -> None:
        self.core = core
        self.settings = core.settings
        self.state = State.HANDSHAKING
        #: The handshake machine, until it has decided.
        self.handshake: Handshake | None = Handshake(
            self.settings, core.replay, lambda domain: core.tls_profiles.get(domain)
        )
        self.user: str | None = None
        self.dc: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._handler: Callable[[bytes], None] = _discard
        self._timer: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        #: The DC leg, once up, or the front leg.
        self._upstream: Leg | None = None
        self._front: FrontRelay | None = None
        self._session: MiddleSession | None = None
        self._pending: list[bytes] = []
        self._from_client: CipherContext | None = None
        self._to_client: CipherContext | None = None
        self._to_dc: CipherContext | None = None
        self._from_dc: CipherContext | None = None
        self._records: faketls.TLSRecordReader | None = None
        self._inner: Callable[[bytes], None] = _discard
        self._seen = -1

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _to(self, state: State, handler: Callable[[bytes], None] = _discard) -> None:
        """
        Enter ``state``; incoming bytes go to ``handler`` from now on (out
        of fake-TLS records first, once the client is past its handshake).
        """
        if state not in NEXT[self.state]:
            raise RuntimeError(f"{self.state.name} -> {state.name}")
        self.state = state
        if self._records is not None and handler is not _discard:
            self._inner = handler
            self._handler = self._unwrap
        else:
            self._handler = handler

    # -- lifecycle

    def connectionMade(self) -> None:
        core = self.core
        if not core.admit(self):
            self._abort()
            return
        _twisted.no_delay(self.transport)
        self._handler = self._read_handshake
        self._timer = core.reactor.callLater(
            self.settings.handshake_timeout, self._handshake_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        self._handler(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self._to(State.CLOSED)
        core = self.core
        core.forget(self)
        core.stats.bytes_from_clients += self.bytes_in
        core.stats.bytes_to_clients += self.bytes_out
        self._cancel_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        upstream, self._upstream = self._upstream, None
        if upstream is not None and not upstream.lost:
            close_peer(upstream.transport)
        front, self._front = self._front, None
        if front is not None:
            front.client_lost()
        session, self._session = self._session, None
        if session is not None:
            session.close()
        self._pending = []

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self) -> None:
        """
        End the client's side gently: what is queued toward it is flushed.
        """
        if self.state is not State.CLOSED:
            if self.state is not State.DRAINING:
                self._to(State.DRAINING)
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self.state is not State.CLOSED:
            if self.state is not State.DRAINING:
                self._to(State.DRAINING)
            self.transport.abortConnection()

    def reject(self, reason: str) -> None:
        """
        Give up on a client that did not complete a valid handshake.

        Nothing more is sent back: the connection is simply closed.
        """
        self.core.stats.rejected[reason] += 1
        self.log.debug("closing {peer}: {reason}", peer=self.transport.getPeer(), reason=reason)
        self._cancel_timer()
        self._close()

    def evict(self) -> None:
        """
        Make room for a newer connection: this one is still in its
        handshake while the limits are full.
        """
        self.core.handshake_over(self)
        self.reject("evicted")

    # -- handshake

    def _read_handshake(self, data: bytes) -> None:
        assert self.handshake is not None
        self._decided(self.handshake.feed(data, self.core.reactor.seconds()))

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.handshake is not None:
            self._decided(self.handshake.timed_out())

    def _decided(self, decision: Decision) -> None:
        reply = getattr(decision, "reply", b"")
        if reply:
            self.transport.write(reply)
        if isinstance(decision, NeedMore):
            return
        self.handshake = None  # decided: its memory goes
        self.core.handshake_over(self)
        if isinstance(decision, Accept):
            self._start(decision)
        elif isinstance(decision, Front):
            self._start_front(decision)
        else:
            self.reject(decision.reason)

    def _start(self, accepted: Accept) -> None:
        core = self.core
        self._cancel_timer()
        secret, init = accepted.secret, accepted.init
        self.user = secret.name
        self.dc = init.dc
        core.stats.accepted[secret.name] += 1
        self._from_client = init.decryptor
        self._to_client = init.encryptor
        self._records = accepted.records
        if core.middle is not None:
            # Relaying before the session exists: attaching may end it at once.
            self._to(State.RELAYING, self._relay_to_middle)
            session = core.middle.attach(self, init.dc, init.tag)
            if self.state is not State.RELAYING:
                return
            self._session = session
            self._timer = core.reactor.callLater(self.settings.idle_timeout, self._idle_check)
            if accepted.rest:
                self._relay_to_middle(accepted.rest)
            return
        address, known = self.settings.dcs.lookup(init.dc)
        if not known:
            self.log.debug("unknown DC id {dc}, using the default DC", dc=init.dc)
        fast = self.settings.fast_mode
        upstream_init = obfuscated2.generate_init(
            init.tag, init.dc, fast_keys=(init.send_key, init.send_iv) if fast else None
        )
        if fast:
            self._to_client = None
        self._to_dc = upstream_init.encryptor
        self._from_dc = None if fast else upstream_init.decryptor
        self._pending = [upstream_init.wire]
        self._to(State.CONNECTING, self._queue_dc)
        if accepted.rest:
            self._queue_dc(accepted.rest)
        self.transport.pauseProducing()
        connecting = self._connecting = connectProtocol(core.endpoint(address), Leg(self))
        connecting.addErrback(self._connect_failed)

    def _unwrap(self, data: bytes) -> None:
        assert self._records is not None
        try:
            plain = self._records.feed(data)
        except faketls.TLSError:
            self.core.stats.rejected["tls-bad-record"] += 1
            self._abort()
            return
        if plain:
            self._inner(plain)

    def _queue_dc(self, data: bytes) -> None:
        assert self._from_client is not None and self._to_dc is not None
        self.bytes_in += len(data)
        self._pending.append(self._to_dc.update(self._from_client.update(data)))

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self.closed:
            return
        self.core.stats.upstream_failures["connect"] += 1
        self.log.info(
            "DC {dc} unreachable for {user}: {error}",
            dc=self.dc,
            user=self.user,
            error=failure.getErrorMessage(),
        )
        self._close()

    # -- fronting

    def _start_front(self, front: Front) -> None:
        """
        Hand a failed handshake to the mask host: every byte read so far
        is sent first.
        """
        core = self.core
        if core.mask_disabled:
            self.reject(front.reason)
            return
        core.stats.fronted[front.reason] += 1
        self.log.debug(
            "fronting {peer}: {reason}", peer=self.transport.getPeer(), reason=front.reason
        )
        self._cancel_timer()
        first = []
        if self.settings.mask_proxy_protocol:
            peer, here = self.transport.getPeer(), self.transport.getHost()
            first.append(proxyprotocol.proxy_protocol_header(peer, here))
        if front.buffered:
            first.append(front.buffered)
            self.bytes_in += len(front.buffered)
        relay = self._front = FrontRelay(self, core.endpoint(front.target), first)
        self._to(State.FRONTING, relay.from_client)
        self._timer = core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    # -- what the front leg calls

    def front_closed(self) -> None:
        self._close()

    def front_failed(self, why: str) -> None:
        self.core.stats.upstream_failures[why] += 1
        self._abort()

    # -- what a leg calls

    def leg_connected(self, leg: Leg) -> None:
        self._connecting = None
        if self.closed:
            leg.transport.loseConnection()
            return
        self._upstream = leg
        transport = leg.transport
        _twisted.no_delay(transport)
        _twisted.set_read_size(transport)
        _twisted.set_read_size(self.transport)
        transport.write(b"".join(self._pending))
        self._pending = []
        transport.registerProducer(self.transport, True)
        self.transport.registerProducer(transport, True)  # type: ignore[arg-type]
        self._to(State.RELAYING, self._relay_to_dc)
        self.transport.resumeProducing()
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    def leg_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._from_dc is not None:
            assert self._to_client is not None
            data = self._to_client.update(self._from_dc.update(data))
        if self._records is not None:
            data = faketls.wrap_records(data)
        _twisted.write(self.transport, data)

    def leg_read_closed(self) -> None:
        pass  # a DC leg is not half-closeable: its end is a loss

    def leg_lost(self, leg: Leg) -> None:
        if leg is not self._upstream:
            return
        self._upstream = None
        if not self.closed:
            # The client may still send before its close completes; there
            # is nowhere left to send it.
            self.transport.unregisterProducer()
            self._close()

    # IHalfCloseableProtocol: a client's half-close matters only when fronting.

    def readConnectionLost(self) -> None:
        if self._front is not None and self.state is State.FRONTING:
            self._front.client_read_closed()
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        if self.state is not State.FRONTING:
            self._close()

    # -- relay

    def _relay_to_dc(self, data: bytes) -> None:
        assert self._upstream is not None
        assert self._from_client is not None and self._to_dc is not None
        self.bytes_in += len(data)
        _twisted.write(
            self._upstream.transport, self._to_dc.update(self._from_client.update(data))
        )

    def _relay_to_middle(self, data: bytes) -> None:
        assert self._from_client is not None and self._session is not None
        self.bytes_in += len(data)
        self._session.feed(self._from_client.update(data))

    # -- what a middle-proxy session calls

    def deliver(self, framed: bytes) -> None:
        """
        Send bytes already in the client's transport framing.
        """
        if self.closed:
            return
        assert self._to_client is not None
        self.bytes_out += len(framed)
        data = self._to_client.update(framed)
        if self._records is not None:
            data = faketls.wrap_records(data)
        _twisted.write(self.transport, data)

    def buffered(self) -> int:
        """
        Bytes waiting in this client's write buffer.
        """
        return _twisted.buffered(self.transport)

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resumeProducing()

    def session_closed(self) -> None:
        """
        The middle proxy or the pool ended this client's session.
        """
        self._session = None
        self._close()

    # -- idleness

    def activity(self) -> int:
        """
        A number that changes whenever bytes move either way.
        """
        return self.bytes_in + self.bytes_out

    def _idle_check(self) -> None:
        seen = self.activity()
        if seen == self._seen:
            self._timer = None
            self.core.stats.idle_closed += 1
            self.log.debug("closing idle connection of {user}", user=self.user)
            self._abort()
            return
        self._seen = seen
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    def close_if_idle(self, since: int) -> bool:
        """
        Close unless bytes moved since ``activity()`` returned ``since``.
        """
        relaying = self._upstream is not None or self._session is not None
        if not relaying or self.activity() == since:
            self._close()
            return True
        return False
