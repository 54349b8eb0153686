"""
:mod:`mtproxy_tw.wire.socks5`: the SOCKS5 client machine against the
messages of RFC 1928 and RFC 1929, and the upstream URL parser.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.config import values
from mtproxy_tw.wire.socks5 import (
    REPLIES,
    Socks5Client,
    Socks5Error,
    Socks5Refused,
    UpstreamProxy,
    parse_url,
)

AUTH = UpstreamProxy("127.0.0.1", 1080, b"user", b"pass")
#: A success reply bound to 192.0.2.7:4660 (RFC 1928 section 6).
OK_V4 = bytes.fromhex("05 00 00 01 c0 00 02 07 12 34")


def ready(client: Socks5Client) -> Socks5Client:
    client.start()
    client.receive(b"\x05\x00")
    return client


class MachineTests(SynchronousTestCase):
    def test_greeting_without_auth(self) -> None:
        # VER 5, NMETHODS 1, METHODS {X'00' NO AUTHENTICATION REQUIRED}.
        self.assertEqual(Socks5Client("192.0.2.1", 443).start(), bytes.fromhex("05 01 00"))

    def test_greeting_with_auth_offers_only_username_password(self) -> None:
        self.assertEqual(Socks5Client("192.0.2.1", 443, AUTH).start(), bytes.fromhex("05 01 02"))

    def test_ipv4_request(self) -> None:
        client = Socks5Client("149.154.167.51", 443)
        client.start()
        # VER CMD=CONNECT RSV ATYP=IPv4 DST.ADDR DST.PORT (network order).
        self.assertEqual(
            client.receive(b"\x05\x00"), bytes.fromhex("05 01 00 01 95 9a a7 33 01 bb")
        )
        self.assertEqual(client.stage, "reply")

    def test_ipv6_request(self) -> None:
        client = Socks5Client("2001:db8::1", 8888)
        client.start()
        self.assertEqual(
            client.receive(b"\x05\x00"),
            bytes.fromhex("05 01 00 04 20010db8000000000000000000000001 22 b8"),
        )

    def test_domain_request(self) -> None:
        client = Socks5Client("core.telegram.org", 443)
        client.start()
        self.assertEqual(
            client.receive(b"\x05\x00"),
            bytes.fromhex("05 01 00 03 11") + b"core.telegram.org" + bytes.fromhex("01 bb"),
        )

    def test_username_password(self) -> None:
        client = Socks5Client("192.0.2.1", 443, AUTH)
        client.start()
        # RFC 1929: VER=1 ULEN UNAME PLEN PASSWD.
        self.assertEqual(client.receive(b"\x05\x02"), b"\x01\x04user\x04pass")
        self.assertEqual(client.stage, "auth")
        # STATUS 0 is success: the request follows.
        self.assertEqual(
            client.receive(b"\x01\x00"), bytes.fromhex("05 01 00 01 c0 00 02 01 01 bb")
        )

    def test_password_refused(self) -> None:
        client = Socks5Client("192.0.2.1", 443, AUTH)
        client.start()
        client.receive(b"\x05\x02")
        with self.assertRaisesRegex(Socks5Error, "refused the username and password"):
            client.receive(b"\x01\x01")

    def test_no_acceptable_method(self) -> None:
        client = Socks5Client("192.0.2.1", 443)
        client.start()
        with self.assertRaisesRegex(Socks5Error, "accepts no offered method"):
            client.receive(b"\x05\xff")

    def test_method_not_offered(self) -> None:
        client = Socks5Client("192.0.2.1", 443)
        client.start()
        with self.assertRaisesRegex(Socks5Error, "not offered"):
            client.receive(b"\x05\x02")

    def test_not_socks5(self) -> None:
        client = Socks5Client("192.0.2.1", 443)
        client.start()
        with self.assertRaisesRegex(Socks5Error, "not a SOCKS5 server"):
            client.receive(b"HTTP/1.1 400 Bad Request\r\n")

    def test_success_reply_ipv4(self) -> None:
        client = ready(Socks5Client("192.0.2.1", 443))
        self.assertEqual(client.receive(OK_V4 + b"early"), b"")
        self.assertEqual(client.stage, "done")
        assert client.bound is not None
        self.assertEqual((client.bound.host, client.bound.port), ("192.0.2.7", 0x1234))
        self.assertEqual(client.bound.rest, b"early")

    def test_success_reply_ipv6_and_domain(self) -> None:
        client = ready(Socks5Client("192.0.2.1", 443))
        client.receive(bytes.fromhex("05 00 00 04") + bytes(15) + b"\x01" + b"\x00\x50")
        assert client.bound is not None
        self.assertEqual((client.bound.host, client.bound.port), ("::1", 80))
        client = ready(Socks5Client("192.0.2.1", 443))
        client.receive(bytes.fromhex("05 00 00 03 04") + b"exit" + b"\x00\x51")
        assert client.bound is not None
        self.assertEqual((client.bound.host, client.bound.port), ("exit", 81))

    def test_reply_in_pieces(self) -> None:
        client = ready(Socks5Client("192.0.2.1", 443))
        for byte in OK_V4[:-1]:
            self.assertEqual(client.receive(bytes((byte,))), b"")
            self.assertIsNone(client.bound)
        client.receive(OK_V4[-1:])
        self.assertIsNotNone(client.bound)

    def test_every_reply_code(self) -> None:
        self.assertEqual(sorted(REPLIES), list(range(1, 9)))
        for code in range(1, 256):
            client = ready(Socks5Client("192.0.2.1", 443))
            with self.assertRaises(Socks5Refused) as caught:
                client.receive(bytes((5, code, 0, 1)) + bytes(6))
            self.assertEqual(caught.exception.code, code)
            self.assertEqual(
                str(caught.exception), REPLIES.get(code, f"unknown reply code {code:#04x}")
            )
        self.assertEqual(str(Socks5Refused(5)), "connection refused")

    def test_bad_address_type(self) -> None:
        client = ready(Socks5Client("192.0.2.1", 443))
        with self.assertRaisesRegex(Socks5Error, "address type"):
            client.receive(bytes.fromhex("05 00 00 02 00 00 00 00 00 00"))

    def test_data_after_done_or_before_start(self) -> None:
        with self.assertRaises(Socks5Error):
            Socks5Client("192.0.2.1", 443).receive(b"\x05\x00")
        client = ready(Socks5Client("192.0.2.1", 443))
        client.receive(OK_V4)
        with self.assertRaises(Socks5Error):
            client.receive(b"x")

    def test_credentials_not_in_repr(self) -> None:
        self.assertEqual(repr(AUTH), "UpstreamProxy(127.0.0.1:1080)")
        self.assertNotIn("pass", repr((AUTH,)))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.binary(max_size=300), max_size=8),
        st.booleans(),
        st.sampled_from(["192.0.2.1", "2001:db8::2", "example.org"]),
    )
    def test_any_bytes_raise_only_socks5_error(
        self, chunks: list[bytes], auth: bool, host: str
    ) -> None:
        client = Socks5Client(host, 443, AUTH if auth else None)
        client.start()
        for chunk in chunks:
            if client.stage == "done":
                break
            try:
                client.receive(chunk)
            except Socks5Error:
                break
            # Nothing unanswered grows without bound.
            self.assertLessEqual(len(client._buffer), 262)


class URLTests(SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(parse_url("socks5://127.0.0.1:1080"), UpstreamProxy("127.0.0.1", 1080))
        self.assertEqual(parse_url("socks5://[::1]:9050/"), UpstreamProxy("::1", 9050))
        self.assertEqual(parse_url("SOCKS5://exit.example:1080").label, "exit.example:1080")
        self.assertEqual(UpstreamProxy("::1", 9050).label, "[::1]:9050")

    def test_credentials(self) -> None:
        proxy = parse_url("socks5://us%40er:p%3Ass:w@127.0.0.1:1080")
        self.assertEqual((proxy.username, proxy.password), (b"us@er", b"p:ss:w"))

    def test_refused(self) -> None:
        for bad in (
            "127.0.0.1:1080",
            "http://127.0.0.1:1080",
            "socks5://127.0.0.1",
            "socks5://127.0.0.1:0",
            "socks5://127.0.0.1:99999",
            "socks5://127.0.0.1:1080/path",
            "socks5://user@127.0.0.1:1080",
            "socks5://:secretpw@127.0.0.1:1080",
        ):
            with self.assertRaises(ValueError, msg=bad):
                parse_url(bad)

    def test_refusal_does_not_repeat_the_password(self) -> None:
        with self.assertRaises(ValueError) as caught:
            values.upstream_proxies(["socks5://user:hunter2@127.0.0.1:0"])
        self.assertNotIn("hunter2", str(caught.exception))
        self.assertIn("SOCKS5", str(caught.exception))
