"""
``--upstream-proxy``: clients reach Telegram through a real SOCKS5 server
(pproxy, run as a subprocess on loopback, its outgoing connections bound
to 127.0.0.2 so that the far end can tell them from the proxy's own).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mtproxy_tw.middle.fetch import fetch, upstream_http_client
from mtproxy_tw.proxy.socks import UpstreamError, Upstreams
from mtproxy_tw.testing import RawClient
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.socks5 import UpstreamProxy
from tests.ports import hold_port
from tests.test_integration import CLASSIC, ProxyHarness
from tests.test_middle import LoopbackHarness

reactor: Any = _reactor

LOCAL = "127.0.0.1"
#: Where pproxy's outgoing connections come from.
EGRESS = "127.0.0.2"


def _egress_usable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((EGRESS, 0))
    except OSError:
        return False
    return True


class SocksServer:
    """
    One pproxy SOCKS5 server on ``127.0.0.1:port``, ended by its PID.

    Until it starts, its port is held (bound, not listening): connecting to
    it is refused, and no listener of the test is handed it meanwhile.
    """

    def __init__(self, test: Any, auth: str | None = None) -> None:
        self.test = test
        self.held: socket.socket | None = hold_port(test, LOCAL)
        self.port: int = self.held.getsockname()[1]
        self.auth = auth
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> SocksServer:
        try:
            import pproxy  # noqa: F401
        except ImportError:
            raise SkipTest("pproxy is not installed") from None
        url = f"socks5://{LOCAL}:{self.port}/@{EGRESS}"
        if self.auth is not None:
            url += f"#{self.auth}"
        held, self.held = self.held, None
        if held is not None:
            held.close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pproxy", "-l", url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.test.addCleanup(self.stop)
        deadline = reactor.seconds() + 20.0
        while not self._listening():
            if self.process.poll() is not None or reactor.seconds() > deadline:
                self.test.fail("pproxy did not start listening")
            await deferLater(reactor, 0.02, lambda: None)
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((LOCAL, self.port)) == 0

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, 15)
            process.wait(10)

    def upstream(self, user: bytes | None = None, password: bytes | None = None) -> UpstreamProxy:
        return UpstreamProxy(LOCAL, self.port, user, password)


class Logged:
    """
    The log lines of a test, formatted.
    """

    def __init__(self, test: Any) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, text: str) -> list[str]:
        return [line for e in self.events if text in (line := formatEvent(e) or "")]

    def level_names(self, text: str) -> list[str]:
        return [e["log_level"].name for e in self.events if text in (formatEvent(e) or "")]


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Answer(Protocol):
    """
    A server that is no SOCKS5 server: answers ``answer`` to anything, or
    stays silent.
    """

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer

    def dataReceived(self, data: bytes) -> None:
        if self.answer is not None:
            self.transport.write(self.answer)


class DirectTests(ProxyHarness):
    """
    Direct mode: client -> proxy -> SOCKS5 server -> FakeDC.
    """

    def setUp(self) -> None:
        if not _egress_usable():
            raise SkipTest(f"cannot bind {EGRESS}")
        self.logged = Logged(self)

    async def _through(self, socks: SocksServer, upstream: UpstreamProxy) -> None:
        await socks.start()
        await self.start(upstream_proxies=(upstream,))
        client = await self.client(CLASSIC)
        payload = b"\x01" + os.urandom(4095)
        self.assertEqual(await self.within(client.request(payload)), payload)
        # The DC saw the SOCKS server's outgoing side, not the proxy.
        (dc,) = self.fakes[2].connections
        self.assertEqual(dc.transport.getPeer().host, EGRESS)

    def test_without_auth(self) -> Deferred[None]:
        socks = SocksServer(self)
        return self.run_async(self._through(socks, socks.upstream()))

    def test_without_hand_over(self) -> Deferred[None]:
        # Where the connection cannot be handed over, the exchange's own
        # protocol passes everything on.
        from mtproxy_tw import _twisted

        self.patch(_twisted, "hand_over", lambda transport, protocol: False)
        socks = SocksServer(self)
        return self.run_async(self._through(socks, socks.upstream()))

    def test_with_username_and_password(self) -> Deferred[None]:
        socks = SocksServer(self, auth="alice:s3cret")
        return self.run_async(self._through(socks, socks.upstream(b"alice", b"s3cret")))

    async def _wrong_password(self) -> None:
        socks = await SocksServer(self, auth="alice:s3cret").start()
        await self.start(upstream_proxies=(socks.upstream(b"alice", b"wrong-pw"),))
        for _ in range(3):
            client = await self.client(CLASSIC)
            client.send(b"\x01" * 16)
            await self.within(client.lost)
        self.assertEqual(self.dc_connections(), 0)
        down = self.logged.lines("is down")
        self.assertEqual(len(down), 1, down)
        self.assertIn(f"upstream proxy 127.0.0.1:{socks.port} is down", down[0])
        self.assertIn("wrong username or password", down[0])
        everything = "\n".join(formatEvent(e) or "" for e in self.logged.events)
        self.assertNotIn("wrong-pw", everything)
        self.assertNotIn("Traceback", everything)

    def test_wrong_password_is_one_clean_line(self) -> Deferred[None]:
        return self.run_async(self._wrong_password())

    async def _dead_then_back(self) -> None:
        socks = SocksServer(self)
        await self.start(upstream_proxies=(socks.upstream(),), connect_timeout=5.0)
        for _ in range(3):
            client = await self.client(CLASSIC)
            client.send(b"\x01" * 16)
            await self.within(client.lost)
        self.assertEqual(len(self.logged.lines("is down")), 1)
        self.assertEqual(self.logged.level_names("is down"), ["warn"])
        await self.no_clients()
        # The server comes back: the next client goes through it.
        await socks.start()
        client = await self.client(CLASSIC)
        payload = b"\x01" + os.urandom(100)
        self.assertEqual(await self.within(client.request(payload)), payload)
        self.assertEqual(
            len(self.logged.lines(f"upstream proxy 127.0.0.1:{socks.port} is back")), 1
        )

    def test_dead_server_is_survived(self) -> Deferred[None]:
        return self.run_async(self._dead_then_back())

    async def _bad_server(self, answer: bytes | None, expected: str) -> None:
        server = reactor.listenTCP(0, Factory.forProtocol(lambda: Answer(answer)), interface=LOCAL)
        self.addCleanup(server.stopListening)
        upstream = UpstreamProxy(LOCAL, server.getHost().port)
        await self.start(upstream_proxies=(upstream,), connect_timeout=0.5)
        for _ in range(2):
            client = await self.client(CLASSIC)
            client.send(b"\x01" * 16)
            await self.within(client.lost)
        down = self.logged.lines("is down")
        self.assertEqual(len(down), 1, down)
        self.assertIn(expected, down[0])
        self.assertEqual(self.dc_connections(), 0)
        await self.no_clients()

    def test_silent_server_times_out(self) -> Deferred[None]:
        return self.run_async(self._bad_server(None, "no SOCKS5 answer in 0.5 s"))

    def test_garbage_answer(self) -> Deferred[None]:
        return self.run_async(self._bad_server(b"HTTP/1.1 400 Bad\r\n\r\n", "not a SOCKS5 server"))

    async def _in_turn(self) -> None:
        dead = SocksServer(self)
        live = await SocksServer(self).start()
        await self.start(upstream_proxies=(dead.upstream(), live.upstream()))
        outcomes = []
        for _ in range(4):
            client = await self.client(CLASSIC)
            payload = b"\x01" + os.urandom(64)
            client.send(payload)
            try:
                outcomes.append(await self.within(client.receive()) == payload)
            except Exception:
                outcomes.append(False)
        # The dead one is tried first, once; it is skipped while it backs off.
        self.assertEqual(outcomes, [False, True, True, True])
        self.assertEqual(len(self.logged.lines("is down")), 1)

    def test_several_in_turn_a_dead_one_skipped(self) -> Deferred[None]:
        return self.run_async(self._in_turn())

    async def _mask_direct(self) -> None:
        site = reactor.listenTCP(0, Factory.forProtocol(Echo), interface=LOCAL)
        self.addCleanup(site.stopListening)
        # The upstream is dead: fronting must not need it.
        dead = SocksServer(self)
        await self.start(
            upstream_proxies=(dead.upstream(),),
            mask=True,
            mask_host=Address(LOCAL, site.getHost().port),
        )
        probe = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n" + b"x" * 64
        raw: RawClient = await self.raw(probe)
        await self.until(lambda: raw.received == probe, "the mask host's answer")
        self.assertEqual(self.logged.lines("is down"), [])

    def test_mask_host_is_reached_directly(self) -> Deferred[None]:
        return self.run_async(self._mask_direct())


class LookupSite(Resource):
    """
    Answers the address a request came from, as an IP look-up service does.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return f"{request.getClientAddress().host}\n".encode()  # type: ignore[attr-defined]


