"""
What a fleet host keeps of its own for :mod:`~mtproxy_tw.shared.redis`,
decided without the server: the usage not yet added to the fleet's totals,
and giving back part of a holder's claims.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from mtproxy_tw.shared.base import Claim
from mtproxy_tw.shared.local import Counters

__all__ = ["UsageLedger", "give_back"]


def give_back(counters: Counters, holder: str, claims: Sequence[Claim]) -> None:
    """
    Undo :meth:`Counters.take` of ``claims`` alone (``holder`` may hold more).
    """
    held = counters.release(holder)
    for claim in claims:
        held.remove((claim.counter, claim.member))
    if held:
        counters.take(holder, [Claim("", counter, None, member) for counter, member in held])


class UsageLedger:
    """
    The users' byte totals as the fleet last told them, plus this host's
    deltas not counted yet.

    Deltas go out in batches, one at a time, each with an id: a batch whose
    answer was lost is sent again with the same id, and the server counts an
    id once (the last per host), so nothing is counted twice or lost.

    :param totals: the totals known at start.
    """

    __slots__ = ("_run", "_sequence", "batch", "totals", "unsent")

    def __init__(self, totals: Mapping[str, int] | None = None) -> None:
        self.totals: dict[str, int] = dict(totals or {})
        #: the batch sent and not confirmed: (id, deltas)
        self.batch: tuple[str, dict[str, int]] | None = None
        self.unsent: dict[str, int] = {}
        self._run = secrets.token_hex(8)
        self._sequence = 0

    def add(self, deltas: Mapping[str, int]) -> None:
        unsent = self.unsent
        for user, n in deltas.items():
            if n > 0:
                unsent[user] = unsent.get(user, 0) + n

    def pending(self) -> bool:
        """
        Whether anything is still to be counted by the server.
        """
        return self.batch is not None or bool(self.unsent)

    def next_batch(self) -> tuple[str, dict[str, int]]:
        """
        The batch to send: the one not confirmed yet, else the deltas so far.
        """
        if self.batch is None:
            self._sequence += 1
            self.batch = (f"{self._run}:{self._sequence}", self.unsent)
            self.unsent = {}
        return self.batch

    def counted(self, batch: str, totals: Mapping[str, int]) -> None:
        """
        The server counted ``batch`` and answered ``totals``.
        """
        if self.batch is not None and self.batch[0] == batch:
            self.batch = None
        self.totals = dict(totals)

    def view(self) -> dict[str, int]:
        """
        The last fleet totals plus what this host has not added to them yet.
        """
        out = dict(self.totals)
        parts = [self.unsent] if self.batch is None else [self.batch[1], self.unsent]
        for part in parts:
            for user, n in part.items():
                out[user] = out.get(user, 0) + n
        return out
