"""
Worker-processes benchmark, run by hand (not part of the test suite).

For each N of ``--workers-list`` starts ``twist mtproxy --workers N`` in
direct mode (dd secret, fast mode) as a child process, drives
``--connections`` concurrent clients through it, all on loopback, and prints
one row per N:

- download and upload throughput (MB/s) over the concurrent connections;
- CPU seconds per GB relayed, of the whole process tree (the parent and
  every worker, from /proc/PID/stat; the tree is found by walking /proc);
- CPU per small request (100-byte ping-pong through the relay), as fast as
  the clients go, and paced: each client waits ``--pause-ms`` after an
  answer, and their first requests are spread over one pause, so each
  request arrives on its own and wakes its process up. Flat out, one
  process batches more requests per wake-up than each of N workers does;
  paced, a process that wakes up less often finds its caches colder, so a
  request costs more the sparser they are per process. Neither is
  coordination: that is the parent's share, shown apart;
- CPU per client set-up (connect, handshake and the first answer, for
  ``--setup`` clients one after the other);
- the spread: the smallest and largest share of the connections a worker
  holds (from which process owns each accepted socket, through /proc), for
  the ``--connections`` clients and for the ``--setup`` ones.

N = 1 is the plain single process (no parent); N > 1 is a parent and N
workers sharing the listener through ``SO_REUSEPORT``.

By default the clients and the sink/source DC run in this process, on one
core: on a 2-core machine the throughput cannot grow with N (the clients
are the bottleneck and the proxy has the other core); what such a machine
shows is that the CPU per GB, per request and per set-up stays near that of
one process, and that the kernel spreads the connections evenly. To see the
throughput grow with N on a larger machine, run the load from K client
processes (``--client-processes K``), each with its own DC (DC id 1..K) and
its share of the clients:

    python bench/scale.py [--workers-list 1,2,4,8,16] [--client-processes 8]
        [--connections 64] [--megabytes 1000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import (
    CHUNK,
    BenchClient,
    Pump,
    closed_port,
    connect_many,
    cpu_seconds,
    free_port,
    make_secret,
    parser,
    proxy_command,
    react,
    sleep,
    start_process,
    state_dir,
    stop_process,
    users_config,
)
from direct import DC, DCFactory
from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver

from mtproxy_tw.wire.secrets import Mode, Secret, parse_secret

PHASES = ("download", "upload", "small", "paced", "setup")
REQUEST = os.urandom(100)
#: Seconds a step of a phase (connecting, running, closing) may take.
STEP_TIMEOUT = 300
#: Seconds the clients of the small requests and set-ups wait for their answers.
ANSWER_TIMEOUT = 60
#: The DC's listen backlog (the kernel caps it at net.core.somaxconn).
DC_BACKLOG = 4096
#: Seconds over which the CPU of the idle proxy is measured.
IDLE = 2.0


# -- the process tree, from /proc


def process_tree(root: int) -> list[int]:
    """
    ``root`` and all its descendants, from the parent pids in /proc.
    """
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return sorted(found)


def switches(pids: list[int]) -> int:
    """
    The context switches (voluntary and not) of ``pids``, from /proc/PID/status.
    """
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.endswith("ctxt_switches:", 0, line.find(":") + 1):
                    total += int(line.split()[1])
    return total


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


class TreeMeter:
    """
    Wall-clock time and the CPU time of a whole process tree, and of its root alone.
    """

    def __init__(self, root: int) -> None:
        self.root = root

    def start(self) -> None:
        self.pids = process_tree(self.root)
        self.cpu0, self.root0 = tree_cpu(self.pids), cpu_seconds(self.root)
        self.switches0 = switches(self.pids)
        self.t0 = time.monotonic()

    def stop(self) -> tuple[float, float, float]:
        """
        (elapsed seconds, CPU seconds of the tree, of the root) since :meth:`start`.
        """
        elapsed, cpu = time.monotonic() - self.t0, tree_cpu(self.pids) - self.cpu0
        root = cpu_seconds(self.root) - self.root0
        self.switched = switches(self.pids) - self.switches0
        if process_tree(self.root) != self.pids:
            raise RuntimeError("a proxy process started or ended during the measurement")
        return elapsed, cpu, root


def connections_held(pids: list[int], port: int) -> dict[int, int]:
    """
    How many established connections to ``port`` (the proxy's end) each of ``pids`` holds.
    """
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for name in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{name}")
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
    held = dict.fromkeys(pids, 0)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "01" and int(local.split(":")[1], 16) == port and inode in inodes:
                held[inodes[inode]] += 1
    return held


def spread(workers: list[int], port: int, expected: int) -> str:
    """
    The smallest and largest share of the connections one worker holds.
    """
    held = connections_held(workers, port)
    total = sum(held.values())
    if total != expected:
        raise RuntimeError(f"{total} connections held by the workers, {expected} expected")
    shares = [100 * n / total for n in held.values()]
    return f"{min(shares):.0f}-{max(shares):.0f}%"


async def settle(reactor: Any, root: int, workers: int) -> list[int]:
    """
    Wait until all the workers run and the tree is idle; return the workers' pids.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = process_tree(root)
        if len(pids) == (workers + 1 if workers > 1 else 1):
            cpu = tree_cpu(pids)
            await sleep(reactor, 0.5)
            if tree_cpu(pids) - cpu < 0.05 and process_tree(root) == pids:
                return [pid for pid in pids if pid != root] if workers > 1 else pids
        else:
            await sleep(reactor, 0.2)
    raise RuntimeError(f"the proxy did not settle with {workers} workers")


# -- the load: a DC and a share of the clients (in this process or a child)


class RequestedDC(DC):
    """
    Streams its download once the client's first bytes (its request)
    arrive, so that all downloads start together; otherwise as :class:`DC`.
    """

    started = False

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if not self.factory.download or self.started:
            super().dataReceived(data)
            return
        cut = min(self.skip, len(data))
        self.skip -= cut
        if data[cut:]:
            self.started = True
            self.left = self.factory.download
            self.transport.registerProducer(self, True)
            self.resumeProducing()


class RequestedDCFactory(DCFactory):
    def buildProtocol(self, addr: Any) -> RequestedDC:
        return RequestedDC(self)


class Client(BenchClient):
    """
    Keeps why its connection was lost.
    """

    lost: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason
        super().connectionLost(reason)


class Load:
    """
    One client side: a DC (Telegram's DC ``dc`` for the proxy) and clients
    asking for it. :meth:`prepare` connects the clients of a phase,
    :meth:`go` runs it, :meth:`finish` closes them.
    """

    def __init__(self, reactor: Any, secret: Secret, dc: int) -> None:
        self.reactor, self.secret, self.dc = reactor, secret, dc
        self.dcs = RequestedDCFactory()
        # The workers open DC connections faster than this one process
        # accepts them while it connects clients: with Twisted's backlog of 50
        # the kernel would drop some, and the proxy would see them reset.
        listening = reactor.listenTCP(0, self.dcs, backlog=DC_BACKLOG, interface="127.0.0.1")
        self.dc_port = listening.getHost().port
        self.clients: list[Client] = []
        self.phase = ""

    def _make(self, on_data: Callable[[Any, bytes], None]) -> Callable[[], Client]:
        return lambda: Client(self.secret, on_data, self.dc)

    async def prepare(self, port: int, phase: str, n: int, size: int, rounds: int) -> None:
        self.port, self.phase, self.n, self.size, self.rounds = port, phase, n, size, rounds
        #: Seconds from an answer to the next request (``paced``: ``size`` is it in µs).
        self.pause = size / 1e6 if phase == "paced" else 0.0
        self.dcs.download = size if phase == "download" else 0
        self.dcs.echo = phase in ("small", "paced", "setup")
        self.finished: defer.Deferred[None] = defer.Deferred()
        self.left = n * size if phase == "download" else n * rounds
        if phase == "download":
            self.clients = await connect_many(self.reactor, port, n, self._make(self._count))
        elif phase == "upload":
            self.clients = await connect_many(self.reactor, port, n, self._make(_ignore))
        elif phase in ("small", "paced"):
            self.clients = await connect_many(self.reactor, port, n, self._make(self._pong))

    def _count(self, client: BenchClient, data: bytes) -> None:
        self.left -= len(data)
        if self.left <= 0 and not self.finished.called:
            self.finished.callback(None)

    def _pong(self, client: BenchClient, data: bytes) -> None:
        if client.received % len(REQUEST) == 0:
            self.left -= 1
            if client.received < self.rounds * len(REQUEST):
                if self.pause:
                    self.reactor.callLater(self.pause, client.send, REQUEST)
                else:
                    client.send(REQUEST)
            if self.left == 0:
                self.finished.callback(None)

    async def go(self) -> int:
        """
        Run the phase; return the bytes relayed or the round trips made.
        """
        if self.phase == "download":
            for c in self.clients:
                c.send(b"GET!")
            await self.finished
            return self.n * self.size
        if self.phase == "upload":
            per = -(-self.size // len(CHUNK)) * len(CHUNK)
            arrived = self.dcs.expect(per * self.n)
            for c in self.clients:
                Pump(c, CHUNK, per, _nothing)
            await arrived
            return per * self.n
        if self.phase == "setup":
            self.left = self.n
            make = self._make(self._pong)
            self.clients = await connect_many(self.reactor, self.port, self.n, make)
        if self.phase == "paced":
            # Spread over one pause: each request arrives on its own, so
            # neither one process nor several batch them.
            for i, c in enumerate(self.clients):
                self.reactor.callLater(i * self.pause / len(self.clients), c.send, REQUEST)
        else:
            for c in self.clients:
                c.send(REQUEST)
        try:
            await self.finished.addTimeout(ANSWER_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            short = [c for c in self.clients if c.received < self.rounds * len(REQUEST)]
            closed = [c.lost for c in short if c.done.called]
            reasons = sorted({type(r.value).__name__ for r in closed})
            raise RuntimeError(
                f"{len(short)} of {self.n} clients still wait for an answer "
                f"after {ANSWER_TIMEOUT} s ({len(closed)} of them closed: {', '.join(reasons)}; "
                f"{sum(not c.received for c in short)} without any answer)"
            ) from None
        return self.n * self.rounds

    async def finish(self) -> None:
        done = [c.done for c in self.clients]
        for c in self.clients:
            c.transport.loseConnection()
        await defer.DeferredList(done)
        self.clients = []
        await sleep(self.reactor, 0.3)


def _ignore(client: BenchClient, data: bytes) -> None:
    pass


def _nothing() -> None:
    pass


class _Commands(LineReceiver):
    """
    A client process's side: commands from the bench on stdin, answers on stdout.
    """

    delimiter = b"\n"

    def __init__(self, load: Load, ended: defer.Deferred[None]) -> None:
        self.load, self.ended = load, ended

    def connectionMade(self) -> None:
        self.sendLine(b"dc %d" % self.load.dc_port)

    def lineReceived(self, line: bytes) -> None:
        defer.ensureDeferred(self._run(line.decode().split()))

    async def _run(self, words: list[str]) -> None:
        try:
            if words[0] == "prepare":
                port, n, size, rounds = (int(w) for w in (words[1], *words[3:]))
                await self.load.prepare(port, words[2], n, size, rounds)
                answer = "ok"
            elif words[0] == "go":
                answer = f"done {await self.load.go()}"
            else:
                await self.load.finish()
                answer = "ok"
        except Exception as e:
            answer = f"error {e!r}"
        self.sendLine(answer.encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.ended.callback(None)


async def serve_load(reactor: Any, secret: str, dc: int) -> None:
    from twisted.internet.stdio import StandardIO

    ended: defer.Deferred[None] = defer.Deferred()
    StandardIO(_Commands(Load(reactor, parse_secret(secret, "bench"), dc), ended), reactor=reactor)
    await ended


class RemoteLoad(protocol.ProcessProtocol):
    """
    A :class:`Load` in a client process: the same methods, over its stdin and stdout.
    """

    process: Any

    def __init__(self, dc: int) -> None:
        self.dc = dc
        self.buffer = b""
        self.waiting: list[defer.Deferred[str]] = []
        self.dc_port = 0

    @classmethod
    async def start(cls, reactor: Any, secret: Secret, dc: int) -> RemoteLoad:
        self = cls(dc)
        started = self._answer()
        argv = [sys.executable, os.path.abspath(__file__), "--client", secret.hex(), str(dc)]
        self.process = reactor.spawnProcess(self, sys.executable, argv, env=dict(os.environ))
        self.dc_port = int((await started).split()[1])
        return self

    def _answer(self) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self.waiting.append(d)
        return d

    async def _ask(self, line: str) -> str:
        answer = self._answer()
        self.process.write(line.encode() + b"\n")
        text = await answer
        if text.startswith("error"):
            raise RuntimeError(f"client process: {text}")
        return text

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.waiting.pop(0).callback(line.decode())

    def errReceived(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    def processEnded(self, reason: Any) -> None:
        for d in self.waiting:
            d.errback(RuntimeError(f"client process ended: {reason.value}"))
        self.waiting = []

    async def prepare(self, port: int, phase: str, n: int, size: int, rounds: int) -> None:
        await self._ask(f"prepare {port} {phase} {n} {size} {rounds}")

    async def go(self) -> int:
        return int((await self._ask("go")).split()[1])

    async def finish(self) -> None:
        await self._ask("finish")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.closeStdin()


# -- the benchmark


def share(total: int, parts: int, i: int) -> int:
    return total // parts + (i < total % parts)


async def measure(
    reactor: Any, args: argparse.Namespace, loads: list[Any], secret: Secret, workers: int
) -> dict[str, Any]:
    """
    One row: start the proxy with ``workers`` workers, run every phase, stop it.
    """
    port = free_port()
    dcs = [f"--dc={load.dc}=127.0.0.1:{load.dc_port}" for load in loads]
    row: dict[str, Any] = {"workers": workers}
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(state_dir(None))
        extra = [*dcs, "--workers", str(workers)]
        if secret.kind is Mode.TLS:
            extra += ["--mask-host", f"127.0.0.1:{stack.enter_context(closed_port())}"]
        given: Secret | None = secret
        if args.users:  # the accounting, added up in the parent
            extra += users_config(state, secret, args.users)
            given = None
        command = proxy_command(port, given, state, 2 * (args.connections + args.setup), extra)
        command[command.index("--log-level") + 1] = args.proxy_log_level
        proxy = await start_process(reactor, command, port)
        stack.callback(stop_process, proxy)
        pids = await settle(reactor, proxy.pid, workers)
        meter = TreeMeter(proxy.pid)
        k = len(loads)
        c = args.connections
        per = args.megabytes * (1 << 20) // c

        async def every(step: str, name: str, calls: list[Any]) -> list[Any]:
            print(f"{workers} workers: {name}, {step}", file=sys.stderr, flush=True)
            steps = defer.gatherResults([defer.ensureDeferred(call) for call in calls])
            try:
                return list(await steps.addTimeout(STEP_TIMEOUT, reactor))
            except defer.FirstError as e:
                failure = e.subFailure
                what = "timed out" if failure.check(defer.CancelledError) else failure.value
                raise RuntimeError(f"{workers} workers: {name}, {step}: {what}") from None

        async def phase(name: str, n: int, size: int, rounds: int) -> tuple[float, float, int]:
            """
            (elapsed seconds, CPU seconds, bytes or round trips); the parent's
            share of the CPU goes in the row.
            """
            prepares = [
                load.prepare(port, name, share(n, k, i), size, rounds)
                for i, load in enumerate(loads)
            ]
            await every("connecting", name, prepares)
            meter.start()
            done = await every("running", name, [load.go() for load in loads])
            elapsed, cpu, parent = meter.stop()
            if workers > 1:
                row[f"parent {name}"] = parent / cpu if cpu else 0.0
            # Every client has had an answer: every connection has been accepted.
            if name == "small":
                row["spread"] = spread(pids, port, n)
            elif name == "setup":
                row["spread setup"] = spread(pids, port, n)
            await every("closing", name, [load.finish() for load in loads])
            return elapsed, cpu, sum(done)

        await phase("small", c, 0, 5)  # warm-up: every worker has served some clients
        meter.start()
        await sleep(reactor, IDLE)
        row["idle"] = 100 * meter.stop()[1] / IDLE
        for name in args.phases.split(","):
            if name in ("download", "upload"):
                elapsed, cpu, relayed = await phase(name, c, per, 0)
                row[f"{name} MB/s"] = relayed / elapsed / 1e6
                row[f"{name} s/GB"] = cpu / relayed * 1e9
            elif name == "small":
                elapsed, cpu, trips = await phase(name, c, 0, args.requests)
                row["small us"] = cpu / trips * 1e6
                row["small cs"] = meter.switched / trips
            elif name == "paced":
                pause = round(args.pause_ms * 1000)
                elapsed, cpu, trips = await phase(name, c, pause, args.paced_requests)
                row["paced us"] = cpu / trips * 1e6
                row["paced rate"] = trips / elapsed
            elif name == "setup":
                elapsed, cpu, count = await phase(name, args.setup, 0, 1)
                row["setup us"] = cpu / count * 1e6
                row["setup cs"] = meter.switched / count
    await sleep(reactor, 0.5)
    return row


COLUMNS = (
    ("workers", "workers", "{:d}"),
    ("idle", "idle CPU %", "{:.1f}"),
    ("download MB/s", "down MB/s", "{:.0f}"),
    ("download s/GB", "down CPU s/GB", "{:.2f}"),
    ("upload MB/s", "up MB/s", "{:.0f}"),
    ("upload s/GB", "up CPU s/GB", "{:.2f}"),
    ("small us", "small CPU us/req", "{:.0f}"),
    ("paced rate", "paced req/s", "{:.0f}"),
    ("paced us", "paced CPU us/req", "{:.0f}"),
    ("setup us", "set-up CPU us", "{:.0f}"),
    ("small cs", "small cs/req", "{:.2f}"),
    ("setup cs", "set-up cs", "{:.1f}"),
    ("spread", "spread (C)", "{}"),
    ("spread setup", "spread (set-up)", "{}"),
)
RELATIVE = ("download s/GB", "upload s/GB", "small us", "paced us", "setup us")
PARENT = ("download", "upload", "small", "paced", "setup")


def print_table(rows: list[dict[str, Any]]) -> None:
    shown = [(key, head, form) for key, head, form in COLUMNS if any(key in r for r in rows)]
    cells = [[head for _, head, _ in shown]]
    cells += [[form.format(r[key]) if key in r else "-" for key, _, form in shown] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(shown))]
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
    ones = [r for r in rows if r["workers"] == 1]
    if not ones:
        return
    print("CPU against 1 worker (the mean of its rows):")
    for r in rows:
        if r["workers"] == 1:
            continue
        parts = []
        for key in RELATIVE:
            if key in r:
                base = sum(one[key] for one in ones) / len(ones)
                parts.append(f"{key.split()[0]} {100 * (r[key] / base - 1):+.0f}%")
        parent = [f"{k} {100 * r[f'parent {k}']:.0f}%" for k in PARENT if f"parent {k}" in r]
        print(f"  {r['workers']} workers: " + ", ".join(parts))
        print("    of which the parent: " + ", ".join(parent))


async def run(reactor: Any, args: argparse.Namespace) -> None:
    workers_list = [int(w) for w in args.workers_list.split(",")]
    if not set(args.phases.split(",")) <= set(PHASES):
        raise SystemExit(f"--phases: of {','.join(PHASES)}")
    secret = make_secret(args.kind)
    loads: list[Any] = []
    try:
        if args.client_processes > 1:
            for i in range(args.client_processes):
                loads.append(await RemoteLoad.start(reactor, secret, i + 1))
        else:
            loads.append(Load(reactor, secret, 2))
        clients = "this process" if len(loads) == 1 else f"{len(loads)} client processes"
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(
            f"direct mode, {args.kind} secret, fast mode, {args.connections} connections, "
            f"{args.megabytes} MiB each way, {args.setup} set-ups, clients in {clients}, "
            f"{os.cpu_count()} CPUs, load average {load} "
            "(CPU figures: the whole proxy tree)",
            flush=True,
        )
        rows = []
        for _ in range(args.repeat):
            for workers in workers_list:
                rows.append(await measure(reactor, args, loads, secret, workers))
        print_table(rows)
    finally:
        for remote in loads:
            if isinstance(remote, RemoteLoad):
                remote.stop()


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        secret, dc = sys.argv[2], int(sys.argv[3])
        react(lambda reactor: serve_load(reactor, secret, dc))
        return
    p = parser(__doc__)
    p.set_defaults(connections=64)
    p.add_argument("--workers-list", default="1,2", help="the values of --workers to measure")
    p.add_argument("--repeat", type=int, default=1, help="measure the whole list this many times")
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="run the clients (and a DC for each) in this many child processes; "
        "1: in this process",
    )
    p.add_argument("--setup", type=int, default=1000, help="clients for the set-up measurement")
    p.add_argument("--phases", default=",".join(PHASES), help="what to measure (comma-separated)")
    p.add_argument(
        "--pause-ms",
        type=float,
        default=10.0,
        help="paced requests: each client waits this long after an answer before asking again",
    )
    p.add_argument(
        "--paced-requests", type=int, default=100, help="paced requests: round trips per client"
    )
    p.add_argument("--proxy-log-level", default="warn", help="the proxy's --log-level")
    args = p.parse_args()
    react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()
