"""
A real ``redis-server`` on loopback, for tests of the fleet's shared state.

Typical use in a trial test::

    server = RedisServer.start_or_skip(self.mktemp())
    self.addCleanup(server.stop)
    url = server.url()
    ...
    server.stop()     # Redis goes down
    server.restart()  # and comes back on the same port

Only the process started here is ever signalled, by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import BinaryIO

from twisted.trial.unittest import SkipTest

from mtproxy_tw.config.values import RedisURL

__all__ = ["RedisServer"]

#: How long the server may take to answer its first PING.
READY_WITHIN = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _reply(stream: BinaryIO) -> object:
    line = stream.readline()[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        return stream.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_reply(stream) for _ in range(int(rest))]
    raise RuntimeError(f"not a redis reply: {line!r}")


class RedisServer:
    """
    :param directory: where the server runs (it saves nothing there).
    """

    def __init__(self, directory: str, executable: str = "redis-server") -> None:
        self.directory = os.path.abspath(directory)
        self.executable = executable
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_or_skip(cls, directory: str) -> RedisServer:
        """
        A started server, or :class:`SkipTest` where there is no
        ``redis-server`` on ``PATH``.
        """
        executable = shutil.which("redis-server")
        if executable is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        os.makedirs(directory, exist_ok=True)
        server = cls(directory, executable)
        server.restart()
        return server

    def url(self, db: int = 0) -> RedisURL:
        return RedisURL("127.0.0.1", self.port, db, None)

    def command(self, *args: str | int) -> object:
        """
        One command's answer, synchronously (for a test to look at the data).
        """
        out = b"*%d\r\n" % len(args)
        for arg in args:
            data = str(arg).encode()
            out += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=READY_WITHIN) as s:
            s.sendall(out)
            return _reply(s.makefile("rb"))

    def restart(self) -> None:
        """
        Start the server (again, on the same port); returns once it answers.
        """
        if self._process is not None:
            raise RuntimeError("the server is running")
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.directory]
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        self._process = process
        deadline = time.monotonic() + READY_WITHIN
        while not _answers(self.port):
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {READY_WITHIN} s")
            time.sleep(0.01)

    def pause(self) -> None:
        """
        Freeze the server: it keeps its connections and answers nothing.
        """
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """
        End the server (if it runs) and wait for it.
        """
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(READY_WITHIN)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
