"""
Middle-proxy mode: clients multiplexed over RPC connections to Telegram's
middle proxies (PROTOCOL.md section 8).

- :class:`MiddleProxy` is the upstream the relay talks to
  (``core.middle``): :meth:`MiddleProxy.attach` gives every client a
  :class:`ClientSession` on the pool of its DC.
- :class:`DCPool` keeps ``pool_min`` .. ``pool_max`` :class:`MEConnection`
  per DC, binds each client to the least loaded one, grows with load, skips
  unreachable middle proxies with backoff and re-establishes lost
  connections.
- :class:`MEConnection` is one RPC channel: nonce exchange, key derivation
  with the external address, RPC_HANDSHAKE with real process ids, then
  RPC_PROXY_REQ out and RPC_PROXY_ANS / SIMPLE_ACK / CLOSE_EXT / PING in.
- :class:`ExternalAddress` decides which address enters the key derivation:
  ``--nat-ip``, a public local address, else an HTTP look-up.

Flow control: one slow client never pauses an RPC connection (that would
stall every other client on it); its bytes queue in its own transport up to
``client_buffer_cap`` and then that client alone is closed (the middle
proxy is told with RPC_CLOSE_CONN). When an RPC connection's own write
buffer fills, the clients writing to it are paused until it drains.
"""

from __future__ import annotations

import ipaddress
import os
import random as _random
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from typing import Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw import _twisted
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.telegramconfig import DEFAULT_PROXY_SECRET, fetch
from mtproxy_tw.wire import obfuscated2, rpc
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED
from mtproxy_tw.wire.proxyconfig import (
    FALLBACK_CONFIG_V4,
    FALLBACK_CONFIG_V6,
    Endpoint,
    ProxyConfig,
)
from mtproxy_tw.wire.transports import TransportError, codec_for_tag

