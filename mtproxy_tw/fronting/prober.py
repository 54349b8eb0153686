"""
Measuring the fronted sites: a probe (:mod:`.measure`) sends the site a
ClientHello of a shape Telegram apps send and reads its answer; the service
measures every site at start and hourly, keeps the last good answer
in the state directory (:mod:`.store`), and measures a site that cannot be
reached again with backoff, seconds growing to minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.fronting.measure import ProfileProber
from mtproxy_tw.fronting.profile import TLSProfile
from mtproxy_tw.fronting.store import PROFILE_FILE, ProfileStore
from mtproxy_tw.wire.faketls import TLSError

if TYPE_CHECKING:
    from mtproxy_tw.proxy.core import ProxyCore

__all__ = ["ProfileProber", "ProfileService"]


class ProfileService(Service):
    """
    Measures each fronted site at start and every ``interval`` seconds.

    Each measurement makes ``probes`` connections per domain with each shape
    of hello (the classic one, and one offering X25519MLKEM768). A domain
    whose probes all fail keeps its last profile -- measured in this run,
    or loaded from ``state_dir`` at start -- or has none (answers then use
    plausible random sizes). A site that cannot be reached is measured
    again after ``retry_policy(attempt)`` seconds (by default 2 s, doubling
    up to 5 minutes) rather than at the next round; one warning says it is
    down and one line says when it is back. A failed handshake that could
    not reach its mask host gets the sites measured within
    :attr:`WATCH_INTERVAL` seconds.
    """

    log = Logger()

    #: Seconds before measuring an unreachable site again, doubling up to
    #: :attr:`RETRY_MAX`.
    RETRY_INITIAL = 2.0
    RETRY_MAX = 300.0
    #: Seconds between looks at the front leg's failures to reach a mask host.
    WATCH_INTERVAL = 15.0

    def __init__(
        self,
        core: ProxyCore,
        interval: float = 3600.0,
        probes: int = 3,
        timeout: float = 5.0,
        state_dir: Path | None = None,
        retry_policy: Callable[[int], float] | None = None,
        measuring: bool = True,
    ) -> None:
        """
        :param measuring: ``False`` in a worker of ``--workers``: its parent
            measures the sites once for all of them, and the worker takes
            the answers from the state directory (:meth:`reload`).
        """
        self.core = core
        self.measuring = measuring
        #: Called after each save of the measured answers.
        self.saved: list[Callable[[], None]] = []
        self.probes = probes
        self.prober = ProfileProber(core.reactor, timeout)
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = core.reactor
        self._watch = LoopingCall(self._watch_front)
        self._watch.clock = core.reactor
        self._front_failures = 0
        self.interval = interval
        self.rounds = 0
        self.store = ProfileStore(state_dir / PROFILE_FILE) if state_dir is not None else None
        self.retry_policy = retry_policy or backoffPolicy(self.RETRY_INITIAL, self.RETRY_MAX, 2.0)
        #: Failed measurements of each site that cannot be reached now.
        self.outages: dict[str, int] = {}
        self._retries: dict[str, IDelayedCall] = {}
        self._measuring: dict[str, Deferred[None]] = {}

    def startService(self) -> None:
        super().startService()
        self.load()

    def load(self) -> None:
        """
        Take the profiles saved in the state directory for the domains
        served and not measured yet.
        """
        if self.store is None:
            return
        domains = self.core.settings.tls_domains
        profiles = self.core.tls_profiles
        saved = self.store.load()
        loaded = sorted(d for d in saved if d in domains and d not in profiles)
        for domain in loaded:
            profiles[domain] = saved[domain]
        if loaded:
            self.log.info(
                "TLS answers of {domains} as last measured, until measured again",
                domains=", ".join(loaded),
            )

    def reload(self) -> None:
        """
        Take every answer saved in the state directory for the domains
        served (measured by the workers' parent), replacing those held.
        """
        if self.store is None:
            return
        domains = self.core.settings.tls_domains
        for domain, profile in self.store.load().items():
            if domain in domains:
                self.core.tls_profiles[domain] = profile

    def start_loop(self) -> None:
        """
        Start measuring: the proxy calls this once it is listening and has
        checked that no mask host is the proxy itself.
        """
        if self.running and self.measuring and not self._loop.running:
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: self.log.failure("TLS profile loop stopped", f)
            )
            self._front_failures = self.core.stats.upstream_failures["mask-host"]
            self._watch.start(self.WATCH_INTERVAL, now=False).addErrback(
                lambda f: self.log.failure("mask host watch stopped", f)
            )

    def _watch_front(self) -> None:
        """
        A failed handshake that found its mask host down: measure the sites
        not known to be down now, rather than at the next round.
        """
        failures = self.core.stats.upstream_failures["mask-host"]
        if failures == self._front_failures:
            return
        self._front_failures = failures
        for domain in sorted(self.core.settings.tls_domains):
            if domain not in self.outages:
                self._measure(domain)

    def stopService(self) -> None:
        super().stopService()
        for loop in (self._loop, self._watch):
            if loop.running:
                loop.stop()
        retries, self._retries = self._retries, {}
        for call in retries.values():
            if call.active():
                call.cancel()
        # Probes still out end now, leaving no connection or timer behind.
        for measuring in list(self._measuring.values()):
            measuring.cancel()

    def refresh(self) -> Deferred[None]:
        """
        Probe every domain once round; fires when all are done. Never fails.
        """
        settings = self.core.settings
        for domain in set(self.outages) - settings.tls_domains:
            self._forget(domain)
        rounds = [self._measure(domain) for domain in sorted(settings.tls_domains)]
        done: Deferred[Any] = DeferredList(rounds, consumeErrors=True)
        return done.addCallback(self._counted)

    def _counted(self, _: object) -> None:
        self.rounds += 1

    def _measure(self, domain: str) -> Deferred[None]:
        if domain in self._measuring:
            return self._measuring[domain]
        self._cancel_retry(domain)
        target = self.core.settings.mask_target(domain)
        if target is None or self.core.mask_disabled:
            return succeed(None)
        # A mask host that wants PROXY protocol gets the "unknown source" form.
        preamble = b"PROXY UNKNOWN\r\n" if self.core.settings.mask_proxy_protocol else b""
        attempts = [
            self.prober.probe(self.core.local_endpoint(target), domain, preamble, mlkem)
            for mlkem in (False, True)
            for _ in range(self.probes)
        ]
        measured: Deferred[Any] = DeferredList(attempts, consumeErrors=True)
        # Before the callbacks, which may run at once (probes that failed
        # already) and take it out again.
        self._measuring[domain] = measured

        def done(result: None) -> None:
            self._measuring.pop(domain, None)
            return result

        measured.addBoth(done)
        measured.addCallback(self._record, domain)
        measured.addErrback(lambda f: self.log.failure("measuring {domain}", f, domain=domain))
        return measured

    def _record(self, results: list[tuple[bool, Any]], domain: str) -> None:
        if not self.running:
            return  # stopped: the probes were cancelled
        classic = [value for ok, value in results[: self.probes] if ok]
        pq = [value for ok, value in results[self.probes :] if ok]
        failures: list[Failure] = [value for ok, value in results if not ok]
        if classic or pq:
            self._back(domain)
            profile = TLSProfile.from_observations(classic, pq)
            self.core.tls_profiles[domain] = profile
            self.log.info(
                "TLS answer of {domain}: {answer}", domain=domain, answer=profile.describe()
            )
            self._save()
            return
        reason = failures[0].getErrorMessage() if failures else "no probe"
        if any(f.check(TLSError) for f in failures):
            # It answers, but not as a TLS 1.3 server: measuring again soon
            # would not change that.
            self._back(domain)
            self.log.info(
                "could not measure the TLS answer of {domain}: {reason}",
                domain=domain,
                reason=reason,
            )
            return
        self._down(domain, reason)

    def _down(self, domain: str, reason: str) -> None:
        attempt = self.outages.get(domain, 0)
        self.outages[domain] = attempt + 1
        if attempt == 0:
            known = domain in self.core.tls_profiles
            self.log.warn(
                "the mask host of {domain} cannot be reached ({reason}); fake-TLS answers "
                "use {fallback} and failed handshakes are closed until it is back; "
                "measuring it again with backoff",
                domain=domain,
                reason=reason,
                fallback="its last measured answer" if known else "generic sizes",
            )
        else:
            self.log.debug(
                "the mask host of {domain} still cannot be reached ({reason})",
                domain=domain,
                reason=reason,
            )
        if self.running:
            delay = self.retry_policy(attempt)
            self._retries[domain] = self.core.reactor.callLater(delay, self._retry, domain)

    def _back(self, domain: str) -> None:
        failed = self.outages.pop(domain, 0)
        if failed:
            self.log.info(
                "the mask host of {domain} can be reached again (after {failed} failed "
                "measurements)",
                domain=domain,
                failed=failed,
            )

    def _retry(self, domain: str) -> None:
        self._retries.pop(domain, None)
        if domain in self.core.settings.tls_domains:
            self._measure(domain)
        else:
            self._forget(domain)

    def _forget(self, domain: str) -> None:
        self.outages.pop(domain, None)
        self._cancel_retry(domain)

    def _cancel_retry(self, domain: str) -> None:
        call = self._retries.pop(domain, None)
        if call is not None and call.active():
            call.cancel()

    def _save(self) -> None:
        if self.store is None:
            return
        domains = self.core.settings.tls_domains
        profiles = self.core.tls_profiles
        self.store.save({d: p for d, p in profiles.items() if d in domains})
        for listener in list(self.saved):
            listener()
