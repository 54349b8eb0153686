"""
Memory after load, run by hand (not part of the test suite).

Starts the proxy as a child process (direct mode against a sink/source DC
in this process, or middle mode against the fake ME of bench/middle.py),
then records the proxy's RSS (from /proc, the child only):

- before: idle, after one warm-up client;
- peak: the highest sample while a burst of N clients downloads and
  uploads and ``--idle`` more sit connected;
- after: every second for ``--after`` seconds once they are all closed.

The goal is that RSS comes back within 25 % of the idle baseline within a
minute of the end of the load.

    python bench/memory.py --upstream direct --connections 200 --megabytes 1000
    python bench/memory.py --upstream middle --connections 200 --megabytes 1000
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Any

from _common import (
    CHUNK,
    BenchClient,
    Pump,
    closed_port,
    connect_many,
    free_port,
    make_secret,
    parser,
    proxy_command,
    react,
    rss_bytes,
    sleep,
    start_process,
    state_dir,
    stop_process,
)
from direct import DCFactory
from middle import BLOB, DOWN, PING, SINK, MiddleClient, _u32, middle_proxy
from twisted.internet import defer, task

from mtproxy_tw.wire.secrets import Mode

MB = 1 << 20


def memory_parts(pid: int) -> str:
    """
    Where a process's resident memory is (from /proc/PID/smaps): glibc's
    main heap, anonymous mappings (Python's arenas, other malloc arenas,
    large chunks), and files.
    """
    parts = {"heap": 0, "anonymous": 0, "files": 0}
    where = "files"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else ""
                where = "heap" if name == "[heap]" else "anonymous" if not name else "files"
                if name.startswith("[") and name != "[heap]":
                    where = "anonymous"
            elif head[0] == "Rss:":
                parts[where] += int(head[1]) << 10
    return ", ".join(f"{k} {v / MB:.1f} MB" for k, v in parts.items())


class Sampler:
    """
    The proxy's RSS every ``interval`` seconds, keeping the highest.
    """

    def __init__(self, reactor: Any, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.peak = 0
        self.loop = task.LoopingCall(self.sample)
        self.loop.clock = reactor
        self.loop.start(interval)

    def sample(self) -> int:
        rss = rss_bytes(self.pid)
        self.peak = max(self.peak, rss)
        return rss

    def stop(self) -> None:
        self.sample()
        if self.loop.running:
            self.loop.stop()


async def burst_direct(reactor: Any, port: int, secret: Any, dcs: DCFactory, args: Any) -> None:
    n = args.connections
    per = args.megabytes * MB // n
    per = -(-per // len(CHUNK)) * len(CHUNK)
    total = per * n
    # Download and upload at once: the DC streams to each client, each
    # client streams to the DC.
    dcs.download, dcs.echo = per, False
    arrived = [0]
    downloaded: defer.Deferred[None] = defer.Deferred()

    def count(c: BenchClient, data: bytes) -> None:
        arrived[0] += len(data)
        if arrived[0] >= total and not downloaded.called:
            downloaded.callback(None)

    uploaded = dcs.expect(total)
    clients = await connect_many(reactor, port, n, lambda: BenchClient(secret, count))
    idle = await connect_many(reactor, port, args.idle, lambda: BenchClient(secret, count))
    for c in idle:
        c.send(os.urandom(100))
    for c in clients:
        Pump(c, CHUNK, per, lambda: None)
    await defer.gatherResults([downloaded, uploaded])
    for c in clients + idle:
        c.transport.loseConnection()
    await defer.gatherResults([c.done for c in clients + idle])


async def burst_middle(reactor: Any, port: int, secret: Any, args: Any) -> None:
    n = args.connections
    part = 128 << 10
    parts = max(1, math.ceil(args.megabytes * MB / n / part))
    down = DOWN + _u32.pack(part)
    left = [n]
    done: defer.Deferred[None] = defer.Deferred()

    def fetched(c: MiddleClient, size: int) -> None:
        if c.requested < parts:
            c.requested += 1
            c.packet(down)
        elif c.answers >= parts + 1:  # the parts and the ping after the upload
            left[0] -= 1
            if not left[0]:
                done.callback(None)

    clients = await connect_many(reactor, port, n, lambda: MiddleClient(secret, fetched))
    idle = await connect_many(
        reactor, port, args.idle, lambda: MiddleClient(secret, lambda c, s: None)
    )
    for c in idle:
        c.packet(PING + os.urandom(96))
    for c in clients:
        for _ in range(min(4, parts)):
            c.requested += 1
            c.packet(down)
        Pump(c, c.codec.encode(SINK + BLOB[: part - 4]), parts * part, c.ping)
    await done
    for c in clients + idle:
        c.transport.loseConnection()
    await defer.gatherResults([c.done for c in clients + idle])


async def run(reactor: Any, args: argparse.Namespace) -> None:
    secret = make_secret(args.kind)
    port = free_port()
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        dcs = DCFactory()
        site = None
        if args.upstream == "direct":
            dc_port = reactor.listenTCP(0, dcs, interface="127.0.0.1").getHost().port
            extra += ["--dc", f"2=127.0.0.1:{dc_port}"]
        else:
            site, _ = await middle_proxy(reactor, stack, extra)
        if secret.kind is Mode.TLS:
            extra += ["--mask-host", f"127.0.0.1:{stack.enter_context(closed_port())}"]
        extra += args.proxy_option
        state = stack.enter_context(state_dir(args.state_dir))
        command = proxy_command(port, secret, state, max(10000, 2 * args.idle), extra)
        if args.log_info:  # the proxy's info lines too (what it handed back, in how long)
            command[command.index("--log-level") + 1] = "info"
        proxy = await start_process(reactor, command, port)
        stack.callback(stop_process, proxy)
        if site is not None:
            for _ in range(100):
                if site.requests["/getProxySecret"] and site.requests["/getProxyConfig"]:
                    break
                await sleep(reactor, 0.1)
        # Warm-up: one client through, so the baseline has the code paths loaded.
        if args.upstream == "direct":
            dcs.download, dcs.echo = 0, True
            warmed: defer.Deferred[None] = defer.Deferred()
            (first,) = await connect_many(
                reactor, port, 1, lambda: BenchClient(secret, lambda c, d: warmed.callback(None))
            )
            first.send(os.urandom(100))
        else:
            warmed = defer.Deferred()
            (first,) = await connect_many(
                reactor, port, 1, lambda: MiddleClient(secret, lambda c, s: warmed.callback(None))
            )
            first.ping()
        await warmed.addTimeout(20, reactor)
        first.transport.loseConnection()
        await sleep(reactor, args.settle)
        before = rss_bytes(proxy.pid)
        before_parts = memory_parts(proxy.pid) if args.smaps else ""
        print(
            f"{args.upstream} mode, {args.kind} secret, burst of {args.connections} clients "
            f"moving {args.megabytes} MiB each way, {args.idle} idle"
        )
        print(f"before: {before / MB:.1f} MB")
        sampler = Sampler(reactor, proxy.pid)
        if args.upstream == "direct":
            await burst_direct(reactor, port, secret, dcs, args)
        else:
            await burst_middle(reactor, port, secret, args)
        sampler.stop()
        print(f"peak: {sampler.peak / MB:.1f} MB")
        bound = before * 1.25
        back = None
        samples = []
        for second in range(1, args.after + 1):
            await sleep(reactor, 1.0)
            rss = rss_bytes(proxy.pid)
            samples.append(rss)
            if back is None and rss <= bound:
                back = second
        if args.smaps:
            print(f"before: {before_parts}")
            print(f"after:  {memory_parts(proxy.pid)}")
        shown = ", ".join(f"{s / MB:.0f}" for s in samples[4::5])
        print(f"after, every 5 s (MB): {shown}")
        after = samples[-1]
        within = "within" if after <= bound else "NOT within"
        print(
            f"after {args.after} s: {after / MB:.1f} MB ({after / before:.2f} x before, "
            f"{within} 25 %); first within 25 % at "
            + (f"{back} s" if back is not None else "never")
        )


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(connections=200, idle=1000)
    p.add_argument("--upstream", choices=("direct", "middle"), default="direct")
    p.add_argument("--after", type=int, default=60, help="seconds sampled after the load")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before the baseline")
    p.add_argument("--log-info", action="store_true", help="show the proxy's info lines")
    p.add_argument(
        "--smaps", action="store_true", help="say where the memory is, before and after"
    )
    p.add_argument(
        "--proxy-option", action="append", default=[], help="one more proxy argument (repeat)"
    )
    args = p.parse_args()
    react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()
