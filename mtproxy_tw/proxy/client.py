"""
The client-facing protocol: the handshake machine and the legs, wired to
one client transport. Its lifecycle is an explicit state machine (:class:`State`); every state
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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.fronting.relay import FrontRelay
from mtproxy_tw.proxy.admission import Admission
from mtproxy_tw.proxy.chain import ChainRelay, direct_leg
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.proxy.dcrelay import DCRelay
from mtproxy_tw.proxy.handshake import Accept, Consult, Decision, Front, Handshake, NeedMore
from mtproxy_tw.proxy.interfaces import MiddleSession, MiddleUpstream, Transport
from mtproxy_tw.proxy.legs import Leg
from mtproxy_tw.proxy.middleleg import MiddleLeg
from mtproxy_tw.proxy.states import NEXT, State
from mtproxy_tw.wire import faketls, proxyprotocol
from mtproxy_tw.wire.secrets import Mode

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
        #: The handshake machine, until it has decided (made once connected).
        self.handshake: Handshake | None = None
        self.address = ""
        self._admission: Admission | None = None
        self.user: str | None = None
        self.mode: Mode | None = None
        self.dc: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._handler: Callable[[bytes], None] = _discard
        self._timer: IDelayedCall | None = None
        #: The DC leg, once up, or the front leg.
        self._dc: DCRelay | ChainRelay | None = None
        self._front: FrontRelay | None = None
        self._shadow_target: Any = None
        self._middle: MiddleLeg | None = None
        self._records: faketls.TLSRecordReader | None = None
        self._writer: faketls.RecordWriter | None = None
        self._inner: Callable[[bytes], None] = _discard
        #: What arrived while the shared state was counting the connection.
        self._waiting = b""
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
        self.address = str(getattr(self.transport.getPeer(), "host", ""))
        admission = self._admission = Admission(core, self, self.address)
        _twisted.no_delay(self.transport)
        self._timer = core.reactor.callLater(
            self.settings.handshake_timeout, self._handshake_timed_out
        )
        started = admission.start()
        if not isinstance(started, Deferred):
            self._admitted(started)
            return
        # Being counted by the shared state: a read meanwhile waits, paused.
        self._handler = self._early
        started.addCallback(self._admitted).addErrback(self._shared_failed)

    def _early(self, data: bytes) -> None:
        self._waiting += data
        self.transport.pauseProducing()

    def _admitted(self, refused: str | None) -> None:
        if self.state is not State.HANDSHAKING or self._admission is None:
            return
        core = self.core
        self.handshake = Handshake(
            self.settings,
            None,
            lambda domain: core.tls_profiles.get(domain),
            admit=self._admission.admit,
            refused=refused,
        )
        self._handler = self._read_handshake
        early, self._waiting = self._waiting, b""
        if early:  # paused on it
            self.transport.resumeProducing()
            self._read_handshake(early)

    def _shared_failed(self, failure: Failure) -> None:
        self.log.failure("the shared state failed on {peer}", failure, peer=self.address)
        if self.state is State.HANDSHAKING:
            self.reject("shared-state")

    def dataReceived(self, data: bytes) -> None:
        self._handler(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self._to(State.CLOSED)
        core = self.core
        core.forget(self)
        if self._admission is not None:
            self._admission.closed(self.bytes_in + self.bytes_out)
        core.stats.closed(self.user, self.bytes_in, self.bytes_out)
        self._cancel_timer()
        legs: tuple[Any, ...] = (self._dc, self._front, self._middle)
        self._dc = self._front = self._middle = None
        for leg in legs:
            if leg is not None:
                leg.client_lost()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self, abort: bool = False) -> None:
        """
        End the client's side: gently (what is queued toward it is flushed)
        or, with ``abort``, at once.
        """
        if self.state is not State.CLOSED:
            if self.state is not State.DRAINING:
                self._to(State.DRAINING)
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def _abort(self) -> None:
        self._close(abort=True)

    def reject(self, reason: str) -> None:
        """Give up on a failed handshake: closed, answering nothing more."""
        self.core.stats.rejected[reason] += 1
        self.log.debug("closing {peer}: {reason}", peer=self.transport.getPeer(), reason=reason)
        self._drop_shadow()
        self._cancel_timer()
        self._close()

    def evict(self) -> None:
        """Make room for a newer connection, limits being full: still handshaking."""
        self.core.handshake_over(self)
        self.reject("evicted")

    # -- handshake

    def _read_handshake(self, data: bytes) -> None:
        handshake = self.handshake
        assert handshake is not None
        if self._front is not None:  # the shadow sees what the site would
            self._front.from_client(data)
        consulting = handshake.consulting
        decision = handshake.feed(data, self.core.reactor.seconds())
        if consulting:  # held till the verdict, and nothing more read
            self.transport.pauseProducing()
            return
        self._decided(decision)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.handshake is not None:
            self._decided(self.handshake.timed_out())
        elif self.state is State.HANDSHAKING:  # still being counted
            self.reject("handshake-timeout")

    def _decided(self, decision: Decision) -> None:
        if isinstance(decision, Consult):
            assert self._admission is not None
            consulted = self._admission.consult(decision.key, decision.secret)
            if not isinstance(consulted, Deferred):
                self._consulted(consulted)
            else:  # a read meanwhile is held, and pauses the client
                consulted.addCallback(self._consulted).addErrback(self._shared_failed)
            return
        reply = getattr(decision, "reply", b"")
        if reply:
            # A fake-TLS answer: committed; the shadow, if any, goes.
            self._drop_shadow()
            if self.settings.split_server_hello:  # sent now: a segment of its own
                hello, reply = faketls.split_flight(reply)
                _twisted.write(self.transport, hello)
            self.transport.write(reply)
        if isinstance(decision, NeedMore):
            if not reply and self._front is None:
                self._shadow()
            return
        self.handshake = None  # decided: its memory goes
        self.core.handshake_over(self)
        if not isinstance(decision, Accept) and (
            decision.user is not None or decision.reason.startswith("limit-")
        ):
            assert self._admission is not None
            self._admission.refusal(decision.reason, decision.user)
        if isinstance(decision, Accept):
            self._drop_shadow()
            self._start(decision)
        elif isinstance(decision, Front):
            self._start_front(decision)
        else:
            self._drop_shadow()
            self.reject(decision.reason)

    def _consulted(self, verdict: str | None) -> None:
        handshake = self.handshake
        if handshake is not None and handshake.consulting and self.state is State.HANDSHAKING:
            if handshake.holding:  # paused on it; before deciding, which may pause again
                self.transport.resumeProducing()
            self._decided(handshake.resume(verdict))

    # -- the shadow connection to the mask host

    def _shadow(self) -> None:
        """
        An undecided handshake that would be fronted if it failed: open the
        site's connection now and copy it the bytes, so that whatever the
        client does next, the site's own answer and timing are what it sees
        (our handshake timer no longer applies; the site's does).
        """
        assert self.handshake is not None
        core = self.core
        target = self.handshake.front_target()
        if target is None or core.mask_disabled:
            return
        self._front = self._front_relay(target, self.handshake.pending, shadow=True)
        self._shadow_target = target
        self._cancel_timer()
        # A bound on a client the site never closes on.
        self._timer = core.reactor.callLater(
            max(self.settings.idle_timeout, self.settings.handshake_timeout),
            self._handshake_timed_out,
        )

    def _drop_shadow(self) -> None:
        front, self._front = self._front, None
        if front is not None:
            front.drop()

    def shadow_answered(self) -> None:
        """
        The site answered or closed on the bytes so far: it took them for a
        complete (bad) request, so the client gets the site from now on.
        """
        if self.handshake is not None and self._front is not None and self._front.shadow:
            self._decided(self.handshake.abandon())

    def cut(self, reason: str) -> None:
        """
        End a working connection because its user hit a limit (quota,
        expiry, disabled or removed).
        """
        if self._admission is not None:
            self._admission.cut(self.user, reason)
        self._abort()

    def _start(self, accepted: Accept) -> None:
        core = self.core
        self._cancel_timer()
        secret, init = accepted.secret, accepted.init
        assert self._admission is not None
        self.user, self.mode = self._admission.accepted(secret), accepted.mode
        self.dc = init.dc
        core.stats.accepted[self.user] += 1
        self._records = accepted.records
        if accepted.records is not None:
            self._writer = faketls.RecordWriter()
        if core.middle is not None:
            middle = self._middle = MiddleLeg(
                self,
                from_client=init.decryptor,
                to_client=init.encryptor,
                writer=self._writer,
                clock=core.reactor,
                ad_tag=self._admission.ad_tag(self.user),
            )
            # Relaying before the session exists: attaching may end it at once.
            self._to(State.RELAYING, middle.relay)
            middle.attach(core.middle, init.dc, init.tag)
            if self.state is not State.RELAYING:
                return
            self._timer = core.reactor.callLater(self.settings.idle_timeout, self._idle_check)
            if accepted.rest:
                middle.relay(accepted.rest)
            return
        address, known = self.settings.dcs.lookup(init.dc)
        if not known:
            self.log.debug("unknown DC id {dc}, using the default DC", dc=init.dc)
        dc = self._dc = direct_leg(
            self,
            core.endpoint(address),
            init,
            back=self.settings.upstream,
            fast=self.settings.fast_mode,
            from_client=init.decryptor,
            to_client=init.encryptor,
            writer=self._writer,
            clock=core.reactor,
            splice=self.settings.splice,
        )
        self._to(State.CONNECTING, dc.queue)
        if accepted.rest:
            dc.queue(accepted.rest)

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

    # -- what the DC leg calls

    def dc_up(self) -> None:
        assert self._dc is not None
        self._to(State.RELAYING, self._dc.relay)
        self.transport.resumeProducing()
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    def dc_lost(self) -> None:
        self._close()

    def dc_failed(self, failure: Failure) -> None:
        self.core.stats.upstream_failures["connect"] += 1
        self.log.info(
            "DC {dc} unreachable for {user}: {error}",
            dc=self.dc,
            user=self.user,
            error=failure.getErrorMessage(),
        )
        self._close()

    @property
    def _upstream(self) -> Leg | None:
        """
        The connection to the DC, once up (direct mode).
        """
        return self._dc.leg if self._dc is not None else None

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
        relay = self._front
        if relay is not None and relay.shadow and front.target == self._shadow_target:
            # The site has had every byte already, and its answer is waiting.
            self._to(State.FRONTING, relay.from_client)
            relay.release()
        else:
            self._drop_shadow()
            relay = self._front = self._front_relay(front.target, front.buffered)
            self._to(State.FRONTING, relay.from_client)
        if not self.closed:
            self._timer = core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    def _front_relay(self, target: Any, sent: bytes, shadow: bool = False) -> FrontRelay:
        first = []
        if self.settings.mask_proxy_protocol:
            peer, here = self.transport.getPeer(), self.transport.getHost()
            first.append(proxyprotocol.proxy_protocol_header(peer, here))
        if sent:
            first.append(sent)
            self.bytes_in += len(sent)
        return FrontRelay(self, self.core.local_endpoint(target), first, shadow=shadow)

    # -- what the front leg calls

    def front_closed(self) -> None:
        self._close()

    def front_failed(self, why: str) -> None:
        self.core.stats.upstream_failures[why] += 1
        if why == "mask-host":
            self._close()  # as a busy TLS server closes: the front leg chose when
        else:
            self._abort()

    # IHalfCloseableProtocol: a client's half-close matters only when fronting.

    def readConnectionLost(self) -> None:
        if self.state is State.HANDSHAKING and self._front is not None:
            # Undecided, and the site is listening: it sees the end too.
            self.shadow_answered()
        if self._front is not None and self.state is State.FRONTING:
            self._front.client_read_closed()
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        if self.state is not State.FRONTING:
            self._close()

    # -- what the middle leg calls

    def session_closed(self) -> None:
        """
        The middle proxy or the pool ended this client's session.
        """
        self._middle = None
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
        relaying = self._upstream is not None or self._middle is not None
        if not relaying or self.activity() == since:
            self._close()
            return True
        return False
