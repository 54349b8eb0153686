"""
The real command as a child process, for integration tests:
``python -m twisted mtproxy ...`` with its output collected, its children
(the workers of ``--workers``) found through ``/proc``, and which process
holds each accepted connection.

Only the processes started here are ever signalled, by their PIDs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

__all__ = ["ProxyProcess", "children", "free_port", "listening_pids", "socket_owners"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """
    The live child processes of ``pid``, from /proc.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def _socket_inodes(pids: Sequence[int]) -> dict[str, int]:
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    return inodes


def _tcp_rows() -> list[list[str]]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows += [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
    return rows


def socket_owners(pids: Sequence[int], server_port: int) -> dict[int, int]:
    """
    Which of ``pids`` holds the proxy's end of each connection accepted on
    ``server_port``: the client's port -> pid.
    """
    inodes = _socket_inodes(pids)
    owners = {}
    for row in _tcp_rows():
        local, remote, inode = row[1], row[2], row[9]
        if int(local.rsplit(":", 1)[1], 16) == server_port and inode in inodes:
            owners[int(remote.rsplit(":", 1)[1], 16)] = inodes[inode]
    return owners


def listening_pids(pids: Sequence[int], port: int) -> list[int]:
    """
    Those of ``pids`` holding a socket listening on ``port``.
    """
    inodes = _socket_inodes(pids)
    found = set()
    for row in _tcp_rows():
        if int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "0A" and row[9] in inodes:
            found.add(inodes[row[9]])
    return sorted(found)


class ProxyProcess(ProcessProtocol):
    """
    ``python -m twisted --log-format text mtproxy ARGS`` with this
    interpreter and import path.

    :ivar ended: fires with ``(exit code, signal)``.
    """

    def __init__(self, reactor: Any, args: Sequence[str], own_group: bool = False) -> None:
        """
        :param own_group: start it in a process group of its own (through
            ``setsid``), as a service manager does, so a test can signal the
            whole group (:meth:`signal_group`).
        """
        self.reactor = reactor
        self.output = b""
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        command = [sys.executable, "-m", "twisted", "--log-format", "text", "mtproxy", *args]
        if own_group:
            setsid = shutil.which("setsid")
            if setsid is None:
                raise RuntimeError("setsid is not installed")
            command = [setsid, *command]
        self.process = reactor.spawnProcess(self, command[0], command, env=env)
        self.pid: int = self.process.pid

    @property
    def log(self) -> str:
        return self.output.decode(errors="replace")

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ended.callback((value.exitCode, value.signal))

    def signal_group(self, number: int) -> None:
        """
        Signal every process of its group (one started with ``own_group``).
        """
        os.killpg(self.pid, number)

    def children(self) -> list[int]:
        return [] if self.ended.called else children(self.pid)

    async def until(self, condition: Callable[[], bool], seconds: float = 30.0) -> None:
        """
        Poll ``condition`` until it holds; :class:`AssertionError` with the
        log if the process ends or the deadline passes first.
        """
        deadline = self.reactor.seconds() + seconds
        while not condition():
            if self.ended.called or self.reactor.seconds() > deadline:
                raise AssertionError(f"gave up waiting; the proxy said:\n{self.log}")
            await deferLater(self.reactor, 0.05, lambda: None)

    async def kill(self) -> None:
        """
        SIGKILL this process and its children, unless it has ended.
        """
        if self.ended.called:
            return
        workers = children(self.pid)
        os.kill(self.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.ended
