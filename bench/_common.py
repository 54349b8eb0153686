"""
Pieces shared by the benchmarks in this directory (run by hand, never by the tests).

The proxy runs as a child process; its CPU time and RSS are read from
/proc/PID of that child only. The bench clients speak classic, dd or ee
(fake TLS) to it, count the payload bytes they receive and leave the rest
to each script.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.internet import defer, protocol, task

from mtproxy_tw._twisted import tune_malloc
from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.obfuscated2 import TAG_INTERMEDIATE, TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import Mode, Secret, generate

CHUNK = os.urandom(1 << 16)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
KINDS = {"classic": Mode.CLASSIC, "dd": Mode.SECURE, "ee": Mode.TLS}
TLS_DOMAIN = "www.example.com"
CHANGE_CIPHER_SPEC = b"\x14\x03\x03\x00\x01\x01"

C = TypeVar("C", bound="BenchClient")


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds of one process (not its children).

    From the scheduler's own count in /proc/PID/schedstat, in nanoseconds,
    where the kernel has it; /proc/PID/stat counts in clock ticks (10 ms),
    too coarse for a process that works a few milliseconds in a phase.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class Meter:
    """
    Wall-clock time and a process's CPU time between :meth:`start` and :meth:`stop`.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start()

    def start(self) -> None:
        self.cpu0, self.t0 = cpu_seconds(self.pid), time.monotonic()

    def stop(self) -> tuple[float, float]:
        """
        (elapsed seconds, CPU seconds) since :meth:`start`.
        """
        return time.monotonic() - self.t0, cpu_seconds(self.pid) - self.cpu0


# -- secrets and the proxy child


def make_secret(kind: str) -> Secret:
    mode = KINDS[kind]
    return generate(mode, domain=TLS_DOMAIN if mode is Mode.TLS else None)


