"""Tests for mtproxy_tw.wire.faketls."""

from __future__ import annotations

import contextlib
import hmac
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.faketls import (
    BOOT_TIME_MAX,
    FULL_RECORD,
    MIN_RECORD,
    ClientHello,
    HelloRecord,
    NeedMore,
    RecordWriter,
    TLSError,
    TLSRecordReader,
    build_client_hello,
    build_server_hello,
    check_server_hello,
    choose_cipher_suite,
    parse_client_hello,
    read_client_hello,
    timestamp_ok,
    verify_client_hello,
    wrap_records,
)

# Fake-TLS known-answer vector: secret, domain, time, session id a0..bf, key share 20..3f.
SECRET = bytes.fromhex("0123456789abcdeffedcba9876543210")
DOMAIN = "example.com"
TS = 1700000000
SESSION_ID = bytes(range(0xA0, 0xC0))
KEY_SHARE = bytes(range(0x20, 0x40))
VECTOR_HELLO = bytes.fromhex(
    "1603010200010001fc03030d26238e0a8f7886aa12f4d6d81029b85595c58660"
    "f139c5faf7d749c407338020a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3"
    "b4b5b6b7b8b9babbbcbdbebf00225a5a130113021303c02bc02fc02cc030cca9"
    "cca8c013c014009c009d002f0035000a010001910a0a000000000010000e0000"
    "0b6578616d706c652e636f6d00170000ff01000100000a000a00081a1a001d00"
    "170018000b00020100002300000010000e000c02683208687474702f312e3100"
    "0500050100000000000d00140012040308040401050308050501080606010201"
    "001200000033002b00292a2a000100001d0020202122232425262728292a2b2c"
    "2d2e2f303132333435363738393a3b3c3d3e3f002d00020101002b000b0a3a3a"
    "0304030303020301001b00030200024a4a000100001500cd"
) + bytes(205)
VECTOR_RANDOM = bytes.fromhex("0d26238e0a8f7886aa12f4d6d81029b85595c58660f139c5faf7d749c4073380")
VECTOR_HELLO_MAC = bytes.fromhex(
    "0d26238e0a8f7886aa12f4d6d81029b85595c58660f139c5faf7d749c4f660e5"
)
TS_MASK = bytes.fromhex("00f15365")  # u32le(1700000000)

SERVER_KEY = bytes(range(0x60, 0x80))
SERVER_FILLER = bytes(0xA5 ^ i for i in range(64))
VECTOR_FLIGHT = bytes.fromhex(
    "160303007a020000760303f2db79b475e1d92b4523d4e2e5700344d6ddb87cee"
    "277e394bc524ef389d245e20a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3"
    "b4b5b6b7b8b9babbbcbdbebf130100002e00330024001d002060616263646566"
    "6768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f002b0002030414"
    "03030001011703030040a5a4a7a6a1a0a3a2adacafaea9a8abaab5b4b7b6b1b0"
    "b3b2bdbcbfbeb9b8bbba85848786818083828d8c8f8e89888b8a959497969190"
    "93929d9c9f9e99989b9a"
)
VECTOR_SERVER_DIGEST = bytes.fromhex(
    "f2db79b475e1d92b4523d4e2e5700344d6ddb87cee277e394bc524ef389d245e"
)

CCS = b"\x14\x03\x03\x00\x01\x01"
SMALL_HELLO = build_client_hello(SECRET, DOMAIN, TS)
BIG_HELLO = build_client_hello(SECRET, DOMAIN, TS, mlkem=True)

fast = settings(max_examples=200, deadline=None, database=None)


def zero_random(record: bytes) -> bytes:
    return record[:11] + bytes(32) + record[43:]


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def fragment(hello: bytes, sizes: list[int]) -> bytes:
    """Split a hello's handshake message over several handshake records."""
    message, out = hello[5:], []
    for size in [*sizes, len(hello)]:
        piece, message = message[:size], message[size:]
        if piece:
            out.append(b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece)
    return b"".join(out)


def resign(hello: bytes) -> bytes:
    """Recompute the client random of an edited hello (timestamp TS)."""
    mac = hmac.digest(SECRET, zero_random(hello), "sha256")
    return hello[:11] + mac[:28] + xor(mac[28:], TS_MASK) + hello[43:]


