"""
The proxy's runtime settings, validated once by the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtproxy_tw.dcs import DCTable
from mtproxy_tw.secrets import Mode, Secret

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """
    Everything the listeners and relays need to know.

    Replaced as a whole on reload; connections keep the one they started
    with.
    """

    secrets: tuple[Secret, ...]
    modes: frozenset[Mode] = frozenset(Mode)
    dcs: DCTable = field(default_factory=DCTable)
    fast_mode: bool = True
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_connections: int = 10000
    replay_capacity: int = 65536
    replay_window: float = 600.0
    drain_timeout: float = 5.0
    state_dir: Path | None = None
