"""
Measuring the fronted sites: a probe sends the site a ClientHello of the
shape Telegram apps send and reads its answer (:mod:`.profile` parses it);
the service re-measures every site at start and hourly.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.fronting.profile import MAX_ANSWER, Observation, TLSProfile, parse_server_answer
from mtproxy_tw.wire.faketls import TLSError, build_client_hello

if TYPE_CHECKING:
    from mtproxy_tw.proxy.core import ProxyCore

__all__ = ["ProfileProber", "ProfileService"]


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
        if len(self.buffer) > MAX_ANSWER:
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
