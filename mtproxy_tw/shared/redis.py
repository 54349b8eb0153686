"""
The fleet's shared state on a Redis server (``--shared-state redis://...``).

Every host of the fleet records replays and takes its claims in the same
Redis database, so a replay seen by one host is refused by all, and a limit
holds across the fleet. Each host's share of a counter is a hash field of
its own (:mod:`~mtproxy_tw.shared.redisscripts`), kept alive by a heartbeat:
the fields of a host that stopped beating no longer count.

Redis is never waited on longer than ``timeout``: while it is away (down,
slow, refusing) every call is answered from this host's own state
(:class:`~mtproxy_tw.shared.local.LocalState`), with one warning. Once it
answers again, this host's holdings are written back from its own record
of them (which also undoes whatever a call that timed out took after all)
and the usage counted meanwhile is added, exactly once.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from mtproxy_tw.config.values import RedisURL
from mtproxy_tw.shared.base import Claim
from mtproxy_tw.shared.ledger import UsageLedger, give_back
from mtproxy_tw.shared.local import Counters, LocalState
from mtproxy_tw.shared.redislink import RedisLink, Unreachable
from mtproxy_tw.shared.redisscripts import ACQUIRE, RECONCILE, RELEASE, USAGE

__all__ = ["RedisState"]


class RedisState:
    """
    :param url: the server and database.
    :param host_id: this host's name in the fleet, unique to it.
    :param fallback: this host's own state: its replay cache records every
        key too, and its counters decide while Redis is away (and always
        decide the claims that are not ``fleet``).
    :param prefix: what every key in Redis starts with.
    :param timeout: the longest wait on Redis for one call, in seconds.
    :param heartbeat: how often this host tells the fleet it is alive (and
        tries to reconnect); a host silent for three beats holds nothing.
    """

    distributed = True

    def __init__(
        self,
        reactor: Any,
        url: RedisURL,
        host_id: str,
        fallback: LocalState,
        *,
        prefix: str = "mtproxy:",
        timeout: float = 0.5,
        heartbeat: float = 5.0,
    ) -> None:
        if not host_id or "\n" in host_id:
            raise ValueError("the host id is a line of text")
        self.url = url
        self.host_id = host_id
        self.fallback = fallback
        self._prefix = prefix
        self._heartbeat = heartbeat
        self._ttl_ms = max(1, int(heartbeat * 3000))
        self._link = RedisLink(reactor, url, timeout, self._connected)
        #: this connection's epoch: commands queued on an older one are void
        self._epoch = ""
        #: the fleet claims this host holds: what its fields in Redis say
        self._mirror = Counters()
        #: holders with an acquire in flight, how many; those released meanwhile
        self._asking: dict[str, int] = {}
        self._dropped: set[str] = set()
        self._beat = LoopingCall(self._tick)
        self._beat.clock = reactor
        self._usage = UsageLedger(fallback.usage)
        self._flushing = False

    def start(self) -> Deferred[None]:
        """
        Connect; fires once connected or once the first attempt failed.
        """
        self._link.stopped = False
        if not self._beat.running:
            self._beat.start(self._heartbeat, now=False)
        return self._link.connect()

    def stop(self) -> Deferred[None]:
        """
        Hand back this host's holdings and usage (if Redis answers), and close.
        """
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        link = self._link
        link.stopped = True
        if self._beat.running:
            self._beat.stop()
        await link.settle()
        if link.up:
            if not self._flushing and self._usage.pending():
                await self._flush()
            leave = [self.host_id, self._prefix, 0, self._epoch]
            with contextlib.suppress(Unreachable):
                await link.ask("eval", RECONCILE, [], leave)
        await link.close()

    def _connected(self) -> Deferred[Any]:
        self._epoch = secrets.token_hex(8)
        # Sent before anything else on this connection, so every claim
        # decided from now on lands after it.
        reconciled = self._reconcile()
        self._flush_some()
        return reconciled

    def _tick(self) -> None:
        link = self._link
        if link.idle():
            link.connect()
        if not link.up:
            return
        beat = link.ask(
            "execute_command", "PEXPIRE", self._prefix + "h:" + self.host_id, self._ttl_ms
        )
        beat.addCallbacks(self._beaten, lambda _: None)
        self._flush_some()

    def _beaten(self, alive: object) -> None:
        if not alive:
            # The fleet counted this host dead: its fields may be gone.
            self._reconcile().addErrback(lambda _: None)

    def _reconcile(self) -> Deferred[Any]:
        """
        Make this host's fields in Redis what :attr:`_mirror` holds.
        """
        fields: dict[tuple[str, str], int] = {}
        for holder in self._mirror.holders():
            for counter, member in self._mirror.held(holder):
                at = self._field(counter, member)
                fields[at] = fields.get(at, 0) + 1
        args: list[object] = [self.host_id, self._prefix, self._ttl_ms, self._epoch]
        for (key, field), n in fields.items():
            args += [key, field, n]
        return self._link.ask("eval", RECONCILE, [], args)

    def _field(self, counter: str, member: str | None) -> tuple[str, str]:
        if member is None:
            return self._prefix + "p:" + counter, self.host_id
        return self._prefix + "m:" + counter, self.host_id + "\n" + member

    # -- SharedState -------------------------------------------------------

    def seen_now(self, key: bytes) -> bool:
        raise NotImplementedError("a distributed state is asked through seen()")

    def seen(self, key: bytes) -> Deferred[bool]:
        replay = self.fallback.replay
        if replay.check_and_add(key):
            return succeed(True)
        window = max(1, int(replay.window * 1000))
        d = self._link.ask(
            "set", self._prefix + "r:" + key.hex(), "1", pexpire=window, only_if_not_exists=True
        )
        return d.addCallbacks(lambda reply: reply is None, lambda _: False)

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        counters = self.fallback.counters
        own = [claim for claim in claims if not claim.fleet]
        fleet = [claim for claim in claims if claim.fleet]
        refused = counters.acquire(holder, own)
        if refused is not None or not fleet:
            return succeed(refused)
        if not self._link.up:
            return succeed(self._locally(holder, own, fleet))
        keys: list[str] = []
        args: list[object] = [self.host_id, self._prefix, self._ttl_ms, self._epoch]
        for claim in fleet:
            keys.append(self._field(claim.counter, claim.member)[0])
            limit = -1 if claim.limit is None else claim.limit
            member = "" if claim.member is None else claim.member
            args += [claim.name, limit, member, "p" if claim.member is None else "m"]
        self._asking[holder] = self._asking.get(holder, 0) + 1
        d = self._link.ask("eval", ACQUIRE, keys, args)
        return d.addCallbacks(
            self._acquired,
            self._unanswered,
            callbackArgs=(holder, own, fleet),
            errbackArgs=(holder, own, fleet),
        )

    def _settle(self, holder: str) -> bool:
        """
        An acquire of ``holder`` is answered: whether it was released meanwhile.
        """
        left = self._asking.pop(holder) - 1
        if left:
            self._asking[holder] = left
            return holder in self._dropped
        if holder in self._dropped:
            self._dropped.discard(holder)
            return True
        return False

    def _locally(self, holder: str, own: Sequence[Claim], fleet: Sequence[Claim]) -> str | None:
        counters = self.fallback.counters
        refused = counters.acquire(holder, fleet)
        if refused is not None:
            give_back(counters, holder, own)
            return refused
        self._mirror.take(holder, fleet)
        return None

    def _acquired(
        self, reply: Any, holder: str, own: Sequence[Claim], fleet: Sequence[Claim]
    ) -> str | None:
        if not reply:  # this connection is no longer this host's own
            self._reconcile().addErrback(lambda _: None)
            return self._unanswered(Failure(Unreachable("superseded")), holder, own, fleet)
        name, stale = str(reply[0]), int(reply[1])
        if self._settle(holder):
            if not name:
                self._give_back_fleet([(c.counter, c.member) for c in fleet])
            return name or None
        if name:
            give_back(self.fallback.counters, holder, own)
            return name
        self.fallback.counters.take(holder, fleet)
        self._mirror.take(holder, fleet)
        if stale:
            self._reconcile().addErrback(lambda _: None)
        return None

    def _unanswered(
        self, failure: Failure, holder: str, own: Sequence[Claim], fleet: Sequence[Claim]
    ) -> str | None:
        failure.trap(Unreachable)
        if self._settle(holder):
            return None
        return self._locally(holder, own, fleet)

    def release(self, holder: str) -> None:
        self.fallback.counters.release(holder)
        held = self._mirror.release(holder)
        if holder in self._asking:
            self._dropped.add(holder)
        if held:
            self._give_back_fleet(held)

    def _give_back_fleet(self, held: Sequence[tuple[str, str | None]]) -> None:
        if not self._link.up:
            return  # the next reconciliation leaves it out
        args: list[str] = [self.host_id, self._prefix, self._epoch]
        for counter, member in held:
            args += self._field(counter, member)
        self._link.ask("eval", RELEASE, [], args).addErrback(lambda _: None)

    def add_usage(self, deltas: Mapping[str, int]) -> Deferred[dict[str, int]]:
        self._usage.add(deltas)
        if not self._link.up or self._flushing:
            return succeed(self._usage.view())
        return self._flush()

    def _flush_some(self) -> None:
        if not self._flushing and self._usage.pending():
            self._flush()

    def _flush(self) -> Deferred[dict[str, int]]:
        usage = self._usage
        batch, deltas = usage.next_batch()
        args: list[object] = [self.host_id, batch]
        for user, n in deltas.items():
            args += [user, n]
        self._flushing = True
        d = self._link.ask("eval", USAGE, [self._prefix + "u", self._prefix + "s"], args)

        def counted(reply: Any) -> dict[str, int]:
            self._flushing = False
            flat = list(reply)
            usage.counted(
                batch, {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
            )
            return usage.view()

        def unanswered(_: Failure) -> dict[str, int]:
            self._flushing = False
            return usage.view()

        return d.addCallbacks(counted, unanswered)
