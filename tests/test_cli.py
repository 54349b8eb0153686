"""
``mtproxy-tw``: secrets and links without the proxy.
"""

from __future__ import annotations

import contextlib
import io

from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.cli import main
from mtproxy_tw.wire.secrets import Mode, parse_secret


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


class SecretCommandTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        for kind, mode in (("classic", Mode.CLASSIC), ("dd", Mode.SECURE)):
            code, out, _ = run("secret", "--kind", kind)
            self.assertEqual(code, 0)
            secret = parse_secret(out.split("secret: ")[1].split()[0], "x")
            self.assertEqual(secret.kind, mode)

    def test_ee_with_links(self) -> None:
        code, out, _ = run(
            "secret", "--kind", "ee", "--domain", "example.com", "--host", "p.example"
        )
        self.assertEqual(code, 0)
        lines = out.splitlines()
        secret = parse_secret(lines[0].split(": ")[1], "x")
        self.assertEqual((secret.kind, secret.domain), (Mode.TLS, "example.com"))
        self.assertEqual(lines[1], f"secret (base64url): {secret.base64url()}")
        self.assertIn(f"tg://proxy?server=p.example&port=443&secret={secret.base64url()}", lines)

    def test_ee_needs_domain(self) -> None:
        code, _, err = run("secret", "--kind", "ee")
        self.assertEqual(code, 2)
        self.assertIn("--domain", err)


class LinksCommandTests(SynchronousTestCase):
    def test_links(self) -> None:
        secret = "dd" + "0123456789abcdeffedcba9876543210"
        code, out, _ = run("links", "--host", "1.2.3.4", "--port", "8443", secret)
        self.assertEqual(code, 0)
        self.assertIn(f"https://t.me/proxy?server=1.2.3.4&port=8443&secret={secret}", out)

    def test_bad_secret(self) -> None:
        code, out, err = run("links", "--host", "h", "zz")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("secret:", err)