def vector_hello() -> bytes:
    return build_client_hello(SECRET, DOMAIN, TS, session_id=SESSION_ID, key_share=KEY_SHARE)


class ClientHelloVectorTests(SynchronousTestCase):
    def test_builds_vector(self) -> None:
        self.assertEqual(vector_hello(), VECTOR_HELLO)

    def test_vector_digest(self) -> None:
        mac = hmac.digest(SECRET, zero_random(VECTOR_HELLO), "sha256")
        self.assertEqual(mac, VECTOR_HELLO_MAC)
        self.assertEqual(VECTOR_HELLO[11:43], VECTOR_RANDOM)
        self.assertEqual(VECTOR_RANDOM[:28], mac[:28])
        self.assertEqual(xor(VECTOR_RANDOM[28:], mac[28:]), TS_MASK)

    def test_verify_vector(self) -> None:
        match = verify_client_hello(VECTOR_HELLO, [("other", bytes(16)), ("main", SECRET)])
        assert match is not None
        self.assertEqual(match.name, "main")
        self.assertEqual(match.secret, SECRET)
        self.assertEqual(match.timestamp, TS)
        self.assertEqual(match.client_random, VECTOR_RANDOM)
        self.assertEqual(match.session_id, SESSION_ID)
        self.assertEqual(match.server_name, DOMAIN)
        self.assertEqual(match.cipher_suite, 0x1301)

    def test_parse_vector(self) -> None:
        hello = parse_client_hello(VECTOR_HELLO)
        self.assertEqual(hello.record, VECTOR_HELLO)
        self.assertEqual(hello.random, VECTOR_RANDOM)
        self.assertEqual(hello.session_id, SESSION_ID)
        self.assertEqual(hello.server_names, (DOMAIN,))
        self.assertEqual(hello.cipher_suites[:4], (0x5A5A, 0x1301, 0x1302, 0x1303))
        self.assertEqual(len(hello.cipher_suites), 17)

    def test_big_hello(self) -> None:
        self.assertTrue(1700 <= len(BIG_HELLO) <= 1900, len(BIG_HELLO))
        self.assertIn(b"\x11\xec\x04\xc0", BIG_HELLO)
        match = verify_client_hello(BIG_HELLO, [(1, SECRET)])
        assert match is not None
        self.assertEqual((match.name, match.timestamp, match.server_name), (1, TS, DOMAIN))

    def test_wrong_secret(self) -> None:
        self.assertIsNone(verify_client_hello(SMALL_HELLO, [("x", SECRET[::-1])]))
        self.assertIsNone(verify_client_hello(SMALL_HELLO, []))

    def test_tampered_hello(self) -> None:
        tampered = SMALL_HELLO.replace(b"example.com", b"example.org")
        self.assertIsNone(verify_client_hello(tampered, [("x", SECRET)]))

    def test_other_timestamps(self) -> None:
        for ts in (0, 5, 2**32 - 1):
            match = verify_client_hello(build_client_hello(SECRET, DOMAIN, ts), [("x", SECRET)])
            assert match is not None
            self.assertEqual(match.timestamp, ts)


