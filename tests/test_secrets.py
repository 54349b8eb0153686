"""
Secret forms and links (PROTOCOL.md section 1).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.wire.secrets import Mode, SecretError, generate, links, parse_secret

S = "0123456789abcdeffedcba9876543210"
EE_HEX = "ee0123456789abcdeffedcba98765432106578616d706c652e636f6d"
EE_B64 = "7gEjRWeJq83v_ty6mHZUMhBleGFtcGxlLmNvbQ"


class ParseTests(SynchronousTestCase):
    def test_classic(self) -> None:
        secret = parse_secret(S, "a")
        self.assertEqual((secret.name, secret.kind, secret.key.hex()), ("a", Mode.CLASSIC, S))

    def test_classic_starting_with_dd_or_ee(self) -> None:
        """
        32 hex digits are a classic secret whatever they start with.
        """
        for text in ("dd" + S[2:], "ee" + S[2:]):
            self.assertEqual(parse_secret(text, "x").kind, Mode.CLASSIC)

    def test_secure(self) -> None:
        secret = parse_secret("alice=dd" + S.upper(), "x")
        self.assertEqual((secret.name, secret.kind, secret.key.hex()), ("alice", Mode.SECURE, S))
        self.assertEqual(secret.hex(), "dd" + S)

    def test_tls_hex_and_base64(self) -> None:
        for text in (EE_HEX, EE_B64):
            secret = parse_secret(text, "x")
            self.assertEqual(
                (secret.kind, secret.domain, secret.key.hex()), (Mode.TLS, "example.com", S)
            )
            self.assertEqual(secret.hex(), EE_HEX)
            self.assertEqual(secret.base64url(), EE_B64)

    def test_errors(self) -> None:
        for text in (
            "",
            "zz",
            S[:-2],
            "ab" + S,
            "dd" + S + "00",
            "bad name=" + S,
            "ee" + S + "ff00",
        ):
            self.assertRaises(SecretError, parse_secret, text, "x")

    def test_error_hides_secret(self) -> None:
        try:
            parse_secret("ab" + S, "x")
        except SecretError as e:
            self.assertNotIn(S, str(e))
        else:
            self.fail("no error")

    def test_repr_hides_secret(self) -> None:
        self.assertNotIn(S, repr(parse_secret(S, "x")))

    def test_admits(self) -> None:
        self.assertEqual(parse_secret(S, "x").admits(), {Mode.CLASSIC, Mode.SECURE})
        self.assertEqual(parse_secret("dd" + S, "x").admits(), {Mode.SECURE})
        self.assertEqual(parse_secret(EE_HEX, "x").admits(), {Mode.TLS})

    @settings(max_examples=200)
    @given(st.text(max_size=80))
    def test_random_text(self, text: str) -> None:
        try:
            secret = parse_secret(text, "x")
        except SecretError:
            return
        self.assertEqual(len(secret.key), 16)


class GenerateTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        for kind in (Mode.CLASSIC, Mode.SECURE):
            secret = generate(kind)
            self.assertEqual(parse_secret(secret.hex(), "x").key, secret.key)
            self.assertEqual(parse_secret(secret.hex(), "x").kind, kind)
        tls = generate(Mode.TLS, domain="example.com")
        self.assertEqual(parse_secret(tls.base64url(), "x").domain, "example.com")
        self.assertNotEqual(generate(Mode.CLASSIC).key, generate(Mode.CLASSIC).key)
        self.assertRaises(SecretError, generate, Mode.TLS)


class LinkTests(SynchronousTestCase):
    def test_links(self) -> None:
        self.assertEqual(
            links(parse_secret("dd" + S, "x"), "proxy.example", 443),
            [
                f"tg://proxy?server=proxy.example&port=443&secret=dd{S}",
                f"https://t.me/proxy?server=proxy.example&port=443&secret=dd{S}",
            ],
        )

    def test_tls_links_both_forms(self) -> None:
        got = links(parse_secret(EE_HEX, "x"), "::1", 8443)
        self.assertEqual(len(got), 4)
        self.assertIn(f"tg://proxy?server=::1&port=8443&secret={EE_B64}", got)
        self.assertIn(f"https://t.me/proxy?server=::1&port=8443&secret={EE_HEX}", got)

    def test_ipv6_server_bare(self) -> None:
        """
        IPv6 goes in ``server=`` bare and short, as Android's inet_pton takes
        it: brackets given (as in ``--public-host [::1]``) are taken off.
        """
        secret = parse_secret("dd" + S, "x")
        for host in ("2001:DB8:0::1", "[2001:db8::1]"):
            self.assertEqual(
                links(secret, host, 443)[0],
                f"tg://proxy?server=2001:db8::1&port=443&secret=dd{S}",
            )
        self.assertIn("server=proxy.example&", links(secret, "proxy.example", 443)[0])
