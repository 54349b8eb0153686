"""
``mtproxy-tw``: secrets and links without the proxy.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.cli import main
from mtproxy_tw.links import secret_forms
from mtproxy_tw.wire.secrets import Mode, parse_secret

from .test_links import links_logged, start

KEY = "0123456789abcdeffedcba9876543210"
EE = parse_secret("alice=ee" + KEY + b"example.com".hex(), "x")


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

    def test_legacy_ipv6_host(self) -> None:
        code, out, _ = run("links", "--host", "[2001:db8::1]", "dd" + KEY)
        self.assertEqual(code, 0)
        self.assertIn(f"tg://proxy?server=2001:db8::1&port=443&secret=dd{KEY}", out)

    def config(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def test_config_file(self) -> None:
        """
        ``--config``: every user's links, one set per fake-TLS domain, the
        same the proxy logs when started with that file.
        """
        config = self.config(
            f'''listen = ["tcp:8443"]
secret = ["{EE.name}={EE.hex()}", "bob=dd{KEY}"]
tls_domain = ["cdn.example.org"]
public_host = "p.example:443"
state_dir = "{self.mktemp()}"
'''
        )
        code, out, err = run("links", "--config", config)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        for header in (
            "alice (tls, example.com):",
            "alice (tls, cdn.example.org):",
            "bob (secure):",
        ):
            self.assertIn(header, lines)
        printed = [line for line in lines if "://" in line]
        self.assertEqual(len(printed), 10)
        other = secret_forms(EE, ["cdn.example.org"])[1]
        self.assertIn(
            f"https://t.me/proxy?server=p.example&port=443&secret={other.base64url()}", printed
        )
        self.assertEqual(sorted(links_logged(start(self, "--config", config))), sorted(printed))

    def test_qr(self) -> None:
        """
        ``--qr``: a QR code follows each https://t.me link, none follows a
        tg:// link.
        """
        code, out, _ = run("links", "--qr", "--host", "p.example", EE.hex())
        self.assertEqual(code, 0)
        lines = out.splitlines()
        for number, line in enumerate(lines):
            if line.startswith("https://t.me/"):
                self.assertTrue(lines[number + 1].startswith("\033["), line)
            if line.startswith("tg://"):
                self.assertFalse(lines[number + 1].startswith("\033["), line)
        self.assertEqual(sum(line.startswith("https://t.me/") for line in lines), 2)

    def test_generated_secret(self) -> None:
        """
        No secret configured: the one the proxy generated in the state
        directory, or, before its first start, an error naming the directory.
        """
        state = Path(self.mktemp())
        code, out, err = run("links", "--state-dir", str(state), "--host", "p.example")
        self.assertEqual((code, out), (1, ""))
        self.assertIn(str(state), err)
        state.mkdir()
        (state / "secret").write_text(f"dd{KEY}\n")
        code, out, _ = run("links", "--state-dir", str(state), "--host", "p.example")
        self.assertEqual(code, 0)
        self.assertIn(f"tg://proxy?server=p.example&port=443&secret=dd{KEY}", out)

    def test_listen_address(self) -> None:
        """
        No --public-host: the listening interface, with a note on stderr.
        """
        code, out, err = run("links", "--listen", "tcp6:8443:interface=\\:\\:1", "dd" + KEY)
        self.assertEqual(code, 0)
        self.assertIn(f"tg://proxy?server=::1&port=8443&secret=dd{KEY}", out)
        self.assertIn("--public-host", err)

    def test_systemd_port(self) -> None:
        """
        A systemd socket's port is not in the options: 443, and a note.
        """
        code, out, err = run(
            "links",
            "--listen",
            "systemd:domain=INET6:index=0",
            "--public-host",
            "p.example",
            "dd" + KEY,
        )
        self.assertEqual(code, 0)
        self.assertIn("server=p.example&port=443&", out)
        self.assertIn("--public-host HOST:PORT", err)
        code, out, err = run(
            "links",
            "--listen",
            "systemd:domain=INET6:index=0",
            "--public-host",
            "p.example:8443",
            "dd" + KEY,
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("server=p.example&port=8443&", out)

    def test_refused_options(self) -> None:
        for argv in (
            ("--public-host", "a:b:c"),
            ("--host", "p.example", "--public-host", "q.example"),
            ("--no-such-option",),
        ):
            code, out, err = run("links", *argv, "dd" + KEY)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(argv[0], err)