class MiddleTests(LoopbackHarness):
    """
    Middle mode: the middle proxy sees the SOCKS server's outgoing address,
    and the proxy derives the RPC keys with it, learnt through the upstream.
    """

    def setUp(self) -> None:
        if not _egress_usable():
            raise SkipTest(f"cannot bind {EGRESS}")
        self.logged = Logged(self)

    timeout = 120

    async def _lookup_site(self) -> str:
        port = reactor.listenTCP(0, Site(LookupSite()), interface=LOCAL)
        self.addCleanup(port.stopListening)
        return f"http://{LOCAL}:{port.getHost().port}/ip"

    async def _through(self) -> None:
        socks = await SocksServer(self).start()
        lookup = await self._lookup_site()
        await self.start(
            middle={"ip_lookup_url": lookup, "pool_min": 1},
            upstream_proxies=(socks.upstream(),),
        )
        core = self.service.core
        assert core.upstreams is not None
        self.middle.external.http_client = upstream_http_client(reactor, core.upstreams)
        self.middle.external.via = core.upstreams.describe()
        # pproxy answers the target's own address as BND: the middle proxy
        # is told which port to expect (the IP is what it really sees).
        self.fake.client_port = self.me_port
        client = await self.client(CLASSIC)
        payload = b"\x01" + os.urandom(1023)
        self.assertEqual(await self.within(client.request(payload)), payload)
        (me,) = self.fake.ready()
        self.assertEqual(me.transport.getPeer().host, EGRESS)
        (conn,) = [c for c in self.pool().connections if c.ready]
        self.assertEqual(conn._client_addr, (ipaddress.ip_address(EGRESS), self.me_port))
        self.assertTrue(self.logged.lines(f"external address (from {lookup} through the upstream"))
        self.assertTrue(
            self.logged.lines(f"the middle proxies see {EGRESS} (looked up at {lookup})")
        )

    def test_keys_use_the_socks_egress_address(self) -> Deferred[None]:
        return self.run_async(self._through())

    async def _nat_ip_wins(self) -> None:
        socks = await SocksServer(self).start()
        await self.start(
            middle={"nat_ips": (ipaddress.ip_address(EGRESS),), "pool_min": 1},
            upstream_proxies=(socks.upstream(),),
        )
        self.fake.client_port = self.me_port
        client = await self.client(CLASSIC)
        payload = b"\x01" + os.urandom(63)
        self.assertEqual(await self.within(client.request(payload)), payload)
        self.assertTrue(self.logged.lines(f"the middle proxies see {EGRESS} (--nat-ip)"))

    def test_nat_ip_overrides(self) -> Deferred[None]:
        return self.run_async(self._nat_ip_wins())

    async def _dead(self, fallback: bool) -> None:
        socks = SocksServer(self)
        await self.start(
            middle={"pool_min": 1, "direct_fallback": fallback},
            upstream_proxies=(socks.upstream(),),
        )
        # Short backoff, so that recovery is seconds away however long the
        # server was down on a loaded machine.
        upstreams = self.service.core.upstreams
        assert upstreams is not None
        upstreams.policy = backoffPolicy(initialDelay=0.1, maxDelay=0.5)
        for _ in range(2):
            client = await self.client(CLASSIC)
            client.send(b"\x01" * 16)
            await self.within(client.lost, 30.0)
        self.assertEqual(self.fake.connections, [])
        self.assertEqual(self.fake_dc.connection_count, 0)
        self.assertEqual(len(self.logged.lines("is down")), 1)
        everything = "\n".join(formatEvent(e) or "" for e in self.logged.events)
        self.assertNotIn("Traceback", everything)
        # What the middle proxy expects, before the server is up: the pool
        # retries every 0.2 s and may get through before start() notices.
        # A handshake made earlier would fail and make the proxy forget the
        # address, and a look-up then in flight would replace it with the
        # config site's (wrong) one: every later handshake would fail.
        self.fake.client_port = self.me_port
        self.middle.external.looked_up[4] = ipaddress.ip_address(EGRESS)
        await socks.start()
        # New clients get through once the pool's own backoff from the
        # middle proxy it could not reach is over (a minute: on a machine
        # loaded by other work, the SOCKS server's own start is slow).
        deadline = reactor.seconds() + 60.0
        payload = b"\x01" + os.urandom(63)
        while True:
            client = await self.client(CLASSIC)
            try:
                self.assertEqual(await self.within(client.request(payload)), payload)
                break
            except ConnectionDone:
                self.assertLess(reactor.seconds(), deadline, "never recovered")
                await deferLater(reactor, 0.2, lambda: None)  # poll, with a deadline

    def test_dead_server_is_survived(self) -> Deferred[None]:
        return self.run_async(self._dead(False))

    def test_dead_server_with_direct_fallback(self) -> Deferred[None]:
        return self.run_async(self._dead(True))

    async def _without_lookup(self) -> None:
        # Without the look-up the proxy's keys use the wrong address: the
        # middle proxy (seeing 127.0.0.2) drops the handshake.
        socks = await SocksServer(self).start()
        await self.start(middle={"pool_min": 1}, upstream_proxies=(socks.upstream(),))
        self.middle.external.looked_up[4] = ipaddress.ip_address(LOCAL)
        self.fake.client_port = self.me_port
        await self.client(CLASSIC)
        await self.until(lambda: self.fake.handshake_failures["keys"] > 0, "a refused handshake")

    def test_wrong_address_is_refused(self) -> Deferred[None]:
        return self.run_async(self._without_lookup())


