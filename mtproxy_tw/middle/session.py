"""
One client's session on the RPC connections of its DC.

Flow control: one slow client never pauses an RPC connection (that would
stall every other client on it); its bytes queue in its own transport up to
``client_buffer_cap`` and then that client alone is closed (the middle
proxy is told with RPC_CLOSE_CONN). When an RPC connection's own write
buffer fills, the clients writing to it are paused until it drains.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.logger import Logger

from mtproxy_tw.middle.address import IPAddress, ip_port
from mtproxy_tw.middle.direct import DirectLeg
from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED
from mtproxy_tw.wire.transports import TransportError, codec_for_tag

if TYPE_CHECKING:
    from mtproxy_tw.middle.connection import MEConnection
    from mtproxy_tw.middle.pool import DCPool
    from mtproxy_tw.middle.upstream import MiddleProxy

__all__ = ["ClientSession", "MiddleClient"]

_u32 = struct.Struct("<I")
_PROXY_REQ_TYPE = _u32.pack(rpc.RPC_PROXY_REQ)
_ZERO8 = bytes(8)
_ANS_HEADER = 16  # type, flags, conn_id
_ABRIDGED_SHORT = [bytes([words]) for words in range(0x7F)]


def _abridged_long(words: int) -> bytes:
    return b"\x7f" + words.to_bytes(3, "little")


class _Host:
    """
    A TCP address of which only the host counts (:func:`ip_port` reads both).
    """

    port = 1

    def __init__(self, host: str) -> None:
        self.host = host


@functools.lru_cache(maxsize=4096)
def _parsed(host: str) -> IPAddress | None:
    ip, port = ip_port(_Host(host))  # type: ignore[arg-type]
    return ip if port else None


def _ip_port(addr: IAddress) -> tuple[IPAddress, int]:
    """
    :func:`ip_port`, parsing each host once: the proxy's own address is the
    same for all its clients, and many clients come back from one address.
    """
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        ip = _parsed(host)
        if ip is not None:
            return ip, port
    return ip_port(addr)


class _Noise:
    """
    Random bytes drawn from the system in blocks and handed out in slices,
    each byte once: one ``getrandom`` per many answers rather than per answer.
    """

    def __init__(self, block: int = 1 << 16) -> None:
        self._block = block
        self._pool = b""
        self._pos = 0

    def take(self, count: int) -> bytes:
        pos = self._pos
        if pos + count > len(self._pool):
            self._pool, pos = os.urandom(self._block), 0
        self._pos = pos + count
        return self._pool[pos : pos + count]


#: The padding bytes of padded-intermediate answers, for every session.
_noise = _Noise()


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
        self.direct: DirectLeg | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pauses: set[str] = set()
        self._wait_timer: IDelayedCall | None = None
        self._rest = b""  # PROXY_REQ bytes after the flags, for this conn_id
        self._flags = 0
        self._out: list[bytes | memoryview] = []
        transport = client.transport
        self.client_addr = _ip_port(transport.getPeer())
        host_ip, host_port = _ip_port(transport.getHost())
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
        payloads: list[rpc.Pieces] = []
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
            # The payload is copied once, into its frame.
            payloads.append((b"".join((head, _u32.pack(flags), rest)), payload))
        conn.send_pieces(payloads)

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
            # The client's user's own tag when it has one, else the proxy's.
            ad_tag=getattr(self.client, "ad_tag", None) or self.upstream.settings.ad_tag,
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
        leg = DirectLeg(self, b"".join(pending))
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

    def answer(self, message: bytes | memoryview) -> None:
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
            noise = _noise.take(4)
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
