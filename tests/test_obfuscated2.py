"""
The obfuscated2 handshake against the vectors of PROTOCOL.md section 11.1-11.2.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire import obfuscated2
from mtproxy_tw.wire.obfuscated2 import (
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    accept_init,
    generate_init,
    is_acceptable_first_bytes,
    make_init,
)

H = bytes.fromhex
SECRET = H("000102030405060708090a0b0c0d0e0f")
CLIENT_PLAIN = bytes(range(0x40, 0x78)) + H("ddddddddfeff7e7f")
CLIENT_WIRE = H(
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
    "606162636465666768696a6b6c6d6e6f707172737475767790ff27c6d9345cdc"
)
RECV_KEY = H("ace73e9a2c276911bf0f75052516a425c4346c78c7b439af1023dd99ff1065c8")
RECV_IV = H("68696a6b6c6d6e6f7071727374757677")
SEND_KEY = H("e9b16a879eae5d15fefa87197f4bc5593e84e21b1a507b801ebafc736070eb4c")
SEND_IV = H("57565554535251504f4e4d4c4b4a4948")
NEXT_RECV_KEYSTREAM = H("e3058d08dcf9c2fd1e8720e434c31e22")
FIRST_SEND_KEYSTREAM = H("e39f670aed634a966a2e108698527944")

DC_RANDOM = H(
    "909396999c9fa2a5a8abaeb1b4b7babdc0c3c6c9cccfd2d5d8dbdee1e4e7eaed"
    "f0f3f6f9fcff0205080b0e1114171a1d202326292c2f3235dddddddd44474a4d"
)
DC_WIRE = H(
    "909396999c9fa2a5a8abaeb1b4b7babdc0c3c6c9cccfd2d5d8dbdee1e4e7eaed"
    "f0f3f6f9fcff0205080b0e1114171a1d202326292c2f323596fd494f181f7e44"
)
DC_FAST_PLAIN = H(
    "909396999c9fa2a548494a4b4c4d4e4f50515253545556574ceb706073fcba1e"
    "807b501a1be2843e59c54b7f1987fafe155dae9e876ab1e9dddddddd44474a4d"
)
DC_FAST_WIRE = H(
    "909396999c9fa2a548494a4b4c4d4e4f50515253545556574ceb706073fcba1e"
    "807b501a1be2843e59c54b7f1987fafe155dae9e876ab1e99af02f683d44be86"
)


class ClientInitTests(SynchronousTestCase):
    def test_client_wire(self) -> None:
        """
        A client encrypts only the tag and DC id of its init.
        """
        self.assertEqual(make_init(CLIENT_PLAIN, SECRET).wire, CLIENT_WIRE)

    def test_accept(self) -> None:
        """
        The proxy recovers tag and DC id, and derives both streams.
        """
        accepted = accept_init(CLIENT_WIRE, SECRET)
        assert accepted is not None
        self.assertEqual(accepted.tag, TAG_PADDED)
        self.assertEqual(accepted.dc, -2)
        self.assertEqual((accepted.send_key, accepted.send_iv), (SEND_KEY, SEND_IV))
        self.assertEqual(accepted.decryptor.update(bytes(16)), NEXT_RECV_KEYSTREAM)
        self.assertEqual(accepted.encryptor.update(bytes(16)), FIRST_SEND_KEYSTREAM)

    def test_receive_key(self) -> None:
        """
        The receive key is SHA-256 over the key seed and the secret.
        """
        self.assertEqual(hashlib.sha256(CLIENT_WIRE[8:40] + SECRET).digest(), RECV_KEY)
        self.assertEqual(CLIENT_WIRE[40:56], RECV_IV)

    def test_wrong_secret(self) -> None:
        self.assertIsNone(accept_init(CLIENT_WIRE, bytes(16)))

    def test_tag_not_allowed(self) -> None:
        self.assertIsNone(accept_init(CLIENT_WIRE, SECRET, {TAG_ABRIDGED, TAG_INTERMEDIATE}))

    def test_length(self) -> None:
        self.assertRaises(ValueError, accept_init, CLIENT_WIRE[:63], SECRET)

    def test_both_directions(self) -> None:
        """
        What the client encrypts the proxy decrypts, and the other way round.
        """
        client = make_init(CLIENT_PLAIN, SECRET)
        proxy = accept_init(client.wire, SECRET)
        assert proxy is not None
        self.assertEqual(proxy.decryptor.update(client.encryptor.update(b"hello")), b"hello")
        self.assertEqual(client.decryptor.update(proxy.encryptor.update(b"world")), b"world")


class DCInitTests(SynchronousTestCase):
    def test_normal(self) -> None:
        streams = make_init(DC_RANDOM, None)
        self.assertEqual(streams.wire, DC_WIRE)
        dc = accept_init(DC_WIRE, None)
        assert dc is not None
        self.assertEqual(dc.tag, TAG_PADDED)
        self.assertEqual(
            dc.send_key, H("35322f2c292623201d1a1714110e0b080502fffcf9f6f3f0edeae7e4e1dedbd8")
        )
        self.assertEqual(dc.send_iv, H("d5d2cfccc9c6c3c0bdbab7b4b1aeaba8"))

    def test_fast(self) -> None:
        """
        In fast mode the DC encrypts with the proxy's stream toward the client.
        """
        dc_id = int.from_bytes(DC_RANDOM[60:62], "little", signed=True)
        streams = generate_init(
            TAG_PADDED, dc_id, fast_keys=(SEND_KEY, SEND_IV), random=lambda n: DC_RANDOM
        )
        self.assertEqual(streams.wire, DC_FAST_WIRE)
        self.assertEqual(make_init(DC_FAST_PLAIN, None).wire, DC_FAST_WIRE)
        dc = accept_init(DC_FAST_WIRE, None)
        assert dc is not None
        self.assertEqual((dc.send_key, dc.send_iv), (SEND_KEY, SEND_IV))
        self.assertEqual(
            streams.encryptor.update(bytes(16)),
            make_init(DC_FAST_PLAIN, None).encryptor.update(bytes(16)),
        )
        to_dc_key = H("48494a4b4c4d4e4f50515253545556574ceb706073fcba1e807b501a1be2843e")
        to_dc_iv = H("59c54b7f1987fafe155dae9e876ab1e9")
        self.assertEqual(
            dc.decryptor.update(b"x"),
            obfuscated2.ctr(to_dc_key, to_dc_iv).update(bytes(64) + b"x")[64:],
        )

    def test_fast_stream_matches_client(self) -> None:
        """
        Bytes the DC sends decrypt on the client with no work by the proxy.
        """
        client = make_init(CLIENT_PLAIN, SECRET)
        proxy = accept_init(client.wire, SECRET)
        assert proxy is not None
        upstream = generate_init(proxy.tag, proxy.dc, fast_keys=(proxy.send_key, proxy.send_iv))
        dc = accept_init(upstream.wire, None)
        assert dc is not None and dc.dc == -2 and dc.tag == TAG_PADDED
        self.assertEqual(
            client.decryptor.update(dc.encryptor.update(b"pass-through")), b"pass-through"
        )


class GenerationTests(SynchronousTestCase):
    def test_forbidden_prefixes(self) -> None:
        """
        A random init that starts like HTTP, TLS or a plain transport is drawn again.
        """
        bad = [b"HEAD", b"POST", b"GET ", b"OPTI", b"\x16\x03\x01\x02", b"\xdd" * 4, b"\xee" * 4]
        for prefix in bad:
            self.assertFalse(is_acceptable_first_bytes(prefix + b"\x01" * 60), prefix)
        self.assertFalse(is_acceptable_first_bytes(b"\xef" + b"\x01" * 63))
        self.assertFalse(is_acceptable_first_bytes(b"\x01" * 4 + b"\0" * 4 + b"\x01" * 56))
        draws = [b"GET " + b"\x01" * 60, b"\x02" * 64]
        streams = generate_init(TAG_ABRIDGED, 3, random=lambda n: draws.pop(0))
        self.assertEqual(streams.wire[:8], b"\x02" * 8)
        self.assertEqual(draws, [])

    @settings(max_examples=100)
    @given(
        st.sampled_from([TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED]),
        st.integers(-32768, 32767),
        st.binary(min_size=16, max_size=16),
    )
    def test_round_trip(self, tag: bytes, dc: int, secret: bytes) -> None:
        streams = generate_init(tag, dc, secret=secret)
        accepted = accept_init(streams.wire, secret)
        assert accepted is not None
        self.assertEqual((accepted.tag, accepted.dc), (tag, dc))
        self.assertTrue(is_acceptable_first_bytes(streams.wire))

    @settings(max_examples=200)
    @given(st.binary(min_size=64, max_size=64))
    def test_random_init(self, blob: bytes) -> None:
        """
        Random bytes either match (with tiny probability) or give None; never raise.
        """
        result = accept_init(blob, bytes(16))
        if result is not None:
            self.assertIn(result.tag, obfuscated2.TAGS)
