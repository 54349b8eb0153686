"""
What every shared-state backend answers, and the claims it counts.

A connection is a *holder*: a string unique across the proxy (and the
fleet). At connection start and when its handshake proves a secret, the
proxy asks for *claims*: a slot in a counter, under a limit. A claim on
a counter with members (the addresses of one user) counts each member
once; a holder whose member is already counted always gets the slot. All
the claims of one call are taken together or not at all, and stay taken
until the holder is released (its connection closed).

Every method answers a :class:`~twisted.internet.defer.Deferred` and never
blocks the reactor: a backend that waits on a server keeps answering from
local state while the server is away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

__all__ = ["Claim", "SharedState"]


@dataclass(frozen=True, slots=True)
class Claim:
    """
    A slot in one counter.

    :ivar name: what a refusal is reported as (``"per_ip"``,
        ``"connections"``, ``"ips"``, ``"max-connections"``).
    :ivar counter: the counter's key (``"ip:1.2.3.4"``, ``"user:alice"``,
        ``"ips:alice"``, ``"global"``); any text without a newline.
    :ivar limit: the most holders (or, with ``member``, the most distinct
        members) the counter takes; ``None`` counts without a limit.
    :ivar member: counted once however many holders share it.
    :ivar fleet: ``False`` keeps the counter to this host even where the
        backend is shared by a fleet (the global connection cap follows
        each host's own descriptors).
    """

    name: str
    counter: str
    limit: int | None
    member: str | None = None
    fleet: bool = True


class SharedState(Protocol):
    """
    The replay cache, the live counters and the users' byte totals.
    """

    #: ``True`` where the state reaches beyond this process (workers, a
    #: fleet): the proxy then also claims what one process enforces alone.
    distributed: bool

    def seen_now(self, key: bytes) -> bool:
        """
        :meth:`seen`, answered at once: only where the state is not
        ``distributed`` (this process's own).
        """

    def seen(self, key: bytes) -> Deferred[bool]:
        """
        Record a handshake's key: ``True`` when it was recorded before,
        within the replay window (a replay).
        """

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        """
        Take every claim for ``holder``: ``None``, or the :attr:`Claim.name`
        of the first claim whose limit is reached (then none is taken).
        """

    def release(self, holder: str) -> None:
        """
        Give back every claim ``holder`` took; a holder with none is
        ignored.
        """

    def add_usage(self, deltas: Mapping[str, int]) -> Deferred[dict[str, int]]:
        """
        Add bytes moved by user; answers the totals of every user counted
        so far (the proxy's, not only this process's).
        """