class ParseTests(SynchronousTestCase):
    def test_no_sni(self) -> None:
        edited = SMALL_HELLO.replace(b"\x00\x00\x00\x10\x00\x0e", b"\x77\x77\x00\x10\x00\x0e", 1)
        hello = resign(edited)
        self.assertEqual(parse_client_hello(hello).server_names, ())
        match = verify_client_hello(hello, [("x", SECRET)])
        assert match is not None
        self.assertEqual((match.server_name, match.timestamp), (None, TS))

    def test_duplicate_sni(self) -> None:
        hello = SMALL_HELLO.replace(b"\x00\x17\x00\x00", b"\x00\x00\x00\x00")
        self.assertRaises(TLSError, parse_client_hello, hello)

    def test_bad_sni(self) -> None:
        self.assertRaises(
            TLSError, parse_client_hello, SMALL_HELLO.replace(b"example", b"ex\xe4mple")
        )
        self.assertRaises(TLSError, parse_client_hello, build_client_hello(SECRET, "", TS))

    def test_truncated(self) -> None:
        for cut in (0, 4, 5, 42, 100, 516):
            self.assertRaises(TLSError, parse_client_hello, SMALL_HELLO[:cut])

    def test_trailing_bytes(self) -> None:
        self.assertRaises(TLSError, parse_client_hello, SMALL_HELLO + b"\x00")

    def test_not_a_client_hello(self) -> None:
        self.assertRaises(
            TLSError, parse_client_hello, SMALL_HELLO[:5] + b"\x02" + SMALL_HELLO[6:]
        )
        self.assertRaises(TLSError, parse_client_hello, b"\x17" + SMALL_HELLO[1:])

    def test_choose_cipher_suite(self) -> None:
        self.assertEqual(choose_cipher_suite([0x8A8A, 0x1302, 0x1301]), 0x1302)
        self.assertEqual(choose_cipher_suite([0xC02B, 0x1303]), 0x1303)
        self.assertEqual(choose_cipher_suite([0xC02B, 0x1A1A]), 0x1301)
        self.assertEqual(choose_cipher_suite([]), 0x1301)


class ReadClientHelloTests(SynchronousTestCase):
    def test_not_tls(self) -> None:
        for data in (b"\xef", b"\xee\xee\xee\xee", b"\x16\x03\x03\x02\x00", b"\x16\x02"):
            self.assertIsNone(read_client_hello(data), data)

    def test_short_record_is_not_tls(self) -> None:
        self.assertIsNone(read_client_hello(b"\x16\x03\x01\x01\xff" + bytes(600)))

    def test_need_more(self) -> None:
        self.assertEqual(read_client_hello(b""), NeedMore(5))
        self.assertEqual(read_client_hello(b"\x16\x03"), NeedMore(5))
        self.assertEqual(read_client_hello(SMALL_HELLO[:5]), NeedMore(517))
        self.assertEqual(read_client_hello(SMALL_HELLO[:516]), NeedMore(517))

    def test_complete(self) -> None:
        self.assertEqual(read_client_hello(SMALL_HELLO), HelloRecord(SMALL_HELLO, 517))
        result = read_client_hello(BIG_HELLO + CCS)
        self.assertEqual(result, HelloRecord(BIG_HELLO, len(BIG_HELLO)))

    def test_too_long(self) -> None:
        self.assertRaises(TLSError, read_client_hello, b"\x16\x03\x01\x40\x01")

    def test_not_client_hello_message(self) -> None:
        data = SMALL_HELLO[:5] + b"\x02" + SMALL_HELLO[6:]
        self.assertRaises(TLSError, read_client_hello, data)

    def test_fragmented(self) -> None:
        wire = fragment(BIG_HELLO, [600, 700])
        self.assertEqual(len(wire), len(BIG_HELLO) + 10)
        self.assertEqual(read_client_hello(wire[:605]), NeedMore(610))
        self.assertEqual(read_client_hello(wire[:610]), NeedMore(1310))
        result = read_client_hello(wire + b"tail")
        self.assertEqual(result, HelloRecord(BIG_HELLO, len(wire)))
        assert isinstance(result, HelloRecord)
        self.assertIsNotNone(verify_client_hello(result.record, [("x", SECRET)]))

    def test_bad_fragments(self) -> None:
        wire = fragment(BIG_HELLO, [600])
        self.assertRaises(TLSError, read_client_hello, wire[:605] + b"\x17" + wire[606:])
        overshoot = wire[:608] + b"\xff\xff" + wire[610:]
        self.assertRaises(TLSError, read_client_hello, overshoot)
        empty = wire[:605] + b"\x16\x03\x01\x00\x00" + wire[605:]
        self.assertRaises(TLSError, read_client_hello, empty)


