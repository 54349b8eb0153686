"""
Counters the proxy keeps about itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats"]


@dataclass
class Stats:
    """
    Totals since start.

    :ivar rejected: handshakes refused, by reason (``bad-init``, ``replay``,
        ``timeout``, ``limit``, ...).
    :ivar accepted: handshakes accepted, by secret name.
    """

    rejected: Counter[str] = field(default_factory=Counter)
    fronted: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    upstream_failures: Counter[str] = field(default_factory=Counter)
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    active: int = 0
    idle_closed: int = 0

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
