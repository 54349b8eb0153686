"""
The client-facing protocol and, for direct mode, its DC connection.

A client connection reads a fake-TLS ClientHello or an obfuscated2 init,
then relays to a DC (direct mode), to a middle-proxy session
(:mod:`mtproxy_tw.middle`), or, when the handshake fails, to the mask host
(:mod:`mtproxy_tw.fronting`). The protocols only move bytes between
transports and the codecs; every decision about bytes lives in
:mod:`mtproxy_tw.obfuscated2`, :mod:`mtproxy_tw.faketls` and friends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from typing import Protocol as TypingProtocol

from cryptography.hazmat.primitives.ciphers import CipherContext
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _fastwrite, faketls, fronting, obfuscated2, tlsprofile
from mtproxy_tw.core import ProxyCore
from mtproxy_tw.obfuscated2 import (
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    AcceptedInit,
    accept_init,
)
from mtproxy_tw.secrets import Mode, Secret

__all__ = ["ClientFactory", "ClientProtocol", "DCProtocol"]

_TAGS_BY_MODE = {
    Mode.CLASSIC: frozenset({TAG_ABRIDGED, TAG_INTERMEDIATE}),
    Mode.SECURE: frozenset({TAG_PADDED}),
    Mode.TLS: frozenset({TAG_PADDED}),
}

#: First words of HTTP requests; a conforming client's init never starts so.
_HTTP_VERBS = frozenset({b"GET ", b"POST", b"HEAD", b"OPTI", b"PUT ", b"DELE", b"CONN", b"PATC"})


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
    One client's place on a shared middle-proxy connection.

    It is fed the client's decrypted transport stream (frames still in the
    client's own framing) and told when the client goes away.
    """

    def feed(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class MiddleUpstream(TypingProtocol):
    """
    Opens middle-proxy sessions; see :mod:`mtproxy_tw.middle`.
    """

    def attach(self, client: ClientProtocol, dc: int, tag: bytes) -> MiddleSession: ...


def _discard(data: bytes) -> None:
    pass


@implementer(IHalfCloseableProtocol)
class ClientProtocol(Protocol):
    """
    One client: handshake, then a relay.

    States, each a ``_handler`` for incoming bytes: reading the first bytes
    (a ClientHello or an init); after a valid hello, reading the init out of
    TLS records; waiting for the DC or the mask host (the client transport
    is paused and what arrives is queued); relaying to the DC, a middle-proxy
    session or the mask host; closed (bytes are discarded). With fake TLS,
    :meth:`_unwrap` takes records off before the relaying handler.
    """

    log = Logger()
    transport: Transport  # type: ignore[assignment]

    def __init__(self, core: ProxyCore) -> None:
        self.core = core
        self.settings = core.settings
        self.user: str | None = None
        self.dc: int | None = None
        self.closed = False
        self._handler: Callable[[bytes], None] = _discard
        self._buffer = bytearray()
        self._timer: IDelayedCall | None = None
        self._connecting: Deferred[IProtocol] | None = None
        self._upstream: DCProtocol | None = None
        self._session: MiddleSession | None = None
        self._pending: list[bytes] = []
        self._from_client: CipherContext | None = None
        self._to_client: CipherContext | None = None
        self._to_dc: CipherContext | None = None
        self._from_dc: CipherContext | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._seen = -1
        # Fake TLS: the secret the hello matched, and the record layers.
        self._sni: str | None = None
        self._tls_secret: Secret | None = None
        self._tls_in: faketls.TLSRecordReader | None = None
        self._inner: Callable[[bytes], None] = _discard
        # Fronting.
        self._fronting = False
        self._front: fronting.FrontProtocol | None = None
        self._client_eof = False
        self._front_eof = False

    # -- lifecycle

    def connectionMade(self) -> None:
        core = self.core
        if not core.admit(self):
            self.transport.abortConnection()
            return
        _fastwrite.no_delay(self.transport)
        self._handler = self._read_first
        self._timer = core.reactor.callLater(
            self.settings.handshake_timeout, self._handshake_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        self._handler(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        self._handler = _discard
        core = self.core
        core.forget(self)
        core.stats.bytes_from_clients += self.bytes_in
        core.stats.bytes_to_clients += self.bytes_out
        self._cancel_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        upstream = self._upstream
        if upstream is not None:
            _close_peer(upstream.transport)
        session, self._session = self._session, None
        if session is not None:
            session.close()
        front, self._front = self._front, None
        if front is not None:
            _close_peer(front.transport)
        self._pending = []

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def reject(self, reason: str) -> None:
        """
        Give up on a client that did not complete a valid handshake.

        Nothing is sent back: the connection is simply closed.
        """
        self.core.stats.rejected[reason] += 1
        self.log.debug("closing {peer}: {reason}", peer=self.transport.getPeer(), reason=reason)
        self._handler = _discard
        self._buffer = bytearray()
        self._cancel_timer()
        self.transport.loseConnection()

    def evict(self) -> None:
        """
        Make room for a newer connection: this one is still in its
        handshake while the limits are full.
        """
        self.core.handshake_over(self)
        self.reject("evicted")

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._tls_secret is None:
            self.front("handshake-timeout", tls=self.settings.tls_enabled)
        else:
            self.reject("handshake-timeout")

    # -- handshake

    def _read_first(self, data: bytes) -> None:
        """
        The first bytes: a fake-TLS ClientHello or an obfuscated2 init.
        """
        buf = self._buffer
        buf += data
        settings = self.settings
        if settings.tls_enabled and buf[:1] == b"\x16":
            try:
                hello = faketls.read_client_hello(bytes(buf))
            except faketls.TLSError:
                self.front("tls-malformed", tls=True)
                return
            if isinstance(hello, faketls.NeedMore):
                return
            if hello is not None:
                self._accept_hello(hello)
                return
        plain_modes = settings.modes - {Mode.TLS}
        if not plain_modes:
            self.front("not-tls", tls=True)
            return
        if bytes(buf[:4]) in _HTTP_VERBS:
            self.front("http")
            return
        if len(buf) < obfuscated2.INIT_LENGTH:
            return
        init = bytes(buf[: obfuscated2.INIT_LENGTH])
        rest = bytes(buf[obfuscated2.INIT_LENGTH :])
        self.accept_init(init, rest, (Mode.CLASSIC, Mode.SECURE), self.settings.secrets)

    def _accept_hello(self, hello: faketls.HelloRecord) -> None:
        settings = self.settings
        candidates = [(s, s.key) for s in settings.secrets if s.kind is Mode.TLS]
        try:
            match = faketls.verify_client_hello(hello.record, candidates)
        except faketls.TLSError:
            match = None
        if match is None:
            self.front("tls-bad-digest", tls=True)
            return
        self._sni = match.server_name
        if match.server_name is None or match.server_name.lower() not in settings.tls_domains:
            self.front("tls-unknown-sni", tls=True)
            return
        now = self.core.reactor.seconds()
        if not faketls.timestamp_ok(match.timestamp, now, skew=settings.tls_time_skew):
            self.front("tls-stale", tls=True)
            return
        if self.core.replay.check_and_add(b"tls:" + match.client_random):
            self.front("tls-replay", tls=True)
            return
        profile = self.core.tls_profiles.get(match.server_name.lower())
        size = profile.pick_size() if profile else tlsprofile.fallback_size()
        # The site's own choice when the client offers it, as the site would.
        cipher = match.cipher_suite
        if profile is not None and profile.cipher_suite in match.cipher_suites:
            cipher = profile.cipher_suite
        flight = faketls.build_server_hello(
            match.secret,
            match.client_random,
            match.session_id,
            cipher_suite=cipher,
            app_data_len=size,
            key_share_first=profile.key_share_first if profile else True,
        )
        self.transport.write(flight)
        self._tls_secret = match.name
        self._tls_in = faketls.TLSRecordReader()
        rest = bytes(self._buffer[hello.consumed :])
        self._buffer = bytearray()
        self._handler = self._read_tls_init
        if rest:
            self._read_tls_init(rest)

    def _read_tls_init(self, data: bytes) -> None:
        assert self._tls_in is not None and self._tls_secret is not None
        try:
            plain = self._tls_in.feed(data)
        except faketls.TLSError:
            self.reject("tls-bad-record")
            return
        buf = self._buffer
        buf += plain
        if len(buf) < obfuscated2.INIT_LENGTH:
            return
        init = bytes(buf[: obfuscated2.INIT_LENGTH])
        rest = bytes(buf[obfuscated2.INIT_LENGTH :])
        self.accept_init(init, rest, (Mode.TLS,), (self._tls_secret,))

    def accept_init(
        self, init: bytes, rest: bytes, modes: tuple[Mode, ...], secrets: Iterable[Secret]
    ) -> None:
        """
        Match an init against ``secrets``; start the relay, or give up.

        ``rest`` is what followed the init, already out of any TLS records.
        On failure the bytes read so far stay buffered, for fronting.
        """
        matched = self._match(init, modes, secrets)
        tls = Mode.TLS in modes
        if matched is None:
            if tls:
                self.reject("tls-bad-init")
            else:
                self.front("bad-init")
            return
        secret, accepted = matched
        if self.core.replay.check_and_add(init[8:56]):
            if tls:
                self.reject("replay")
            else:
                self.front("replay")
            return
        self._buffer = bytearray()
        self._start(secret, accepted, rest)

    def _match(
        self, init: bytes, modes: tuple[Mode, ...], secrets: Iterable[Secret]
    ) -> tuple[Secret, AcceptedInit] | None:
        enabled = self.settings.modes
        for secret in secrets:
            allowed = secret.admits() & enabled
            tags = frozenset().union(*(_TAGS_BY_MODE[m] for m in modes if m in allowed))
            if not tags:
                continue
            accepted = accept_init(init, secret.key, tags)
            if accepted is not None:
                return secret, accepted
        return None

    # -- fronting

    def front(self, reason: str, tls: bool = False) -> None:
        """
        Hand a failed handshake to the mask host, or close it.

        Fake-TLS failures are always fronted; other failures only when
        masking is on. Every byte read so far is sent first.
        """
        settings = self.settings
        target = settings.mask_target(self._sni) if (tls or settings.masking) else None
        if target is None or self.core.mask_disabled:
            self.reject(reason)
            return
        self.core.handshake_over(self)
        self.core.stats.fronted[reason] += 1
        self.log.debug("fronting {peer}: {reason}", peer=self.transport.getPeer(), reason=reason)
        self._cancel_timer()
        self._fronting = True
        self._pending = []
        if settings.mask_proxy_protocol:
            self._pending.append(
                fronting.proxy_protocol_header(self.transport.getPeer(), self.transport.getHost())
            )
        if self._buffer:
            self._pending.append(bytes(self._buffer))
            self.bytes_in += len(self._buffer)
        self._buffer = bytearray()
        self._handler = self._queue_front
        self.transport.pauseProducing()
        connecting = self._connecting = self.core.connect(target, fronting.FrontFactory(self))
        connecting.addCallbacks(lambda _: None, self._front_failed)
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    def _queue_front(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._pending.append(data)

    def _front_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self.closed:
            return
        self.core.stats.upstream_failures["mask-host"] += 1
        self.log.debug("mask host unreachable: {error}", error=failure.getErrorMessage())
        self.transport.abortConnection()

    def front_connected(self, front: fronting.FrontProtocol) -> None:
        self._connecting = None
        if self.closed:
            front.transport.loseConnection()
            return
        peer, here = front.transport.getPeer(), self.transport.getHost()
        if (getattr(peer, "host", 1), getattr(peer, "port", 1)) == (
            getattr(here, "host", 2),
            getattr(here, "port", 2),
        ):
            self.log.error("the mask host is this proxy's own listening address; not fronting")
            self.core.stats.upstream_failures["mask-loop"] += 1
            front.transport.abortConnection()
            self.transport.abortConnection()
            return
        self._front = front
        front.transport.write(b"".join(self._pending))
        self._pending = []
        front.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(front.transport, True)  # type: ignore[arg-type]
        self._handler = self._relay_to_front
        if self._client_eof:
            front.transport.loseWriteConnection()
        else:
            self.transport.resumeProducing()

    def _relay_to_front(self, data: bytes) -> None:
        assert self._front is not None
        self.bytes_in += len(data)
        _fastwrite.write(self._front.transport, data)

    def front_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        _fastwrite.write(self.transport, data)

    def front_read_closed(self) -> None:
        self._front_eof = True
        if self._client_eof:
            self._close_front_pair()
        elif not self.closed:
            self.transport.loseWriteConnection()

    def front_lost(self) -> None:
        front, self._front = self._front, None
        # The client may still send before its close completes; there is
        # nowhere left to send it.
        self._handler = _discard
        if front is not None and not self.closed:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _close_front_pair(self) -> None:
        if self._front is not None:
            _close_peer(self._front.transport)
        if not self.closed:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    # IHalfCloseableProtocol: a client's half-close matters only when fronting.

    def readConnectionLost(self) -> None:
        self._client_eof = True
        if not self._fronting:
            self.transport.loseConnection()
        elif self._front_eof:
            self._close_front_pair()
        elif self._front is not None:
            self._front.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        if not self._fronting:
            self.transport.loseConnection()

    def _start(self, secret: Secret, accepted: AcceptedInit, rest: bytes) -> None:
        core = self.core
        core.handshake_over(self)
        self._cancel_timer()
        self.user = secret.name
        self.dc = accepted.dc
        core.stats.accepted[secret.name] += 1
        self._from_client = accepted.decryptor
        self._to_client = accepted.encryptor
        if core.middle is not None:
            self._start_middle(core.middle, accepted, rest)
            return
        address, known = self.settings.dcs.lookup(accepted.dc)
        if not known:
            self.log.debug("unknown DC id {dc}, using the default DC", dc=accepted.dc)
        fast = self.settings.fast_mode
        upstream_init = obfuscated2.generate_init(
            accepted.tag,
            accepted.dc,
            fast_keys=(accepted.send_key, accepted.send_iv) if fast else None,
        )
        if fast:
            self._to_client = None
        self._to_dc = upstream_init.encryptor
        self._from_dc = None if fast else upstream_init.decryptor
        self._pending = [upstream_init.wire]
        if rest:
            self._queue(rest)
        self._set_handler(self._queue)
        self.transport.pauseProducing()
        connecting = self._connecting = core.connect(address, _DCFactory(self))
        connecting.addCallbacks(self._connected, self._connect_failed)

    def _set_handler(self, handler: Callable[[bytes], None]) -> None:
        """
        Route incoming bytes to ``handler``, out of TLS records first if needed.
        """
        if self._tls_in is None:
            self._handler = handler
        else:
            self._inner = handler
            self._handler = self._unwrap

    def _unwrap(self, data: bytes) -> None:
        assert self._tls_in is not None
        try:
            plain = self._tls_in.feed(data)
        except faketls.TLSError:
            self.core.stats.rejected["tls-bad-record"] += 1
            self.transport.abortConnection()
            return
        if plain:
            self._inner(plain)

    def _start_middle(self, middle: MiddleUpstream, accepted: AcceptedInit, rest: bytes) -> None:
        self._session = middle.attach(self, accepted.dc, accepted.tag)
        self._set_handler(self._relay_to_middle)
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)
        if rest:
            self._relay_to_middle(rest)

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
        if self._tls_in is not None:
            data = faketls.wrap_records(data)
        _fastwrite.write(self.transport, data)

    def buffered(self) -> int:
        """
        Bytes waiting in this client's write buffer.
        """
        return _fastwrite.buffered(self.transport)

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
        if not self.closed:
            self.transport.loseConnection()

    def _queue(self, data: bytes) -> None:
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
        self.transport.loseConnection()

    def _connected(self, protocol: IProtocol) -> None:
        self._connecting = None
        assert isinstance(protocol, DCProtocol)
        if self.closed:
            protocol.transport.loseConnection()
            return
        self._upstream = protocol
        upstream = protocol.transport
        _fastwrite.no_delay(upstream)
        _fastwrite.set_read_size(upstream)
        _fastwrite.set_read_size(self.transport)
        upstream.write(b"".join(self._pending))
        self._pending = []
        upstream.registerProducer(self.transport, True)  # type: ignore[arg-type]
        self.transport.registerProducer(upstream, True)  # type: ignore[arg-type]
        protocol.relay_to = self._relay_to_client
        self._set_handler(self._relay_to_dc)
        self.transport.resumeProducing()
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    # -- relay

    def _relay_to_dc(self, data: bytes) -> None:
        assert self._upstream is not None
        assert self._from_client is not None and self._to_dc is not None
        self.bytes_in += len(data)
        _fastwrite.write(
            self._upstream.transport, self._to_dc.update(self._from_client.update(data))
        )

    def _relay_to_client(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._from_dc is not None:
            assert self._to_client is not None
            data = self._to_client.update(self._from_dc.update(data))
        if self._tls_in is not None:
            data = faketls.wrap_records(data)
        _fastwrite.write(self.transport, data)

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
            self.transport.abortConnection()
            return
        self._seen = seen
        self._timer = self.core.reactor.callLater(self.settings.idle_timeout, self._idle_check)

    def close_if_idle(self, since: int) -> bool:
        """
        Close unless bytes moved since ``activity()`` returned ``since``.
        """
        relaying = self._upstream is not None or self._session is not None
        if not relaying or self.activity() == since:
            self.transport.loseConnection()
            return True
        return False

    def upstream_lost(self) -> None:
        self._upstream = None
        self._set_handler(_discard)
        if not self.closed:
            self.transport.unregisterProducer()
            self.transport.loseConnection()


def _close_peer(transport: Transport) -> None:
    """
    Close the other side of a pair whose client is gone.

    Bytes still queued toward it can never be answered to anyone, and a
    peer that stopped reading would keep the socket open forever, so a
    full write buffer is dropped (aborted) rather than flushed.
    """
    transport.unregisterProducer()
    if _fastwrite.buffered(transport):
        transport.abortConnection()
    else:
        transport.loseConnection()


class DCProtocol(Protocol):
    """
    The proxy's connection to a DC on behalf of one client.
    """

    transport: Transport  # type: ignore[assignment]

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.relay_to: Callable[[bytes], None] = _discard

    def dataReceived(self, data: bytes) -> None:
        self.relay_to(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay_to = _discard
        self.client.upstream_lost()


class _DCFactory(Factory):
    noisy = False

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> DCProtocol:
        return DCProtocol(self.client)


class ClientFactory(Factory):
    """
    Builds a :class:`ClientProtocol` for every accepted connection.
    """

    noisy = False

    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        return ClientProtocol(self.core)
