"""
Zero-copy relaying of one direction: ``splice(2)`` from one TCP socket into
a pipe and from the pipe into another, so the bytes stay in the kernel.

A direct-mode client in fast mode (classic and ``dd`` secrets) gets from
the DC exactly what the DC sends, already encrypted for it: the download
direction is a copy, and :class:`Pump` makes it one the process never sees.
The upload direction (decrypted and encrypted again) and the closing of
both connections stay with Twisted's transports.

Flow control is the pipe's: the source is read only while the pipe is
empty; when the sink cannot take all of it, the source is left unread and
the sink watched until it drained, so a slow reader holds back the sender
with at most one pipe's bytes in flight. Pipes are lent from a small pool
and come back whenever drained, so a client costs no descriptor while no
bytes are in flight.

Used only on Linux with :func:`os.splice` (Python 3.10 on), between plain
TCP connections (:func:`mtproxy_tw._twisted.plain_tcp`); a kernel that
refuses it (``EINVAL``, ``ENOSYS``) turns it off for the process and the
pump hands its connection back to Twisted's own reading.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import main

from mtproxy_tw import _twisted

__all__ = ["CHUNK", "Pump", "available", "start_pump"]

#: Bytes moved per splice into the pipe, and the pipe size asked for.
CHUNK = 1 << 18
#: Drained pipes kept for the next pump that needs one.
POOL_SIZE = 32

_SPLICE = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: Errors that mean this kernel (or sandbox) does not splice sockets.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

_pool: list[tuple[int, int]] = []
_refused = False


def available() -> bool:
    """
    Whether this process can splice (Linux, :func:`os.splice`, not refused).
    """
    return _SPLICE is not None and sys.platform.startswith("linux") and not _refused


def _lend() -> tuple[int, int]:
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Refused, the default 64 KiB (over the user's pipe quota: less) still works.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _SETPIPE_SZ, CHUNK)
    return r, w


def _take_back(pipe: tuple[int, int], empty: bool) -> None:
    if empty and len(_pool) < POOL_SIZE:
        _pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def start_pump(
    source: Any,
    sink: Any,
    delivered: Callable[[int], None],
    refused: Callable[[], None],
) -> Pump | None:
    """
    Splice what arrives on ``source`` to ``sink`` from now on; ``None``
    (nothing changed) where that cannot be done.

    Both must be plain TCP connections with nothing queued toward ``sink``.
    ``delivered`` is told each count of bytes the sink took; ``refused``
    is called, before Twisted reads ``source`` again, if the kernel turns
    out not to splice.
    """
    if not (available() and _twisted.plain_tcp(source) and _twisted.plain_tcp(sink)):
        return None
    if _twisted.buffered(sink) or not source.connected or not sink.connected:
        return None
    return Pump(source, sink, delivered, refused)


class Pump:
    """
    One direction of one pair of connections, spliced.

    :ivar moved: bytes delivered to the sink.
    :ivar waits: how many times the sink was full and the source held back.
    """

    __slots__ = (
        "_broken",
        "_delivered",
        "_from",
        "_held",
        "_pipe",
        "_queued",
        "_refused",
        "_sink",
        "_sink_write",
        "_source",
        "_source_gone",
        "_to",
        "moved",
        "waits",
    )

    def __init__(
        self,
        source: Any,
        sink: Any,
        delivered: Callable[[int], None],
        refused: Callable[[], None],
    ) -> None:
        self._source = source
        self._sink = sink
        self._from = _twisted.fileno(source)
        self._to = _twisted.fileno(sink)
        self._delivered = delivered
        self._refused = refused
        self._broken = False
        self._source_gone = False
        #: Twisted holds bytes for the sink, written around the pump.
        self._queued = False
        self._pipe: tuple[int, int] | None = None
        self._held = 0
        self.moved = 0
        self.waits = 0
        _twisted.take_reads(source, self._readable)
        self._sink_write = _twisted.take_writes(sink, self._writable)

    @property
    def held(self) -> int:
        """
        Bytes in the pipe, not yet taken by the sink.
        """
        return self._held

    # -- what the reactor calls

    def _readable(self) -> Any:
        """
        The source's ``doRead``: move what it has into the pipe and on.
        """
        assert _SPLICE is not None
        if self._held or self._queued:
            return None  # a read before the sink drained: wait for it
        pipe = self._pipe = self._pipe or _lend()
        try:
            size = _SPLICE(self._from, pipe[1], CHUNK, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            return self._release()
        except OSError as e:
            self._release()
            if e.errno in _UNSUPPORTED and not self.moved:
                return self._refuse()
            return main.CONNECTION_LOST
        if not size:
            self._release()
            return main.CONNECTION_DONE
        self._held = size
        if not self._flush() and not self._broken:
            _twisted.watch_reads(self._source, False)
            _twisted.watch_writes(self._sink)
        return None

    def _writable(self) -> Any:
        """
        The sink's ``doWrite``: drain the pipe, then let Twisted write.
        """
        if self._held:
            if not self._flush():
                return None
            self._read_again()
        outcome = self._sink_write()
        if self._queued and not _twisted.buffered(self._sink):
            self._queued = False
            self._read_again()
        return outcome

    def _read_again(self) -> None:
        if not (self._sink.disconnecting or self._source_gone):
            _twisted.watch_reads(self._source, True)

    def wrote(self) -> None:
        """
        Bytes were written to the sink around the pump: while Twisted holds
        any of them, splice nothing after them.
        """
        if _twisted.buffered(self._sink) and not self._queued:
            self._queued = True
            _twisted.watch_reads(self._source, False)

    def _flush(self) -> bool:
        """
        Splice the pipe into the sink; whether it is empty now.
        """
        assert _SPLICE is not None and self._pipe is not None
        while self._held:
            try:
                size = _SPLICE(self._pipe[0], self._to, self._held, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                self.waits += 1
                return False
            except OSError:
                # The sink is gone: so is this pair.
                self._broken = True
                self.stop()
                _twisted.watch_reads(self._source, False)
                self._sink.abortConnection()
                return False
            self._held -= size
            self.moved += size
            self._delivered(size)
        self._release()
        return True

    # -- the end

    def _release(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            _take_back(pipe, not self._held)
            self._held = 0

    def _refuse(self) -> Any:
        """
        This kernel does not splice sockets: hand the pair back to Twisted.
        """
        global _refused
        _refused = True
        self.stop()
        self._refused()
        read: Any = self._source.doRead
        return read()

    def source_lost(self) -> None:
        """
        The source is gone: what is in the pipe still goes to the sink.
        """
        self._source_gone = True
        _twisted.give_back(self._source, self._readable)

    def stop(self) -> None:
        """
        Both are gone, or the pump is done: Twisted reads and writes again.
        """
        _twisted.give_back(self._source, self._readable)
        _twisted.give_back(self._sink, self._writable)
        self._release()
