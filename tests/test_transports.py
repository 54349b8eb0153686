"""
Client transports against PROTOCOL.md section 11.7, and their properties.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED
from mtproxy_tw.wire.transports import (
    AbridgedCodec,
    Codec,
    IntermediateCodec,
    Packet,
    PaddedIntermediateCodec,
    TransportError,
    codec_for_tag,
)

H = bytes.fromhex
PAYLOAD = bytes(range(12))


class VectorTests(SynchronousTestCase):
    def test_abridged(self) -> None:
        self.assertEqual(AbridgedCodec().encode(PAYLOAD), H("03") + PAYLOAD)
        self.assertEqual(AbridgedCodec().encode(bytes(508))[:4], H("7f7f0000"))
        self.assertEqual(AbridgedCodec().encode(PAYLOAD, quick_ack=True)[:1], H("83"))

    def test_intermediate(self) -> None:
        self.assertEqual(IntermediateCodec().encode(PAYLOAD), H("0c000000") + PAYLOAD)

    def test_padded(self) -> None:
        codec = PaddedIntermediateCodec(random=lambda n: H("03aabbcc")[-n:] if n != 1 else b"\x03")
        self.assertEqual(codec.encode(PAYLOAD), H("0f000000") + PAYLOAD + H("aabbcc"))
        self.assertEqual(
            PaddedIntermediateCodec().feed(H("0f000000") + PAYLOAD + H("aabbcc")),
            [Packet(PAYLOAD)],
        )

    def test_decode_vectors(self) -> None:
        self.assertEqual(AbridgedCodec().feed(H("03") + PAYLOAD), [Packet(PAYLOAD)])
        self.assertEqual(
            IntermediateCodec().feed(H("0c000080") + PAYLOAD), [Packet(PAYLOAD, True)]
        )
        long = AbridgedCodec().feed(H("7f7f0000") + bytes(508))
        self.assertEqual(long, [Packet(bytes(508))])

    def test_codec_for_tag(self) -> None:
        self.assertIsInstance(codec_for_tag(TAG_ABRIDGED), AbridgedCodec)
        self.assertIsInstance(codec_for_tag(TAG_PADDED), PaddedIntermediateCodec)
        self.assertIsInstance(codec_for_tag(TAG_INTERMEDIATE), IntermediateCodec)
        self.assertRaises(TransportError, codec_for_tag, b"\0\0\0\0")


class ErrorTests(SynchronousTestCase):
    def test_too_large(self) -> None:
        self.assertRaises(TransportError, IntermediateCodec(max_packet=16).feed, H("14000000"))

    def test_empty(self) -> None:
        self.assertRaises(TransportError, AbridgedCodec().feed, H("00"))
        self.assertRaises(TransportError, IntermediateCodec().feed, H("00000000"))

    def test_long_form_for_short(self) -> None:
        self.assertRaises(TransportError, AbridgedCodec().feed, H("7f010000"))

    def test_abridged_alignment(self) -> None:
        self.assertRaises(TransportError, AbridgedCodec().encode, b"abc")


codecs = st.sampled_from([AbridgedCodec, IntermediateCodec, PaddedIntermediateCodec])
payloads = st.lists(
    st.binary(min_size=1, max_size=600).map(lambda b: b + bytes(-len(b) % 4)),
    min_size=1,
    max_size=8,
)


def _feed_split(codec: Codec, stream: bytes, cuts: list[int]) -> list[Packet]:
    out: list[Packet] = []
    last = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        out.extend(codec.feed(stream[last:cut]))
        last = max(last, cut)
    return out


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=150)
    @given(
        codecs,
        payloads,
        st.lists(st.booleans(), min_size=8, max_size=8),
        st.lists(st.integers(0, 10**6), max_size=10),
    )
    def test_round_trip(
        self, cls: type[Codec], items: list[bytes], acks: list[bool], cuts: list[int]
    ) -> None:
        """
        Whatever the chunking, packets come out as they went in.
        """
        stream = b"".join(cls().encode(p, a) for p, a in zip(items, acks, strict=False))
        self.assertEqual(
            _feed_split(cls(), stream, cuts),
            [Packet(p, a) for p, a in zip(items, acks, strict=False)],
        )

    @settings(max_examples=200)
    @given(codecs, st.binary(max_size=2000), st.lists(st.integers(0, 10**6), max_size=5))
    def test_garbage(self, cls: type[Codec], blob: bytes, cuts: list[int]) -> None:
        """
        Random input yields packets or a TransportError, nothing else.
        """
        try:
            packets = _feed_split(cls(max_packet=4096), blob, cuts)
        except TransportError:
            return
        self.assertLessEqual(sum(len(p.payload) for p in packets), len(blob))

    @settings(max_examples=100)
    @given(codecs, payloads, st.integers(0, 10**6))
    def test_truncated(self, cls: type[Codec], items: list[bytes], cut: int) -> None:
        """
        A truncated stream gives a prefix of the packets and waits for more.
        """
        stream = b"".join(cls().encode(p) for p in items)
        got = cls().feed(stream[: cut % (len(stream) + 1)])
        self.assertEqual([p.payload for p in got], items[: len(got)])