class TimestampTests(SynchronousTestCase):
    def test_window_edges(self) -> None:
        now = float(TS)
        self.assertTrue(timestamp_ok(TS - 300, now))
        self.assertTrue(timestamp_ok(TS + 300, now))
        self.assertFalse(timestamp_ok(TS - 301, now))
        self.assertFalse(timestamp_ok(TS + 301, now))
        self.assertFalse(timestamp_ok(TS - 300, now + 0.5))
        self.assertTrue(timestamp_ok(TS + 5, now, skew=5))
        self.assertFalse(timestamp_ok(TS + 6, now, skew=5))

    def test_boot_time(self) -> None:
        now = float(TS)
        self.assertEqual(BOOT_TIME_MAX, 7 * 86400)
        self.assertTrue(timestamp_ok(0, now))
        self.assertTrue(timestamp_ok(BOOT_TIME_MAX - 1, now))
        self.assertFalse(timestamp_ok(BOOT_TIME_MAX, now))
        self.assertFalse(timestamp_ok(5, now, boot_time_max=0))


class ServerHelloTests(SynchronousTestCase):
    def vector_flight(self, cipher_suite: int = 0x1301, key_share_first: bool = True) -> bytes:
        return build_server_hello(
            SECRET,
            VECTOR_RANDOM,
            SESSION_ID,
            cipher_suite=cipher_suite,
            public_key=SERVER_KEY,
            filler=SERVER_FILLER,
            key_share_first=key_share_first,
        )

    def test_vector(self) -> None:
        flight = self.vector_flight(cipher_suite=0x1301)
        self.assertEqual(flight, VECTOR_FLIGHT)
        self.assertEqual(len(flight), 202)
        self.assertEqual(flight[11:43], VECTOR_SERVER_DIGEST)
        expected = hmac.digest(SECRET, VECTOR_RANDOM + zero_random(VECTOR_FLIGHT), "sha256")
        self.assertEqual(expected, VECTOR_SERVER_DIGEST)

    def test_check_vector(self) -> None:
        self.assertEqual(check_server_hello(VECTOR_FLIGHT, SECRET, VECTOR_RANDOM), 202)
        self.assertEqual(check_server_hello(VECTOR_FLIGHT + b"\x17", SECRET, VECTOR_RANDOM), 202)

    def test_check_incomplete(self) -> None:
        for cut in range(202):
            result = check_server_hello(VECTOR_FLIGHT[:cut], SECRET, VECTOR_RANDOM)
            assert isinstance(result, NeedMore), cut
            self.assertTrue(cut < result.total <= 202, (cut, result))

    def test_check_rejects(self) -> None:
        self.assertRaises(TLSError, check_server_hello, VECTOR_FLIGHT, SECRET[::-1], VECTOR_RANDOM)
        self.assertRaises(TLSError, check_server_hello, VECTOR_FLIGHT, SECRET, bytes(32))
        for pos in (12, 50, 100, 201):
            bad = bytearray(VECTOR_FLIGHT)
            bad[pos] ^= 1
            self.assertRaises(TLSError, check_server_hello, bytes(bad), SECRET, VECTOR_RANDOM)
        two_ccs = VECTOR_FLIGHT[:127] + CCS + VECTOR_FLIGHT[127:]
        self.assertRaises(TLSError, check_server_hello, two_ccs, SECRET, VECTOR_RANDOM)
        alert = b"\x15\x03\x03\x00\x02\x02\x28"
        self.assertRaises(TLSError, check_server_hello, alert, SECRET, VECTOR_RANDOM)

    def test_extension_order_and_suite(self) -> None:
        flight = self.vector_flight(cipher_suite=0x1302, key_share_first=False)
        self.assertEqual(flight[76:78], b"\x13\x02")
        self.assertEqual(flight[81:87], b"\x00\x2b\x00\x02\x03\x04")
        self.assertEqual(flight[87:127], b"\x00\x33\x00\x24\x00\x1d\x00\x20" + SERVER_KEY)
        self.assertEqual(check_server_hello(flight, SECRET, VECTOR_RANDOM), 202)

    def test_defaults(self) -> None:
        first = build_server_hello(SECRET, VECTOR_RANDOM, SESSION_ID)
        second = build_server_hello(SECRET, VECTOR_RANDOM, SESSION_ID, app_data_len=1000)
        self.assertTrue(2500 <= len(first) - 138 < 3620)
        self.assertEqual(len(second), 1138)
        self.assertNotEqual(first[89:121], second[89:121])  # fresh X25519 keys
        for flight in (first, second):
            self.assertEqual(check_server_hello(flight, SECRET, VECTOR_RANDOM), len(flight))

    def test_bad_lengths(self) -> None:
        args = (SECRET, VECTOR_RANDOM, SESSION_ID)
        self.assertRaises(ValueError, build_server_hello, *args, app_data_len=0)
        self.assertRaises(ValueError, build_server_hello, *args, app_data_len=16402)
        self.assertRaises(ValueError, build_server_hello, *args, filler=b"")
        mismatch = {"filler": SERVER_FILLER, "app_data_len": 63}
        self.assertRaises(ValueError, build_server_hello, *args, **mismatch)


