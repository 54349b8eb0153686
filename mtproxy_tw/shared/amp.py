"""
The workers' channel to their parent: AMP over the socket pair each worker
is started with.

The parent serves its shared state (:class:`StateServer`, one per worker);
a worker's :class:`RemoteState` is that state seen from the worker, so a
handshake replayed to another worker, or a user's connections spread over
several, are counted as in one process. The parent asks its workers too:
their metrics (:class:`Metrics`), and hands them Telegram's middle-proxy
config once it has fetched it (:class:`MiddleConfig`).

A worker's claims are released when its channel closes (the worker died),
so a dead worker leaves no slot taken.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mtproxy_tw.shared.base import Claim, SharedState

__all__ = [
    "Acquire",
    "AddUsage",
    "Chunked",
    "Metrics",
    "MiddleConfig",
    "ProfilesChanged",
    "Release",
    "RemoteState",
    "Seen",
    "StateServer",
    "Stop",
]

_CHUNK = 60000


class Chunked(amp.Argument):
    """
    Bytes of any length: AMP values stop at 64 KiB, so longer ones travel
    as ``name.0``, ``name.1``, ... with their count under ``name``.
    """

    def toBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:
        value: bytes = objects[name.decode("ascii")]
        chunks = [value[i : i + _CHUNK] for i in range(0, len(value), _CHUNK)]
        strings[name] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode("ascii")] = chunk

    def fromBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:
        count = int(strings[name])
        parts = [strings[name + b"." + str(i).encode("ascii")] for i in range(count)]
        objects[name.decode("ascii")] = b"".join(parts)


class _JSON(amp.Argument):
    def toString(self, inObject: Any) -> bytes:
        return json.dumps(inObject, separators=(",", ":")).encode()

    def fromString(self, inString: bytes) -> Any:
        return json.loads(inString)


# -- worker to parent


class Seen(amp.Command):
    arguments = [(b"key", amp.String())]
    response = [(b"seen", amp.Boolean())]


class Acquire(amp.Command):
    arguments = [(b"holder", amp.Unicode()), (b"claims", _JSON())]
    response = [(b"refused", amp.Unicode(optional=True))]


class Release(amp.Command):
    arguments = [(b"holder", amp.Unicode())]
    requiresAnswer = False


class AddUsage(amp.Command):
    arguments = [(b"deltas", _JSON())]
    response = [(b"totals", _JSON())]


# -- parent to worker


class Metrics(amp.Command):
    """
    The worker's metrics, as Prometheus text.
    """

    response = [(b"text", Chunked())]


class Stop(amp.Command):
    """
    Stop as on SIGTERM (drain), unless already stopping: a worker that got
    SIGTERM too (systemd signals the whole control group) stops once.
    """

    requiresAnswer = False


class ProfilesChanged(amp.Command):
    """
    The parent measured the fronted sites again: their answers are in the
    state directory.
    """

    requiresAnswer = False


class MiddleConfig(amp.Command):
    """
    One of Telegram's middle-proxy configs or its proxy secret, as the
    parent downloaded it (``kind`` as :class:`TelegramConfig` names them).
    """

    arguments = [(b"kind", amp.Unicode()), (b"body", Chunked())]
    response = []


def _claims(claims: Sequence[Claim]) -> list[list[Any]]:
    return [[c.name, c.counter, c.limit, c.member, c.fleet] for c in claims]


def _unclaims(items: Any) -> list[Claim]:
    return [
        Claim(str(n), str(c), limit, member, bool(fleet)) for n, c, limit, member, fleet in items
    ]


class _Quiet(amp.AMP):
    """
    AMP without its info line per connection made and lost (one per worker
    start is the pool's own line).
    """

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class StateServer(_Quiet):
    """
    The parent's end of one worker's channel.

    :param state: the parent's shared state.
    :param prefix: makes this worker's holders unique among the workers
        (its index and start count).
    :param lost: called when the channel closes.
    """

    log = Logger()

    def __init__(self, state: SharedState, prefix: str, lost: Callable[[], None]) -> None:
        super().__init__()
        self.shared = state
        self.prefix = prefix
        self._lost = lost
        self._holders: set[str] = set()
        self._gone = False

    @Seen.responder
    def seen(self, key: bytes) -> Deferred[dict[str, bool]]:
        return self.shared.seen(key).addCallback(lambda seen: {"seen": seen})

    @Acquire.responder
    def acquire(self, holder: str, claims: Any) -> Deferred[dict[str, str | None]]:
        name = self.prefix + holder

        def answered(refused: str | None) -> dict[str, str | None]:
            if refused is None:
                if self._gone:  # the worker died while this was asked
                    self.shared.release(name)
                else:
                    self._holders.add(name)
            return {"refused": refused}

        return self.shared.acquire(name, _unclaims(claims)).addCallback(answered)

    @Release.responder
    def release(self, holder: str) -> dict[str, Any]:
        name = self.prefix + holder
        if name in self._holders:
            self._holders.discard(name)
            self.shared.release(name)
        return {}

    @AddUsage.responder
    def add_usage(self, deltas: Any) -> Deferred[dict[str, Any]]:
        clean = {str(u): int(n) for u, n in dict(deltas).items()}
        return self.shared.add_usage(clean).addCallback(lambda totals: {"totals": totals})

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self._gone = True
        holders, self._holders = self._holders, set()
        for name in holders:
            self.shared.release(name)
        self._lost()


class RemoteState(_Quiet):
    """
    The worker's end: the parent's shared state, and the parent's
    requests to this worker.

    :param metrics: this worker's metrics as Prometheus text.
    :param middle_config: takes each config or secret the parent downloaded.
    :param lost: called when the parent's end closes (the parent is gone).
    """

    distributed = True
    log = Logger()

    def __init__(
        self,
        metrics: Callable[[], bytes] = lambda: b"",
        middle_config: Callable[[str, bytes], None] = lambda kind, body: None,
        lost: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.metrics_text = metrics
        self.middle_config = middle_config
        #: The claims channel, once connected: the calls every connection
        #: makes go there, not over AMP.
        self.claims: Any = None
        #: Called when the parent's end closes.
        self.on_lost = lost
        #: Called when the parent asks this worker to stop.
        self.on_stop: Callable[[], None] = lambda: None
        #: Called when the parent has measured the fronted sites again.
        self.on_profiles: Callable[[], None] = lambda: None

    # -- SharedState

    def seen_now(self, key: bytes) -> bool:
        raise NotImplementedError("a distributed state is asked through seen()")

    def seen(self, key: bytes) -> Deferred[bool]:
        if self.claims is not None:
            seen: Deferred[bool] = self.claims.seen(key)
            return seen
        d: Deferred[Any] = self.callRemote(Seen, key=key)
        return d.addCallback(lambda answer: bool(answer["seen"]))

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        if self.claims is not None:
            refused: Deferred[str | None] = self.claims.acquire(holder, claims)
            return refused
        d: Deferred[Any] = self.callRemote(Acquire, holder=holder, claims=_claims(claims))
        return d.addCallback(lambda answer: answer.get("refused"))

    def release(self, holder: str) -> None:
        if self.claims is not None:
            self.claims.release(holder)
            return
        if self.transport is not None and getattr(self.transport, "connected", True):
            self.callRemote(Release, holder=holder)

    def add_usage(self, deltas: Mapping[str, int]) -> Deferred[dict[str, int]]:
        d: Deferred[Any] = self.callRemote(AddUsage, deltas=dict(deltas))
        return d.addCallback(lambda answer: {str(u): int(n) for u, n in answer["totals"].items()})

    # -- the parent's requests

    @Metrics.responder
    def metrics(self) -> dict[str, bytes]:
        return {"text": self.metrics_text()}

    @ProfilesChanged.responder
    def profiles_changed(self) -> dict[str, Any]:
        self.on_profiles()
        return {}

    @Stop.responder
    def stop(self) -> dict[str, Any]:
        self.on_stop()
        return {}

    @MiddleConfig.responder
    def take_middle_config(self, kind: str, body: bytes) -> dict[str, Any]:
        self.middle_config(kind, body)
        return {}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.on_lost()
