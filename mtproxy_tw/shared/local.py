"""
The embedded shared state: one process's memory. It answers at once (its
deferreds have fired when returned), so a single proxy process costs
nothing for the indirection; the workers' parent serves one of these to
its children (:mod:`~mtproxy_tw.shared.amp`), and a fleet backend falls
back on one while its server is away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred, succeed

from mtproxy_tw.shared.base import Claim
from mtproxy_tw.wire.replay import ReplayCache

__all__ = ["Counters", "LocalState"]


class Counters:
    """
    The live claims, decided synchronously.
    """

    __slots__ = ("_held", "_members", "_plain")

    def __init__(self) -> None:
        #: counter -> holders
        self._plain: dict[str, int] = {}
        #: counter -> member -> holders
        self._members: dict[str, dict[str, int]] = {}
        #: holder -> what it holds: (counter, member)
        self._held: dict[str, list[tuple[str, str | None]]] = {}

    def refusal(self, claim: Claim, taking: int = 0, adding: frozenset[str] = frozenset()) -> bool:
        """
        Whether ``claim`` cannot be taken now, with ``taking`` more holders
        of its plain counter, or the members ``adding``, already asked for
        in the same call.
        """
        if claim.limit is None:
            return False
        if claim.member is None:
            return self._plain.get(claim.counter, 0) + taking >= claim.limit
        members = self._members.get(claim.counter, {})
        if claim.member in members or claim.member in adding:
            return False
        return len(members) + len(adding - members.keys()) >= claim.limit

    def acquire(self, holder: str, claims: Sequence[Claim]) -> str | None:
        taking: dict[str, int] = {}
        adding: dict[str, frozenset[str]] = {}
        for claim in claims:
            counter = claim.counter
            if self.refusal(claim, taking.get(counter, 0), adding.get(counter, frozenset())):
                return claim.name
            if claim.member is None:
                taking[counter] = taking.get(counter, 0) + 1
            else:
                adding[counter] = adding.get(counter, frozenset()) | {claim.member}
        self.take(holder, claims)
        return None

    def take(self, holder: str, claims: Sequence[Claim]) -> None:
        """
        Count ``claims`` for ``holder`` whatever the limits (a backend
        replaying what a server already decided).
        """
        held = self._held.setdefault(holder, [])
        for claim in claims:
            if claim.member is None:
                self._plain[claim.counter] = self._plain.get(claim.counter, 0) + 1
            else:
                members = self._members.setdefault(claim.counter, {})
                members[claim.member] = members.get(claim.member, 0) + 1
            held.append((claim.counter, claim.member))

    def release(self, holder: str) -> list[tuple[str, str | None]]:
        """
        Give back what ``holder`` took; answers it.
        """
        held = self._held.pop(holder, [])
        for counter, member in held:
            if member is None:
                left = self._plain.get(counter, 0) - 1
                if left > 0:
                    self._plain[counter] = left
                else:
                    self._plain.pop(counter, None)
                continue
            members = self._members.get(counter, {})
            left = members.get(member, 0) - 1
            if left > 0:
                members[member] = left
            else:
                members.pop(member, None)
                if not members:
                    self._members.pop(counter, None)
        return held

    def holders(self) -> list[str]:
        return list(self._held)

    def held(self, holder: str) -> list[tuple[str, str | None]]:
        return list(self._held.get(holder, ()))

    def count(self, counter: str) -> int:
        """
        Holders of a plain counter, or distinct members of one with members.
        """
        if counter in self._members:
            return len(self._members[counter])
        return self._plain.get(counter, 0)

    def snapshot(self) -> dict[str, int]:
        """
        Every counter's :meth:`count`, for tests and debugging.
        """
        out = dict(self._plain)
        out.update({counter: len(members) for counter, members in self._members.items()})
        return out


class LocalState:
    """
    :param replay: the replay cache (the proxy's own, which the state
        directory keeps across restarts).
    :param usage: the users' byte totals so far.
    """

    distributed = False

    def __init__(self, replay: ReplayCache, usage: Mapping[str, int] | None = None) -> None:
        self.replay = replay
        self.counters = Counters()
        self.usage: dict[str, int] = dict(usage or {})

    def seen_now(self, key: bytes) -> bool:
        return self.replay.check_and_add(key)

    def seen(self, key: bytes) -> Deferred[bool]:
        return succeed(self.seen_now(key))

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        return succeed(self.counters.acquire(holder, claims))

    def release(self, holder: str) -> None:
        self.counters.release(holder)

    def add_usage(self, deltas: Mapping[str, int]) -> Deferred[dict[str, int]]:
        usage = self.usage
        for user, n in deltas.items():
            if n > 0:
                usage[user] = usage.get(user, 0) + n
        return succeed(dict(usage))