class RecordTests(SynchronousTestCase):
    def test_wrap(self) -> None:
        self.assertEqual(wrap_records(b""), b"")
        self.assertEqual(wrap_records(b"hello"), b"\x17\x03\x03\x00\x05hello")
        self.assertEqual(wrap_records(bytes(16401))[:5], b"\x17\x03\x03\x40\x11")
        self.assertEqual(len(wrap_records(bytes(16401))), 16406)
        two = wrap_records(bytes(16402))
        self.assertEqual(len(two), 16402 + 10)
        self.assertEqual(two[16406:16411], b"\x17\x03\x03\x00\x01")
        self.assertEqual(
            wrap_records(b"abcde", max_payload=2),
            b"".join(b"\x17\x03\x03\x00" + bytes((len(p),)) + p for p in (b"ab", b"cd", b"e")),
        )

    def test_read(self) -> None:
        reader = TLSRecordReader()
        stream = CCS + wrap_records(b"init") + CCS + wrap_records(b"more")
        self.assertEqual(reader.feed(stream), b"initmore")
        self.assertEqual(reader.feed(b"\x17\x03\x03\x00\x00"), b"")

    def test_read_byte_by_byte(self) -> None:
        reader = TLSRecordReader()
        stream = CCS + wrap_records(bytes(range(256)) * 100, max_payload=2878)
        out = b"".join(reader.feed(stream[i : i + 1]) for i in range(len(stream)))
        self.assertEqual(out, bytes(range(256)) * 100)

    def test_read_max_payload(self) -> None:
        payload = bytes(16640)
        record = b"\x17\x03\x03\x41\x00" + payload
        self.assertEqual(TLSRecordReader().feed(record), payload)

    def test_read_errors(self) -> None:
        bad = [
            b"\x17\x03\x01\x00\x01x",  # version
            b"\x15\x03\x03\x00\x02\x02\x28",  # alert
            b"\x16\x03\x03\x00\x01\x01",  # handshake
            b"\x14\x03\x03\x00\x02\x01\x01",  # long ChangeCipherSpec
            b"\x14\x03\x03\x00\x01\x02",  # bad ChangeCipherSpec body
            b"\x17\x03\x03\x41\x01",  # too long: rejected on the header alone
        ]
        for data in bad:
            self.assertRaises(TLSError, TLSRecordReader().feed, data)
            reader = TLSRecordReader()
            reader.feed(data[:3])
            self.assertRaises(TLSError, reader.feed, data[3:])

    def test_partial_then_many(self) -> None:
        reader = TLSRecordReader()
        stream = wrap_records(b"x" * 5000, max_payload=100)
        self.assertEqual(reader.feed(stream[:150]), b"x" * 100)
        self.assertEqual(reader.feed(stream[150:]), b"x" * 4900)


def record_payloads(wire: bytes) -> list[bytes]:
    """The payloads of a run of whole ``17 03 03`` records."""
    out, pos = [], 0
    while pos < len(wire):
        assert wire[pos : pos + 3] == b"\x17\x03\x03", wire[pos : pos + 5]
        size = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        out.append(wire[pos + 5 : pos + 5 + size])
        assert len(out[-1]) == size
        pos += 5 + size
    return out


def record_sizes(wire: bytes) -> list[int]:
    return [len(p) for p in record_payloads(wire)]


