"""
The replay cache kept in the state directory, so that a handshake seen
before a restart is still refused after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mtproxy_tw.wire.replay import (
    ReplayCache,
    decode_snapshot,
    encode_snapshot,
    snapshot_size_limit,
)

__all__ = ["REPLAY_FILE", "SAVE_INTERVAL", "ReplayStore"]

#: The snapshot's name in the state directory.
REPLAY_FILE = "replay-cache.bin"
#: Seconds between saves while running.
SAVE_INTERVAL = 60.0


class ReplayStore(TimerService):
    """
    Loads the replay cache from ``path`` at start, saves it every
    ``interval`` seconds when something was added, and at stop.

    A missing file is an empty cache; one that cannot be read or is not a
    whole snapshot is an empty cache and one warning. Saving writes a file
    aside and renames it over the old one, so a crash leaves the old
    snapshot or the new one; a failed save is one warning until a save
    works again.

    :param cache: the cache to keep, asked afresh each time (the proxy's
        current core holds it).
    """

    log = Logger()

    def __init__(
        self,
        cache: Callable[[], ReplayCache],
        path: Path,
        clock: Any = None,
        interval: float = SAVE_INTERVAL,
    ) -> None:
        super().__init__(interval, self.save)
        self.clock = clock
        self.cache = cache
        self.path = path
        #: The cache and its :attr:`~ReplayCache.additions` when last in
        #: step with the file.
        self._saved: tuple[ReplayCache, int] | None = None
        self._failing = False

    def startService(self) -> None:
        self.load()
        super().startService()

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        self.save()
        return stopped

    def load(self) -> None:
        """
        Put the saved handshakes still inside the window into the cache.
        """
        cache = self.cache()
        limit = snapshot_size_limit(cache.capacity)
        try:
            with self.path.open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            self._saved = (cache, cache.additions)
            return
        except OSError as e:
            self._unusable(f"cannot read {self.path}: {e.strerror}")
            return
        if len(data) > limit:
            self._unusable(f"{self.path} is larger than {cache.capacity} entries can be")
            return
        snapshot = decode_snapshot(data)
        if snapshot.error is not None:
            self._unusable(f"{self.path} is not a usable replay cache: {snapshot.error}")
            return
        held = cache.restore(snapshot.entries)
        self._saved = (cache, cache.additions)
        self.log.info(
            "replay cache: {held} handshakes loaded from {path} ({expired} had expired)",
            held=held,
            path=str(self.path),
            expired=len(snapshot.entries) - held,
        )

    def _unusable(self, why: str) -> None:
        self.log.warn("{why}; the replay cache starts empty", why=why)

    def save(self) -> None:
        """
        Write the cache, unless nothing was added since the last save.
        """
        cache = self.cache()
        if self._saved is not None and self._saved == (cache, cache.additions):
            return
        additions = cache.additions
        data = encode_snapshot(cache.entries())
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, self.path)
        except OSError as e:
            if not self._failing:
                self.log.warn(
                    "cannot save the replay cache to {path}: {error}; "
                    "handshakes seen since the last save would be accepted again "
                    "after a restart",
                    path=str(self.path),
                    error=e.strerror,
                )
            self._failing = True
            return
        if self._failing:
            self.log.info("replay cache saved to {path} again", path=str(self.path))
        self._failing = False
        self._saved = (cache, additions)
