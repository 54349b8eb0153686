"""
``mtproxy-tw doctor`` against the loopback fakes: every check OK, then one
test per way a check fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw.doctor import DoctorOptions, Result, Status, exit_status, run
from mtproxy_tw.doctor.tls import read_server_hello
from mtproxy_tw.middle.cache import CONFIG_FILE
from mtproxy_tw.testing import FakeConfigServer, FakeDC, FakeMiddleProxy, FakeSite, config_text
from mtproxy_tw.wire.faketls import TLSError
from tests.ports import hold_port

reactor: Any = _reactor
LOCAL = "127.0.0.1"
AD_TAG = "ad" * 16
#: An ee secret whose fake-TLS domain is localhost (which tests may resolve).
SECRET = "alice=ee" + "4c" * 16 + b"localhost".hex()
DC_IDS = (1, -1, 2, -2, 3, -3, 4, -4, 5, -5)
PLENTY = (1 << 20, 1 << 20)


def _port(listening: IListeningPort) -> int:
    port: int = listening.getHost().port  # type: ignore[attr-defined]
    return port


class DoctorHarness(TestCase):
    """
    A FakeDC for every DC id, a fake middle proxy, Telegram's config site
    and a TLS 1.3 site for localhost, each on loopback.
    """

    timeout = 60

    def setUp(self) -> None:
        self.dc = FakeDC(reactor)
        self.dc_port = self.listen(self.dc)
        self.addCleanup(self._drop, self.dc)
        self.middle = FakeMiddleProxy(reactor=reactor)
        self.me_port = self.listen(self.middle)
        self.addCleanup(self._drop, self.middle)
        body = config_text({dc: [(LOCAL, self.me_port)] for dc in DC_IDS})
        self.config = FakeConfigServer(reactor, config_v4=body, config_v6=body)
        self.config_port = self.listen(self.config)
        self.addCleanup(self.config.idle)
        self.site = self.start_site(FakeSite("localhost"))
        self.state_dir = Path(self.mktemp())
        self.state_dir.mkdir(parents=True)

    def closed_port(self) -> int:
        """
        A loopback port that refuses, held for the test (see tests/ports.py).
        """
        return int(hold_port(self, LOCAL).getsockname()[1])

    def listen(self, factory: Any) -> int:
        listening = reactor.listenTCP(0, factory, interface=LOCAL)
        self.addCleanup(listening.stopListening)
        return _port(listening)

    def start_site(self, site: FakeSite) -> FakeSite:
        site.listen(reactor)
        self.addCleanup(site.close)
        return site

    async def _drop(self, fake: Any) -> None:
        for conn in fake.live():
            conn.transport.abortConnection()
            await conn.lost

    def url(self, path: str) -> str:
        return self.config.url(self.config_port, path)

    def argv(self, *more: str, middle: bool = True, **replace: str) -> list[str]:
        """
        The options, every outbound address on loopback; ``replace`` swaps
        one option's value (``mask_host="..."``).
        """
        given = {
            "listen": f"tcp:0:interface={LOCAL}",
            "secret": SECRET,
            "state-dir": str(self.state_dir),
            "proxy-config-url": self.url("getProxyConfig"),
            "proxy-config-v6-url": self.url("getProxyConfigV6"),
            "proxy-secret-url": self.url("getProxySecret"),
            "ip-lookup-url": self.url("ip"),
            "mask-host": f"{LOCAL}:{self.site.port_number}",
            "public-host": LOCAL,
            "max-connections": "100",
            "connect-timeout": "5",
        }
        for key, value in replace.items():
            given[key.replace("_", "-")] = value
        argv = [f"--{key}={value}" for key, value in given.items()]
        argv += [f"--dc={dc}={LOCAL}:{self.dc_port}" for dc in DC_IDS]
        if middle:
            argv.append(f"--ad-tag={AD_TAG}")
        return [*argv, *more]

    async def doctor(
        self, *more: str, limits: tuple[int, int] = PLENTY, **kwargs: Any
    ) -> dict[str, Result]:
        options = DoctorOptions()
        options.parseOptions(self.argv(*more, **kwargs))
        lines: list[str] = []
        results = await run(reactor, options, lines.append, open_file_limits=lambda: limits)
        self.assertEqual(lines, [r.line() for r in results])
        by_name = {r.name: r for r in results}
        self.assertEqual(len(by_name), len(results), "one line per check")
        self.results = results
        return by_name

    def assertOnlyFailure(self, results: dict[str, Result], name: str, *words: str) -> None:
        """
        ``name`` failed, saying ``words``; nothing else failed.
        """
        failed = {n for n, r in results.items() if r.status is Status.FAIL}
        self.assertEqual(failed, {name}, [r.line() for r in self.results])
        for word in words:
            self.assertIn(word, results[name].detail)
        self.assertEqual(exit_status(results.values()), 1)


class AllGoodTests(DoctorHarness):
    def test_middle_mode(self) -> Deferred[None]:
        return ensureDeferred(self._middle_mode())

    async def _middle_mode(self) -> None:
        results = await self.doctor()
        self.assertEqual(
            [r.status for r in self.results], [Status.OK] * len(self.results), self.results
        )
        self.assertEqual(exit_status(self.results), 0)
        dcs = "dc 1, -1, 2, -2, 3, -3, 4, -4, 5, -5"
        self.assertEqual(
            list(results),
            [
                f"listen tcp:0:interface={LOCAL}",
                "state dir",
                "open files",
                "proxy config",
                "proxy config v6",
                "proxy secret",
                "clock",
                dcs,
                f"middle proxy {LOCAL}:{self.me_port}",
                "external address",
                "mask host for localhost",
                "dns localhost",
            ],
        )
        self.assertIn(f"{LOCAL}:{self.dc_port}: connected in", results[dcs].detail)
        self.assertIn("downloaded config", results[f"middle proxy {LOCAL}:{self.me_port}"].detail)
        self.assertIn("203.0.113.7", results["external address"].detail)
        self.assertIn("TLS 1.3", results["mask host for localhost"].detail)
        self.assertIn("key share x25519", results["mask host for localhost"].detail)
        self.assertIn("this host", results["dns localhost"].detail)
        # The site saw the two hellos (of older and of current apps).
        self.assertEqual(len(self.site.connections), 2)

    def test_direct_mode(self) -> Deferred[None]:
        return ensureDeferred(self._direct_mode())

    async def _direct_mode(self) -> None:
        results = await self.doctor(middle=False)
        self.assertEqual(exit_status(self.results), 0, self.results)
        self.assertNotIn("proxy config", results)
        self.assertNotIn("external address", results)
        self.assertFalse([n for n in results if n.startswith("middle proxy")])
        self.assertEqual(results["clock"].status, Status.OK)
        # Only the config's Date was asked for, for the clock.
        self.assertEqual(dict(self.config.requests), {"/getProxyConfig": 1})


class FailureTests(DoctorHarness):
    """
    One test per FAIL path; each asserts nothing else failed.
    """

    def test_dc_unreachable(self) -> Deferred[None]:
        return ensureDeferred(self._dc_unreachable())

    async def _dc_unreachable(self) -> None:
        port = self.closed_port()
        results = await self.doctor(f"--dc=3={LOCAL}:{port}", middle=False)
        self.assertOnlyFailure(results, "dc 3", f"{LOCAL}:{port}", "connection refused")
        self.assertEqual(results["dc 1, -1, 2, -2, -3, 4, -4, 5, -5"].status, Status.OK)

    def test_dc_unreachable_in_middle_mode_warns(self) -> Deferred[None]:
        return ensureDeferred(self._dc_unreachable_middle())

    async def _dc_unreachable_middle(self) -> None:
        results = await self.doctor(f"--dc=3={LOCAL}:{self.closed_port()}")
        self.assertEqual(results["dc 3"].status, Status.WARN)
        self.assertIn("direct fallback", results["dc 3"].detail)
        self.assertEqual(exit_status(results.values()), 0)

    def test_config_not_found(self) -> Deferred[None]:
        return ensureDeferred(self._config_not_found())

    async def _config_not_found(self) -> None:
        self.config.status["/getProxyConfig"] = 404
        # The proxy would start with its cached copy: the doctor tries those.
        cached = config_text({2: [(LOCAL, self.me_port)]})
        (self.state_dir / CONFIG_FILE).write_bytes(cached)
        results = await self.doctor()
        self.assertOnlyFailure(results, "proxy config", "HTTP status 404")
        middle = results[f"middle proxy {LOCAL}:{self.me_port}"]
        self.assertEqual(middle.status, Status.OK)
        self.assertIn("cached", middle.detail)

    def test_secret_is_a_web_page(self) -> Deferred[None]:
        return ensureDeferred(self._secret_is_a_web_page())

    async def _secret_is_a_web_page(self) -> None:
        page = b"<html><head><title>Service unavailable</title></head><body>"
        page = (page + b" " * 128)[: 128 - len(b"</body></html>")] + b"</body></html>"
        self.assertEqual(len(page), 128)  # the secret's length: only its text gives it away
        self.config.bodies["/getProxySecret"] = page
        results = await self.doctor()
        self.assertOnlyFailure(results, "proxy secret", "text")

    def test_mask_host_speaks_tls12(self) -> Deferred[None]:
        return ensureDeferred(self._mask_host_speaks_tls12())

    async def _mask_host_speaks_tls12(self) -> None:
        old = self.start_site(FakeSite("localhost", tls13=False))
        results = await self.doctor(mask_host=f"{LOCAL}:{old.port_number}")
        # A TLS 1.2 server answers either with a TLS 1.2 ServerHello (0x0303)
        # or, depending on its OpenSSL, a protocol_version alert.
        self.assertOnlyFailure(results, "mask host for localhost", "not TLS 1.3")

    def test_mask_host_is_no_tls_site(self) -> Deferred[None]:
        return ensureDeferred(self._mask_host_is_no_tls_site())

    async def _mask_host_is_no_tls_site(self) -> None:
        plain = self.start_site(FakeSite("localhost", tls=False))
        results = await self.doctor(mask_host=f"{LOCAL}:{plain.port_number}")
        self.assertOnlyFailure(results, "mask host for localhost", "plain HTTP")

    def test_mask_host_unreachable(self) -> Deferred[None]:
        return ensureDeferred(self._mask_host_unreachable())

    async def _mask_host_unreachable(self) -> None:
        results = await self.doctor(mask_host=f"{LOCAL}:{self.closed_port()}")
        self.assertOnlyFailure(results, "mask host for localhost", "connection refused")

    def test_clock_an_hour_off(self) -> Deferred[None]:
        return ensureDeferred(self._clock_an_hour_off())

    async def _clock_an_hour_off(self) -> None:
        self.config.date_offset = 3600.0
        results = await self.doctor()
        self.assertOnlyFailure(results, "clock", "s behind", "middle proxies refuse")
        self.assertRegex(results["clock"].detail, "^(3599|3600|3601) s behind")

    def test_clock_off_in_direct_mode_without_fake_tls_warns(self) -> Deferred[None]:
        return ensureDeferred(self._clock_direct())

    async def _clock_direct(self) -> None:
        self.config.date_offset = -60.0
        results = await self.doctor(middle=False, secret="bob=dd" + "5b" * 16)
        self.assertEqual(results["clock"].status, Status.WARN)
        self.assertRegex(results["clock"].detail, "^(59|60|61) s ahead of")
        self.assertEqual(exit_status(results.values()), 0)

    def test_state_dir_not_writable(self) -> Deferred[None]:
        return ensureDeferred(self._state_dir_not_writable())

    async def _state_dir_not_writable(self) -> None:
        # A path under a file: no one can create it, root included.
        blocker = self.state_dir / "file"
        blocker.write_text("x")
        results = await self.doctor(state_dir=str(blocker / "state"))
        self.assertOnlyFailure(results, "state dir", "is not a directory")

    def test_state_dir_is_a_file(self) -> Deferred[None]:
        return ensureDeferred(self._state_dir_is_a_file())

    async def _state_dir_is_a_file(self) -> None:
        path = self.state_dir / "file"
        path.write_text("x")
        results = await self.doctor(state_dir=str(path))
        self.assertOnlyFailure(results, "state dir", "is not a directory")

    def test_listen_endpoint_busy(self) -> Deferred[None]:
        return ensureDeferred(self._listen_endpoint_busy())

    async def _listen_endpoint_busy(self) -> None:
        busy = self.listen(Factory.forProtocol(Protocol))
        listen = f"tcp:{busy}:interface={LOCAL}"
        results = await self.doctor(listen=listen)
        self.assertOnlyFailure(results, f"listen {listen}", "in use")

    def test_open_file_limit_too_low(self) -> Deferred[None]:
        return ensureDeferred(self._open_file_limit_too_low())

    async def _open_file_limit_too_low(self) -> None:
        results = await self.doctor(limits=(200, 240))
        # 100 clients, 80 pool connections, 1 listener and 64 spare.
        self.assertOnlyFailure(results, "open files", "240", "245", "LimitNOFILE=245")

    def test_middle_proxy_unreachable(self) -> Deferred[None]:
        return ensureDeferred(self._middle_proxy_unreachable())

    async def _middle_proxy_unreachable(self) -> None:
        port = self.closed_port()
        self.config.bodies["/getProxyConfig"] = config_text(
            {2: [(LOCAL, self.me_port), (LOCAL, port)], 4: [(LOCAL, port)]}
        )
        results = await self.doctor()
        self.assertOnlyFailure(results, f"middle proxy {LOCAL}:{port}", "dc 2, 4")
        self.assertEqual(results[f"middle proxy {LOCAL}:{self.me_port}"].status, Status.OK)

    def test_other_middle_proxies_of_its_dc_answer(self) -> Deferred[None]:
        return ensureDeferred(self._other_middle_proxies())

    async def _other_middle_proxies(self) -> None:
        port = self.closed_port()
        self.config.bodies["/getProxyConfig"] = config_text(
            {2: [(LOCAL, self.me_port), (LOCAL, port)]}
        )
        results = await self.doctor()
        self.assertEqual(results[f"middle proxy {LOCAL}:{port}"].status, Status.WARN)
        self.assertEqual(exit_status(results.values()), 0)


class WarningTests(DoctorHarness):
    def test_domain_resolves_elsewhere(self) -> Deferred[None]:
        return ensureDeferred(self._domain_resolves_elsewhere())

    async def _domain_resolves_elsewhere(self) -> None:
        results = await self.doctor(public_host="127.0.0.2")
        self.assertEqual(results["dns localhost"].status, Status.WARN)
        self.assertIn("not to this host (127.0.0.2", results["dns localhost"].detail)
        self.assertEqual(exit_status(results.values()), 0)

    def test_public_address_from_the_lookup(self) -> Deferred[None]:
        return ensureDeferred(self._public_address_from_the_lookup())

    async def _public_address_from_the_lookup(self) -> None:
        argv = [a for a in self.argv() if not a.startswith("--public-host")]
        options = DoctorOptions()
        options.parseOptions(argv)
        results = {r.name: r for r in await run(reactor, options, open_file_limits=lambda: PLENTY)}
        self.assertIn("203.0.113.7", results["dns localhost"].detail)
        self.assertEqual(results["dns localhost"].status, Status.WARN)
        self.assertEqual(self.config.requests["/ip"], 1)

    def test_external_address_unknown(self) -> Deferred[None]:
        return ensureDeferred(self._external_address_unknown())

    async def _external_address_unknown(self) -> None:
        self.config.status["/ip"] = 500
        results = await self.doctor()
        self.assertEqual(results["external address"].status, Status.WARN)
        self.assertIn("HTTP status 500", results["external address"].detail)
        self.assertIn("--nat-ip", results["external address"].detail)

    def test_nat_ip(self) -> Deferred[None]:
        return ensureDeferred(self._nat_ip())

    async def _nat_ip(self) -> None:
        results = await self.doctor("--nat-ip=198.51.100.4")
        self.assertEqual(
            results["external address"].line(), "OK   external address: 198.51.100.4 (--nat-ip)"
        )
        self.assertEqual(self.config.requests["/ip"], 0)


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ended.callback(value.exitCode)


class CommandTests(DoctorHarness):
    """
    ``mtproxy-tw doctor`` as a child process: its lines and exit status.
    """

    async def command(self, *argv: str) -> tuple[int | None, list[str], bytes]:
        child = Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        args = [sys.executable, "-m", "mtproxy_tw.cli", "doctor", *argv]
        reactor.spawnProcess(child, sys.executable, args, env=env)
        code = await child.ended
        return code, child.out.decode().splitlines(), child.err

    def test_all_good(self) -> Deferred[None]:
        return ensureDeferred(self._all_good())

    async def _all_good(self) -> None:
        # One client needs few descriptors: any host's limit has room.
        code, lines, err = await self.command(*self.argv(middle=False, max_connections="1"))
        self.assertEqual((code, err), (0, b""), lines)
        self.assertEqual([line.split()[0] for line in lines], ["OK"] * len(lines))
        names = [line[5:].split(":")[0] for line in lines]
        self.assertEqual(names[:4], ["listen tcp", "state dir", "open files", "clock"])
        self.assertIn("mask host for localhost", names)

    def test_a_failure_exits_1(self) -> Deferred[None]:
        return ensureDeferred(self._a_failure_exits_1())

    async def _a_failure_exits_1(self) -> None:
        port = self.closed_port()
        argv = self.argv(f"--dc=4={LOCAL}:{port}", middle=False, max_connections="1")
        code, lines, _ = await self.command(*argv)
        self.assertEqual(code, 1)
        self.assertIn(f"FAIL dc 4: {LOCAL}:{port}: connection refused", lines)

    def test_bad_option(self) -> Deferred[None]:
        return ensureDeferred(self._bad_option())

    async def _bad_option(self) -> None:
        code, lines, err = await self.command(*self.argv(max_connections="none"))
        self.assertEqual((code, lines), (2, []))
        self.assertEqual(err.decode().splitlines(), [err.decode().strip()])
        self.assertIn("--max-connections", err.decode())


def _server_hello(*extensions: tuple[int, bytes], random: bytes = b"\x11" * 32) -> bytes:
    body = b"\x03\x03" + random + b"\x00" + b"\x13\x01" + b"\x00"
    exts = b"".join(t.to_bytes(2, "big") + len(v).to_bytes(2, "big") + v for t, v in extensions)
    body += len(exts).to_bytes(2, "big") + exts
    handshake = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + len(handshake).to_bytes(2, "big") + handshake


class ServerHelloTests(SynchronousTestCase):
    """
    The key-share group and version read from a ServerHello.
    """

    def test_tls13_group(self) -> None:
        data = _server_hello((0x002B, b"\x03\x04"), (0x0033, b"\x11\xec\x00\x02ab"))
        hello = read_server_hello(data)
        assert hello is not None
        self.assertEqual((hello.version, hello.cipher, hello.group), (0x0304, 0x1301, 0x11EC))
        self.assertFalse(hello.retry)
        self.assertIsNone(read_server_hello(data[:-1]))

    def test_hello_retry_request(self) -> None:
        retry = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
        data = _server_hello((0x002B, b"\x03\x04"), (0x0033, b"\x00\x17"), random=retry)
        hello = read_server_hello(data)
        assert hello is not None
        self.assertEqual((hello.retry, hello.group), (True, 0x0017))

    def test_tls12(self) -> None:
        hello = read_server_hello(_server_hello())
        assert hello is not None
        self.assertEqual((hello.version, hello.group), (0x0303, None))

    def test_not_a_server_hello(self) -> None:
        for data, words in (
            (b"HTTP/1.1 400 Bad Request\r\n", "plain HTTP"),
            (b"\x15\x03\x03\x00\x02\x02\x46", "alert 70"),
            (b"SSH-2.0-OpenSSH\r\n", "not TLS"),
        ):
            with self.assertRaises(TLSError) as caught:
                read_server_hello(data)
            self.assertIn(words, str(caught.exception))


class SharedStateTests(DoctorHarness):
    """
    ``--shared-state``: the fleet's Redis answers, or a FAIL line says why
    (never with the password).
    """

    def test_redis_answers(self) -> Deferred[None]:
        return ensureDeferred(self._answers())

    async def _answers(self) -> None:
        from mtproxy_tw.testing.redisserver import RedisServer

        server = RedisServer.start_or_skip(self.mktemp())
        self.addCleanup(server.stop)
        url = f"redis://127.0.0.1:{server.port}/2"
        results = await self.doctor(f"--shared-state={url}", middle=False)
        check = results["shared-state"]
        self.assertEqual(check.status, Status.OK, check)
        self.assertIn(f"{url} answers (Redis ", check.detail)
        self.assertEqual(exit_status(self.results), 0, self.results)

    def test_redis_away(self) -> Deferred[None]:
        return ensureDeferred(self._away())

    async def _away(self) -> None:
        port = self.closed_port()
        results = await self.doctor(
            f"--shared-state=redis://:hunter2@{LOCAL}:{port}/0", middle=False
        )
        check = results["shared-state"]
        self.assertEqual(check.status, Status.FAIL, check)
        self.assertIn(f"redis://{LOCAL}:{port}/0", check.detail)
        self.assertNotIn("hunter2", check.line())
        self.assertEqual(exit_status(self.results), 1)