class RecordWriterTests(SynchronousTestCase):
    """The download direction, sized as a TLS 1.3 server with dynamic record sizing."""

    def test_a_full_record_is_a_tls13_one(self) -> None:
        self.assertEqual(FULL_RECORD, 2**14 + 1 + 16)
        self.assertEqual(MIN_RECORD, 18)

    def test_burst_ramps_up_to_full_records(self) -> None:
        writer = RecordWriter(small=1400)
        data = random.Random(1).randbytes(1 << 20)
        wire = writer.wrap(data, 100.0)
        payloads = record_payloads(wire)
        self.assertEqual(b"".join(payloads), data)
        sizes = [len(p) for p in payloads]
        self.assertEqual(sizes[:40], [1400] * 40)
        self.assertEqual(sizes[40:80], [4246] * 40)
        self.assertEqual(set(sizes[80:-1]), {FULL_RECORD})
        self.assertEqual(sum(sizes), 1 << 20)
        # Later writes of the burst: full records from the first.
        self.assertEqual(
            record_sizes(writer.wrap(bytes(3 * FULL_RECORD + 100), 100.5)),
            [FULL_RECORD, FULL_RECORD, FULL_RECORD, 100],
        )
        self.assertEqual(record_sizes(writer.wrap(bytes(FULL_RECORD), 101.4)), [FULL_RECORD])

    def test_ramp_spans_writes(self) -> None:
        writer = RecordWriter(small=1400, ramp=2)
        sizes = [record_sizes(writer.wrap(bytes(1000), 5.0 + i / 10)) for i in range(5)]
        self.assertEqual(sizes, [[1000]] * 5)  # each write fits one record
        self.assertEqual(record_sizes(writer.wrap(bytes(30000), 5.5)), [16401, 13599])

    def test_idle_starts_a_new_burst(self) -> None:
        writer = RecordWriter(small=1400)
        writer.wrap(bytes(1 << 20), 0.0)
        self.assertEqual(record_sizes(writer.wrap(bytes(20000), 0.875)), [16401, 3599])
        # 0.875 s after the previous write: still the same burst.
        self.assertEqual(record_sizes(writer.wrap(bytes(20000), 1.75)), [16401, 3599])
        # A second without sending: small records again.
        self.assertEqual(record_sizes(writer.wrap(bytes(5000), 2.75)), [1400, 1400, 1400, 800])
        # An empty write sends nothing and is not activity.
        writer.wrap(bytes(1 << 20), 3.0)
        self.assertEqual(writer.wrap(b"", 3.5), b"")
        self.assertEqual(record_sizes(writer.wrap(bytes(2000), 4.25)), [1400, 600])

    def test_no_record_shorter_than_an_aead_record(self) -> None:
        writer = RecordWriter(small=1400, ramp=0)
        self.assertEqual(record_sizes(writer.wrap(bytes(FULL_RECORD + 5), 0.0)), [16388, 18])
        self.assertEqual(record_sizes(writer.wrap(bytes(FULL_RECORD + 17), 0.0)), [16400, 18])
        self.assertEqual(record_sizes(writer.wrap(bytes(FULL_RECORD + 18), 0.0)), [16401, 18])
        # A write that small is one record: nothing else is there to send.
        self.assertEqual(record_sizes(writer.wrap(b"abc", 0.0)), [3])
        small = RecordWriter(small=1400)
        self.assertEqual(record_sizes(small.wrap(bytes(1401), 0.0)), [1383, 18])

    def test_small_records_vary_per_connection(self) -> None:
        rng = random.Random(7)
        firsts = {
            record_sizes(RecordWriter(rng=rng).wrap(bytes(9000), 0.0))[0] for _ in range(200)
        }
        self.assertLessEqual(min(firsts), 1369 + 17 + 3)
        self.assertGreaterEqual(max(firsts), 1400 + 17 - 3)
        self.assertTrue(firsts <= set(range(1369 + 17, 1400 + 17 + 1)), firsts)
        # Within a connection the small size stays.
        writer = RecordWriter(rng=rng)
        self.assertEqual(len(set(record_sizes(writer.wrap(bytes(30000), 0.0))[:-2])), 1)

    def test_other_limits(self) -> None:
        writer = RecordWriter(full=0xFFFF, ramp=0)
        self.assertEqual(record_sizes(writer.wrap(bytes(70000), 0.0)), [0xFFFF, 70000 - 0xFFFF])
        for bad in ({"full": 0x10000}, {"small": 20}, {"small": 5000}, {"ramp": -1}):
            self.assertRaises(ValueError, RecordWriter, **bad)


