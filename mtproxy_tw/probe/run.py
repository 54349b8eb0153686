"""
The probes sent over TCP: each probe of the battery goes to the proxy and
to the site at the same time, and what came back is compared
(:mod:`.compare`).

Every probe of a run starts at once, each with its own wait
(``Deferred.addTimeout``), so a run takes about one wait however many
probes it has (two when the replayed hello's first sending gets no
answer); a line is reported as each probe ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mtproxy_tw.probe.battery import Probe, battery
from mtproxy_tw.probe.compare import (
    FIN,
    PROBE_CLOSED,
    REFUSED,
    RST,
    TIMEOUT,
    UNREACHABLE,
    Answer,
    compare,
    result_line,
)
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.secrets import Secret

__all__ = ["DIFFERENT", "SAME", "SKIPPED", "Report", "Result", "run_battery"]

SAME = "same"
DIFFERENT = "different"
SKIPPED = "skipped"

#: Bytes of each answer kept for the comparison (its size counts them all).
KEEP = 1 << 16
#: Seconds between the "waiting for" lines while probes are out.
TICK = 5.0

#: The HTTP/2 client preface and an empty SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


@dataclass(frozen=True)
class Result:
    """
    One probe's outcome: its verdict (:data:`SAME`, :data:`DIFFERENT` or
    :data:`SKIPPED`), its line, and the two answers.
    """

    name: str
    verdict: str
    line: str
    site: Answer | None = None
    proxy: Answer | None = None


@dataclass(frozen=True)
class Report:
    """
    The results of a run, in the battery's order.
    """

    results: tuple[Result, ...]

    @property
    def lines(self) -> list[str]:
        return [r.line for r in self.results]

    @property
    def different(self) -> bool:
        return any(r.verdict == DIFFERENT for r in self.results)

    def summary(self) -> str:
        counts = {v: sum(r.verdict == v for r in self.results) for v in (SAME, DIFFERENT, SKIPPED)}
        return ", ".join(f"{n} {v}" for v, n in counts.items())


class _Watch(Protocol):
    """
    Writes a probe's bytes once connected and records what comes back:
    the bytes, when the first came, and how and when the connection ended.

    :ivar done: fires with the :class:`Answer`; cancelling it (the wait is
        over) fires it with a :data:`TIMEOUT` answer and aborts.
    """

    transport: Any

    def __init__(self, clock: IReactorTime, payload: bytes, stop_on_answer: bool = False) -> None:
        self.clock = clock
        self.payload = payload
        self.stop_on_answer = stop_on_answer
        self.received = bytearray()
        self.size = 0
        self.started: float | None = None
        self.first: float | None = None
        self.note = ""
        self.waited = 0.0
        self._closing: str | None = None
        self.done: Deferred[Answer] = Deferred(self._cancelled)

    def connectionMade(self) -> None:
        self.started = self.clock.seconds()
        self.send_first()

    def send_first(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        if self.first is None:
            self.first = self._since()
            if self.stop_on_answer:
                self.close_ourselves(PROBE_CLOSED, abort=True)
        self.size += len(data)
        room = KEEP - len(self.received)
        if room > 0:
            self.received += data[:room]

    def close_ourselves(self, kind: str, abort: bool = False) -> None:
        self._closing = kind
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _since(self) -> float:
        return 0.0 if self.started is None else self.clock.seconds() - self.started

    def answer(self, close: str) -> Answer:
        return Answer(
            bytes(self.received),
            self.size,
            close,
            closed_after=None if close in (TIMEOUT, REFUSED, UNREACHABLE) else self._since(),
            first_after=self.first,
            note=self.note,
            waited=self.waited,
        )

    def _cancelled(self, done: Deferred[Answer]) -> None:
        done.callback(self.answer(TIMEOUT))
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._closing is not None:
            close = self._closing
        else:
            close = FIN if reason.check(ConnectionDone) else RST
        self.done.callback(self.answer(close))


class _TLSWatch(_Watch):
    """
    A browser's TLS 1.3 client (OpenSSL through pyOpenSSL, with the groups,
    the post-quantum share included, that its OpenSSL offers), driven in
    memory so every byte on the wire is recorded; once the handshake is
    done it asks for ``/``. A failed handshake is given up the way a
    browser does: the alert, then a close.
    """

    def __init__(self, clock: IReactorTime, sni: str) -> None:
        super().__init__(clock, b"")
        self.sni = sni
        self.tls: SSL.Connection | None = None
        self.shaken = False

    def send_first(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_alpn_protos([b"h2", b"http/1.1"])
        tls = self.tls = SSL.Connection(context, None)
        tls.set_tlsext_host_name(self.sni.encode("idna"))
        tls.set_connect_state()
        self._pump(b"")

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.tls is not None:
            self._pump(data)

    def _request(self) -> bytes:
        assert self.tls is not None
        if self.tls.get_alpn_proto_negotiated() == b"h2":
            return _H2_PREFACE
        return (
            b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\n"
            b"Connection: close\r\n\r\n" % self.sni.encode("idna")
        )

    def _pump(self, data: bytes) -> None:
        tls = self.tls
        assert tls is not None
        failed = ""
        closing = False
        try:
            if data:
                tls.bio_write(data)
            if not self.shaken:
                tls.do_handshake()
                self.shaken = True
                tls.send(self._request())
            while tls.recv(KEEP):
                pass
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            # The server's close_notify: answer it and close, as browsers do.
            with contextlib.suppress(SSL.Error):
                tls.shutdown()
            closing = True
        except SSL.Error as e:
            failed = _reason(e)
        out = []
        while True:
            try:
                chunk = tls.bio_read(KEEP)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out.append(chunk)
        if out:
            self.transport.write(b"".join(out))
        if failed:
            self.note = f"TLS failed: {failed}"
        if failed or closing:
            self.tls = None
            self.close_ourselves(PROBE_CLOSED)


def _reason(error: SSL.Error) -> str:
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return str(error) or type(error).__name__


def _observe(
    clock: IReactorTime, endpoint: IStreamClientEndpoint, watch: _Watch, wait: float
) -> Deferred[Answer]:
    """
    Connect ``watch``; fires with its answer within ``wait`` seconds.
    """
    watch.waited = wait
    connecting = connectProtocol(endpoint, watch)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) or watch.done.called:
            return
        refused = failure.check(ConnectionRefusedError)
        watch.done.callback(watch.answer(REFUSED if refused else UNREACHABLE))

    connecting.addErrback(failed)
    done = watch.done

    def cancel_connect(result: Answer) -> Answer:
        if not connecting.called:
            connecting.cancel()
        return result

    done.addTimeout(wait, clock)
    return done.addCallback(cancel_connect)


#: Makes the endpoint that reaches an address.
Connect = Callable[[Address], IStreamClientEndpoint]


async def _probe_one(
    clock: IReactorTime, probe: Probe, connect: Connect, address: Address, sni: str, wait: float
) -> Answer:
    if probe.tls:
        return await _observe(clock, connect(address), _TLSWatch(clock, sni), wait)
    if probe.replay:
        await _observe(clock, connect(address), _Watch(clock, probe.payload, True), wait)
    return await _observe(clock, connect(address), _Watch(clock, probe.payload), wait)


def _tcp(reactor: Any, wait: float) -> Connect:
    def connect(address: Address) -> IStreamClientEndpoint:
        return HostnameEndpoint(reactor, address.host, address.port, timeout=int(wait) + 1)

    return connect


async def run_battery(
    reactor: Any,
    proxy: Address,
    site: Address,
    sni: str,
    *,
    secret: Secret | None = None,
    wait: float = 15.0,
    tolerance: float = 1.0,
    progress: Callable[[str], None] | None = None,
    connect: Connect | None = None,
) -> Report:
    """
    Send every probe of the battery to ``proxy`` and to ``site``; return
    the results. ``progress`` gets each result line as its probe ends,
    and every :data:`TICK` seconds a line naming the probes still out.
    """
    report = progress or (lambda line: None)
    reach = connect or _tcp(reactor, wait)
    probes = battery(sni, reactor.seconds(), secret)
    out = {p.name for p in probes if not p.needs_secret}

    async def one(probe: Probe) -> Result:
        if probe.needs_secret:
            line = f"skipped   {probe.name}: needs --secret (an ee secret)"
            report(line)
            return Result(probe.name, SKIPPED, line)
        answers = await gatherResults(
            [
                ensureDeferred(_probe_one(reactor, probe, reach, address, sni, wait))
                for address in (site, proxy)
            ],
            consumeErrors=True,
        )
        site_answer, proxy_answer = answers
        line = result_line(probe.name, site_answer, proxy_answer, tolerance)
        verdict = DIFFERENT if compare(site_answer, proxy_answer, tolerance) else SAME
        out.discard(probe.name)
        report(line)
        return Result(probe.name, verdict, line, site_answer, proxy_answer)

    ticker = LoopingCall(lambda: report(f"# waiting for {len(out)}: {', '.join(sorted(out))}"))
    ticker.clock = reactor
    ticker.start(TICK, now=False)
    try:
        results = await gatherResults([ensureDeferred(one(p)) for p in probes], consumeErrors=True)
    finally:
        ticker.stop()
    return Report(tuple(results))