class FetchTests(ProxyHarness):
    """
    The HTTP client for the look-up and the config goes through the upstream.
    """

    async def _fetch(self) -> None:
        if not _egress_usable():
            raise SkipTest(f"cannot bind {EGRESS}")
        socks = await SocksServer(self).start()
        site = reactor.listenTCP(0, Site(LookupSite()), interface=LOCAL)
        self.addCleanup(site.stopListening)
        await self.start(upstream_proxies=(socks.upstream(),))
        upstreams = self.service.core.upstreams
        assert upstreams is not None
        client = upstream_http_client(reactor, upstreams)
        url = f"http://{LOCAL}:{site.getHost().port}/ip"
        fetched = await fetch(client, url, clock=reactor, timeout=5.0)
        self.assertEqual(fetched.body, f"{EGRESS}\n".encode())
        socks.stop()
        with self.assertRaisesRegex(UpstreamError, f"upstream proxy 127.0.0.1:{socks.port}"):
            await fetch(client, url, clock=reactor, timeout=5.0)

    def test_lookup_goes_through_the_upstream(self) -> Deferred[None]:
        return self.run_async(self._fetch())


class UpstreamsTests(SynchronousTestCase):
    """
    The servers in turn, the backoff of a failed one, one line per outage.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.one, self.two = UpstreamProxy(LOCAL, 1), UpstreamProxy(LOCAL, 2)
        self.upstreams = Upstreams(self.clock, (self.one, self.two), 1.0)
        self.logged = Logged(self)

    def test_in_turn(self) -> None:
        picks = [self.upstreams.pick() for _ in range(4)]
        self.assertEqual(picks, [self.one, self.two, self.one, self.two])

    def test_failed_one_skipped_until_its_backoff_ends(self) -> None:
        self.upstreams.failed(self.one, "refused")
        self.assertEqual({self.upstreams.pick() for _ in range(4)}, {self.two})
        self.clock.advance(self.upstreams.down[self.one][1] + 0.01)
        self.assertIn(self.one, {self.upstreams.pick() for _ in range(2)})

    def test_backoff_grows(self) -> None:
        delays = []
        for _ in range(5):
            self.upstreams.failed(self.one, "refused")
            delays.append(self.upstreams.down[self.one][1] - self.clock.seconds())
        self.assertLess(delays[0], delays[-1])
        self.assertLessEqual(max(delays), 60.0 + 1.0)

    def test_all_down_the_soonest_is_tried(self) -> None:
        self.upstreams.failed(self.one, "refused")
        for _ in range(4):
            self.upstreams.failed(self.two, "refused")
        self.assertEqual(self.upstreams.pick(), self.one)

    def test_one_line_per_outage(self) -> None:
        for _ in range(5):
            self.upstreams.failed(self.one, "refused")
        self.upstreams.succeeded(self.one)
        self.upstreams.succeeded(self.one)
        self.upstreams.failed(self.one, "refused")
        self.assertEqual(len(self.logged.lines("127.0.0.1:1 is down (refused)")), 2)
        self.assertEqual(len(self.logged.lines("127.0.0.1:1 is back")), 1)

    def test_credentials_never_logged(self) -> None:
        secret = UpstreamProxy(LOCAL, 3, b"user", b"hunter2")
        upstreams = Upstreams(self.clock, (secret,), 1.0)
        upstreams.failed(secret, "refused")
        upstreams.succeeded(secret)
        text = "\n".join(formatEvent(e) or "" for e in self.logged.events)
        self.assertIn("127.0.0.1:3", text)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("user", text)


class CancelTests(ProxyHarness):
    """
    A connection attempt cancelled during the SOCKS5 exchange is dropped,
    and does not count against the server.
    """

    async def _cancel(self) -> None:
        accepted: list[Answer] = []

        def silent() -> Answer:
            accepted.append(Answer(None))
            return accepted[-1]

        server = reactor.listenTCP(0, Factory.forProtocol(silent), interface=LOCAL)
        self.addCleanup(server.stopListening)
        logged = Logged(self)
        upstreams = Upstreams(reactor, (UpstreamProxy(LOCAL, server.getHost().port),), 5.0)
        attempt = upstreams.endpoint("192.0.2.1", 443).connect(Factory.forProtocol(Protocol))
        await self.until(lambda: bool(accepted) and accepted[0].transport is not None, "accepted")
        lost: Deferred[None] = Deferred()
        accepted[0].connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        attempt.cancel()
        with self.assertRaises(CancelledError):
            await attempt
        await self.within(lost)
        self.assertEqual(upstreams.down, {})
        self.assertEqual(logged.lines("is down"), [])

    def test_cancel_during_the_exchange(self) -> Deferred[None]:
        return self.run_async(self._cancel())


class OptionTests(SynchronousTestCase):
    """
    ``--upstream-proxy`` and ``upstream_proxy`` reach the settings.
    """

    def parse(self, *argv: str) -> Any:
        from mtproxy_tw import tap

        options = tap.Options()
        options.parseOptions(["--secret", "a1" * 16, *argv])
        return options

    def test_command_line(self) -> None:
        from mtproxy_tw.tap import settings_from_options

        options = self.parse(
            "--upstream-proxy",
            "socks5://u:p%40ss@127.0.0.1:1080",
            "--upstream-proxy",
            "socks5://[::1]:1081",
            "--upstream-proxy-for-config",
        )
        settings = settings_from_options(options, tuple(options["secrets"]))
        self.assertEqual(
            settings.upstream_proxies,
            (UpstreamProxy(LOCAL, 1080, b"u", b"p@ss"), UpstreamProxy("::1", 1081)),
        )
        self.assertTrue(options["upstream-proxy-for-config"])

    def test_config_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                'upstream_proxy = "socks5://127.0.0.1:1080"\nupstream_proxy_for_config = true\n'
            )
        options = self.parse("--config", path)
        self.assertEqual(list(options["upstream-proxy"]), [UpstreamProxy(LOCAL, 1080)])

    def test_bad_url_is_one_line_without_the_password(self) -> None:
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError) as caught:
            self.parse("--upstream-proxy", "socks5://u:hunter2@127.0.0.1")
        message = str(caught.exception)
        self.assertTrue(message.startswith("--upstream-proxy: "), message)
        self.assertNotIn("hunter2", message)
        self.assertNotIn("\n", message)

    def test_mask_and_telegram_endpoints(self) -> None:
        from mtproxy_tw.proxy.core import ProxyCore
        from mtproxy_tw.proxy.socks import SOCKS5Endpoint
        from mtproxy_tw.settings import Settings

        core = ProxyCore(
            Settings(secrets=(), upstream_proxies=(UpstreamProxy(LOCAL, 1),)), Clock()
        )
        self.assertIsInstance(core.endpoint(Address("149.154.167.51", 443)), SOCKS5Endpoint)
        self.assertNotIsInstance(core.local_endpoint(Address(LOCAL, 443)), SOCKS5Endpoint)
        self.assertIs(core.upstreams, core.upstreams)
        plain = ProxyCore(Settings(secrets=()), Clock())
        self.assertNotIsInstance(plain.endpoint(Address(LOCAL, 443)), SOCKS5Endpoint)

    def test_build_middle_looks_up_through_the_upstream(self) -> None:
        from mtproxy_tw.middle.settings import MiddleSettings
        from mtproxy_tw.middle_options import build_middle
        from mtproxy_tw.proxy.core import ProxyCore
        from mtproxy_tw.settings import Settings

        clock = Clock()
        proxies = (UpstreamProxy(LOCAL, 1, b"user", b"pw"),)
        for for_config in (False, True):
            core = ProxyCore(Settings(secrets=(), upstream_proxies=proxies), clock)
            settings = MiddleSettings(upstream_proxy_for_config=for_config)
            _, middle = build_middle(core, settings, None, clock)
            external = middle.external  # type: ignore[attr-defined]
            self.assertIsNotNone(external.http_client)
            self.assertEqual(external.via, "127.0.0.1:1")
            config = middle.config._http_client  # type: ignore[attr-defined]
            self.assertIs(config, external.http_client if for_config else None)
