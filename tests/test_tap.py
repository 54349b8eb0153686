"""
Command-line options, the service they build, and the plugin.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path
from typing import Any

from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet import tcp
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw import tap
from mtproxy_tw.services.proxy import ListenError, ProxyService
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.secrets import Mode
from tests.logs import observe

S = "0123456789abcdeffedcba9876543210"


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def warnings(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]


class RefusingReactor(MemoryReactorClock):
    """
    Every ``listenTCP`` fails as a port below 1024 does without privileges.
    """

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        error = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        raise CannotListenError(interface, port, error)


class PortReactor(MemoryReactorClock):
    """
    A clock whose ``listenTCP`` makes a real listening ``tcp.Port`` on
    loopback; nothing reads from it unless the test calls ``doRead``.
    """

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = tcp.Port(port, factory, backlog, interface, self)
        listening.startListening()
        return listening


class FakeListener:
    """
    A listening socket out of descriptors: ``accept`` fails with EMFILE
    while Twisted holds its reserve descriptor, and hands out the
    ``pending`` clients once Twisted has let it go.
    """

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.pending = 0

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        if tcp._reservedFD.available():
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self.pending -= 1
        client, other = socket.socketpair()
        other.close()
        return client, ("127.0.0.1", 40000 + self.pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse("--secret", S)
        self.assertEqual(options["listen"], ["tcp:443"])
        self.assertEqual(options["modes"], frozenset(Mode))
        self.assertIsNone(options["max-connections"])  # auto: from the open-file limit
        self.assertIsNone(parse("--secret", S, "--max-connections", "auto")["max-connections"])
        self.assertEqual(parse("--secret", S, "--max-connections", "7")["max-connections"], 7)

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

    def test_empty_secrets_file_refused(self) -> None:
        """
        An emptied --secrets-file with no --secret refuses the start rather
        than letting the proxy generate a default secret: who emptied it
        meant to shut everyone out.
        """
        path = Path(self.mktemp())
        path.write_text("# nobody for now\n")
        e = self.assertRaises(UsageError, parse, "--secrets-file", str(path))
        self.assertTrue(str(e).startswith(f"--secrets-file: {path} lists no secrets"), str(e))
        self.assertIn("--secret", str(e))
        self.assertNotIn("\n", str(e))
        options = parse("--secret", "alice=" + S, "--secrets-file", str(path))
        self.assertEqual([s.name for s in options["secrets"]], ["alice"])

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


class OpenFileLimitTests(SynchronousTestCase):
    def start(self, limit: tuple[int, int], *argv: str) -> list[str]:
        """
        Start the proxy with a faked open-file limit; return its warnings.
        """
        observer = self.events = observe(self)
        top = tap.makeService(
            parse(
                "--listen",
                "tcp:8443",
                "--public-host",
                "proxy.example",
                "--state-dir",
                self.mktemp(),
                *argv,
            ),
            MemoryReactorClock(),
        )
        assert isinstance(top, MultiService)
        proxy = next(s for s in top if isinstance(s, ProxyService))
        proxy.open_file_limit = lambda: limit
        self.proxy = proxy
        top.startService()
        self.addCleanup(top.stopService)
        return warnings(observer)

    def infos(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.info]

    def test_low_limit_warns_at_start(self) -> None:
        """
        A limit far below what --max-connections needs is a warning naming
        the limit, the need and the fix.
        """
        found = self.start((1024, 1024), "--secret", S, "--max-connections", "10000")
        self.assertEqual(len(found), 1, found)
        # Two descriptors per direct client, plus the spares and the listener.
        need = 2 * 10000 + 64 + 1
        for part in ("1024", str(need), f"LimitNOFILE={need}", f"ulimit -n {need}"):
            self.assertIn(part, found[0])

    def test_middle_clients_need_one_each(self) -> None:
        found = self.start(
            (1024, 1024),
            "--secret",
            S,
            "--ad-tag",
            "ab" * 16,
            "--nat-ip",
            "203.0.113.7",
            "--proxy-config-url",
            "http://127.0.0.1:1/c",
            "--max-connections",
            "2000",
        )
        need = 2000 + 10 * 8 + 64 + 1
        self.assertTrue(any(f"LimitNOFILE={need}" in w for w in found), found)
        self.assertNotIn("ab" * 16, " ".join(found))

    def test_enough_is_no_warning(self) -> None:
        self.assertEqual(self.start((65536, 65536), "--secret", S), [])

    def test_auto_follows_the_limit(self) -> None:
        """
        By default --max-connections is what the raised open-file limit
        holds, and the start-up log says the figure and why.
        """
        self.assertEqual(self.start((20000, 20000), "--secret", S), [])
        # (20000 - 64 spare - 1 listener) // 2 descriptors per direct client
        self.assertEqual(self.proxy.settings.max_connections, 9967)
        self.assertEqual(self.proxy.settings.handshake_cap, 9967 // 4)
        self.assertIn(
            "--max-connections 9967 (from the open-file limit 20000: "
            "2 descriptors per direct client, 65 reserved)",
            self.infos(),
        )
        self.assertEqual(self.proxy.descriptors_needed(), 20000 - 1)

    def test_auto_middle_clients_need_one_each(self) -> None:
        found = self.start(
            (20000, 20000),
            "--secret",
            S,
            "--ad-tag",
            "ab" * 16,
            "--nat-ip",
            "203.0.113.7",
            "--proxy-config-url",
            "http://127.0.0.1:1/c",
        )
        self.assertEqual(found, [])
        # 80 pool connections (10 DCs x --middle-pool-max 8), 64 spare, 1 listener.
        self.assertEqual(self.proxy.settings.max_connections, 20000 - 145)
        self.assertTrue(
            any("1 descriptor per middle-proxy client, 145 reserved" in i for i in self.infos())
        )

    def test_auto_outlives_a_reload(self) -> None:
        self.start((200, 200), "--secret", S, "--max-connections", "auto")
        self.assertEqual(self.proxy.settings.max_connections, 67)
        settings = tap.settings_from_options(parse("--secret", S), ())
        self.proxy.reload(settings)
        self.assertEqual(self.proxy.core.settings.max_connections, 67)

    def test_auto_below_the_reserve(self) -> None:
        """
        A limit that holds nothing beyond the reserved descriptors leaves
        one client, with a warning.
        """
        found = self.start((48, 48), "--secret", S)
        self.assertEqual(self.proxy.settings.max_connections, 1)
        self.assertEqual(len(found), 1, found)
        self.assertIn("open file limit 48 (hard 48) leaves no room", found[0])
        self.assertIn("LimitNOFILE=", found[0])

    def test_explicit_number_stays(self) -> None:
        self.assertEqual(self.start((20000, 20000), "--secret", S, "--max-connections", "50"), [])
        self.assertEqual(self.proxy.settings.max_connections, 50)
        self.assertIn("open file limit: 20000 (hard 20000)", self.infos())


class AcceptFailureTests(SynchronousTestCase):
    def test_port_refusals_are_one_warning_a_minute(self) -> None:
        """
        Twisted's one info line per connection a port cannot accept for
        want of descriptors becomes one warning, then one a minute with
        the count.
        """
        observer = observe(self)
        reactor = PortReactor()
        proxy = ProxyService(
            tap.settings_from_options(parse("--secret", S), ()),
            reactor,
            ["tcp:0:interface=127.0.0.1"],
        )
        proxy.open_file_limit = lambda: (64, 64)
        proxy.startService()
        [port] = self.successResultOf(proxy.listening())
        assert isinstance(port, tcp.Port)
        real = port.socket
        fake = FakeListener(real)
        port.socket = fake
        try:
            for _ in range(40):  # bursts of three, over a minute and a half
                fake.pending += 3
                port.doRead()
                reactor.advance(2.25)
        finally:
            port.socket = real
        proxy.stopService()
        reactor.advance(1)
        texts = [formatEvent(e) for e in observer]
        self.assertFalse(any("EMFILE" in t or "Could not accept" in t for t in texts), texts)
        refusals = [w for w in warnings(observer) if "cannot accept clients" in w]
        self.assertEqual(len(refusals), 3, refusals)
        self.assertTrue(refusals[0].startswith("cannot accept clients: 3 connections closed"))
        self.assertIn("the open file limit 64 is below", refusals[0])
        self.assertIn("LimitNOFILE=", refusals[0])
        self.assertIn("in the last 60 s: ", refusals[1])
        self.assertIn("since the last warning: ", refusals[2])
        told = [int(n) for w in refusals for n in re.findall(r"(\d+) connections closed", w)]
        self.assertEqual(sum(told), 3 * 40 - fake.pending)


class ListenErrorTests(SynchronousTestCase):
    def test_permission_denied_names_the_option_given(self) -> None:
        """
        The line about a port that needs privileges names --port when the
        operator gave --port, --listen when they gave --listen.
        """
        given = {
            ("--port", "80"): "--port 80: cannot listen: Permission denied",
            ("--listen", "tcp:80"): "--listen tcp:80: cannot listen: Permission denied",
            (): "--port 443 (the default): cannot listen: Permission denied",
        }
        for argv, expected in given.items():
            top = tap.makeService(
                parse(*argv, "--secret", S, "--state-dir", self.mktemp()), RefusingReactor()
            )
            e = self.assertRaises(ListenError, top.privilegedStartService)
            self.assertTrue(str(e).startswith(expected), str(e))
            self.assertIn("CAP_NET_BIND_SERVICE", str(e))
            self.assertNotIn("\n", str(e))

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
