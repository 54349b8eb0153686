"""
The claims channel of ``--workers`` (:mod:`mtproxy_tw.wire.statechannel`)
wired to sockets: every connection's replay check, claims and release go
from a worker to its parent on it, each a few bytes, answered in order.
(The rarer messages, metrics, usage and Telegram's config, go over AMP:
:mod:`mtproxy_tw.shared.amp`.)

A worker's claims are released when its channel closes (the worker died),
and a claim answered after that is released at once, so a dead worker
leaves no slot taken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtproxy_tw.shared.base import Claim, SharedState
from mtproxy_tw.wire import statechannel as wire

__all__ = ["ClaimsClient", "ClaimsServer"]

_PENDING = object()


class ClaimsServer(Protocol):
    """
    The parent's end of one worker's claims channel.

    :param prefix: makes this worker's holders unique among the workers.
    """

    log = Logger()
    transport: Any

    def __init__(self, shared: SharedState, prefix: str) -> None:
        self.shared = shared
        self.prefix = prefix
        self._reader = wire.FrameReader(requests=True)
        self._holders: set[str] = set()
        #: answers in the order asked; _PENDING until known
        self._answers: deque[list[object]] = deque()
        self._lost = False

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except wire.ChannelError as e:
            self.log.error("a worker's claims channel sent {e}; closing it", e=e)
            self.transport.abortConnection()
            return
        for op, payload in frames:
            try:
                self._handle(op, payload)
            except wire.ChannelError as e:
                self.log.error("a worker's claims channel sent {e}; closing it", e=e)
                self.transport.abortConnection()
                return
        self._flush()

    def _handle(self, op: bytes, payload: bytes) -> None:
        if op == wire.RELEASE:
            name = self.prefix + payload.decode("utf-8", "replace")
            if name in self._holders:
                self._holders.discard(name)
                self.shared.release(name)
            return
        slot: list[object] = [_PENDING]
        self._answers.append(slot)
        if op == wire.SEEN:
            d: Deferred[Any] = self.shared.seen(payload)
            d.addCallback(lambda seen: b"1" if seen else b"0")
        else:
            holder, fields = wire.decode_claims(payload)
            name = self.prefix + holder
            claims = [Claim(*f) for f in fields]
            d = self.shared.acquire(name, claims)
            d.addCallback(self._acquired, name)
        d.addErrback(self._failed)
        d.addCallback(self._answered, slot)

    def _acquired(self, refused: str | None, name: str) -> bytes:
        if refused is None:
            if self._lost:  # the worker is gone: nobody will release it
                self.shared.release(name)
            else:
                self._holders.add(name)
            return b""
        return refused.encode("utf-8")

    def _failed(self, failure: Failure) -> bytes:
        self.log.failure("the shared state failed a worker's call", failure)
        return b"0"

    def _answered(self, result: bytes, slot: list[object]) -> None:
        slot[0] = result
        self._flush()

    def _flush(self) -> None:
        out = []
        answers = self._answers
        while answers and answers[0][0] is not _PENDING:
            result = answers.popleft()[0]
            assert isinstance(result, bytes)
            out.append(wire.answer(result))
        if out and not self._lost:
            self.transport.write(b"".join(out))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        holders, self._holders = self._holders, set()
        for name in holders:
            self.shared.release(name)


class ClaimsClient(Protocol):
    """
    The worker's end: :meth:`seen`, :meth:`acquire` and :meth:`release`
    answered by the parent's shared state.

    :ivar on_lost: called when the parent's end closes.
    """

    transport: Any

    def __init__(self) -> None:
        self._reader = wire.FrameReader(requests=False)
        self._waiting: deque[tuple[Deferred[Any], Callable[[bytes], Any]]] = deque()
        self.on_lost: Callable[[], None] = lambda: None
        self._gone = False

    def _ask(self, op: bytes, payload: bytes, decode: Callable[[bytes], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._gone or self.transport is None:
            d.errback(ConnectionError("the parent's claims channel is closed"))
            return d
        self._waiting.append((d, decode))
        self.transport.write(wire.request(op, payload))
        return d

    def seen(self, key: bytes) -> Deferred[bool]:
        return self._ask(wire.SEEN, key, lambda answer: answer == b"1")

    def acquire(self, holder: str, claims: Sequence[Claim]) -> Deferred[str | None]:
        fields = [(c.name, c.counter, c.limit, c.member, c.fleet) for c in claims]
        payload = wire.encode_claims(holder, fields)
        return self._ask(wire.ACQUIRE, payload, lambda answer: answer.decode() or None)

    def release(self, holder: str) -> None:
        if not self._gone and self.transport is not None:
            self.transport.write(wire.request(wire.RELEASE, holder.encode("utf-8")))

    def dataReceived(self, data: bytes) -> None:
        for _, payload in self._reader.feed(data):
            if not self._waiting:
                self.transport.abortConnection()
                return
            d, decode = self._waiting.popleft()
            d.callback(decode(payload))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        waiting, self._waiting = self._waiting, deque()
        for d, _ in waiting:
            d.errback(ConnectionError("the parent's claims channel closed"))
        self.on_lost()