def client_tag(secret: Secret) -> bytes:
    """
    The protocol tag an app uses with this secret (intermediate for classic).
    """
    return TAG_INTERMEDIATE if secret.kind is Mode.CLASSIC else TAG_PADDED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def closed_port() -> Iterator[int]:
    """
    A loopback port bound but not listening: connections to it are refused at once.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@contextmanager
def state_dir(path: str | None) -> Iterator[str]:
    """
    The given state directory, or a fresh one removed afterwards.
    """
    if path is not None:
        yield path
        return
    made = tempfile.mkdtemp(prefix="mtproxy-tw-bench-")
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def proxy_command(
    port: int, secret: Secret | None, state: str, max_connections: int, extra: list[str]
) -> list[str]:
    secret_option = ["--secret", secret.hex()] if secret is not None else []
    return [
        sys.executable,
        "-m",
        "twisted",
        "--log-format",
        "text",
        "--log-file",
        "+",
        "--log-level",
        "warn",
        "mtproxy",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--public-host",
        "127.0.0.1",
        *secret_option,
        "--state-dir",
        state,
        "--stats-interval",
        "0",
        "--max-connections",
        str(max_connections),
        *extra,
    ]


async def start_process(reactor: Any, command: list[str], port: int) -> subprocess.Popen[bytes]:
    """
    Start a child and wait until it accepts connections on ``port``.
    """
    child = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return child
            except OSError:
                if child.poll() is not None:
                    raise RuntimeError(f"{command[2:4]} exited with {child.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                await sleep(reactor, 0.1)
    except BaseException:
        stop_process(child)
        raise


def stop_process(child: subprocess.Popen[Any]) -> None:
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# -- clients


class BenchClient(protocol.Protocol):
    """
    A client of the proxy: obfuscated2 with the secret, inside fake TLS for ee,
    asking for DC ``dc``.

    For ee it sends a ClientHello, checks the server's flight, then sends
    ChangeCipherSpec and wraps everything in ApplicationData records; what
    it receives is unwrapped (not decrypted) before :meth:`got`.

    :ivar received: payload bytes received (obfuscated2 stream, out of TLS).
    :ivar ready: fires once the client may send (its init is on its way).
    :ivar done: fires when the connection is closed.
    """

    transport: Any

    def __init__(self, secret: Secret, on_data: Callable[[Any, bytes], None], dc: int = 2) -> None:
        self.secret = secret
        self.on_data = on_data
        self.init = generate_init(client_tag(secret), dc, secret=secret.key)
        self.encrypt = self.init.encryptor.update
        self.received = 0
        self.ready: defer.Deferred[BenchClient] = defer.Deferred()
        self.done: defer.Deferred[None] = defer.Deferred()
        self._tls: faketls.TLSRecordReader | None = None
        self._flight: bytes | None = None
        self._random = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        if self.secret.kind is Mode.TLS:
            assert self.secret.domain is not None
            hello = faketls.build_client_hello(
                self.secret.key, self.secret.domain, int(time.time())
            )
            self._random = hello[11:43]
            self._flight = b""
            self.transport.write(hello)
        else:
            self.transport.write(self.init.wire)
            self.ready.callback(self)

    def send(self, data: bytes) -> None:
        """
        Encrypt and send bytes of the client's stream.
        """
        data = self.encrypt(data)
        if self._tls is not None:
            data = faketls.wrap_records(data)
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            data = self._tls.feed(data)
        elif self._flight is not None:
            flight = self._flight + data
            try:
                end = faketls.check_server_hello(flight, self.secret.key, self._random)
            except faketls.TLSError as e:
                self._flight = None
                self.transport.abortConnection()
                self.ready.errback(e)
                return
            if isinstance(end, faketls.NeedMore):
                self._flight = flight
                return
            self._flight = None
            self._tls = faketls.TLSRecordReader()
            self.transport.write(CHANGE_CIPHER_SPEC + faketls.wrap_records(self.init.wire))
            self.ready.callback(self)
            data = self._tls.feed(flight[end:])
        if data:
            self.received += len(data)
            self.got(data)

    def got(self, data: bytes) -> None:
        self.on_data(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"connection lost during the handshake: {reason}"))
        if not self.done.called:
            self.done.callback(None)


async def connect_many(reactor: Any, port: int, n: int, make: Callable[[], C]) -> list[C]:
    """
    Connect ``n`` clients one after the other, each through its handshake.
    """
    clients = []
    for _ in range(n):
        client = make()
        await protocol.ClientCreator(reactor, lambda c=client: c).connectTCP("127.0.0.1", port)
        await client.ready
        clients.append(client)
    return clients


class Pump:
    """
    Streams ``total`` bytes of ``block`` (repeated) through a client, honouring
    the transport's flow control; then calls ``finished``.
    """

    def __init__(
        self, client: BenchClient, block: bytes, total: int, finished: Callable[[], None]
    ) -> None:
        self.client, self.block, self.left, self.finished = client, block, total, finished
        self.paused = False
        self.sent = 0
        client.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while self.left > 0 and not self.paused:
            self.left -= len(self.block)
            self.sent += len(self.block)
            self.client.send(self.block)
        if self.left <= 0 and not self.paused:
            self.left = 0
            self.client.transport.unregisterProducer()
            self.finished()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


# -- command line


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--kind", choices=sorted(KINDS), default="dd", help="secret kind")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--megabytes", type=int, default=1000, help="MiB each way, over all")
    p.add_argument("--requests", type=int, default=200, help="round trips per connection")
    p.add_argument("--idle", type=int, default=2000, help="idle connections for RSS")
    p.add_argument("--state-dir", default=None, help="proxy state dir (default: a fresh one)")
    p.add_argument(
        "--users",
        type=int,
        default=0,
        help="run with this many named users in a --config file (the bench's clients are "
        "one of them, with limits it never reaches), to measure the accounting",
    )
    return p


def users_config(state: str, secret: Secret, users: int) -> list[str]:
    """
    Options for a --config file with ``users`` named users, the first of
    which holds ``secret``; replaces the --secret option.
    """
    lines = [
        "[users.bench]",
        f'secret = "{secret.hex()}"',
        "max_connections = 1000000",
        "max_ips = 1000",
        'quota = "1000TB"',
    ]
    for i in range(1, users):
        lines += [
            f"[users.user{i}]",
            f'secret = "dd{os.urandom(16).hex()}"',
            "max_connections = 16",
            'quota = "20GB"',
        ]
    path = os.path.join(state, "bench.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return ["--config", path]


def react(main: Callable[[Any], Any]) -> None:
    """
    Raise the open-file limit, then run ``main(reactor)`` (a coroutine function).

    Large reads and writes churn glibc's mmap threshold; tuning it as the
    proxy does keeps this process from being the bottleneck.
    """
    tune_malloc()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
