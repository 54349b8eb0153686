"""
One measurement of a fronted site: a probe connection sends a ClientHello
of a shape Telegram apps send and reads the site's answer until the site
goes quiet (:mod:`.profile` parses it).
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.fronting.profile import MAX_ANSWER, Observation, parse_server_answer
from mtproxy_tw.wire.faketls import TLSError, build_client_hello

__all__ = ["ProfileProber"]


class _Probe(Protocol):
    """
    Sends a ClientHello and reads the answer until the site goes quiet.
    """

    #: Seconds without new bytes after which the answer is taken as whole.
    QUIET = 0.25

    def __init__(
        self,
        domain: str,
        result: Deferred[Observation],
        clock: Any,
        preamble: bytes = b"",
        mlkem: bool = False,
    ) -> None:
        self.domain = domain
        self.preamble = preamble
        self.mlkem = mlkem
        self.result = result
        self.clock = clock
        self.buffer = b""
        self.observed: Observation | None = None
        self._quiet: Any = None

    def connectionMade(self) -> None:
        hello = build_client_hello(
            os.urandom(16),
            self.domain,
            int(time.time()),
            consistent_grease=True,
            mlkem=self.mlkem,
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

    def probe(
        self, endpoint: Any, domain: str, preamble: bytes = b"", mlkem: bool = False
    ) -> Deferred[Observation]:
        """
        :param preamble: sent before the hello (a PROXY protocol line).
        :param mlkem: send the hello current apps send, with an
            X25519MLKEM768 key share, rather than the classic one.
        """
        result: Deferred[Observation] = Deferred()
        probes: list[_Probe] = []

        def build() -> _Probe:
            probe = _Probe(domain, result, self.reactor, preamble, mlkem)
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