def reference_read(stream: bytes) -> bytes:
    """Straightforward record parser used as an oracle; raises TLSError like the reader."""
    out, pos = [], 0
    while len(stream) - pos >= 5:
        kind, version, size = stream[pos], stream[pos + 1 : pos + 3], stream[pos + 3 : pos + 5]
        length = int.from_bytes(size, "big")
        if version != b"\x03\x03":
            raise TLSError
        if kind == 0x14:
            if length != 1:
                raise TLSError
        elif kind != 0x17 or length > 16640:
            raise TLSError
        if len(stream) - pos - 5 < length:
            break
        payload = stream[pos + 5 : pos + 5 + length]
        if kind == 0x17:
            out.append(payload)
        elif payload != b"\x01":
            raise TLSError
        pos += 5 + length
    return b"".join(out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


record_kinds = st.sampled_from([0x14, 0x15, 0x16, 0x17, 0x17, 0x17]) | st.integers(0, 255)
versions = st.sampled_from([b"\x03\x03", b"\x03\x03", b"\x03\x01"]) | st.binary(
    min_size=2, max_size=2
)
raw_records = st.tuples(record_kinds, versions, st.binary(max_size=300), st.integers(-2, 2)).map(
    lambda t: bytes((t[0],)) + t[1] + max(0, len(t[2]) + t[3]).to_bytes(2, "big") + t[2]
)
ccs_like = st.sampled_from([CCS, b"\x14\x03\x03\x00\x01\x02", b"\x14\x03\x03\x00\x00"])


class PropertyTests(SynchronousTestCase):
    @fast
    @given(
        data=st.binary(max_size=20000),
        max_payload=st.sampled_from([1, 7, 2878, 16384]) | st.integers(1, 16384),
        ccs_before=st.sets(st.integers(0, 40)),
        cuts=st.lists(st.integers(0, 10**6), max_size=20),
    )
    def test_record_round_trip(
        self, data: bytes, max_payload: int, ccs_before: set[int], cuts: list[int]
    ) -> None:
        records = [
            wrap_records(data[i : i + max_payload], max_payload)
            for i in range(0, len(data), max_payload)
        ]
        for index in sorted(ccs_before, reverse=True):
            records.insert(min(index, len(records)), CCS)
        stream = b"".join(records)
        if not ccs_before:
            self.assertEqual(stream, wrap_records(data, max_payload))
        reader = TLSRecordReader()
        self.assertEqual(b"".join(reader.feed(chunk) for chunk in split(stream, cuts)), data)

    @fast
    @given(
        parts=st.lists(raw_records | ccs_like | st.binary(max_size=8), max_size=12),
        cuts=st.lists(st.integers(0, 10**6), max_size=10),
    )
    def test_record_reader_matches_reference(self, parts: list[bytes], cuts: list[int]) -> None:
        stream = b"".join(parts)
        try:
            expected: bytes | None = reference_read(stream)
        except TLSError:
            expected = None
        reader = TLSRecordReader()
        out = []
        try:
            for chunk in split(stream, cuts):
                out.append(reader.feed(chunk))
        except TLSError:
            self.assertIsNone(expected)
        else:
            self.assertEqual(b"".join(out), expected)

    @fast
    @given(
        writes=st.lists(
            st.tuples(
                st.integers(0, 5000) | st.sampled_from([1, 17, 18, 19, 35, 36, 37]),
                st.sampled_from([0.0, 0.001, 0.5, 0.999, 1.0, 30.0]),
            ),
            max_size=30,
        ),
        small=st.integers(2 * MIN_RECORD, 400),
        extra=st.tuples(st.integers(0, 300), st.integers(0, 300)),
        ramp=st.integers(0, 4),
    )
    def test_record_writer(
        self,
        writes: list[tuple[int, float]],
        small: int,
        extra: tuple[int, int],
        ramp: int,
    ) -> None:
        medium, full = small + extra[0], small + extra[0] + extra[1]
        writer = RecordWriter(small=small, medium=medium, full=full, ramp=ramp)
        rng = random.Random(len(writes))
        now, last = 1000.0, None
        sent = 0  # records of the burst so far
        for size, gap in writes:
            now += gap
            data = rng.randbytes(size)
            payloads = record_payloads(writer.wrap(data, now))
            self.assertEqual(b"".join(payloads), data)
            if not data:
                self.assertEqual(payloads, [])
                continue
            burst = last is None or now - last >= 1.0
            last = now
            if burst:
                sent = 0
            sizes = [len(p) for p in payloads]
            self.assertLessEqual(max(sizes), full)
            if size >= MIN_RECORD:
                self.assertGreaterEqual(min(sizes), MIN_RECORD)
            else:
                self.assertEqual(sizes, [size])
            if burst and ramp:
                self.assertLessEqual(sizes[0], small)
            # Every record but a write's last two is exactly its phase's size; the
            # one before the last gave the last some bytes at most.
            for index, got in enumerate(sizes[:-1]):
                nth = sent + index
                limit = small if nth < ramp else medium if nth < 2 * ramp else full
                if index < len(sizes) - 2:
                    self.assertEqual(got, limit)
                else:
                    self.assertGreater(got, limit - MIN_RECORD)
            sent += len(sizes)

    @fast
    @given(data=st.binary(max_size=2000) | st.binary(max_size=2000).map(b"\x16\x03\x01".__add__))
    def test_random_bytes_only_raise_tls_error(self, data: bytes) -> None:
        try:
            result = read_client_hello(data)
        except TLSError:
            result = None
        self.assertIsInstance(result, (HelloRecord, NeedMore, type(None)))
        if isinstance(result, NeedMore):
            self.assertGreater(result.total, len(data))
        for record in (data, result.record if isinstance(result, HelloRecord) else b""):
            with contextlib.suppress(TLSError):
                self.assertIsInstance(parse_client_hello(record), ClientHello)
                verify_client_hello(record, [("x", SECRET)])

    @fast
    @given(hello=st.sampled_from([SMALL_HELLO, BIG_HELLO]), data=st.data())
    def test_truncated_hellos(self, hello: bytes, data: st.DataObject) -> None:
        cut = data.draw(st.integers(0, len(hello) - 1))
        prefix = hello[:cut]
        result = read_client_hello(prefix)
        assert isinstance(result, NeedMore)
        self.assertEqual(result.total, 5 if cut < 5 else len(hello))
        self.assertRaises(TLSError, parse_client_hello, prefix)
        self.assertRaises(TLSError, verify_client_hello, prefix, [("x", SECRET)])

    @fast
    @given(
        hello=st.sampled_from([SMALL_HELLO, BIG_HELLO]),
        edits=st.lists(
            st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6
        ),
        extra=st.binary(max_size=4),
    )
    def test_corrupted_hellos(
        self, hello: bytes, edits: list[tuple[int, int]], extra: bytes
    ) -> None:
        corrupted = bytearray(hello)
        for pos, value in edits:
            corrupted[pos % len(hello)] = value
        data = bytes(corrupted) + extra
        try:
            result = read_client_hello(data)
            if isinstance(result, HelloRecord):
                record = result.record
                match = verify_client_hello(record, [("x", SECRET)])
                if match is not None:
                    self.assertEqual(match.session_id, parse_client_hello(record).session_id)
            else:
                self.assertIsInstance(result, (NeedMore, type(None)))
        except TLSError:
            pass
        with contextlib.suppress(TLSError):
            self.assertEqual(parse_client_hello(data).record, data)

    @fast
    @given(sizes=st.lists(st.integers(1, 1500), max_size=4), cuts=st.integers(0, 5000))
    def test_fragmented_hello(self, sizes: list[int], cuts: int) -> None:
        wire = fragment(BIG_HELLO, [512, *sizes])
        self.assertEqual(read_client_hello(wire), HelloRecord(BIG_HELLO, len(wire)))
        prefix = wire[: cuts % len(wire)]
        result = read_client_hello(prefix)
        assert isinstance(result, NeedMore)
        self.assertGreater(result.total, len(prefix))
        self.assertLessEqual(result.total, len(wire))