__all__ = [
    "DEFAULT_IP_LOOKUP_URL",
    "ClientSession",
    "ConfigSource",
    "DCPool",
    "ExternalAddress",
    "MEConnection",
    "MiddleClient",
    "MiddleProxy",
    "MiddleSettings",
    "StaticConfig",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_IP_LOOKUP_URL = "https://icanhazip.com/"

_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")
_PROXY_REQ_TYPE = _u32.pack(rpc.RPC_PROXY_REQ)
_PROXY_ANS_TYPE = _u32.pack(rpc.RPC_PROXY_ANS)
_ZERO8 = bytes(8)
_ANS_HEADER = 16  # type, flags, conn_id
_ABRIDGED_SHORT = [bytes([words]) for words in range(0x7F)]


def _abridged_long(words: int) -> bytes:
    return b"\x7f" + words.to_bytes(3, "little")


_ANY_V4 = ipaddress.IPv4Address(0)
#: A ready connection lost within this many seconds counts as a flap.
_SHORT_LIVED = 5.0


@dataclass(frozen=True)
class MiddleSettings:
    """
    Everything middle-proxy mode needs besides the core's settings.

    :ivar ad_tag: the 16-byte tag from @MTProxybot, sent in every request
        (never logged); None sends requests without one.
    :ivar nat_ips: the proxy's public addresses as the middle proxies see
        them (at most one per IP version is used).
    :ivar pool_min: RPC connections kept per DC once it has had a client.
    :ivar pool_max: most RPC connections per DC.
    :ivar clients_per_connection: load above which a pool opens another
        connection (up to ``pool_max``).
    :ivar client_buffer_cap: bytes a client may have queued toward it
        before it is closed.
    :ivar pending_limit: bytes a client may send before its RPC connection
        is ready; reading from it pauses above that.
    :ivar direct_fallback: clients of a DC whose middle proxies are all
        unreachable go to the DC directly (without the ad tag).
    :ivar wait_timeout: seconds a client waits for an RPC connection.
    """

    ad_tag: bytes | None = field(default=None, repr=False)
    nat_ips: tuple[IPAddress, ...] = ()
    ip_lookup_url: str = DEFAULT_IP_LOOKUP_URL
    proxy_config_url: str = "https://core.telegram.org/getProxyConfig"
    proxy_config_v6_url: str = "https://core.telegram.org/getProxyConfigV6"
    proxy_secret_url: str = "https://core.telegram.org/getProxySecret"
    config_refresh: float = 3600.0
    http_timeout: float = 10.0
    pool_min: int = 2
    pool_max: int = 8
    clients_per_connection: int = 300
    client_buffer_cap: int = 8 << 20
    pending_limit: int = 1 << 20
    direct_fallback: bool = False
    prefer_ipv6: bool = False
    handshake_timeout: float = 10.0
    ping_interval: float = 10.0
    ping_timeout: float = 35.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    wait_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.ad_tag is not None and len(self.ad_tag) != 16:
            raise ValueError("the ad tag must be 16 bytes")
        if not 1 <= self.pool_min <= self.pool_max:
            raise ValueError("need 1 <= pool_min <= pool_max")


class ConfigSource(TypingProtocol):
    """
    Where the pools read the middle-proxy lists and the proxy secret.

    Read at every new connection, so a refreshed config applies to new
    connections while existing ones keep going. ``secret`` is the proxy
    secret in use; ``candidate`` (or None) a new one not tried yet: new
    connections use it, and the first handshake made with it is reported
    with :meth:`secret_accepted` or :meth:`secret_refused`.
    """

    @property
    def config_v4(self) -> ProxyConfig: ...
    @property
    def config_v6(self) -> ProxyConfig: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def candidate(self) -> bytes | None: ...
    @property
    def clock_skew(self) -> float | None: ...
    def secret_accepted(self, secret: bytes) -> None: ...
    def secret_refused(self, secret: bytes, reason: str) -> None: ...


@dataclass
class StaticConfig:
    """
    A config source that never changes (tests, or a fixed set of files).
    """

    config_v4: ProxyConfig = FALLBACK_CONFIG_V4
    config_v6: ProxyConfig = FALLBACK_CONFIG_V6
    secret: bytes = field(default=DEFAULT_PROXY_SECRET, repr=False)
    clock_skew: float | None = None
    candidate: bytes | None = field(default=None, init=False, repr=False)

    def secret_accepted(self, secret: bytes) -> None:
        pass

    def secret_refused(self, secret: bytes, reason: str) -> None:
        pass


class _Addresses(TypingProtocol):
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def abortConnection(self) -> None: ...


class MiddleClient(TypingProtocol):
    """
    What a session uses of its client (:class:`mtproxy_tw.proxy.client.ClientProtocol`).
    """

    @property
    def transport(self) -> _Addresses: ...
    def deliver(self, framed: bytes) -> None: ...
    def buffered(self) -> int: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def session_closed(self) -> None: ...


# -- addresses


def _ip(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _address(addr: IAddress) -> tuple[IPAddress, int]:
    """
    ``(ip, port)`` of a Twisted address; 0.0.0.0:0 for non-IP ones.
    """
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return _ANY_V4, 0
    try:
        return _ip(host), port
    except ValueError:
        return _ANY_V4, 0


def _is_public(ip: IPAddress) -> bool:
    return ip.is_global


class ExternalAddress:
    """
    The proxy's address as a middle proxy sees it (it enters the key derivation).

    Order: the ``--nat-ip`` of the connection's IP version; the local
    address if it is public; the result of an HTTP look-up; the local
    address. A middle proxy on a private or loopback address sees the local
    address itself.
    """

    log = Logger()
    RETRY_AFTER = 60.0

    def __init__(
        self,
        reactor: Any,
        nat_ips: Iterable[IPAddress] = (),
        lookup_url: str = DEFAULT_IP_LOOKUP_URL,
        http_client: Any = None,
        timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.nat: dict[int, IPAddress] = {}
        for ip in nat_ips:
            self.nat.setdefault(ip.version, ip)
        self.lookup_url = lookup_url
        self.http_client = http_client
        self.timeout = timeout
        self.looked_up: dict[int, IPAddress] = {}
        self._waiters: list[Deferred[None]] | None = None
        self._failed_at: float | None = None

    def public(self, version: int) -> IPAddress | None:
        """
        The known public address of this IP version, without looking it up.
        """
        return self.nat.get(version) or self.looked_up.get(version)

    def for_connection(self, local: IPAddress, peer: IPAddress) -> Deferred[IPAddress]:
        """
        The address to use in the key derivation of a connection ``local`` -> ``peer``.
        """
        if not _is_public(peer):
            return succeed(local)
        known = self.nat.get(local.version)
        if known is not None:
            return succeed(known)
        if _is_public(local):
            return succeed(local)
        if local.version in self.looked_up:
            return succeed(self.looked_up[local.version])
        return self.lookup().addCallback(lambda _: self.looked_up.get(local.version, local))

    def forget(self) -> None:
        """
        Drop the looked-up address (after a handshake failure it may be stale).
        """
        self.looked_up.clear()
        self._failed_at = None

    def lookup(self) -> Deferred[None]:
        """
        Ask ``lookup_url`` for our address; never fails (a failure is logged).
        """
        d: Deferred[None] = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        now = self.reactor.seconds()
        if self._failed_at is not None and now - self._failed_at < self.RETRY_AFTER:
            return succeed(None)
        self._waiters = [d]
        if self.http_client is None:
            from mtproxy_tw.telegramconfig import default_http_client

            self.http_client = default_http_client(self.reactor)
        fetching = fetch(
            self.http_client, self.lookup_url, clock=self.reactor, timeout=self.timeout, limit=256
        )
        fetching.addCallbacks(self._found, self._failed).addBoth(self._finished)
        return d

    def _found(self, fetched: Any) -> None:
        try:
            ip = _ip(fetched.body.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            self._failed(Failure(ValueError("the answer is not an IP address")))
            return
        self.looked_up[ip.version] = ip
        self._failed_at = None
        self.log.info("external address (from {url}): {ip}", url=self.lookup_url, ip=str(ip))

    def _failed(self, failure: Failure) -> None:
        self._failed_at = self.reactor.seconds()
        self.log.warn(
            "cannot learn the external address from {url} ({error}); "
            "the middle proxies may reject the handshake: set --nat-ip",
            url=self.lookup_url,
            error=failure.getErrorMessage() or repr(failure.value),
        )

    def _finished(self, result: object) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(None)


# -- one client


class ClientSession:
    """
    One client's place on an RPC connection of its DC's pool.

    Until it is bound to a ready connection it keeps what the client sends
    (raw, at most ``pending_limit`` bytes before reading pauses); then every
    complete packet of a read goes out as RPC_PROXY_REQs in one write.
    """

    log = Logger()

    def __init__(self, upstream: MiddleProxy, client: MiddleClient, dc: int, tag: bytes) -> None:
        self.upstream = upstream
        self.client = client
        self.dc = dc
        self.tag = tag
        self.codec = codec_for_tag(tag)
        self.reverse_acks = tag == TAG_ABRIDGED
        self.pool: DCPool | None = None
        self.conn: MEConnection | None = None
        self.conn_id = 0
        self.closed = False
        self.direct: _DirectLeg | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pauses: set[str] = set()
        self._wait_timer: IDelayedCall | None = None
        self._rest = b""  # PROXY_REQ bytes after the flags, for this conn_id
        self._flags = 0
        self._out: list[bytes | memoryview] = []
        transport = client.transport
        self.client_addr = _address(transport.getPeer())
        host_ip, host_port = _address(transport.getHost())
        public = upstream.external.public(host_ip.version)
        self.proxy_addr = (
            public if public is not None and not host_ip.is_loopback else host_ip,
            host_port,
        )

    # -- what the relay calls

    def feed(self, data: bytes) -> None:
        """
        Bytes from the client, still in its transport framing.
        """
        if self.closed:
            return
        conn = self.conn
        if conn is None:
            if self.direct is not None:
                self.direct.send(data)
                return
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > self.upstream.settings.pending_limit:
                self._pause("pending")
            return
        try:
            packets = self.codec.feed(data)
        except TransportError as e:
            self._fail(f"bad transport framing: {e}")
            return
        if not packets:
            return
        head, rest = _PROXY_REQ_TYPE, self._rest
        base = self._flags
        payloads = []
        for packet in packets:
            payload = packet.payload
            if len(payload) & 3:
                self._fail("packet length is not a multiple of 4")
                return
            flags = base
            if payload[:8] == _ZERO8:
                flags |= rpc.FLAG_NOT_ENCRYPTED
            if packet.quick_ack:
                flags |= rpc.FLAG_QUICKACK
            payloads.append(b"".join((head, _u32.pack(flags), rest, payload)))
        conn.send(payloads)

    def close(self) -> None:
        """
        The client went away.
        """
        if self.closed:
            return
        self._finish()
        if self.conn is not None:
            self.conn.detach(self, tell_me=True)
            self.conn = None

    # -- binding

    def wait(self, pool: DCPool) -> None:
        self.pool = pool
        timeout = self.upstream.settings.wait_timeout
        self._wait_timer = self.upstream.reactor.callLater(timeout, self._waited_too_long)

    def _waited_too_long(self) -> None:
        self._wait_timer = None
        if self.pool is not None:
            self.pool.forget_waiting(self)
        self.upstream.counters["wait-timeout"] += 1
        self._fail("no middle-proxy connection in time")

    def bind(self, conn: MEConnection) -> None:
        """
        Start using a ready connection: pick a conn_id and send what waited.
        """
        self._cancel_wait()
        self.conn = conn
        self.conn_id = conn.attach(self)
        template = rpc.build_proxy_req(
            conn_id=self.conn_id,
            client_addr=self.client_addr,
            proxy_addr=self.proxy_addr,
            data=b"",
            tag=self.tag,
            ad_tag=self.upstream.settings.ad_tag,
        )
        self._flags = _u32.unpack_from(template, 4)[0]
        self._rest = template[8:]
        if conn.paused:
            self._pause("me")
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            self.feed(b"".join(pending))
        self._resume("pending")

    def go_direct(self) -> None:
        """
        Carry this client straight to its DC (fallback; no ad tag).
        """
        self._cancel_wait()
        pending, self._pending, self._pending_size = self._pending, [], 0
        leg = _DirectLeg(self, b"".join(pending))
        if self.closed:
            leg.close()
            return
        self.direct = leg
        self._resume("pending")

    def _cancel_wait(self) -> None:
        if self._wait_timer is not None and self._wait_timer.active():
            self._wait_timer.cancel()
        self._wait_timer = None

    # -- what the connection calls

    def answer(self, message: bytes) -> None:
        """
        Queue the data of an RPC_PROXY_ANS (``message`` whole) for the client,
        framed in its transport; :meth:`flush` sends.

        Framed here rather than by the codec so that each byte is copied
        once, by the join in :meth:`flush`.
        """
        body = memoryview(message)[_ANS_HEADER:]
        size = len(body)
        out = self._out
        tag = self.tag
        if tag == TAG_PADDED:
            # Two random bits for the padding length, up to three bytes of it.
            noise = os.urandom(4)
            pad = noise[0] & 3
            out += (_u32.pack(size + pad), body, noise[1 : 1 + pad])
        elif tag == TAG_INTERMEDIATE:
            out += (_u32.pack(size), body)
        else:
            # RPC frames are whole 4-byte words, so is every answer.
            words = size >> 2
            header = _ABRIDGED_SHORT[words] if words < 0x7F else _abridged_long(words)
            out += (header, body)

    def quick_ack(self, token: bytes) -> None:
        self._out.append(token[::-1] if self.reverse_acks else token)

    def flush(self) -> None:
        """
        Deliver everything queued in one write, then enforce the buffer cap.
        """
        out = self._out
        if not out or self.closed:
            out.clear()
            return
        self._out = []
        self.deliver(bytes(out[0]) if len(out) == 1 else b"".join(out))

    def deliver(self, data: bytes) -> None:
        client = self.client
        client.deliver(data)
        if client.buffered() > self.upstream.settings.client_buffer_cap:
            self.upstream.counters["buffer-cap"] += 1
            self.upstream.core.stats.upstream_failures["middle-client-buffer"] += 1
            self._fail("client reads too slowly (buffer cap reached)", level="info")
            # Closing politely would wait for the client to read the queue.
            client.transport.abortConnection()

    def me_paused(self) -> None:
        self._pause("me")

    def me_resumed(self) -> None:
        self._resume("me")

    def ended_by_me(self) -> None:
        """
        RPC_CLOSE_EXT: the middle proxy ended this session.
        """
        self.flush()
        self.conn = None
        self._finish()
        self.client.session_closed()

    def lost(self) -> None:
        """
        The connection carrying this session is gone.
        """
        self._out.clear()
        self.conn = None
        if not self.closed:
            self._finish()
            self.client.session_closed()

    # -- internals

    def _pause(self, reason: str) -> None:
        if not self._pauses:
            self.client.pause_reading()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self.closed:
                self.client.resume_reading()

    def _finish(self) -> None:
        self.closed = True
        self._cancel_wait()
        self._pending = []
        self._out = []
        if self.pool is not None:
            self.pool.forget_waiting(self)
        if self.direct is not None:
            self.direct.close()
            self.direct = None

    def _fail(self, reason: str, level: str = "debug") -> None:
        """
        End the session from our side: tell the middle proxy, close the client.
        """
        if self.closed:
            return
        getattr(self.log, level)(
            "closing a client of DC {dc}: {reason}", dc=self.dc, reason=reason
        )
        conn, self.conn = self.conn, None
        self._finish()
        if conn is not None:
            conn.detach(self, tell_me=True)
        self.client.session_closed()


@implementer(IPushProducer)
class _DirectLeg(Protocol):
    """
    Direct-mode fallback for one client: obfuscated2 to the DC, no ad tag.
    """

    transport: Any

    def __init__(self, session: ClientSession, first: bytes) -> None:
        self.session = session
        upstream = session.upstream
        self.init = obfuscated2.generate_init(session.tag, session.dc)
        self._pending: list[bytes] | None = [self.init.wire, self.init.encryptor.update(first)]
        self._closed = False
        address, _ = upstream.core.settings.dcs.lookup(session.dc)
        self._connecting: Deferred[IProtocol] | None = upstream.core.connect(address, _Given(self))
        self._connecting.addErrback(self._failed)

    def send(self, data: bytes) -> None:
        data = self.init.encryptor.update(data)
        if self._pending is not None:
            self._pending.append(data)
        else:
            _twisted.write(self.transport, data)

    def connectionMade(self) -> None:
        self._connecting = None
        if self._closed:
            self.transport.loseConnection()
            return
        pending, self._pending = self._pending or [], None
        self.transport.registerProducer(self, True)
        _twisted.write(self.transport, b"".join(pending))

    def dataReceived(self, data: bytes) -> None:
        if not self._closed:
            self.session.deliver(self.init.decryptor.update(data))

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not failure.check(CancelledError):
            self.session._fail(f"DC unreachable in direct fallback: {failure.getErrorMessage()}")

    def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._closed:
            self._closed = True
            self.session._fail("the DC closed the direct connection")

    # The DC connection's write buffer is full: stop reading the client.
    def pauseProducing(self) -> None:
        self.session._pause("direct")

    def resumeProducing(self) -> None:
        self.session._resume("direct")

    def stopProducing(self) -> None:
        pass


class _Given(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


# -- one RPC connection


@implementer(IPushProducer)
class MEConnection(Protocol):
    """
    One TCP RPC connection to a middle proxy, shared by many clients.

    States: ``connected`` (waiting for the external address), ``nonce``,
    ``handshake``, ``ready``, ``closed``.
    """

    log = Logger()
    transport: Any

    def __init__(self, pool: DCPool, endpoint: Endpoint, secret: bytes) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.secret = secret
        self.upstream = pool.upstream
        self.state = "connecting"
        self.sessions: dict[int, ClientSession] = {}
        self.paused = False
        self.ready_at: float | None = None
        self.last_received = 0.0
        self.external: IPAddress | None = None
        self.failure_reason: str | None = None
        #: The handshake failed because of an untried proxy secret (no backoff).
        self.secret_refused = False
        self.dead = False
        #: conn_ids closed lately: late answers for them are dropped quietly.
        self._recently_closed: dict[int, None] = {}
        self._encoder = rpc.FrameEncoder()
        self._decoder = rpc.FrameDecoder()
        self._timer: IDelayedCall | None = None
        self._sender_pid: rpc.ProcessId | None = None
        self._crypto_ts = 0
        self._nonce = b""
        self._client_addr: tuple[IPAddress, int] = (_ANY_V4, 0)
        self._server_addr: tuple[IPAddress, int] = (_ANY_V4, 0)

    @property
    def load(self) -> int:
        return len(self.sessions)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def __repr__(self) -> str:
        host, port = self.endpoint
        return f"<MEConnection {host}:{port} {self.state} {len(self.sessions)} clients>"

    # -- handshake

    def connectionMade(self) -> None:
        reactor = self.upstream.reactor
        self.state = "connected"
        self.pool.connections.add(self)
        self.last_received = reactor.seconds()
        transport: Any = self.transport
        _twisted.no_delay(transport)
        _twisted.set_read_size(transport)
        transport.registerProducer(self, True)
        self._timer = reactor.callLater(
            self.upstream.settings.handshake_timeout, self._handshake_timed_out
        )
        local, self._server_addr = _address(transport.getHost()), _address(transport.getPeer())
        self._client_addr = local
        self.upstream.external.for_connection(local[0], self._server_addr[0]).addCallback(
            self._send_nonce
        ).addErrback(self._nonce_failed)

    def _nonce_failed(self, failure: Failure) -> None:
        self.log.failure("cannot start the handshake with a middle proxy", failure)
        self.failure_reason = "internal error"
        self.abort()

    def _send_nonce(self, external: IPAddress) -> None:
        if self.state != "connected":
            return
        self.external = external
        self._client_addr = (external, self._client_addr[1])
        self._crypto_ts = int(self.upstream.reactor.seconds()) & 0xFFFFFFFF
        self._nonce = os.urandom(16)
        self.state = "nonce"
        self._write(
            self._encoder.encode(rpc.build_nonce(self.secret, self._crypto_ts, self._nonce))
        )

    def _got_nonce(self, payload: bytes) -> None:
        now = int(self.upstream.reactor.seconds())
        try:
            theirs = rpc.parse_nonce(payload, self.secret, now=now)
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
            external if isinstance(external, ipaddress.IPv4Address) else _ANY_V4,
            self._client_addr[1],
            os.getpid() & 0xFFFF,
            self.upstream.start_time,
        )
        peer_pid = rpc.ProcessId(
            server if isinstance(server, ipaddress.IPv4Address) else _ANY_V4,
            self._server_addr[1],
            0,
            0,
        )
        self.state = "handshake"
        self._write(self._encoder.encode(rpc.build_handshake(self._sender_pid, peer_pid)))

    def _got_handshake(self, payload: bytes) -> None:
        try:
            rpc.parse_handshake(payload, expected_peer_pid=self._sender_pid)
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
        self.state = "ready"
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
        self.dead = True
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.failure_reason = "no handshake in time"
        self.abort()

    # -- data

    def dataReceived(self, data: bytes) -> None:
        self.last_received = self.upstream.reactor.seconds()
        decoder = self._decoder
        touched: dict[ClientSession, None] = {}
        try:
            decoder.feed(data)
            for payload in decoder.frames():
                if self.state == "ready":
                    self._message(payload, touched)
                elif self.state == "nonce":
                    self._got_nonce(payload)
                elif self.state == "handshake":
                    self._got_handshake(payload)
                if self.dead:
                    break
        except rpc.RPCError as e:
            if self.state == "ready":
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

    def _message(self, payload: bytes, touched: dict[ClientSession, None]) -> None:
        if payload[:4] == _PROXY_ANS_TYPE and len(payload) >= 16:
            (conn_id,) = _u64.unpack_from(payload, 8)
            session = self.sessions.get(conn_id)
            if session is None:
                self._unknown(conn_id)
                return
            session.answer(payload)
            touched[session] = None
            return
        msg = rpc.parse_message(payload)
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
        """
        Frame, encrypt and write payloads in one write (ready state only).
        """
        if self.state == "ready" and not self.dead:
            self._write(self._encoder.encode(*payloads))

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
        was = self.state
        self.state = "closed"
        self.dead = True
        self.pool.connections.discard(self)
        self._cancel_timer()
        sessions, self.sessions = self.sessions, {}
        for session in sessions.values():
            session.lost()
        if was == "ready":
            self.pool.connection_lost(self, reason)
        else:
            if self.failure_reason is None:
                self.failure_reason = _closed_during(was, reason)
                if was in ("nonce", "handshake"):
                    # Dropped without a word: a middle proxy does that to a
                    # key_select it does not know, or to keys that disagree.
                    cause = "clock" if was == "nonce" else "ip"
                    self.upstream.handshake_rejected(
                        self, self.failure_reason, cause, secret_suspect=True
                    )
            self.pool.connect_failed(
                self.endpoint, self.failure_reason, back_off=not self.secret_refused
            )


def _closed_during(state: str, reason: Failure) -> str:
    what = {
        "connected": "before the handshake",
        "nonce": "after our RPC_NONCE",
        "handshake": "after our RPC_HANDSHAKE",
    }.get(state, "during the handshake")
    return f"connection closed {what} ({reason.getErrorMessage()})"


class _MEFactory(Factory):
    noisy = False

    def __init__(self, pool: DCPool, endpoint: Endpoint, secret: bytes) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.secret = secret

    def buildProtocol(self, addr: Any) -> MEConnection:
        return MEConnection(self.pool, self.endpoint, self.secret)


# -- the pool of one DC


class _Backoff:
    __slots__ = ("failures", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.until = 0.0


class DCPool:
    """
    The RPC connections of one DC (a cluster of the config).

    It keeps ``pool_min`` connections once used, opens another (up to
    ``pool_max``) when every ready one carries ``clients_per_connection``
    clients, and picks endpoints at random among those not backing off.
    """

    log = Logger()

    def __init__(self, upstream: MiddleProxy, dc: int) -> None:
        self.upstream = upstream
        self.dc = dc
        self.ready: list[MEConnection] = []
        #: Every open connection, ready or not.
        self.connections: set[MEConnection] = set()
        self.connecting = 0
        self.waiting: dict[ClientSession, None] = {}
        self.backoff: dict[Endpoint, _Backoff] = {}
        #: Ready connections per endpoint lost soon after the handshake, in a row.
        self.flaps: dict[Endpoint, int] = {}
        self.down = False
        self.stopped = False
        self._retry: IDelayedCall | None = None
        self._attempts: set[Deferred[IProtocol]] = set()

    def __repr__(self) -> str:
        return f"<DCPool {self.dc}: {len(self.ready)} ready, {self.connecting} connecting>"

    @property
    def settings(self) -> MiddleSettings:
        return self.upstream.settings

    def endpoints(self) -> tuple[Endpoint, ...]:
        source = self.upstream.config
        first, second = (
            (source.config_v6, source.config_v4)
            if self.settings.prefer_ipv6
            else (source.config_v4, source.config_v6)
        )
        for config in (first, second):
            if self.dc in config.clusters:
                return config.lookup(self.dc)
        return first.lookup(self.dc) or second.lookup(self.dc)

    # -- sessions

    def acquire(self, session: ClientSession) -> None:
        conn = self._least_loaded()
        if conn is not None:
            session.bind(conn)
            self._maintain()
            return
        if self.down and not self.connecting:
            self._unavailable(session)
            return
        self.waiting[session] = None
        session.wait(self)
        self._maintain()

    def forget_waiting(self, session: ClientSession) -> None:
        self.waiting.pop(session, None)

    def _least_loaded(self) -> MEConnection | None:
        if not self.ready:
            return None
        return min(self.ready, key=lambda c: len(c.sessions))

    def _unavailable(self, session: ClientSession) -> None:
        if self.settings.direct_fallback:
            self.upstream.counters["direct-fallback"] += 1
            session.go_direct()
        else:
            self.upstream.counters["unavailable"] += 1
            session._fail("every middle proxy of its DC is unreachable", level="info")

    def session_left(self, conn: MEConnection) -> None:
        if self.stopped and not conn.sessions:
            conn.transport.loseConnection()

    # -- connections

    def _maintain(self) -> None:
        if self.stopped:
            return
        settings = self.settings
        want = settings.pool_min
        total = len(self.ready) + self.connecting
        if self.ready and self.connecting == 0:
            lightest = min(len(c.sessions) for c in self.ready)
            if lightest >= settings.clients_per_connection:
                want = max(want, total + 1)
        want = min(want, settings.pool_max)
        while total < want:
            if not self._connect_one():
                break
            total += 1

    def _connect_one(self) -> bool:
        endpoints = self.endpoints()
        now = self.upstream.reactor.seconds()
        candidates = [ep for ep in endpoints if self._until(ep) <= now]
        if not candidates:
            self._all_unreachable(endpoints, now)
            return False
        endpoint = self.upstream.random.choice(candidates)
        self.connecting += 1
        source = self.upstream.config
        # An untried proxy secret is tried by every new connection until one
        # handshake decides on it; the secret in use stays until then.
        secret = source.candidate if source.candidate is not None else source.secret
        factory = _MEFactory(self, endpoint, secret)
        host, port = endpoint
        attempt = self.upstream.core.connect(Address(host, port), factory)
        self._attempts.add(attempt)

        def connected(protocol: IProtocol) -> None:
            self._attempts.discard(attempt)

        def failed(failure: Failure) -> None:
            self._attempts.discard(attempt)
            if failure.check(CancelledError):
                self.connecting -= 1
                return
            self.upstream.core.stats.upstream_failures["middle-connect"] += 1
            self.connect_failed(endpoint, failure.getErrorMessage())

        attempt.addCallbacks(connected, failed)
        return True

    def _until(self, endpoint: Endpoint) -> float:
        backoff = self.backoff.get(endpoint)
        return backoff.until if backoff is not None else 0.0

    def _all_unreachable(self, endpoints: tuple[Endpoint, ...], now: float) -> None:
        if self._retry is None or not self._retry.active():
            delay = min((self._until(ep) for ep in endpoints), default=now + 60.0) - now
            self._retry = self.upstream.reactor.callLater(max(delay, 0.0), self._retry_now)
        if self.ready or self.connecting:
            return
        if not self.down:
            self.down = True
            if not endpoints:
                self.log.error("DC {dc}: the config lists no middle proxy for it", dc=self.dc)
            fallback = self.settings.direct_fallback
            log = self.log.error if fallback or self.settings.ad_tag else self.log.warn
            log(
                "DC {dc}: all {count} middle proxies are unreachable; {what}",
                dc=self.dc,
                count=len(endpoints),
                what=(
                    "FALLING BACK TO DIRECT MODE for its clients (no ad tag)"
                    if fallback
                    else "its clients are refused until one answers"
                ),
            )
        waiting, self.waiting = self.waiting, {}
        for session in waiting:
            session.pool = None
            self._unavailable(session)

    def _retry_now(self) -> None:
        self._retry = None
        self._maintain()

    def connect_failed(self, endpoint: Endpoint, reason: str, back_off: bool = True) -> None:
        """
        A connection to ``endpoint`` failed before it was ready: back off from it.

        Without ``back_off`` (it refused an untried proxy secret, not its
        fault) the next connection goes at once, with the secret in use.
        """
        self.connecting -= 1
        if not back_off:
            self.log.info(
                "middle proxy {host}:{port} of DC {dc} refused a new proxy secret ({reason}); "
                "connecting again with the one in use",
                host=endpoint[0],
                port=endpoint[1],
                dc=self.dc,
                reason=reason,
            )
            self._maintain()
            return
        delay = self._back_off(endpoint)
        self.log.info(
            "middle proxy {host}:{port} of DC {dc} failed ({reason}); next try in {delay:.1f} s",
            host=endpoint[0],
            port=endpoint[1],
            dc=self.dc,
            reason=reason,
            delay=delay,
        )
        self._maintain()

    def _back_off(self, endpoint: Endpoint) -> float:
        backoff = self.backoff.setdefault(endpoint, _Backoff())
        backoff.failures += 1
        settings = self.settings
        delay = min(settings.backoff_max, settings.backoff_initial * 2 ** (backoff.failures - 1))
        delay *= self.upstream.random.uniform(0.8, 1.2)
        backoff.until = self.upstream.reactor.seconds() + delay
        return float(delay)

    def connection_ready(self, conn: MEConnection) -> None:
        self.connecting -= 1
        self.backoff.pop(conn.endpoint, None)
        if self.stopped:
            conn.transport.loseConnection()
            return
        if self.down:
            self.down = False
            self.log.warn("DC {dc}: middle proxies reachable again", dc=self.dc)
        self.ready.append(conn)
        self.log.debug("DC {dc}: {conn} ready", dc=self.dc, conn=conn)
        waiting, self.waiting = self.waiting, {}
        for session in waiting:
            session.pool = None
            # Spread the waiting clients over the ready connections.
            target = self._least_loaded()
            assert target is not None
            session.bind(target)
        self._maintain()

    def connection_lost(self, conn: MEConnection, reason: Failure) -> None:
        if conn in self.ready:
            self.ready.remove(conn)
        if self.stopped:
            return
        lived = self.upstream.reactor.seconds() - (conn.ready_at or 0.0)
        if lived < _SHORT_LIVED:
            # A middle proxy that drops every connection at once must not
            # make us reconnect in a tight loop: back off after a few.
            flaps = self.flaps[conn.endpoint] = self.flaps.get(conn.endpoint, 0) + 1
            if flaps >= 3:
                self._back_off(conn.endpoint)
        else:
            self.flaps.pop(conn.endpoint, None)
        self.upstream.core.stats.upstream_failures["middle-lost"] += 1
        self.log.info(
            "DC {dc}: lost {host}:{port} ({reason}); reconnecting",
            dc=self.dc,
            host=conn.endpoint[0],
            port=conn.endpoint[1],
            reason=reason.getErrorMessage(),
        )
        self._maintain()

    def stop(self) -> None:
        """
        No new connections; close those without clients (the rest as they empty).
        """
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for attempt in list(self._attempts):
            attempt.cancel()
        for conn in list(self.connections):
            if not conn.ready:
                conn.abort()
            elif not conn.sessions:
                conn.transport.loseConnection()

    def abort(self) -> None:
        for conn in list(self.connections):
            conn.abort()


# -- the upstream


class MiddleProxy(Service):
    """
    The middle-proxy upstream (``core.middle``): a pool per DC.

    :ivar counters: events worth counting (``buffer-cap``,
        ``direct-fallback``, ``unavailable``, ``wait-timeout``,
        ``handshake-rejected``).
    """

    log = Logger()

    def __init__(
        self,
        core: ProxyCore,
        settings: MiddleSettings,
        config: ConfigSource,
        *,
        external: ExternalAddress | None = None,
        random: _random.Random | None = None,
    ) -> None:
        self.core = core
        self.reactor = core.reactor
        self.settings = settings
        self.config = config
        self.external = external or ExternalAddress(
            core.reactor, settings.nat_ips, settings.ip_lookup_url, timeout=settings.http_timeout
        )
        self.random = random or _random.Random()
        self.pools: dict[int, DCPool] = {}
        self.counters: Counter[str] = Counter()
        self.start_time = int(core.reactor.seconds()) & 0xFFFFFFFF
        self._stopped: Deferred[None] | None = None
        self._rejections_logged: set[tuple[Endpoint, str]] = set()

    def cluster(self, dc: int) -> int:
        """
        The config cluster a client DC id goes to (unknown ids: the default one).
        """
        source = self.config
        config = source.config_v6 if self.settings.prefer_ipv6 else source.config_v4
        if dc != 0 and dc in config.clusters:
            return dc
        other = source.config_v4 if self.settings.prefer_ipv6 else source.config_v6
        if dc != 0 and dc in other.clusters:
            return dc
        return config.default_dc

    def pool(self, dc: int) -> DCPool:
        key = self.cluster(dc)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = DCPool(self, key)
        return pool

    def attach(self, client: MiddleClient, dc: int, tag: bytes) -> ClientSession:
        """
        A session for a client that completed its handshake.
        """
        session = ClientSession(self, client, dc, tag)
        if self._stopped is not None:
            session._fail("the proxy is shutting down")
            return session
        self.pool(dc).acquire(session)
        return session

    def handshake_accepted(self, conn: MEConnection) -> None:
        """
        A middle proxy accepted the handshake: a new proxy secret is proven.
        """
        if conn.secret != self.config.secret:
            self.config.secret_accepted(conn.secret)

    def handshake_rejected(
        self, conn: MEConnection, detail: str, cause: str, *, secret_suspect: bool = False
    ) -> None:
        """
        A handshake failed; ``secret_suspect``: in a way a wrong proxy secret causes.

        If the connection tried a proxy secret other than the one in use and
        the failure points at it (and not at a local clock known to be off),
        that secret is reported refused and the endpoint is not blamed.
        """
        self.counters["handshake-rejected"] += 1
        self.core.stats.upstream_failures["middle-handshake"] += 1
        skew = self.config.clock_skew
        clock_off = skew is not None and abs(skew) > rpc.MAX_CLOCK_SKEW + 1
        if (
            secret_suspect
            and conn.secret != self.config.secret
            and not (cause == "clock" and clock_off)
        ):
            conn.secret_refused = True
            self.config.secret_refused(
                conn.secret, f"{conn.endpoint[0]}:{conn.endpoint[1]}: {detail}"
            )
            return
        external = str(conn.external) if conn.external is not None else "unknown"
        clock = "the local clock" + (f" (off by {skew:+.0f} s)" if skew is not None else "")
        if cause == "clock":
            likely = f"{clock} or the proxy secret"
        elif cause == "secret":
            likely = "the proxy secret (getProxySecret) does not match the middle proxy's"
        elif cause == "ip":
            likely = (
                f"the external address {external} used in the key derivation "
                "(set --nat-ip to the public address)"
            )
        else:
            likely = f"the external address {external} or {clock}"
        key = (conn.endpoint, likely)
        log = self.log.warn if key not in self._rejections_logged else self.log.debug
        self._rejections_logged.add(key)
        log(
            "middle proxy {host}:{port} rejected the handshake ({detail}); likely cause: {likely}",
            host=conn.endpoint[0],
            port=conn.endpoint[1],
            detail=detail,
            likely=likely,
        )
        if cause in ("ip", "protocol"):
            self.external.forget()

    def startService(self) -> None:
        super().startService()
        self._stopped = None
        mode = "with an ad tag" if self.settings.ad_tag is not None else "without an ad tag"
        self.log.info("clients go through Telegram's middle proxies ({mode})", mode=mode)

    def stopService(self) -> Deferred[None]:
        """
        Stop opening connections; wait for the clients to leave (bounded), then close.
        """
        super().stopService()
        done: Deferred[None] = Deferred()
        self._stopped = done
        for pool in self.pools.values():
            pool.stop()
        deadline = self.reactor.seconds() + self.core.settings.drain_timeout + 1.0

        def check() -> None:
            live = sum(len(p.connections) + len(p._attempts) for p in self.pools.values())
            if not live:
                done.callback(None)
                return
            if self.reactor.seconds() >= deadline:
                for pool in self.pools.values():
                    pool.abort()
            self.reactor.callLater(0.05, check)

        check()
        return done
