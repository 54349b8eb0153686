"""
Tests for mtproxy_tw.wire.rpc: known answers from PROTOCOL.md 11.4-11.6, validation,
framing properties and a complete proxy/middle-proxy exchange in memory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.rpc import (
    CloseConn,
    CloseExt,
    FrameDecoder,
    FrameEncoder,
    HandshakeRejected,
    Ping,
    Pong,
    ProcessId,
    ProxyAns,
    ProxyReq,
    RPCError,
    SimpleAck,
    UnknownMessage,
    messages,
)

# -- section 11.4 inputs -----------------------------------------------------------------------
SECRET = bytes(range(128))
NONCE_CLT = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE_SRV = bytes.fromhex("ffeeddccbbaa99887766554433221100")
CLIENT_TS = 1700000000
ME_V4 = ("149.154.175.50", 8888)
PROXY_V4 = ("203.0.113.7", 40000)
ME_V6 = ("2001:b28:f23d:f001::d", 8888)
PROXY_V6 = ("2001:db8::7", 40000)

KDF_CLIENT_V4 = (
    bytes.fromhex(
        "ffeeddccbbaa99887766554433221100 00112233445566778899aabbccddeeff"
        "00f15365 32af9a95 409c 434c49454e54 077100cb b822"
    )
    + SECRET
    + bytes.fromhex("ffeeddccbbaa99887766554433221100 00112233445566778899aabbccddeeff")
)

CLIENT_KEY_V4 = "66cb2ec088ca89c8e7603f64d30e94dc242dd367cee41f0d67803b3b5be617bd"
CLIENT_IV_V4 = "e1747cfceb7a53d9287b759be1c52e6b"
SERVER_KEY_V4 = "3c6eac1ff5391534b503a317e8154c4982c9ef84c8f31624d413bbc9452128b1"
SERVER_IV_V4 = "87fae9bff631fd027e7e433a4e91bd8b"
CLIENT_KEY_V6 = "6c8dca44bcc28a755ec58cbdad8930e94e5301f3808e675725f4a29aaac044bb"
CLIENT_IV_V6 = "9de51bfa959ddacb0d2ae3cc1c08459e"
SERVER_KEY_V6 = "737c4aa69991f0a0d09fc7d04bdcd61b87027bc075c235b916b52a7ad7f3accb"
SERVER_IV_V6 = "c5b3e015148d2225554de20682c9c19b"

# -- section 11.5 ------------------------------------------------------------------------------
NONCE_FRAME = bytes.fromhex(
    "2c000000 feffffff aa87cb7a 00010203 01000000 00f15365"
    "00112233445566778899aabbccddeeff 78e8043c"
)
HANDSHAKE_FRAME_PLAIN = bytes.fromhex(
    "2c000000 ffffffff f5ee8276 00000000 077100cb 409c 3412 00f15365"
    "32af9a95 b822 0000 00000000 b2f1fd9e"
)
HANDSHAKE_FRAME_ENCRYPTED = bytes.fromhex(
    "c17c5b127068a4f6110401ed2a218b7eb879a8527e57d1ca8c194da58a223db9"
    "f6119252e95f54f186d437aaf5c6fc29"
)
PROXY_PID = ProcessId(ipaddress.IPv4Address("203.0.113.7"), 40000, 0x1234, 1700000000)
ME_PEER_PID = ProcessId(ipaddress.IPv4Address("149.154.175.50"), 8888, 0, 0)

# -- section 11.6 ------------------------------------------------------------------------------
AD_TAG = bytes.fromhex("0f0e0d0c0b0a09080706050403020100")
REQ_PACKET = bytes.fromhex("0000000000000000 d4c3b2a1e70f5e5f 14000000") + bytes(range(20))
PROXY_REQ = bytes.fromhex(
    "eef1ce36 0a100228 0807060504030201 00000000000000000000ffffc6336417 3bc90000"
    "00000000000000000000ffffcb007107 bb010000 18000000 ae261edb 10"
    "0f0e0d0c0b0a09080706050403020100 000000"
    "0000000000000000 d4c3b2a1e70f5e5f 14000000 000102030405060708090a0b0c0d0e0f10111213"
)
PROXY_REQ_FRAME = bytes.fromhex("88000000 00000000") + PROXY_REQ + bytes.fromhex("b8ac3521")

TAG_ABRIDGED = b"\xef" * 4
TAG_INTERMEDIATE = b"\xee" * 4
TAG_PADDED = b"\xdd" * 4

KEY = bytes(range(32))
IV = bytes(range(16))


def _keys(client: rpc.Address, server: rpc.Address, server_side: bool = False) -> rpc.SessionKeys:
    return rpc.derive_keys(
        secret=SECRET,
        nonce_srv=NONCE_SRV,
        nonce_clt=NONCE_CLT,
        client_ts=CLIENT_TS,
        client_addr=client,
        server_addr=server,
        server_side=server_side,
    )


def _proxy_req(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "conn_id": 0x0102030405060708,
        "client_addr": ("198.51.100.23", 51515),
        "proxy_addr": ("203.0.113.7", 443),
        "data": REQ_PACKET,
        "tag": TAG_PADDED,
        "ad_tag": AD_TAG,
    }
    args.update(overrides)
    return rpc.build_proxy_req(**args)  # type: ignore[arg-type]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder.frames())
    return out


class KeyDerivationTests(SynchronousTestCase):
    def test_kdf_string_ipv4(self) -> None:
        data = rpc.kdf_input(
            b"CLIENT",
            secret=SECRET,
            nonce_srv=NONCE_SRV,
            nonce_clt=NONCE_CLT,
            client_ts=CLIENT_TS,
            client_addr=PROXY_V4,
            server_addr=ME_V4,
        )
        self.assertEqual(len(data), 214)
        self.assertEqual(data, KDF_CLIENT_V4)

    def test_kdf_string_ipv6(self) -> None:
        data = rpc.kdf_input(
            b"SERVER",
            secret=SECRET,
            nonce_srv=NONCE_SRV,
            nonce_clt=NONCE_CLT,
            client_ts=CLIENT_TS,
            client_addr=(ipaddress.IPv6Address(PROXY_V6[0]), PROXY_V6[1]),
            server_addr=ME_V6,
        )
        self.assertEqual(len(data), 246)
        self.assertEqual(data[36:40], bytes(4))
        self.assertEqual(data[48:52], bytes(4))
        self.assertEqual(data[42:48], b"SERVER")
        v6 = ipaddress.IPv6Address(PROXY_V6[0]).packed + ipaddress.IPv6Address(ME_V6[0]).packed
        self.assertEqual(data[198:230], v6)

    def test_keys_ipv4(self) -> None:
        keys = _keys(PROXY_V4, ME_V4)
        self.assertEqual(keys.encrypt.key.hex(), CLIENT_KEY_V4)
        self.assertEqual(keys.encrypt.iv.hex(), CLIENT_IV_V4)
        self.assertEqual(keys.decrypt.key.hex(), SERVER_KEY_V4)
        self.assertEqual(keys.decrypt.iv.hex(), SERVER_IV_V4)

    def test_keys_ipv6(self) -> None:
        keys = _keys(PROXY_V6, ME_V6)
        self.assertEqual(keys.encrypt.key.hex(), CLIENT_KEY_V6)
        self.assertEqual(keys.encrypt.iv.hex(), CLIENT_IV_V6)
        self.assertEqual(keys.decrypt.key.hex(), SERVER_KEY_V6)
        self.assertEqual(keys.decrypt.iv.hex(), SERVER_IV_V6)

    def test_server_side_swaps_roles(self) -> None:
        keys = _keys(PROXY_V4, ME_V4, server_side=True)
        self.assertEqual(keys.encrypt.key.hex(), SERVER_KEY_V4)
        self.assertEqual(keys.decrypt.iv.hex(), CLIENT_IV_V4)

    def test_ip_objects_and_mapped_addresses(self) -> None:
        mapped = (ipaddress.IPv6Address("::ffff:203.0.113.7"), 40000)
        keys = _keys(mapped, (ipaddress.IPv4Address(ME_V4[0]), ME_V4[1]))
        self.assertEqual(keys.encrypt.key.hex(), CLIENT_KEY_V4)

    def test_mixed_families_rejected(self) -> None:
        self.assertRaises(ValueError, _keys, PROXY_V4, ME_V6)

    def test_bad_purpose(self) -> None:
        self.assertRaises(
            ValueError,
            rpc.kdf_input,
            b"OTHER!",
            secret=SECRET,
            nonce_srv=NONCE_SRV,
            nonce_clt=NONCE_CLT,
            client_ts=CLIENT_TS,
            client_addr=PROXY_V4,
            server_addr=ME_V4,
        )

    def test_bad_nonce_length(self) -> None:
        self.assertRaises(
            ValueError,
            rpc.derive_keys,
            secret=SECRET,
            nonce_srv=NONCE_SRV[:15],
            nonce_clt=NONCE_CLT,
            client_ts=CLIENT_TS,
            client_addr=PROXY_V4,
            server_addr=ME_V4,
        )


class KnownFrameTests(SynchronousTestCase):
    def test_nonce_frame(self) -> None:
        encoder = FrameEncoder()
        self.assertEqual(
            encoder.encode(rpc.build_nonce(SECRET, CLIENT_TS, NONCE_CLT)), NONCE_FRAME
        )
        self.assertEqual(encoder.seq, -1)

    def test_parse_nonce_frame(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(NONCE_FRAME)
        nonce = rpc.parse_nonce(decoder.next_frame() or b"", SECRET, now=CLIENT_TS + 30)
        self.assertEqual(nonce, rpc.Nonce(b"\x00\x01\x02\x03", 1, CLIENT_TS, NONCE_CLT))
        self.assertIsNone(decoder.next_frame())

    def test_handshake_frame_encrypted(self) -> None:
        encoder = FrameEncoder()
        encoder.seq = -1
        keys = _keys(PROXY_V4, ME_V4)
        encoder.set_key(keys.encrypt.key, keys.encrypt.iv)
        wire = encoder.encode(rpc.build_handshake(PROXY_PID, ME_PEER_PID))
        self.assertEqual(wire, HANDSHAKE_FRAME_ENCRYPTED)
        decryptor = Cipher(
            algorithms.AES(keys.encrypt.key), modes.CBC(keys.encrypt.iv)
        ).decryptor()
        self.assertEqual(decryptor.update(wire), HANDSHAKE_FRAME_PLAIN + rpc.PADDING_WORD)

    def test_handshake_frame_decoded_by_middle_proxy(self) -> None:
        keys = _keys(PROXY_V4, ME_V4, server_side=True)
        decoder = FrameDecoder()
        decoder.seq = -1
        decoder.set_key(keys.decrypt.key, keys.decrypt.iv)
        decoder.feed(HANDSHAKE_FRAME_ENCRYPTED)
        (payload,) = decoder.frames()
        handshake = rpc.parse_handshake(payload)
        self.assertEqual(handshake, rpc.Handshake(0, PROXY_PID, ME_PEER_PID))
        self.assertEqual(decoder.buffered, 0)

    def test_process_id_encoding(self) -> None:
        self.assertEqual(PROXY_PID.encode().hex(), "077100cb409c341200f15365")
        self.assertEqual(ProcessId.decode(ME_PEER_PID.encode()), ME_PEER_PID)
        self.assertRaises(RPCError, ProcessId.decode, bytes(11))
        self.assertRaises(ValueError, ProcessId(ME_PEER_PID.ip, 8888, 1 << 16, 0).encode)

    def test_proxy_req(self) -> None:
        self.assertEqual(_proxy_req(pad_flag=True), PROXY_REQ)
        self.assertEqual(len(PROXY_REQ), 124)

    def test_proxy_req_frame(self) -> None:
        encoder = FrameEncoder()
        encoder.seq = 0
        self.assertEqual(encoder.encode(_proxy_req(pad_flag=True)), PROXY_REQ_FRAME)

    def test_proxy_req_frame_decoded(self) -> None:
        decoder = FrameDecoder()
        decoder.seq = 0
        decoder.feed(PROXY_REQ_FRAME)
        self.assertEqual(list(decoder.frames()), [PROXY_REQ])

    def test_parse_proxy_req(self) -> None:
        req = rpc.parse_proxy_req(PROXY_REQ)
        self.assertEqual(
            req,
            ProxyReq(
                0x2802100A,
                0x0102030405060708,
                (ipaddress.IPv4Address("198.51.100.23"), 51515),
                (ipaddress.IPv4Address("203.0.113.7"), 443),
                AD_TAG,
                REQ_PACKET,
            ),
        )
        self.assertEqual(rpc.parse_message(PROXY_REQ), req)


class ProxyReqTests(SynchronousTestCase):
    def test_default_has_no_pad_flag(self) -> None:
        req = rpc.parse_proxy_req(_proxy_req())
        self.assertEqual(req.flags, 0x2002100A)

    def test_typical_flags(self) -> None:
        flags = rpc.proxy_req_flags
        self.assertEqual(flags(TAG_ABRIDGED, has_ad_tag=True), 0x40021008)
        self.assertEqual(flags(TAG_INTERMEDIATE, has_ad_tag=True), 0x20021008)
        self.assertEqual(flags(TAG_PADDED, has_ad_tag=True), 0x20021008)
        self.assertEqual(flags(TAG_PADDED, has_ad_tag=True, pad_flag=True), 0x28021008)
        self.assertEqual(flags(TAG_INTERMEDIATE, has_ad_tag=True, pad_flag=True), 0x20021008)
        self.assertEqual(flags(TAG_ABRIDGED, has_ad_tag=False, quickack=True), 0xC0021000)
        self.assertEqual(flags(TAG_ABRIDGED, has_ad_tag=False, not_encrypted=True), 0x40021002)
        self.assertRaises(ValueError, flags, b"\x00" * 4, has_ad_tag=False)

    def test_without_ad_tag(self) -> None:
        data = bytes(range(1, 57))
        payload = _proxy_req(ad_tag=None, data=data, tag=TAG_ABRIDGED, quickack=True)
        self.assertEqual(len(payload), 56 + len(data))
        req = rpc.parse_proxy_req(payload)
        self.assertEqual((req.flags, req.ad_tag, req.data), (0xC0021000, None, data))

    def test_ipv6_addresses(self) -> None:
        payload = _proxy_req(client_addr=("2001:db8::1", 1), proxy_addr=PROXY_V6)
        self.assertEqual(payload[16:32], ipaddress.IPv6Address("2001:db8::1").packed)
        req = rpc.parse_proxy_req(payload)
        self.assertEqual(req.client_addr, (ipaddress.IPv6Address("2001:db8::1"), 1))
        self.assertEqual(req.proxy_addr, (ipaddress.IPv6Address(PROXY_V6[0]), PROXY_V6[1]))

    def test_extra_section_without_ad_tag(self) -> None:
        extra = b"\x01\x02\x03\x04"
        head = struct.pack("<IIQ16sI16sI", rpc.RPC_PROXY_REQ, 0x4, 9, bytes(16), 1, bytes(16), 2)
        req = rpc.parse_proxy_req(head + struct.pack("<I", 4) + extra + b"data")
        self.assertEqual((req.ad_tag, req.data), (None, b"data"))
        self.assertEqual(req.client_addr, (ipaddress.IPv6Address("::"), 1))

    def test_tl_strings(self) -> None:
        for size in (0, 1, 3, 4, 253, 254, 1000):
            encoded = messages._tl_string(b"\xab" * size)
            self.assertEqual(len(encoded) % 4, 0)
            self.assertEqual(messages._parse_tl_string(encoded, 0), b"\xab" * size)
        for bad in (b"", b"\xff\x00\x00\x00", b"\xfe\x01", b"\x05abcd", b"\xfe\x05\x00\x00abcd"):
            self.assertRaises(RPCError, messages._parse_tl_string, bad, 0)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, _proxy_req, data=b"abc")
        self.assertRaises(ValueError, _proxy_req, ad_tag=b"short")
        self.assertRaises(ValueError, _proxy_req, conn_id=-1)
        self.assertRaises(ValueError, _proxy_req, client_addr=("1.2.3.4", 65536))

    def test_malformed(self) -> None:
        bad_extra_size = PROXY_REQ[:56] + struct.pack("<I", 1000) + PROXY_REQ[60:]
        no_marker = PROXY_REQ[:60] + bytes(4) + PROXY_REQ[64:]
        big_port = PROXY_REQ[:32] + struct.pack("<I", 70000) + PROXY_REQ[36:]
        for payload in (PROXY_REQ[:55], PROXY_REQ[:58], bad_extra_size, no_marker, big_port):
            self.assertRaises(RPCError, rpc.parse_proxy_req, payload)


class MessageTests(SynchronousTestCase):
    def test_round_trips(self) -> None:
        cases = [
            (rpc.build_proxy_ans(7, b"abcd", flags=8), ProxyAns(8, 7, b"abcd")),
            (
                rpc.build_simple_ack(2**64 - 1, b"\x81\x02\x03\x04"),
                SimpleAck(2**64 - 1, b"\x81\x02\x03\x04"),
            ),
            (rpc.build_close_ext(5), CloseExt(5)),
            (rpc.build_close_conn(6), CloseConn(6)),
            (rpc.build_ping(0x1122334455667788), Ping(0x1122334455667788)),
            (rpc.build_pong(9), Pong(9)),
        ]
        for payload, message in cases:
            self.assertEqual(rpc.parse_message(payload), message)

    def test_wire_constants(self) -> None:
        self.assertEqual(rpc.build_proxy_ans(0, b"")[:4].hex(), "0dda0344")
        self.assertEqual(rpc.build_simple_ack(0, bytes(4))[:4].hex(), "9b40ac3b")
        self.assertEqual(rpc.build_close_ext(0).hex(), "a234b65e" + "00" * 8)
        self.assertEqual(rpc.build_close_conn(1).hex(), "5d42cf1f01" + "00" * 7)
        self.assertEqual(rpc.build_ping(0)[:4].hex(), "dfa23057")
        self.assertEqual(rpc.build_pong(0)[:4].hex(), "a7ea3084")
        self.assertEqual(len(rpc.build_simple_ack(0, bytes(4))), 16)

    def test_unknown_type(self) -> None:
        payload = b"\x01\x02\x03\x04rest"
        self.assertEqual(rpc.parse_message(payload), UnknownMessage(0x04030201, payload))

    def test_truncated(self) -> None:
        for payload in (
            b"",
            b"\x0d\xda",
            rpc.build_proxy_ans(1, b"")[:15],
            rpc.build_simple_ack(1, b"abcd")[:15],
            rpc.build_close_ext(1)[:11],
            rpc.build_ping(1)[:8],
        ):
            self.assertRaises(RPCError, rpc.parse_message, payload)

    def test_builder_arguments(self) -> None:
        self.assertRaises(ValueError, rpc.build_simple_ack, 1, b"abc")
        self.assertRaises(ValueError, rpc.build_close_conn, 2**64)
        self.assertRaises(ValueError, rpc.build_ping, -1)

    @settings(max_examples=200)
    @given(st.binary(max_size=200))
    def test_random_messages(self, payload: bytes) -> None:
        with contextlib.suppress(RPCError):
            rpc.parse_message(payload)

    @settings(max_examples=200)
    @given(
        st.sampled_from(sorted(messages._PARSERS)).map(lambda t: struct.pack("<I", t)),
        st.binary(max_size=100),
    )
    def test_random_bodies(self, head: bytes, body: bytes) -> None:
        with contextlib.suppress(RPCError):
            rpc.parse_message(head + body)


class NonceTests(SynchronousTestCase):
    payload = rpc.build_nonce(SECRET, CLIENT_TS, NONCE_CLT)

    def test_skew(self) -> None:
        rpc.parse_nonce(self.payload, SECRET, now=CLIENT_TS - 30)
        self.assertRaises(RPCError, rpc.parse_nonce, self.payload, SECRET, now=CLIENT_TS + 31)
        self.assertRaises(RPCError, rpc.parse_nonce, self.payload, SECRET, now=CLIENT_TS - 31)
        rpc.parse_nonce(self.payload, SECRET, now=CLIENT_TS + 100, max_skew=100)

    def test_invalid(self) -> None:
        p = self.payload
        for payload in (
            p[:31],
            p + bytes(4),
            b"\x00" + p[1:],
            p[:4] + b"XXXX" + p[8:],
            p[:8] + struct.pack("<I", 2) + p[12:],
            rpc.build_handshake(PROXY_PID, ME_PEER_PID),
        ):
            self.assertRaises(RPCError, rpc.parse_nonce, payload, SECRET)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, rpc.build_nonce, SECRET, CLIENT_TS, b"short")
        self.assertRaises(ValueError, rpc.build_nonce, b"abc", CLIENT_TS, NONCE_CLT)

    @settings(max_examples=100)
    @given(st.binary(min_size=28, max_size=40))
    def test_random(self, payload: bytes) -> None:
        with contextlib.suppress(RPCError):
            rpc.parse_nonce(struct.pack("<I", rpc.RPC_NONCE) + payload, SECRET, now=0)


class HandshakeTests(SynchronousTestCase):
    payload = rpc.build_handshake(PROXY_PID, ME_PEER_PID)

    def test_answer(self) -> None:
        me = ProcessId(ipaddress.IPv4Address("149.154.175.50"), 8888, 77, 1600000000)
        reply = rpc.parse_handshake(
            rpc.answer_handshake(self.payload, me), expected_peer_pid=PROXY_PID
        )
        self.assertEqual(reply, rpc.Handshake(0, me, PROXY_PID))

    def test_peer_pid_mismatch(self) -> None:
        self.assertRaises(RPCError, rpc.parse_handshake, self.payload, expected_peer_pid=PROXY_PID)

    def test_error_reply(self) -> None:
        payload = rpc.build_handshake_error(-4, ME_PEER_PID)
        self.assertEqual(payload[:8].hex(), "dabe276afcffffff")
        error = self.assertRaises(HandshakeRejected, rpc.parse_handshake, payload)
        self.assertEqual(error.code, -4)
        self.assertIn("peer pid mismatch", str(error))
        self.assertRaises(RPCError, rpc.parse_handshake, payload[:19])

    def test_invalid(self) -> None:
        p = self.payload
        for payload in (
            p[:31],
            p + bytes(4),
            rpc.build_handshake(PROXY_PID, ME_PEER_PID, flags=1),
            rpc.build_handshake(PROXY_PID, ME_PEER_PID, flags=rpc.HANDSHAKE_FLAG_CRC32C),
            rpc.build_nonce(SECRET, 0, NONCE_CLT),
            b"",
        ):
            self.assertRaises(RPCError, rpc.parse_handshake, payload)

    def test_ascii_pids_accepted(self) -> None:
        pid = ProcessId.decode(b"IPIPPRPDTIME")
        payload = struct.pack("<II", rpc.RPC_HANDSHAKE, 0) + b"IPIPPRPDTIME" * 2
        self.assertEqual(rpc.parse_handshake(payload, expected_peer_pid=pid).sender_pid, pid)


class FramingTests(SynchronousTestCase):
    def frame(self, payload: bytes, seq: int) -> bytes:
        encoder = FrameEncoder()
        encoder.seq = seq
        return encoder.encode(payload)

    def test_padding_words_skipped(self) -> None:
        pad = rpc.PADDING_WORD
        stream = pad + self.frame(b"abcd", -2) + pad * 3 + self.frame(b"efgh", -1) + pad
        decoder = FrameDecoder()
        self.assertEqual(_feed_all(decoder, [stream]), [b"abcd", b"efgh"])
        self.assertEqual(decoder.buffered, 0)

    def test_batched_and_padded_when_encrypted(self) -> None:
        encoder = FrameEncoder()
        encoder.set_key(KEY, IV)
        wire = encoder.encode(b"abcd", b"x" * 20)
        self.assertEqual(len(wire), 48)
        self.assertEqual(encoder.seq, 0)
        decoder = FrameDecoder()
        decoder.set_key(KEY, IV)
        self.assertEqual(_feed_all(decoder, [wire]), [b"abcd", b"x" * 20])
        self.assertTrue(encoder.encrypted and decoder.encrypted)

    def test_bad_lengths(self) -> None:
        for total in (0, 8, 12, 13, 1 << 24 + 1):
            decoder = FrameDecoder()
            decoder.feed(struct.pack("<Ii", total, -2))
            self.assertRaises(RPCError, decoder.next_frame)

    def test_length_above_custom_maximum(self) -> None:
        decoder = FrameDecoder(max_frame_len=64)
        decoder.feed(struct.pack("<I", 68))
        self.assertRaises(RPCError, decoder.next_frame)
        self.assertRaises(ValueError, FrameEncoder(max_frame_len=64).encode, bytes(56))

    def test_crc_mismatch(self) -> None:
        frame = bytearray(self.frame(b"abcd", -2))
        frame[9] ^= 1
        decoder = FrameDecoder()
        decoder.feed(bytes(frame))
        self.assertRaises(RPCError, decoder.next_frame)

    def test_seq_mismatch(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(self.frame(b"abcd", -1))
        self.assertRaises(RPCError, decoder.next_frame)

    def test_waits_for_more(self) -> None:
        frame = self.frame(b"abcdefgh", -2)
        decoder = FrameDecoder()
        decoder.feed(frame[:-1])
        self.assertIsNone(decoder.next_frame())
        decoder.feed(frame[-1:])
        self.assertEqual(decoder.next_frame(), b"abcdefgh")

    def test_buffer_bound(self) -> None:
        decoder = FrameDecoder(max_frame_len=64, max_buffer=100)
        decoder.feed(bytes(100))
        self.assertRaises(RPCError, decoder.feed, b"x")

    def test_bad_payloads(self) -> None:
        encoder = FrameEncoder()
        self.assertRaises(ValueError, encoder.encode, b"")
        self.assertRaises(ValueError, encoder.encode, b"abc")
        self.assertRaises(ValueError, encoder.encode, b"abcd", b"efg")
        self.assertEqual(encoder.seq, -2)

    def test_keys_set_once(self) -> None:
        encoder, decoder = FrameEncoder(), FrameDecoder()
        encoder.set_key(KEY, IV)
        decoder.set_key(KEY, IV)
        self.assertRaises(ValueError, encoder.set_key, KEY, IV)
        self.assertRaises(ValueError, decoder.set_key, KEY, IV)
        self.assertRaises(ValueError, FrameEncoder().set_key, KEY[:16], IV)

    def test_plaintext_padding_before_key(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(self.frame(b"abcd", -2) + rpc.PADDING_WORD)
        self.assertEqual(decoder.next_frame(), b"abcd")
        decoder.set_key(KEY, IV)
        encoder = FrameEncoder()
        encoder.seq = -1
        encoder.set_key(KEY, IV)
        self.assertEqual(_feed_all(decoder, [encoder.encode(b"efgh")]), [b"efgh"])

    def test_plaintext_garbage_before_key(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(self.frame(b"abcd", -2) + b"\x04\x00")
        self.assertEqual(decoder.next_frame(), b"abcd")
        self.assertRaises(RPCError, decoder.set_key, KEY, IV)

    def test_unaligned_ciphertext(self) -> None:
        encoder, decoder = FrameEncoder(), FrameDecoder()
        encoder.set_key(KEY, IV)
        decoder.set_key(KEY, IV)
        wire = encoder.encode(b"abcdefgh") + encoder.encode(b"x" * 36)
        decoder.feed(wire[:17])
        self.assertEqual(list(decoder.frames()), [])
        self.assertEqual(decoder.buffered, 17)
        decoder.feed(wire[17:40])
        self.assertEqual(list(decoder.frames()), [b"abcdefgh"])
        self.assertEqual(decoder.buffered, 8)
        decoder.feed(wire[40:])
        self.assertEqual(list(decoder.frames()), [b"x" * 36])
        self.assertEqual(decoder.buffered, 0)


payloads = st.lists(
    st.binary(min_size=1, max_size=100).map(lambda b: b * 4), min_size=1, max_size=12
)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)


def _stream(batches: list[list[bytes]], encrypted: bool) -> bytes:
    encoder = FrameEncoder()
    if encrypted:
        encoder.set_key(KEY, IV)
    return b"".join(encoder.encode(*batch) for batch in batches)


def _batches(items: list[bytes], sizes: list[int]) -> list[list[bytes]]:
    out, i = [], 0
    for size in [*sizes, len(items)]:
        if i < len(items):
            out.append(items[i : i + max(size, 1)])
            i += max(size, 1)
    return out


class FramingPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(payloads, st.lists(st.integers(1, 4), max_size=6), cuts, st.booleans())
    def test_round_trip(
        self, items: list[bytes], sizes: list[int], cut: list[int], encrypted: bool
    ) -> None:
        stream = _stream(_batches(items, sizes), encrypted)
        decoder = FrameDecoder()
        if encrypted:
            decoder.set_key(KEY, IV)
        self.assertEqual(_feed_all(decoder, _split(stream, cut)), items)
        self.assertEqual(decoder.buffered, 0)
        self.assertEqual(decoder.seq, -2 + len(items))

    @settings(max_examples=200, deadline=None)
    @given(payloads, cuts, st.booleans(), st.data())
    def test_pieces_and_late_reads(
        self, items: list[bytes], cut: list[int], encrypted: bool, data: st.DataObject
    ) -> None:
        """
        Payloads framed from pieces, chunks fed with frames of earlier ones
        still unread, and the frames read as views: the same payloads.
        """
        whole, pieced = FrameEncoder(), FrameEncoder()
        if encrypted:
            whole.set_key(KEY, IV)
            pieced.set_key(KEY, IV)
        at = [data.draw(st.integers(0, len(item))) for item in items]
        pieces = [(item[:i], memoryview(item)[i:]) for item, i in zip(items, at, strict=True)]
        stream = pieced.encode_pieces(pieces)
        self.assertEqual(stream, whole.encode(*items))
        self.assertEqual(pieced.seq, whole.seq)
        decoder = FrameDecoder()
        if encrypted:
            decoder.set_key(KEY, IV)
        got: list[bytes] = []
        for chunk in _split(stream, cut):
            decoder.feed(chunk)
            if data.draw(st.booleans()):
                got.extend(bytes(view) for view in decoder.views())
        got.extend(bytes(view) for view in decoder.views())
        self.assertEqual(got, items)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(payloads, cuts, st.booleans(), st.data())
    def test_truncation_waits(
        self, items: list[bytes], cut: list[int], encrypted: bool, data: st.DataObject
    ) -> None:
        stream = _stream([items], encrypted)
        stream = stream[: data.draw(st.integers(0, len(stream)))]
        decoder = FrameDecoder()
        if encrypted:
            decoder.set_key(KEY, IV)
        got = _feed_all(decoder, _split(stream, cut))
        self.assertEqual(got, items[: len(got)])

    @settings(max_examples=200, deadline=None)
    @given(payloads, st.booleans(), st.data())
    def test_bit_flips(self, items: list[bytes], encrypted: bool, data: st.DataObject) -> None:
        stream = bytearray(_stream([items], encrypted))
        bits = st.integers(0, len(stream) * 8 - 1)
        for bit in data.draw(st.lists(bits, min_size=1, max_size=3, unique=True)):
            stream[bit // 8] ^= 1 << (bit % 8)
        decoder = FrameDecoder()
        if encrypted:
            decoder.set_key(KEY, IV)
        try:
            got = _feed_all(decoder, _split(bytes(stream), data.draw(cuts)))
        except RPCError:
            return
        self.assertNotEqual(got, items)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), cuts, st.booleans())
    def test_random_bytes(self, stream: bytes, cut: list[int], encrypted: bool) -> None:
        decoder = FrameDecoder(max_frame_len=256, max_buffer=1024)
        if encrypted:
            decoder.set_key(KEY, IV)
        with contextlib.suppress(RPCError):
            _feed_all(decoder, _split(stream, cut))


# -- a proxy and a middle proxy talking in memory ----------------------------------------------

ME_PID = ProcessId(ipaddress.IPv4Address(ME_V4[0]), ME_V4[1], 4242, 1690000000)


class FakeMiddleProxy:
    """
    The middle-proxy end, built from the server-side pieces of rpc.
    """

    def __init__(self, now: int) -> None:
        self.now = now
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()
        self.state = "nonce"
        self.requests: list[rpc.Message] = []

    def receive(self, data: bytes) -> bytes:
        out: list[bytes] = []
        self.decoder.feed(data)
        for payload in self.decoder.frames():
            if self.state == "nonce":
                theirs = rpc.parse_nonce(payload, SECRET, now=self.now)
                out.append(self.encoder.encode(rpc.build_nonce(SECRET, self.now, NONCE_SRV)))
                keys = rpc.derive_keys(
                    secret=SECRET,
                    nonce_srv=NONCE_SRV,
                    nonce_clt=theirs.nonce,
                    client_ts=theirs.crypto_ts,
                    client_addr=PROXY_V4,
                    server_addr=ME_V4,
                    server_side=True,
                )
                self.encoder.set_key(keys.encrypt.key, keys.encrypt.iv)
                self.decoder.set_key(keys.decrypt.key, keys.decrypt.iv)
                self.state = "handshake"
            elif self.state == "handshake":
                out.append(self.encoder.encode(rpc.answer_handshake(payload, ME_PID)))
                self.state = "ready"
            else:
                message = rpc.parse_message(payload)
                self.requests.append(message)
                if isinstance(message, ProxyReq):
                    out.append(
                        self.encoder.encode(
                            rpc.build_simple_ack(message.conn_id, b"\x80\x01\x02\x03"),
                            rpc.build_proxy_ans(message.conn_id, message.data[::-1]),
                            rpc.build_ping(99),
                            rpc.build_close_ext(message.conn_id),
                        )
                    )
        return b"".join(out)


class ProxySide:
    """
    The proxy end of the handshake, driven by the client-side pieces of rpc.
    """

    def __init__(self, now: int) -> None:
        self.now = now
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()
        self.state = "nonce"
        self.events: list[rpc.Message] = []

    def start(self) -> bytes:
        return self.encoder.encode(rpc.build_nonce(SECRET, self.now, NONCE_CLT))

    def receive(self, data: bytes) -> bytes:
        out: list[bytes] = []
        self.decoder.feed(data)
        for payload in self.decoder.frames():
            if self.state == "nonce":
                theirs = rpc.parse_nonce(payload, SECRET, now=self.now)
                keys = rpc.derive_keys(
                    secret=SECRET,
                    nonce_srv=theirs.nonce,
                    nonce_clt=NONCE_CLT,
                    client_ts=self.now,
                    client_addr=PROXY_V4,
                    server_addr=ME_V4,
                )
                self.encoder.set_key(keys.encrypt.key, keys.encrypt.iv)
                self.decoder.set_key(keys.decrypt.key, keys.decrypt.iv)
                out.append(self.encoder.encode(rpc.build_handshake(PROXY_PID, ME_PEER_PID)))
                self.state = "handshake"
            elif self.state == "handshake":
                rpc.parse_handshake(payload, expected_peer_pid=PROXY_PID)
                self.state = "ready"
            else:
                event = rpc.parse_message(payload)
                self.events.append(event)
                if isinstance(event, Ping):
                    out.append(self.encoder.encode(rpc.build_pong(event.ping_id)))
        return b"".join(out)


def _deliver(data: bytes, receiver: FakeMiddleProxy | ProxySide, step: int) -> bytes:
    return b"".join(receiver.receive(data[i : i + step]) for i in range(0, len(data), step))


class InMemoryHandshakeTests(SynchronousTestCase):
    def exchange(self, step: int) -> tuple[ProxySide, FakeMiddleProxy]:
        proxy, me = ProxySide(CLIENT_TS), FakeMiddleProxy(CLIENT_TS + 3)
        to_proxy = _deliver(proxy.start(), me, step)
        to_me = _deliver(to_proxy, proxy, step)
        to_proxy = _deliver(to_me, me, step)
        self.assertEqual(_deliver(to_proxy, proxy, step), b"")
        self.assertEqual((proxy.state, me.state), ("ready", "ready"))
        request = _proxy_req(data=bytes(range(8, 48)), conn_id=17)
        to_proxy = _deliver(proxy.encoder.encode(request, rpc.build_ping(5)), me, step)
        pong = _deliver(to_proxy, proxy, step)
        self.assertEqual(_deliver(pong, me, step), b"")
        return proxy, me

    def test_handshake_and_data(self) -> None:
        for step in (1, 7, 16, 1000):
            proxy, me = self.exchange(step)
            self.assertEqual(
                proxy.events,
                [
                    SimpleAck(17, b"\x80\x01\x02\x03"),
                    ProxyAns(0, 17, bytes(range(8, 48))[::-1]),
                    Ping(99),
                    CloseExt(17),
                ],
            )
            self.assertEqual(len(me.requests), 3)
            request = rpc.parse_proxy_req(_proxy_req(data=bytes(range(8, 48)), conn_id=17))
            self.assertEqual(me.requests[0], request)
            self.assertEqual(me.requests[1:], [Ping(5), Pong(99)])
            self.assertEqual((proxy.encoder.seq, me.decoder.seq), (3, 3))
            self.assertEqual((me.encoder.seq, proxy.decoder.seq), (4, 4))

    def test_wrong_secret_rejected(self) -> None:
        me = FakeMiddleProxy(CLIENT_TS)
        nonce = FrameEncoder().encode(rpc.build_nonce(b"\xff" * 32, CLIENT_TS, NONCE_CLT))
        self.assertRaises(RPCError, me.receive, nonce)

    def test_skewed_clock_rejected(self) -> None:
        proxy, me = ProxySide(CLIENT_TS), FakeMiddleProxy(CLIENT_TS + 31)
        self.assertRaises(RPCError, me.receive, proxy.start())

    def test_wrong_address_breaks_handshake(self) -> None:
        proxy, me = ProxySide(CLIENT_TS), FakeMiddleProxy(CLIENT_TS)
        reply = me.receive(proxy.start())
        proxy.decoder.feed(reply)
        (payload,) = proxy.decoder.frames()
        theirs = rpc.parse_nonce(payload, SECRET)
        keys = rpc.derive_keys(
            secret=SECRET,
            nonce_srv=theirs.nonce,
            nonce_clt=NONCE_CLT,
            client_ts=CLIENT_TS,
            client_addr=("203.0.113.7", 40001),
            server_addr=ME_V4,
        )
        proxy.encoder.set_key(keys.encrypt.key, keys.encrypt.iv)
        handshake = proxy.encoder.encode(rpc.build_handshake(PROXY_PID, ME_PEER_PID))
        self.assertRaises(RPCError, me.receive, handshake)
