"""
The users' usage: counted live from the connections' byte totals, enforced
(a user over quota or past expiry is cut mid-connection), and kept in the
state directory across restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, Protocol, cast

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.services.state import StateDir
from mtproxy_tw.shared.base import SharedState

__all__ = [
    "SAVE_INTERVAL",
    "SWEEP_INTERVAL",
    "USAGE_FILE",
    "Cuttable",
    "UsageService",
    "read_usage",
]

#: The usage's name in the state directory.
USAGE_FILE = "usage.json"
#: Seconds between counts (and so the longest a user runs over a limit).
SWEEP_INTERVAL = 1.0
#: Seconds between saves while running.
SAVE_INTERVAL = 60.0
#: Seconds the last count at stop may take to reach the shared total.
_SHARE_TIMEOUT = 5.0
#: A usage file larger than this is not read.
_MAX_FILE = 16 << 20
_VERSION = 1


class Cuttable(Protocol):
    def __hash__(self) -> int: ...

    def cut(self, reason: str) -> None:
        """
        End the connection now, logging ``reason``.
        """


class UsageService(TimerService):
    """
    Every ``interval`` seconds, hands the registry each live connection's
    byte total (:meth:`~mtproxy_tw.proxy.users.Registry.sweep`) and cuts
    the connections it names; every ``save_interval`` seconds, when the
    usage changed, and at stop, writes ``usage.json`` in the state dir.

    At start the file is loaded; a missing file is no usage, one that cannot
    be read or is not a usage file is no usage and one warning. Saving
    writes a file aside and renames it over the old one; a failed save is
    one warning until a save works again.

    :param clients: ``(conn, user, bytes_total)`` of each live connection,
        asked afresh each time; each ``conn`` has ``cut(reason)``.
    :param state_dir: the state directory (or its path).
    :param shared: where the usage is totalled across processes or hosts:
        each tick adds what was counted here and takes the totals back.
    :param saving: ``False`` in a worker (its parent keeps the file).
    """

    log = Logger()

    def __init__(
        self,
        registry: Registry,
        clients: Callable[[], Iterable[tuple[Cuttable, str | None, int]]],
        state_dir: StateDir | Path,
        clock: Any = None,
        interval: float = SWEEP_INTERVAL,
        save_interval: float = SAVE_INTERVAL,
        *,
        shared: SharedState | None = None,
        saving: bool = True,
    ) -> None:
        super().__init__(interval, self.tick)
        self.shared = shared
        self.saving = saving
        self._share_failing = False
        self.clock = clock
        self.registry = registry
        self.clients = clients
        directory = state_dir.path if isinstance(state_dir, StateDir) else state_dir
        self.path = directory / USAGE_FILE
        self.save_interval = save_interval
        self._saved: dict[str, int] | None = None
        self._last_save: float | None = None
        self._failing = False

    def _now(self) -> float:
        if self.clock is None:
            from twisted.internet import reactor

            return float(reactor.seconds())  # type: ignore[attr-defined]
        return float(self.clock.seconds())

    def startService(self) -> None:
        self.load()
        self._last_save = self._now()
        super().startService()

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        # Count what moved since the last tick; nobody is cut on the way out.
        self.registry.sweep(self._now(), self._live())
        shared = self._share()
        self.save()
        if shared is None:
            return stopped
        # The last count must reach the total before the connections close.
        clock: Any = self.clock
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        shared.addTimeout(_SHARE_TIMEOUT, clock)
        both: Deferred[Any] = DeferredList([stopped, shared], consumeErrors=True)
        return both.addCallback(lambda _: None)

    def _live(self) -> list[tuple[Hashable, str | None, int]]:
        return [(conn, user, total) for conn, user, total in self.clients()]

    def tick(self) -> None:
        """
        Count, cut, and save when it is time.
        """
        now = self._now()
        cuts = self.registry.sweep(now, self._live())
        self._share()
        for conn, reason in cuts:
            # sweep hands back the very objects it was given.
            try:
                cast(Cuttable, conn).cut(reason)
            except Exception:
                self.log.failure("cutting a connection ({reason})", reason=reason)
        if self._last_save is None or now - self._last_save >= self.save_interval:
            self._last_save = now
            self.save()

    def final_save(self) -> Deferred[None]:
        """
        Take the shared totals once more and save them (the workers' parent,
        once every worker has ended).
        """
        shared = self._share()
        if shared is None:
            self.save()
            return succeed(None)
        return shared.addBoth(lambda _: self.save())

    def _share(self) -> Deferred[None] | None:
        """
        Add what was counted here to the shared total and take the totals
        back; what could not be added is added at the next try.
        """
        if self.shared is None:
            return None
        deltas = self.registry.take_unsent()
        d = self.shared.add_usage(deltas)

        def failed(failure: Any) -> None:
            self.registry.put_back(deltas)
            if not self._share_failing:
                self._share_failing = True
                self.log.warn(
                    "cannot add this process's usage to the shared total ({error}); trying again",
                    error=failure.getErrorMessage(),
                )

        def added(totals: dict[str, int]) -> None:
            self._share_failing = False
            self.registry.restore(totals)

        return d.addCallbacks(added, failed)

    def load(self) -> None:
        """
        Put the saved usage into the registry.
        """
        try:
            with self.path.open("rb") as f:
                data = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            self._saved = self.registry.usage_snapshot()
            return
        except OSError as e:
            self._unusable(f"cannot read {self.path}: {e.strerror}")
            return
        if len(data) > _MAX_FILE:
            self._unusable(f"{self.path} is larger than {_MAX_FILE >> 20} MiB")
            return
        usage = _decode(data)
        if usage is None:
            self._unusable(f"{self.path} is not a usage file")
            return
        self.registry.restore(usage)
        self._saved = self.registry.usage_snapshot()
        self.log.info(
            "usage of {users} users loaded from {path}", users=len(usage), path=str(self.path)
        )

    def _unusable(self, why: str) -> None:
        self.log.warn("{why}; the users' usage starts from zero", why=why)

    def save(self) -> None:
        """
        Write the usage, unless it is what the file already holds.
        """
        if not self.saving:
            return
        usage = self.registry.usage_snapshot()
        if usage == self._saved:
            return
        data = json.dumps({"version": _VERSION, "bytes": usage}, sort_keys=True, indent=1)
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data + "\n")
            os.replace(temporary, self.path)
        except OSError as e:
            if not self._failing:
                self.log.warn(
                    "cannot save the users' usage to {path}: {error}; "
                    "what was used since the last save would be forgotten at a restart",
                    path=str(self.path),
                    error=e.strerror,
                )
            self._failing = True
            return
        if self._failing:
            self.log.info("users' usage saved to {path} again", path=str(self.path))
        self._failing = False
        self._saved = usage


def read_usage(state_dir: Path) -> dict[str, int]:
    """
    The usage saved in ``state_dir``; empty when there is none or it cannot
    be read (the service that loads it says why).
    """
    try:
        with (state_dir / USAGE_FILE).open("rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError:
        return {}
    return (_decode(data) if len(data) <= _MAX_FILE else None) or {}


def _decode(data: bytes) -> dict[str, int] | None:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("version") != _VERSION:
        return None
    usage = document.get("bytes")
    if not isinstance(usage, dict):
        return None
    for user, n in usage.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or not isinstance(user, str):
            return None
    return usage
