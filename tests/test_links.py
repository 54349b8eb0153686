"""
The links handed out: the host and port they name, one set per fake-TLS
domain, where they are logged, and the terminal QR code.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw import tap
from mtproxy_tw.links import (
    endpoint_address,
    secret_forms,
    split_public_host,
    targets,
    terminal_qr,
    user_links,
)
from mtproxy_tw.wire.secrets import Mode, parse_secret

from .test_tap import observe, parse, warnings

KEY = "0123456789abcdeffedcba9876543210"
EE = parse_secret("alice=ee" + KEY + b"example.com".hex(), "x")
DD = parse_secret("bob=dd" + KEY, "x")


def links_logged(events: list[LogEvent]) -> list[str]:
    return [
        formatEvent(e).split(": ", 1)[1] for e in events if "{link}" in (e.get("log_format") or "")
    ]


def start(case: SynchronousTestCase, *argv: str) -> list[LogEvent]:
    """
    Start the proxy in memory with ``argv``; return what it logs.
    """
    events = observe(case)
    top = tap.makeService(parse("--state-dir", case.mktemp(), *argv), MemoryReactorClock())
    assert isinstance(top, MultiService)
    top.startService()
    case.addCleanup(top.stopService)
    return events


class PublicHostTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        ``--public-host`` takes a port, and IPv6 bare or in brackets.
        """
        for given, expected in [
            ("proxy.example", ("proxy.example", None)),
            ("proxy.example:8443", ("proxy.example", 8443)),
            ("203.0.113.5:443", ("203.0.113.5", 443)),
            ("2001:DB8::1", ("2001:db8::1", None)),
            ("[2001:db8::1]", ("2001:db8::1", None)),
            ("[2001:db8::1]:8443", ("2001:db8::1", 8443)),
        ]:
            self.assertEqual(split_public_host(given), expected, given)

    def test_refused(self) -> None:
        """
        A value that is no host, or a port out of range, is refused at start
        with one line naming --public-host.
        """
        for bad in ("proxy.example:99999", "proxy.example:0", "a:b:c", "proxy example"):
            with self.assertRaises(UsageError) as caught:
                parse("--public-host", bad)
            self.assertTrue(str(caught.exception).startswith("--public-host: "), bad)
            self.assertNotIn("\n", str(caught.exception))

    def test_port_taken(self) -> None:
        """
        ``--public-host HOST:PORT``: the links name that port, not the
        listening one (the proxy behind a NAT or a port forward), and the
        host is never written with the port inside (``server=[host:port]``).
        """
        events = start(
            self,
            "--listen",
            "tcp:8443",
            "--secret",
            DD.hex(),
            "--public-host",
            "proxy.example:443",
        )
        self.assertEqual(
            links_logged(events)[0],
            f"tg://proxy?server=proxy.example&port=443&secret={DD.hex()}",
        )


class ListenAddressTests(SynchronousTestCase):
    def test_descriptions(self) -> None:
        for description, expected in [
            ("tcp:443", (None, 443)),
            ("tcp:8443:interface=127.0.0.1", ("127.0.0.1", 8443)),
            ("tcp6:443:interface=\\:\\:1", ("::1", 443)),
            ("tcp6:interface=\\:\\:1:port=444", ("::1", 444)),
            ("haproxy:tcp:443:interface=10.0.0.2", ("10.0.0.2", 443)),
            ("ssl:443:privateKey=key.pem:certKey=cert.pem", (None, 443)),
            ("systemd:domain=INET6:index=0", (None, None)),
            ("unix:/run/proxy.sock", (None, None)),
        ]:
            self.assertEqual(endpoint_address(description), expected, description)

    def test_only_ipv6_loopback(self) -> None:
        """
        Listening only on ``::1`` with no ``--public-host``: the links name
        ``::1`` (bare, as the apps parse it), not a guess at an IPv4 address.
        """
        events = start(self, "--listen", "tcp6:443:interface=\\:\\:1", "--secret", DD.hex())
        self.assertEqual(
            links_logged(events),
            [
                f"tg://proxy?server=::1&port=443&secret={DD.hex()}",
                f"https://t.me/proxy?server=::1&port=443&secret={DD.hex()}",
            ],
        )
        [warning] = [w for w in warnings(events) if "--public-host" in w]
        self.assertIn("::1", warning)

    def test_targets(self) -> None:
        self.assertEqual(targets(None, [(None, 443)], guess="192.0.2.1"), [("192.0.2.1", 443)])
        self.assertEqual(
            targets(None, [("::", 443), (None, 443)], guess="192.0.2.1"), [("192.0.2.1", 443)]
        )
        self.assertEqual(
            targets(None, [("127.0.0.1", 80), ("::1", 80)], guess="x"),
            [("127.0.0.1", 80), ("::1", 80)],
        )
        self.assertEqual(targets("p.example", [(None, 8443)]), [("p.example", 8443)])
        self.assertEqual(targets("p.example:443", [(None, 8443)]), [("p.example", 443)])
        # A systemd socket: the port is not in the description.
        self.assertEqual(targets("p.example", [(None, None)]), [("p.example", 443)])


class DomainTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        An ee secret is handed out once per fake-TLS domain: the same key,
        re-encoded with each ``--tls-domain``; other kinds once.
        """
        forms = secret_forms(EE, ["cdn.example.org", "example.com", "cdn.example.org"])
        self.assertEqual([f.domain for f in forms], ["example.com", "cdn.example.org"])
        other = parse_secret(forms[1].hex(), "x")
        self.assertEqual(
            (other.key, other.kind, other.domain), (EE.key, Mode.TLS, "cdn.example.org")
        )
        self.assertEqual(secret_forms(DD, ["cdn.example.org"]), [DD])
        self.assertEqual(len(user_links(EE, "p.example", 443, ["cdn.example.org"])), 8)

    def test_logged(self) -> None:
        """
        The proxy logs the links of every ``--tls-domain``, not only the one
        inside the secret.
        """
        events = start(
            self,
            "--listen",
            "tcp:443",
            "--secret",
            EE.hex(),
            "--tls-domain",
            "cdn.example.org",
            "--public-host",
            "p.example",
        )
        logged = links_logged(events)
        other = secret_forms(EE, ["cdn.example.org"])[1]
        self.assertEqual(len(logged), 8)
        self.assertIn(f"https://t.me/proxy?server=p.example&port=443&secret={other.hex()}", logged)
        self.assertIn(f"tg://proxy?server=p.example&port=443&secret={other.base64url()}", logged)


class FirstStartTests(SynchronousTestCase):
    def test_generated_secret_is_a_warning(self) -> None:
        """
        With no secret configured, the first start says at warning level
        (seen with --log-level=warn) that it generated one, where it is kept
        and how to print its links again; a later start says which it uses.
        """
        state = self.mktemp()
        events = start(self, "--state-dir", state, "--public-host", "p.example")
        [line] = [w for w in warnings(events) if "generated" in w]
        self.assertIn(f"{state}/secret", line)
        self.assertIn("mtproxy-tw links", line)
        first = links_logged(events)
        self.assertEqual(len(first), 2)
        again = start(self, "--state-dir", state, "--public-host", "p.example")
        self.assertEqual([w for w in warnings(again) if "generated" in w], [])
        told = [formatEvent(e) for e in again]
        self.assertIn(f"no --secret given: using the secret kept in {state}/secret", told)
        self.assertEqual(links_logged(again)[-2:], first)
        # The links themselves are info: secrets stay out of warning-level logs.
        self.assertEqual(
            {e["log_level"] for e in events if "{link}" in (e.get("log_format") or "")},
            {LogLevel.info},
        )


_SGR = re.compile(r"\033\[([0-9;]*)m")


def qr_pixels(text: str) -> list[list[bool]]:
    """
    The picture a terminal shows for :func:`terminal_qr`'s text, one pixel
    a module (``True`` dark): each character is an upper half block, its
    foreground the top module and its background the bottom one.
    """
    colours = {"30": True, "97": False, "40": True, "107": False}
    pixels: list[list[bool]] = []
    for line in text.split("\n"):
        top: list[bool] = []
        bottom: list[bool] = []
        fg: bool | None = None
        bg: bool | None = None
        for part in re.split(r"(\033\[[0-9;]*m)", line):
            match = _SGR.fullmatch(part)
            if match:
                codes = match.group(1).split(";")
                if codes == ["0"]:
                    fg = bg = None
                    continue
                # Only the explicit colours: no default (39, 49), no reverse (7).
                assert set(codes) <= set(colours), codes
                fg, bg = colours[codes[0]], colours[codes[1]]
                continue
            for char in part:
                assert char == "\u2580" and fg is not None and bg is not None, repr(char)
                top.append(fg)
                bottom.append(bg)
        pixels.extend([top, bottom])
    return pixels


class QRTests(SynchronousTestCase):
    LINK = f"https://t.me/proxy?server=2001:db8::1&port=443&secret={EE.base64url()}"

    def test_matrix_and_quiet_zone(self) -> None:
        """
        The terminal picture is segno's matrix, module for module, in
        explicit colours only, with a light quiet zone of four modules.
        """
        import segno

        pixels = qr_pixels(terminal_qr(self.LINK))
        matrix = [[bool(b) for b in row] for row in segno.make_qr(self.LINK).matrix]
        size = len(matrix)
        self.assertEqual(len(pixels[0]), size + 8)
        for row in pixels[:4] + pixels[4 + size :]:
            self.assertFalse(any(row))
        body = [row[4 : 4 + size] for row in pixels[4 : 4 + size]]
        self.assertEqual(body, matrix)
        for row in pixels[4 : 4 + size]:
            self.assertFalse(any(row[:4] + row[4 + size :]))

    def test_decodes(self) -> None:
        """
        A QR decoder reads the link back from the picture.
        """
        try:
            import zxingcpp
        except ImportError:
            raise self.skipTest("zxing-cpp is not installed") from None
        pixels = qr_pixels(terminal_qr(self.LINK))
        scale = 4
        image = bytes(
            0 if dark else 255
            for row in pixels
            for _ in range(scale)
            for dark in row
            for _ in range(scale)
        )
        view = memoryview(image).cast("B", (len(pixels) * scale, len(pixels[0]) * scale))
        found: Any = zxingcpp.read_barcodes(view, try_invert=False)
        self.assertEqual([b.text for b in found], [self.LINK])
