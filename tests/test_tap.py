"""
Command-line options, the service they build, and the plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw import tap
from mtproxy_tw.services.proxy import ListenError, ProxyService
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.secrets import Mode

S = "0123456789abcdeffedcba9876543210"


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse("--secret", S)
        self.assertEqual(options["listen"], ["tcp:443"])
        self.assertEqual(options["modes"], frozenset(Mode))
        self.assertEqual(options["max-connections"], 10000)

    def test_port_and_listen(self) -> None:
        self.assertEqual(parse("--port", "8443")["listen"], ["tcp:8443"])
        listen = parse("--listen", "tcp6:443", "--listen", "tcp:8443:interface=127.0.0.1")
        self.assertEqual(listen["listen"], ["tcp6:443", "tcp:8443:interface=127.0.0.1"])
        self.assertRaises(UsageError, parse, "--port", "1", "--listen", "tcp:2")
        self.assertRaises(UsageError, parse, "--port", "70000")

    def test_bad_listen(self) -> None:
        for bad in ("bogus:1", "tcp:notaport", "tcp:1:colour=blue"):
            e = self.assertRaises(UsageError, parse, "--listen", bad)
            self.assertTrue(str(e).startswith("--listen:"), str(e))
        systemd = parse("--listen", "systemd:domain=INET:index=0")
        self.assertEqual(systemd["listen"], ["systemd:domain=INET:index=0"])

    def test_secrets(self) -> None:
        options = parse("--secret", S, "--secret", "bob=dd" + S)
        names = [(s.name, s.kind) for s in options["secrets"]]
        self.assertEqual(names, [("secret1", Mode.CLASSIC), ("bob", Mode.SECURE)])

    def test_bad_secret_names_option(self) -> None:
        e = self.assertRaises(UsageError, parse, "--secret", "xyz")
        self.assertTrue(str(e).startswith("--secret:"))
        e = self.assertRaises(UsageError, parse, "--secret", "a=" + S, "--secret", "a=" + S)
        self.assertIn("twice", str(e))

    def test_secrets_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text(f"# users\nbob=dd{S}\n")
        options = parse("--secret", "alice=" + S, "--secrets-file", str(path))
        self.assertEqual([s.name for s in options["secrets"]], ["alice", "bob"])
        path.write_text("bob=nothex\n")
        e = self.assertRaises(UsageError, parse, "--secrets-file", str(path))
        self.assertTrue(str(e).startswith("--secrets-file: line 1:"))
        path.write_text(f"alice={S}\n")
        e = self.assertRaises(
            UsageError, parse, "--secret", "alice=" + S, "--secrets-file", str(path)
        )
        self.assertIn("also a --secret", str(e))
        e = self.assertRaises(UsageError, parse, "--secrets-file", str(path) + ".missing")
        self.assertTrue(str(e).startswith("--secrets-file: cannot read"))

    def test_tls_options(self) -> None:
        ee = "ee" + S + b"example.com".hex()
        options = parse(
            "--secret",
            ee,
            "--tls-domain",
            "Other.Example",
            "--mask-host",
            "127.0.0.1:8443",
            "--tls-time-skew",
            "30",
            "--mask-proxy-protocol",
            "--no-mask",
        )
        settings = tap.settings_from_options(options, tuple(options["secrets"]))
        self.assertEqual(settings.tls_domains, {"example.com", "other.example"})
        self.assertEqual(settings.mask_host, Address("127.0.0.1", 8443))
        self.assertEqual((settings.tls_time_skew, settings.mask), (30.0, False))
        self.assertTrue(settings.mask_proxy_protocol)
        self.assertGreaterEqual(settings.replay_window, 60)
        self.assertEqual(
            parse("--mask-host", "example.org")["mask-host"], Address("example.org", 443)
        )
        for bad in (
            ["--tls-domain", "bad..name"],
            ["--mask-host", "[zz]:1"],
            ["--mask", "--no-mask"],
            ["--tls-time-skew", "-1"],
        ):
            e = self.assertRaises(UsageError, parse, *bad)
            self.assertTrue(str(e).startswith(bad[0]), str(e))

    def test_dc(self) -> None:
        options = parse("--dc=-2=[::1]:443", "--dc", "-4=127.0.0.1:5", "--dc", "1=localhost:7")
        self.assertEqual(
            options["dc"],
            {-2: Address("::1", 443), -4: Address("127.0.0.1", 5), 1: Address("localhost", 7)},
        )
        e = self.assertRaises(UsageError, parse, "--dc", "2=nowhere")
        self.assertTrue(str(e).startswith("--dc:"))

    def test_numbers(self) -> None:
        for option in ("--handshake-timeout", "--idle-timeout", "--connect-timeout"):
            e = self.assertRaises(UsageError, parse, option, "0")
            self.assertIn(option, str(e))
            e = self.assertRaises(UsageError, parse, option, "soon")
            self.assertIn(option, str(e))
        e = self.assertRaises(UsageError, parse, "--max-connections", "0")
        self.assertIn("--max-connections", str(e))

    def test_modes(self) -> None:
        self.assertEqual(parse("--modes", "secure")["modes"], {Mode.SECURE})
        self.assertRaises(UsageError, parse, "--modes", "fast")
        e = self.assertRaises(UsageError, parse, "--modes", "tls", "--secret", "dd" + S)
        self.assertIn("--modes", str(e))

    def test_flags(self) -> None:
        options = parse("--no-fast-mode", "--prefer-ipv6", "--secret", S)
        settings = tap.settings_from_options(options, tuple(options["secrets"]))
        self.assertFalse(settings.fast_mode)
        self.assertTrue(settings.dcs.prefer_ipv6)


class MakeServiceTests(SynchronousTestCase):
    def test_generates_and_keeps_secret(self) -> None:
        """
        With no --secret, a secret is generated once and reused.
        """
        state = self.mktemp()
        first = tap.makeService(parse("--state-dir", state), MemoryReactorClock())
        second = tap.makeService(parse("--state-dir", state), MemoryReactorClock())

        def secrets(top: IService) -> list[bytes]:
            assert isinstance(top, MultiService)
            proxy = next(s for s in top if isinstance(s, ProxyService))
            return [s.key for s in proxy.settings.secrets]

        self.assertEqual(secrets(first), secrets(second))
        path = Path(state) / "secret"
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_bad_state_dir(self) -> None:
        blocker = self.mktemp()
        Path(blocker).write_text("x")
        e = self.assertRaises(
            SystemExit,
            tap.makeService,
            parse("--state-dir", blocker + "/sub"),
            MemoryReactorClock(),
        )
        self.assertTrue(str(e).startswith("--state-dir:"))

    def test_modes_without_usable_secret(self) -> None:
        """
        --modes tls with only the generated dd secret would accept nobody.
        """
        options = parse("--modes", "tls", "--state-dir", self.mktemp())
        e = self.assertRaises(SystemExit, tap.makeService, options, MemoryReactorClock())
        self.assertTrue(str(e).startswith("--modes:"))

    def test_middle_mode(self) -> None:
        """
        --ad-tag puts a middle-proxy upstream and the config service in the tree.
        """
        options = parse(
            "--secret",
            S,
            "--state-dir",
            self.mktemp(),
            "--ad-tag",
            "ab" * 16,
            "--nat-ip",
            "203.0.113.7",
            "--proxy-config-url",
            "http://127.0.0.1:1/c",
        )
        top = tap.makeService(options, MemoryReactorClock())
        assert isinstance(top, MultiService)
        proxy = next(s for s in top if isinstance(s, ProxyService))
        self.assertIsNotNone(proxy.core.middle)
        self.assertNotIn("ab" * 16, repr(options["middle"]))
        direct = tap.makeService(
            parse(
                "--secret",
                S,
                "--state-dir",
                self.mktemp(),
                "--ad-tag",
                "ab" * 16,
                "--upstream",
                "direct",
            ),
            MemoryReactorClock(),
        )
        assert isinstance(direct, MultiService)
        self.assertIsNone(next(s for s in direct if isinstance(s, ProxyService)).core.middle)
        e = self.assertRaises(UsageError, parse, "--ad-tag", "xyz")
        self.assertTrue(str(e).startswith("--ad-tag:"))

    def test_listens(self) -> None:
        reactor = MemoryReactorClock()
        top = tap.makeService(
            parse(
                "--listen",
                "tcp:8443:interface=127.0.0.1",
                "--secret",
                S,
                "--state-dir",
                self.mktemp(),
            ),
            reactor,
        )
        top.startService()
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers], [(8443, "127.0.0.1")])


class ListenErrorTests(SynchronousTestCase):
    def test_cannot_listen_is_one_line(self) -> None:
        """
        A port that cannot be had ends the start with one line naming it.
        """
        from twisted.internet import reactor

        service = ProxyService(
            tap.settings_from_options(parse("--secret", S), ()),
            reactor,
            ["tcp:1:interface=192.0.2.1"],
        )
        e = self.assertRaises(ListenError, service.privilegedStartService)
        self.assertTrue(str(e).startswith("--listen tcp:1:interface=192.0.2.1: cannot listen:"))
        self.assertNotIn("\n", str(e))

    def test_unusable_endpoint(self) -> None:
        e = self.assertRaises(
            ListenError,
            ProxyService,
            tap.settings_from_options(parse("--secret", S), ()),
            MemoryReactorClock(),
            ["systemd:domain=INET:index=5"],
        )
        self.assertTrue(str(e).startswith("--listen systemd:domain=INET:index=5:"))


class PluginTests(SynchronousTestCase):
    def test_found(self) -> None:
        from twisted import plugins

        makers = {p.tapname: p for p in getPlugins(IServiceMaker, plugins)}
        self.assertIn("mtproxy", makers)
        options = makers["mtproxy"].options()
        options.parseOptions(["--secret", S])
        self.assertEqual(len(options["secrets"]), 1)
