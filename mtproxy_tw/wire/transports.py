"""
The MTProto transports a client speaks inside obfuscated2 (PROTOCOL.md
section 3): abridged, intermediate and padded intermediate.

Each codec is a small object: :meth:`Codec.encode` frames one packet,
:meth:`Codec.feed` takes any chunk of the stream and returns the packets it
completed. Direct mode never parses frames; middle-proxy mode, the fake DC
and the test client do.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED

__all__ = [
    "MAX_PACKET",
    "AbridgedCodec",
    "Codec",
    "IntermediateCodec",
    "Packet",
    "PaddedIntermediateCodec",
    "TransportError",
    "codec_for_tag",
]

#: The largest payload accepted (1 MiB, as [C]'s MAX_POST_SIZE rounded up).
MAX_PACKET = 1 << 20

_u32 = struct.Struct("<I")


class TransportError(Exception):
    """
    The peer broke the transport's framing.
    """


@dataclass(frozen=True, slots=True)
class Packet:
    payload: bytes
    quick_ack: bool = False


class Codec:
    """
    Base class: buffering and the feed loop; subclasses parse one header.
    """

    tag: bytes = b""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self._buffer = bytearray()
        self.max_packet = max_packet

    def encode(self, payload: bytes, quick_ack: bool = False) -> bytes:
        raise NotImplementedError

    def _header(self, buf: bytearray, at: int) -> tuple[int, int, bool] | None:
        """
        (header length, body length, quick ack) of the packet at ``at``,
        or ``None`` if its header is incomplete.
        """
        raise NotImplementedError

    def _payload_length(self, body_length: int) -> int:
        """
        How much of a packet's body is payload (the rest is padding).
        """
        return body_length

    def feed(self, data: bytes) -> list[Packet]:
        """
        Add a chunk of the stream; return the packets it completed.

        :raises TransportError: on a framing error; the stream is then dead.
        """
        buf = self._buffer
        buf += data
        packets = []
        offset = 0
        while (header := self._header(buf, offset)) is not None:
            hlen, blen, quick = header
            if blen > self.max_packet:
                raise TransportError(f"packet of {blen} bytes is too large")
            end = offset + hlen + blen
            if end > len(buf):
                break
            start = offset + hlen
            with memoryview(buf) as view:  # one copy, and released before the resize
                payload = bytes(view[start : start + self._payload_length(blen)])
            packets.append(Packet(payload, quick))
            offset = end
        if offset:
            del buf[:offset]
        return packets


class AbridgedCodec(Codec):
    """
    One length byte (in 4-byte words), or ``7f`` and a 3-byte length.
    """

    tag = TAG_ABRIDGED

    def encode(self, payload: bytes, quick_ack: bool = False) -> bytes:
        words, rest = divmod(len(payload), 4)
        if rest:
            raise TransportError("abridged payloads are whole 4-byte words")
        flag = 0x80 if quick_ack else 0
        if words < 0x7F:
            return bytes([words | flag]) + payload
        return bytes([0x7F | flag]) + words.to_bytes(3, "little") + payload

    def _header(self, buf: bytearray, at: int) -> tuple[int, int, bool] | None:
        if len(buf) <= at:
            return None
        first = buf[at]
        quick = bool(first & 0x80)
        words = first & 0x7F
        if words < 0x7F:
            if words == 0:
                raise TransportError("empty abridged packet")
            return 1, words * 4, quick
        if len(buf) < at + 4:
            return None
        words = int.from_bytes(buf[at + 1 : at + 4], "little")
        if words < 0x7F:
            raise TransportError("long abridged header for a short packet")
        return 4, words * 4, quick


class IntermediateCodec(Codec):
    """
    A ``u32le`` length (bit 31: quick-ack request) and the payload.
    """

    tag = TAG_INTERMEDIATE

    def encode(self, payload: bytes, quick_ack: bool = False) -> bytes:
        return _u32.pack(len(payload) | (0x80000000 if quick_ack else 0)) + payload

    def _header(self, buf: bytearray, at: int) -> tuple[int, int, bool] | None:
        if len(buf) < at + 4:
            return None
        (word,) = _u32.unpack_from(buf, at)
        length = word & 0x7FFFFFFF
        if length == 0:
            raise TransportError("empty packet")
        return 4, length, bool(word & 0x80000000)


class PaddedIntermediateCodec(IntermediateCodec):
    """
    Intermediate with 0..3 random bytes after each payload (section 3.3).

    The receiver can only strip ``length mod 4`` bytes; whole words of
    padding stay attached and MTProto ignores them.
    """

    tag = TAG_PADDED

    def __init__(
        self, max_packet: int = MAX_PACKET, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        super().__init__(max_packet)
        self._random = random

    def encode(self, payload: bytes, quick_ack: bool = False) -> bytes:
        padding = self._random(self._random(1)[0] & 3)
        return super().encode(payload + padding, quick_ack)

    def _payload_length(self, body_length: int) -> int:
        return body_length - (body_length & 3)


def codec_for_tag(tag: bytes) -> Codec:
    """
    A fresh codec for a protocol tag from an init.
    """
    for cls in (AbridgedCodec, IntermediateCodec, PaddedIntermediateCodec):
        if cls.tag == tag:
            return cls()
    raise TransportError("unknown protocol tag")
