"""
What the fronted web site's TLS answer looks like, so ours can look the same.

The proxy sends the site a ClientHello of its own (the shape Telegram apps
send) and reads the answer: the cipher suite and extension order of the
ServerHello, and the size of the first encrypted record, which carries the
site's certificate chain. Fake-TLS answers then use that size, with the
small jitter a real site shows, and that extension order (PROTOCOL.md
sections 4.6 and 4.8, section 13 item 5).

:func:`parse_server_answer` is pure; :class:`ProfileProber` is the Twisted
side that fetches it.
"""

from __future__ import annotations

import os
import random as _random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.faketls import NeedMore, TLSError, build_client_hello, fallback_app_data_len

if TYPE_CHECKING:
    from mtproxy_tw.core import ProxyCore

__all__ = ["ProfileProber", "ProfileService", "TLSProfile", "parse_server_answer"]

_KEY_SHARE = 0x0033
_SUPPORTED_VERSIONS = 0x002B
_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True, slots=True)
class Observation:
    """
    One answer of the site.
    """

    cipher_suite: int
    key_share_first: bool
    app_data_len: int


@dataclass(frozen=True, slots=True)
class TLSProfile:
    """
    What several answers of one site had in common.

    :ivar sizes: the first encrypted record's sizes seen.
    """

    sizes: tuple[int, ...]
    cipher_suite: int
    key_share_first: bool

    @classmethod
    def from_observations(cls, seen: list[Observation]) -> TLSProfile:
        last = seen[-1]
        return cls(
            tuple(sorted(o.app_data_len for o in seen)), last.cipher_suite, last.key_share_first
        )

    def pick_size(self, rng: _random.Random | None = None) -> int:
        """
        A size for one answer: one seen, moved by at most one byte.
        """
        rng = rng or _random.SystemRandom()
        return max(1, min(16384, rng.choice(self.sizes) + rng.randint(-1, 1)))


#: The size used when a site has no profile (the codec's own fallback).
fallback_size = fallback_app_data_len


def _read_record(data: bytes, pos: int) -> tuple[int, bytes] | NeedMore:
    if len(data) < pos + 5:
        return NeedMore(pos + 5)
    length = int.from_bytes(data[pos + 3 : pos + 5], "big")
    if data[pos + 1] != 3 or length > 16384 + 256:
        raise TLSError("not a TLS record")
    if len(data) < pos + 5 + length:
        return NeedMore(pos + 5 + length)
    return data[pos], data[pos + 5 : pos + 5 + length]


def parse_server_answer(data: bytes) -> Observation | NeedMore:
    """
    Read a TLS 1.3 answer from the start of ``data``: ServerHello,
    ChangeCipherSpec, then the encrypted records that follow.

    The observed size is what one ApplicationData record would need to take
    the same room on the wire as all the encrypted records read so far (a
    site may send its flight as several records; a fake-TLS answer is one).
    Each record is checked as soon as it is complete.

    :raises TLSError: on anything else (an alert, TLS 1.2, garbage).
    """
    hello = _read_record(data, 0)
    if isinstance(hello, NeedMore):
        return hello
    kind, body = hello
    if kind != 0x16:
        raise TLSError(f"the answer starts with a record of type {kind}, not a handshake")
    cipher, order = _parse_server_hello(body)
    if _SUPPORTED_VERSIONS not in order or _KEY_SHARE not in order:
        raise TLSError("the server did not answer with TLS 1.3")
    first = order.index(_KEY_SHARE) < order.index(_SUPPORTED_VERSIONS)
    pos = 5 + len(body)
    ccs = _read_record(data, pos)
    if isinstance(ccs, NeedMore):
        return ccs
    if ccs != (0x14, b"\x01"):
        raise TLSError("the ServerHello is not followed by ChangeCipherSpec")
    pos += 6
    wire = 0
    while True:
        record = _read_record(data, pos)
        if isinstance(record, NeedMore):
            if wire:
                break
            return record
        kind, body = record
        if kind != 0x17:
            if wire:
                break
            raise TLSError("no ApplicationData record after ChangeCipherSpec")
        wire += 5 + len(body)
        pos += 5 + len(body)
    return Observation(cipher, first, min(wire - 5, 16384))


def _parse_server_hello(hello: bytes) -> tuple[int, list[int]]:
    try:
        if hello[0] != 0x02:
            raise TLSError("not a ServerHello")
        pos = 4 + 2 + 32
        pos += 1 + hello[pos]
        cipher = int.from_bytes(hello[pos : pos + 2], "big")
        pos += 3
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        order = []
        while pos + 4 <= end:
            order.append(int.from_bytes(hello[pos : pos + 2], "big"))
            pos += 4 + int.from_bytes(hello[pos + 2 : pos + 4], "big")
    except IndexError:
        raise TLSError("truncated ServerHello") from None
    if pos != end or end > len(hello):
        raise TLSError("malformed ServerHello extensions")
    return cipher, order


