"""
Counters the proxy keeps about itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["LIMITS", "Stats"]

#: Every limit a connection can be refused or cut by, as the metrics name
#: them (``mtproxy_limit_rejections_total{limit}``).
LIMITS = (
    "connections",
    "ips",
    "expired",
    "quota",
    "disabled",
    "denied",
    "per_ip",
    "handshakes",
    "global",
)

#: Reasons in :attr:`Stats.rejected` that are limits, and which.
_REJECTED_BY_LIMIT = {"evicted": "handshakes", "limit": "global"}


@dataclass
class Stats:
    """
    Totals since start.

    :ivar rejected: handshakes refused, by reason (``bad-init``, ``replay``,
        ``timeout``, ``limit``, ...).
    :ivar accepted: handshakes accepted, by secret name.
    :ivar limited: connections refused or cut by a limit of :data:`LIMITS`
        other than those counted in ``rejected`` (see :meth:`limit_rejections`).
    :ivar user_bytes_in: bytes from the clients of each user, of closed
        connections (live ones hold theirs).
    :ivar user_bytes_out: bytes to the clients of each user, likewise.
    """

    rejected: Counter[str] = field(default_factory=Counter)
    fronted: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    upstream_failures: Counter[str] = field(default_factory=Counter)
    limited: Counter[str] = field(default_factory=Counter)
    user_bytes_in: Counter[str] = field(default_factory=Counter)
    user_bytes_out: Counter[str] = field(default_factory=Counter)
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    active: int = 0
    idle_closed: int = 0

    def closed(self, user: str | None, bytes_in: int, bytes_out: int) -> None:
        """
        A connection ended, having carried these bytes (for ``user``, once
        its handshake was accepted).
        """
        self.bytes_from_clients += bytes_in
        self.bytes_to_clients += bytes_out
        if user is not None:
            self.user_bytes_in[user] += bytes_in
            self.user_bytes_out[user] += bytes_out

    def limit_rejections(self) -> dict[str, int]:
        """
        Connections refused or cut by each limit of :data:`LIMITS`.
        """
        counts = dict.fromkeys(LIMITS, 0)
        counts.update(self.limited)
        for reason, limit in _REJECTED_BY_LIMIT.items():
            counts[limit] += self.rejected[reason]
        return counts

    def snapshot(self) -> dict[str, object]:
        return {
            "active": self.active,
            "idle_closed": self.idle_closed,
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "fronted": dict(self.fronted),
            "upstream_failures": dict(self.upstream_failures),
            "bytes_from_clients": self.bytes_from_clients,
            "bytes_to_clients": self.bytes_to_clients,
        }
