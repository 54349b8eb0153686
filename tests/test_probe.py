"""
``mtproxy-tw probe``: the battery, the comparison, and runs against a
proxy fronting a FakeSite on loopback and against the site itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.cli import main
from mtproxy_tw.probe import compare
from mtproxy_tw.probe.battery import STALE_BY, battery, short_client_hello
from mtproxy_tw.probe.compare import (
    FIN,
    PROBE_CLOSED,
    REFUSED,
    RST,
    TIMEOUT,
    UNREACHABLE,
    Answer,
    records,
)
from mtproxy_tw.probe.run import (
    DIFFERENT,
    SAME,
    SKIPPED,
    Report,
    _observe,
    _Watch,
    run_battery,
)
from mtproxy_tw.testing import FakeSite
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.faketls import parse_client_hello, verify_client_hello
from tests.test_fronting import DOMAIN, EE, FrontingHarness
from tests.test_integration import CLASSIC, LOCAL, reactor

#: Every probe, in the order of the lines.
NAMES = [
    "tls-browser",
    "tls-short",
    "tdlib-wrong-key",
    "http-get",
    "garbage-1",
    "garbage-10",
    "garbage-200",
    "tls-header",
    "hello-100",
    "tdlib-valid",
    "tdlib-replay",
    "tdlib-stale",
]
#: What any site fronted by a proxy must answer alike, whatever its timers.
FRONTED_AT_ONCE = ["tls-browser", "tdlib-wrong-key", "http-get", "tdlib-replay", "tdlib-stale"]
#: The wait of each probe in these tests.
WAIT = 2.0

ROOT = Path(__file__).resolve().parent.parent


class BatteryTests(SynchronousTestCase):
    def test_names_and_order(self) -> None:
        self.assertEqual([p.name for p in battery(DOMAIN, time.time(), EE)], NAMES)

    def test_without_a_secret(self) -> None:
        probes = battery(DOMAIN, time.time())
        needing = [p.name for p in probes if p.needs_secret]
        self.assertEqual(needing, ["tdlib-valid", "tdlib-replay", "tdlib-stale"])
        self.assertTrue(all(not p.payload for p in probes if p.needs_secret))

    def test_valid_hellos(self) -> None:
        now = time.time()
        probes = {p.name: p for p in battery(DOMAIN, now, EE)}
        candidates = [(EE.name, EE.key)]
        for name, age in (("tdlib-valid", 0), ("tdlib-replay", 0), ("tdlib-stale", STALE_BY)):
            match = verify_client_hello(probes[name].payload, candidates)
            assert match is not None, name
            self.assertEqual(match.timestamp, int(now) - age, name)
            self.assertEqual(match.server_name, DOMAIN)
        self.assertIsNone(verify_client_hello(probes["tdlib-wrong-key"].payload, candidates))
        self.assertTrue(probes["tdlib-replay"].replay)

    def test_sizes(self) -> None:
        probes = {p.name: p for p in battery(DOMAIN, time.time(), EE)}
        sizes = {name: len(p.payload) for name, p in probes.items()}
        self.assertEqual(sizes["garbage-1"], 1)
        self.assertEqual(sizes["garbage-10"], 10)
        self.assertEqual(sizes["garbage-200"], 200)
        self.assertEqual(probes["tls-header"].payload, b"\x16\x03\x01")
        self.assertEqual(probes["hello-100"].payload, probes["tdlib-wrong-key"].payload[:100])
        self.assertTrue(probes["http-get"].payload.startswith(b"GET / HTTP/1.1\r\n"))
        self.assertTrue(probes["tls-browser"].tls)

    def test_short_hello_parses(self) -> None:
        hello = short_client_hello(DOMAIN)
        self.assertLess(len(hello), 512)
        parsed = parse_client_hello(hello)
        self.assertEqual(parsed.server_names, (DOMAIN,))
        self.assertIn(0x1301, parsed.cipher_suites)


def answer(
    data: bytes = b"",
    close: str = FIN,
    closed_after: float | None = 0.1,
    first_after: float | None = None,
    note: str = "",
) -> Answer:
    if data and first_after is None:
        first_after = 0.05
    if close == TIMEOUT:
        closed_after = None
    return Answer(data, len(data), close, closed_after, first_after, note, waited=WAIT)


def tls(*sizes: int, kind: int = 0x17) -> bytes:
    return b"".join(bytes((kind, 3, 3)) + n.to_bytes(2, "big") + bytes(n) for n in sizes)


class CompareTests(SynchronousTestCase):
    def test_same(self) -> None:
        for a in (answer(), answer(b"HTTP/1.1 400 Bad Request\r\n"), answer(close=TIMEOUT)):
            self.assertEqual(compare.compare(a, a), [])

    def test_close_kind(self) -> None:
        (how,) = compare.compare(answer(), answer(close=RST))
        self.assertEqual(how, "close: site FIN after 0.10 s, proxy RST after 0.10 s")
        (how,) = compare.compare(answer(close=TIMEOUT), answer(closed_after=10.0))
        self.assertEqual(how, "close: site open after 2 s, proxy FIN after 10.00 s")

    def test_close_time_tolerance(self) -> None:
        self.assertEqual(compare.compare(answer(closed_after=0.1), answer(closed_after=1.0)), [])
        (how,) = compare.compare(answer(closed_after=0.1), answer(closed_after=10.1))
        self.assertEqual(how, "close time: site 0.10 s, proxy 10.10 s")
        self.assertEqual(
            compare.compare(answer(closed_after=0.1), answer(closed_after=3.0), tolerance=5), []
        )

    def test_answer_time(self) -> None:
        site, proxy = answer(b"x" * 20, first_after=0.1), answer(b"x" * 20, first_after=5.0)
        (how,) = compare.compare(site, proxy)
        self.assertEqual(how, "answer time: site 0.10 s, proxy 5.00 s")

    def test_tls_records(self) -> None:
        site = answer(tls(122, kind=0x16) + tls(1, kind=0x14) + tls(2500, 300))
        within = answer(tls(122, kind=0x16) + tls(1, kind=0x14) + tls(2504, 300))
        self.assertEqual(compare.compare(site, within), [])
        one_record = answer(tls(122, kind=0x16) + tls(1, kind=0x14) + tls(2800))
        (how,) = compare.compare(site, one_record)
        self.assertEqual(
            how,
            "answer: site TLS 16:122 14:1 17:2500 17:300 (2943 B), "
            "proxy TLS 16:122 14:1 17:2800 (2938 B)",
        )
        self.assertTrue(compare.compare(site, answer(tls(122, kind=0x16) + tls(1, 2800))))
        self.assertTrue(compare.compare(site, answer()))

    def test_other_answers(self) -> None:
        bad = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
        self.assertEqual(compare.compare(answer(bad), answer(bad + b"X: y\r\n")), [])
        (how,) = compare.compare(answer(bad), answer(b"HTTP/1.0 400 Bad Request\r\n\r\n"))
        self.assertTrue(how.startswith("answer: site 47 B 'HTTP/1.1 400 Bad'"), how)
        (how,) = compare.compare(answer(bad), answer(bad + b"x" * 100))
        self.assertTrue(how.startswith("answer:"), how)

    def test_tls_client_note(self) -> None:
        (how,) = compare.compare(
            answer(close=PROBE_CLOSED), answer(close=PROBE_CLOSED, note="TLS failed: x")
        )
        self.assertEqual(how, "TLS client: site no error, proxy TLS failed: x")

    def test_records(self) -> None:
        self.assertIsNone(records(b"GET /"))
        self.assertIsNone(records(b"\x16\x03"))
        self.assertEqual(records(tls(3) + tls(100)[:20]), [(0x17, 3), (0x17, 100)])
        self.assertEqual(records(tls(3) + b"junk!!"), [(0x17, 3), (-1, 6)])

    def test_lines(self) -> None:
        line = compare.result_line("garbage-10", answer(), answer())
        self.assertEqual(line, "same      garbage-10: nothing, FIN after 0.10 s")
        line = compare.result_line("tls-header", answer(close=TIMEOUT), answer(close=TIMEOUT))
        self.assertEqual(
            line,
            "same      tls-header: nothing, open after 2 s; raise --wait to compare later closes",
        )
        line = compare.result_line("garbage-10", answer(), answer(closed_after=10.0))
        self.assertEqual(line, "different garbage-10: close time: site 0.10 s, proxy 10.00 s")
        self.assertIn("'HTTP/1.1 200 OK'", compare.describe(answer(b"HTTP/1.1 200 OK\r\n\r\n")))
        self.assertIn("3 B 00ff10", compare.describe(answer(b"\x00\xff\x10")))


class WatchTests(SynchronousTestCase):
    """
    How a probe connection's end is read.
    """

    def _watch(self, reason: Failure) -> Answer:
        clock = MemoryReactorClock()
        watch = _Watch(clock, b"probe")
        transport = StringTransport()
        watch.makeConnection(transport)
        self.assertEqual(transport.value(), b"probe")
        clock.advance(0.5)
        watch.dataReceived(b"answer")
        clock.advance(0.25)
        watch.connectionLost(reason)
        return self.successResultOf(watch.done)

    def test_fin(self) -> None:
        got = self._watch(Failure(ConnectionDone()))
        self.assertEqual((got.close, got.closed_after, got.first_after), (FIN, 0.75, 0.5))
        self.assertEqual((got.data, got.size), (b"answer", 6))

    def test_rst(self) -> None:
        self.assertEqual(self._watch(Failure(ConnectionLost())).close, RST)

    def test_timeout(self) -> None:
        clock = MemoryReactorClock()
        watch = _Watch(clock, b"probe")
        transport = StringTransport()
        watch.makeConnection(transport)
        watch.waited = 15.0
        watch.done.addTimeout(15, clock)
        clock.advance(15)
        got = self.successResultOf(watch.done)
        self.assertEqual((got.close, got.closed_after), (TIMEOUT, None))
        self.assertTrue(transport.disconnecting)
        watch.connectionLost(Failure(ConnectionDone()))  # the abort's own report: ignored


class Failing:
    """
    An endpoint whose connections fail with ``error``.
    """

    def __init__(self, error: Exception) -> None:
        self.error = error

    def connect(self, factory: Any) -> Any:
        return fail(self.error)


class ObserveTests(SynchronousTestCase):
    def test_refused_and_unreachable(self) -> None:
        clock = MemoryReactorClock()
        for error, close in (
            (ConnectionRefusedError(), REFUSED),
            (DNSLookupError("nowhere.example"), UNREACHABLE),
        ):
            done = _observe(clock, Failing(error), _Watch(clock, b"x"), 5)
            got = self.successResultOf(done)
            self.assertEqual((got.close, got.closed_after, got.size), (close, None, 0))
            self.assertEqual(compare.describe(got), f"nothing, {close}")


def verdicts(report: Report) -> dict[str, str]:
    return {r.name: r.verdict for r in report.results}


class ProbeRunTests(FrontingHarness):
    """
    The battery over loopback, as the command runs it.
    """

    async def _probe(self, proxy: int, site: FakeSite, **options: Any) -> Report:
        lines: list[str] = []
        report = await run_battery(
            reactor,
            Address(LOCAL, proxy),
            Address(LOCAL, site.port_number),
            DOMAIN,
            wait=WAIT,
            progress=lines.append,
            **options,
        )
        self.assertEqual([r.name for r in report.results], NAMES)
        # One line per probe, as each ended, and the same in the report.
        self.assertEqual(sorted(lines), sorted(report.lines))
        for result in report.results:
            verdict, name = result.line.split()[:2]
            self.assertEqual((verdict, name), (result.verdict, result.name + ":"))
        return report

    async def _site_against_itself(self) -> None:
        site = await self.site()
        report = await self._probe(site.port_number, site, secret=EE)
        self.assertEqual(verdicts(report), dict.fromkeys(NAMES, SAME), report.lines)
        self.assertFalse(report.different)
        self.assertEqual(report.summary(), "12 same, 0 different, 0 skipped")

    def test_site_against_itself(self) -> Any:
        return self.run_async(self._site_against_itself())

    async def _fronting_proxy(self) -> None:
        site = await self.site()
        port = await self.start(site=site, handshake_timeout=1.0)
        report = await self._probe(port, site, secret=EE)
        found = verdicts(report)
        self.assertEqual(set(found.values()) - {SAME, DIFFERENT}, set())
        for name in FRONTED_AT_ONCE:
            self.assertEqual(found[name], SAME, report.lines)
        # The site answered each one, through the proxy and directly.
        browser = report.results[0]
        assert browser.site is not None and browser.proxy is not None
        self.assertGreater(browser.site.size, 1000)
        self.assertEqual(browser.proxy.close, PROBE_CLOSED)

    def test_fronting_proxy(self) -> Any:
        return self.run_async(self._fronting_proxy())

    async def _without_secret(self) -> None:
        site = await self.site()
        port = await self.start(site=site)
        report = await self._probe(port, site)
        found = verdicts(report)
        for name in ("tdlib-valid", "tdlib-replay", "tdlib-stale"):
            self.assertEqual(found[name], SKIPPED)
        self.assertIn("skipped   tdlib-valid: needs --secret (an ee secret)", report.lines)
        self.assertEqual(found["http-get"], SAME)

    def test_without_secret(self) -> Any:
        return self.run_async(self._without_secret())

    async def _distinguishable(self) -> None:
        """
        No fronting at all (a classic secret, --no-mask): told apart.
        """
        site = await self.site()
        port = await self.start((CLASSIC,), site=site, mask=False, measured=False)
        report = await self._probe(port, site, secret=EE)
        self.assertTrue(report.different)
        found = verdicts(report)
        self.assertEqual(found["tls-browser"], DIFFERENT)
        self.assertEqual(found["tdlib-wrong-key"], DIFFERENT)
        line = report.results[NAMES.index("tdlib-wrong-key")].line
        self.assertIn("answer: site TLS 16:", line)
        self.assertIn("proxy nothing", line)

    def test_distinguishable(self) -> Any:
        return self.run_async(self._distinguishable())

    async def _command(self) -> None:
        """
        The real command, in a child process, against the site twice:
        progress, a line per probe, the summary, exit status 0; then
        against a closed port: refused, exit status 1.
        """
        site = await self.site()
        args = ["-m", "mtproxy_tw", "probe", "--sni", DOMAIN, "--wait", "1"]
        here = f"{LOCAL}:{site.port_number}"
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [*args, "--proxy", here, "--site", here],
            env=dict(os.environ),
            path=str(ROOT),
        )
        lines = out.decode().splitlines()
        self.assertEqual(code, 0, (out, err))
        self.assertTrue(lines[0].startswith(f"# probing proxy {here} and site {here} as {DOMAIN}"))
        self.assertEqual(lines[-1], "# 9 same, 0 different, 3 skipped")
        found = sorted(line.split()[1].rstrip(":") for line in lines if not line.startswith("#"))
        self.assertEqual(found, sorted(NAMES))
        closed = self.closed_port()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [*args, "--proxy", f"{LOCAL}:{closed}", "--site", here],
            env=dict(os.environ),
            path=str(ROOT),
        )
        self.assertEqual(code, 1, (out, err))
        self.assertIn("proxy refused", out.decode())

    def closed_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind((LOCAL, 0))
            return int(s.getsockname()[1])

    def test_command(self) -> Any:
        return self.run_async(self._command())


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


class CommandLineTests(SynchronousTestCase):
    def test_bad_arguments_one_line(self) -> None:
        site = ["--site", "127.0.0.1:443"]
        for argv, why in (
            (["--proxy", "nowhere", *site], "argument --proxy: 'nowhere' has no port"),
            (
                ["--proxy", "127.0.0.1:443", *site, "--secret", "dd" + "ab" * 16],
                "argument --secret: an ee secret (fake TLS) is needed",
            ),
            (
                ["--proxy", "127.0.0.1:443", *site, "--wait", "0"],
                "argument --wait: must be more than 0 and at most 3600",
            ),
            (
                ["--proxy", "127.0.0.1:443", *site],
                "--sni: the site is given as an address; name the domain it serves",
            ),
        ):
            code, out, err = run("probe", *argv)
            self.assertEqual(code, 2)
            self.assertEqual(out, "")
            self.assertEqual(err.splitlines()[-1], f"mtproxy-tw probe: error: {why}"[:999], err)