class _Probe(Protocol):
    """
    Sends a ClientHello and reads the answer until the site goes quiet.
    """

    #: Seconds without new bytes after which the answer is taken as whole.
    QUIET = 0.25

    def __init__(
        self, domain: str, result: Deferred[Observation], clock: Any, preamble: bytes = b""
    ) -> None:
        self.domain = domain
        self.preamble = preamble
        self.result = result
        self.clock = clock
        self.buffer = b""
        self.observed: Observation | None = None
        self._quiet: Any = None

    def connectionMade(self) -> None:
        hello = build_client_hello(
            os.urandom(16), self.domain, int(time.time()), consistent_grease=True
        )
        self.transport.write(self.preamble + hello)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        try:
            answer = parse_server_answer(self.buffer)
        except TLSError as e:
            self._finish(Failure(e))
            return
        if isinstance(answer, Observation):
            self.observed = answer
            if self._quiet is not None and self._quiet.active():
                self._quiet.reset(self.QUIET)
            else:
                self._quiet = self.clock.callLater(self.QUIET, self._went_quiet)
        if len(self.buffer) > _MAX_ANSWER:
            self._went_quiet()

    def _went_quiet(self) -> None:
        if self.observed is not None:
            self._finish(self.observed)
        else:
            self._finish(Failure(TLSError("answer too long")))

    def _finish(self, result: Observation | Failure) -> None:
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        if not self.result.called:
            if isinstance(result, Observation):
                self.result.callback(result)
            else:
                self.result.errback(result)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        if not self.result.called:
            if self.observed is not None:
                self.result.callback(self.observed)
            else:
                self.result.errback(TLSError("the site closed before answering"))


class ProfileProber:
    """
    Fetches one observation of a site's TLS answer.
    """

    log = Logger()

    def __init__(self, reactor: Any, timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.timeout = timeout

    def probe(self, endpoint: Any, domain: str, preamble: bytes = b"") -> Deferred[Observation]:
        """
        :param preamble: sent before the hello (a PROXY protocol line).
        """
        result: Deferred[Observation] = Deferred()
        probes: list[_Probe] = []

        def build() -> _Probe:
            probe = _Probe(domain, result, self.reactor, preamble)
            probes.append(probe)
            return probe

        factory = Factory.forProtocol(build)
        factory.noisy = False
        connecting = endpoint.connect(factory)

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        connecting.addErrback(failed)

        def cleanup(outcome: Any) -> Any:
            # A timed-out probe must not leave its connection behind.
            if not probes and not connecting.called:
                connecting.cancel()
            for probe in probes:
                probe.abort()
            return outcome

        result.addTimeout(self.timeout, self.reactor)
        result.addBoth(cleanup)
        return result


class ProfileService(Service):
    """
    Measures each fronted site at start and every ``interval`` seconds.

    Each round makes ``probes`` connections per domain; a domain whose probes
    all fail keeps its last profile, or has none (answers then use plausible
    random sizes).
    """

    log = Logger()

    def __init__(
        self,
        core: ProxyCore,
        interval: float = 3600.0,
        probes: int = 3,
        timeout: float = 5.0,
    ) -> None:
        self.core = core
        self.probes = probes
        self.prober = ProfileProber(core.reactor, timeout)
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = core.reactor
        self.interval = interval
        self.rounds = 0

    def start_loop(self) -> None:
        """
        Start measuring: the proxy calls this once it is listening and has
        checked that no mask host is the proxy itself.
        """
        if self.running and not self._loop.running:
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: self.log.failure("TLS profile loop stopped", f)
            )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> Deferred[None]:
        """
        Probe every domain once round; fires when all are done. Never fails.
        """
        settings = self.core.settings
        rounds = [self._measure(domain) for domain in sorted(settings.tls_domains)]
        done: Deferred[Any] = DeferredList(rounds, consumeErrors=True)
        return done.addCallback(self._counted)

    def _counted(self, _: object) -> None:
        self.rounds += 1

    def _measure(self, domain: str) -> Deferred[None]:
        target = self.core.settings.mask_target(domain)
        if target is None or self.core.mask_disabled:
            return succeed(None)
        # A mask host that wants PROXY protocol gets the "unknown source" form.
        preamble = b"PROXY UNKNOWN\r\n" if self.core.settings.mask_proxy_protocol else b""
        attempts = [
            self.prober.probe(self.core.endpoint(target), domain, preamble)
            for _ in range(self.probes)
        ]
        measured: Deferred[Any] = DeferredList(attempts, consumeErrors=True)

        def record(results: list[tuple[bool, Any]]) -> None:
            seen = [value for ok, value in results if ok]
            if not seen:
                reason = results[0][1].getErrorMessage() if results else "no probe"
                self.log.info(
                    "could not measure the TLS answer of {domain}: {reason}",
                    domain=domain,
                    reason=reason,
                )
                return
            profile = TLSProfile.from_observations(seen)
            self.core.tls_profiles[domain] = profile
            self.log.info(
                "TLS answer of {domain}: first record {sizes} bytes, cipher {cipher:04x}",
                domain=domain,
                sizes=list(profile.sizes),
                cipher=profile.cipher_suite,
            )

        return measured.addCallback(record)
