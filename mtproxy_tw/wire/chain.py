"""
Another MTProxy as the upstream (``--upstream mtproxy://HOST:PORT?secret=SECRET``).

The front speaks to the back exactly as a Telegram app speaks to a proxy:
:class:`BackStream` is that client side, bytes in and bytes out — an
obfuscated2 init made with the back's secret and the client's DC id and,
for an ``ee`` secret, a fake-TLS ClientHello first, the back's ServerHello
flight checked, then everything inside ApplicationData records.
:class:`Reframer` moves packets between two framings when the client's is
one the back's secret does not admit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.faketls import (
    NeedMore,
    TLSError,
    TLSRecordReader,
    build_client_hello,
    check_server_hello,
    wrap_records,
)
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import Mode, Secret, SecretError, parse_secret
from mtproxy_tw.wire.transports import MAX_PACKET, TransportError, codec_for_tag

__all__ = ["BackProxy", "BackStream", "ChainError", "Reframer", "parse_back_proxy"]

#: The ChangeCipherSpec record an app sends before its first data.
CCS = b"\x14\x03\x03\x00\x01\x01"
#: The largest record payload TDLib sends (``MAX_TLS_PACKET_LENGTH``).
CLIENT_RECORD = 2878


class ChainError(Exception):
    """
    The back broke the protocol (a bad flight, a bad record, bad framing).
    """


@dataclass(frozen=True, slots=True)
class BackProxy:
    """
    The back proxy: where it is and the secret it gave us.
    """

    address: Address
    secret: Secret

    def __repr__(self) -> str:  # never the secret
        return f"BackProxy({self.address.host}:{self.address.port}, {self.secret.kind.value})"

    def __str__(self) -> str:
        host = self.address.host
        return f"mtproxy://{f'[{host}]' if ':' in host else host}:{self.address.port}"

    def tag_for(self, tag: bytes) -> bytes:
        """
        The protocol tag toward the back for a client that uses ``tag``:
        the same where the back's secret admits it, else padded intermediate.
        """
        return tag if self.secret.kind is Mode.CLASSIC else TAG_PADDED


def parse_back_proxy(text: str) -> BackProxy:
    """
    ``mtproxy://HOST:PORT?secret=SECRET`` (hex or base64url, any kind).

    :raises ValueError: saying why, never repeating the secret.
    """
    url = urlsplit(text)
    if url.scheme != "mtproxy" or url.path not in ("", "/") or url.fragment:
        raise ValueError("use middle, direct or mtproxy://HOST:PORT?secret=SECRET")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        raise ValueError("mtproxy://: a bad port") from None
    if not host or port is None or port == 0 or url.username is not None:
        raise ValueError("mtproxy://: give HOST:PORT")
    query = parse_qs(url.query, keep_blank_values=True)
    found = query.pop("secret", [])
    if len(found) != 1 or query:
        raise ValueError("mtproxy://: give one secret=SECRET and nothing else")
    try:
        secret = parse_secret(found[0], "upstream")
    except SecretError as e:
        raise ValueError(f"mtproxy://: the secret: {e}") from None
    return BackProxy(Address(host, port), secret)


class BackStream:
    """
    The front's client side of one connection to the back, sans IO.

    :meth:`opening` is sent on connect; :meth:`outgoing` takes the
    client's transport stream (plain) and gives the bytes to send;
    :meth:`incoming` takes the back's bytes and gives the plain stream
    toward the client and any bytes to send now. Until :attr:`up` (for an
    ``ee`` secret: the ServerHello flight checked), outgoing bytes are held.
    """

    def __init__(
        self,
        back: BackProxy,
        tag: bytes,
        dc: int,
        now: float,
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        secret = back.secret
        self.init = generate_init(tag, dc, secret=secret.key, random=random)
        self._key = secret.key
        self._held: list[bytes] = []
        self._buffer = bytearray()
        self._records: TLSRecordReader | None = None
        if secret.kind is Mode.TLS:
            assert secret.domain is not None
            self.hello = build_client_hello(secret.key, secret.domain, int(now))
            self.up = False
            self._held += [CCS, self.init.wire]
        else:
            self.hello = b""
            self.up = True

    def opening(self) -> bytes:
        """
        What goes first: the ClientHello, or the obfuscated2 init.
        """
        return self.hello or self.init.wire

    def outgoing(self, plain: bytes) -> bytes:
        """
        The client's stream, encrypted (and in records) for the back; held
        (and ``b""`` returned) until the back is up.
        """
        data = self.init.encryptor.update(plain)
        if self.hello:
            if not self.up:
                self._held.append(data)
                return b""
            return wrap_records(data, CLIENT_RECORD) if data else b""
        return data

    def incoming(self, data: bytes) -> tuple[bytes, bytes]:
        """
        (the plain stream for the client, the bytes to send the back now).

        :raises ChainError: the back broke the protocol.
        """
        send = b""
        if self.hello and not self.up:
            self._buffer += data
            try:
                end = check_server_hello(bytes(self._buffer), self._key, self.hello[11:43])
            except TLSError as e:
                raise ChainError(f"the back's ServerHello: {e}") from None
            if isinstance(end, NeedMore):
                return b"", b""
            data = bytes(self._buffer[end:])
            self._buffer = bytearray()
            self.up = True
            self._records = TLSRecordReader()
            held, self._held = self._held, []
            send = held[0] + wrap_records(b"".join(held[1:]), CLIENT_RECORD)
        if self._records is not None:
            try:
                data = self._records.feed(data)
            except TLSError as e:
                raise ChainError(f"the back's records: {e}") from None
        return (self.init.decryptor.update(data) if data else b""), send


class Reframer:
    """
    Packets of one transport framing re-encoded in another: the client's
    toward the back, or (``from_back``) the back's padded intermediate
    toward the client, whose quick acks (a word with bit 31 set) are passed
    on in the client's framing (byte-reversed for abridged).
    """

    def __init__(self, source: bytes, target: bytes, *, from_back: bool = False) -> None:
        self._in = codec_for_tag(source)
        self._in.max_packet = MAX_PACKET + 16  # and its padding
        self._out = codec_for_tag(target)
        self._acks = from_back and source != TAG_ABRIDGED
        self._abridged = target == TAG_ABRIDGED
        self._padded = source == TAG_PADDED
        self._buffer = bytearray()

    def feed(self, data: bytes) -> bytes:
        """
        :raises ChainError: on a framing error (the stream is then dead).
        """
        try:
            if self._acks:
                return self._feed_answers(data)
            packets = self._in.feed(data)
            encode = self._out.encode
            return b"".join(encode(p.payload, p.quick_ack) for p in packets)
        except TransportError as e:
            raise ChainError(f"framing: {e}") from None

    def _feed_answers(self, data: bytes) -> bytes:
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        encode = self._out.encode
        pos = 0
        while len(buf) - pos >= 4:
            word = int.from_bytes(buf[pos : pos + 4], "little")
            if word & 0x80000000:  # a quick ack, not a length
                ack = bytes(buf[pos : pos + 4])
                out.append(ack[::-1] if self._abridged else ack)
                pos += 4
                continue
            if word == 0 or word > self._in.max_packet:
                raise TransportError(f"a packet of {word} bytes")
            end = pos + 4 + word
            if len(buf) < end:
                break
            out.append(encode(bytes(buf[pos + 4 : end - (word & 3 if self._padded else 0)])))
            pos = end
        del buf[:pos]
        return b"".join(out)
