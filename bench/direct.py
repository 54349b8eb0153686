"""
Direct-mode benchmark, run by hand (not part of the test suite).

Starts the proxy as a child process, a sink/source DC and N clients in this
process, all on loopback, and reports:

- download and upload throughput (MB/s) over N concurrent connections;
- the proxy's CPU seconds per GB relayed (from /proc, the child only);
- the proxy's CPU per small request (100-byte ping-pong through the relay);
- the proxy's RSS per idle connection (N handshaken, silent connections).

    python bench/direct.py --connections 50 --megabytes 2000 [--no-fast-mode]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, task

from mtproxy_tw.obfuscated2 import TAG_PADDED, generate_init
from mtproxy_tw.secrets import Mode, generate

CHUNK = os.urandom(1 << 16)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


class DC(protocol.Protocol):
    """
    Skips the proxy's init, then sends ``download`` bytes or echoes.
    """

    def __init__(self, factory: DCFactory) -> None:
        self.factory = factory
        self.skip = 64
        self.left = 0

    def connectionMade(self) -> None:
        self.left = self.factory.download
        if self.left:
            self.transport.registerProducer(self, True)
            self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while self.left > 0 and not self.paused:
            n = min(self.left, len(CHUNK))
            self.left -= n
            self.transport.write(CHUNK[:n])
        if self.left <= 0:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0

    def dataReceived(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
        if data and self.factory.echo:
            self.transport.write(data)


class DCFactory(protocol.Factory):
    noisy = False

    def __init__(self) -> None:
        self.download = 0
        self.echo = False

    def buildProtocol(self, addr: Any) -> DC:
        return DC(self)


class Client(protocol.Protocol):
    def __init__(self, key: bytes, on_data: Callable[[Client, bytes], None]) -> None:
        self.key = key
        self.on_data = on_data
        self.received = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.made: defer.Deferred[Client] = defer.Deferred()

    def connectionMade(self) -> None:
        init = generate_init(TAG_PADDED, 2, secret=self.key)
        self.encrypt = init.encryptor.update
        self.transport.write(init.wire)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.on_data(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


async def connect_many(reactor: Any, port: int, key: bytes, n: int, on_data: Any) -> list[Client]:
    clients = []
    for _ in range(n):
        endpoint = protocol.ClientCreator(reactor, Client, key, on_data)
        clients.append(await endpoint.connectTCP("127.0.0.1", port))
    return clients


async def run(reactor: Any, args: argparse.Namespace) -> None:
    secret = generate(Mode.SECURE)
    dcs = DCFactory()
    dc_port = reactor.listenTCP(0, dcs, interface="127.0.0.1").getHost().port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "twisted",
        "--log-level",
        "warn",
        "mtproxy",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--secret",
        secret.hex(),
        "--dc",
        f"2=127.0.0.1:{dc_port}",
        "--state-dir",
        args.state_dir,
        "--max-connections",
        str(max(10000, args.idle * 2)),
    ]
    if args.no_fast_mode:
        command.append("--no-fast-mode")
    proxy = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await task.deferLater(reactor, 0.1, lambda: None)
        await task.deferLater(reactor, 0.5, lambda: None)
        n = args.connections
        per = args.megabytes * (1 << 20) // n

        # Download: the DC streams, clients count.
        dcs.download, dcs.echo = per, False
        cpu0, t0 = cpu_seconds(proxy.pid), time.monotonic()
        clients = await connect_many(reactor, port, secret.key, n, lambda c, d: None)
        while sum(c.received for c in clients) < per * n:
            await task.deferLater(reactor, 0.05, lambda: None)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proxy.pid) - cpu0
        total = per * n
        print(
            f"download: {total / elapsed / 1e6:.0f} MB/s, proxy {cpu / (total / 1e9):.2f} CPU s/GB"
        )
        for c in clients:
            c.transport.loseConnection()

        # Upload: clients stream encrypted bytes, the DC counts.
        dcs.download, dcs.echo = 0, False
        sent = [0]
        clients = await connect_many(reactor, port, secret.key, n, lambda c, d: None)
        cpu0, t0 = cpu_seconds(proxy.pid), time.monotonic()

        class Pump:
            def __init__(self, client: Client) -> None:
                self.client, self.left, self.paused = client, per, False
                client.transport.registerProducer(self, True)
                self.resumeProducing()

            def resumeProducing(self) -> None:
                self.paused = False
                while self.left > 0 and not self.paused:
                    self.left -= len(CHUNK)
                    sent[0] += len(CHUNK)
                    self.client.transport.write(self.client.encrypt(CHUNK))
                if self.left <= 0:
                    self.client.transport.unregisterProducer()
                    self.client.transport.loseConnection()

            def pauseProducing(self) -> None:
                self.paused = True

            def stopProducing(self) -> None:
                self.left = 0

        for c in clients:
            Pump(c)
        await defer.DeferredList([c.done for c in clients])
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proxy.pid) - cpu0
        rate = sent[0] / elapsed / 1e6
        print(f"upload: {rate:.0f} MB/s, proxy {cpu / sent[0] * 1e9:.2f} CPU s/GB")

        # Small requests: 100-byte ping-pong, echoed by the DC.
        dcs.echo = True
        rounds = args.requests
        payload = os.urandom(100)
        remaining = [rounds * n]
        finished: defer.Deferred[None] = defer.Deferred()

        def pong(c: Client, data: bytes) -> None:
            if c.received % 100 == 0:
                remaining[0] -= 1
                if c.received < rounds * 100:
                    c.transport.write(c.encrypt(payload))
                if remaining[0] == 0:
                    finished.callback(None)

        clients = await connect_many(reactor, port, secret.key, n, pong)
        cpu0, t0 = cpu_seconds(proxy.pid), time.monotonic()
        for c in clients:
            c.transport.write(c.encrypt(payload))
        await finished
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proxy.pid) - cpu0
        print(
            f"small requests: {rounds * n / elapsed:.0f} round trips/s, "
            f"proxy {cpu / (rounds * n) * 1e6:.0f} CPU us per request"
        )
        for c in clients:
            c.transport.loseConnection()

        # Idle connections: RSS growth per handshaken, silent pair.
        dcs.echo = False
        await task.deferLater(reactor, 1.0, lambda: None)
        rss0 = rss_bytes(proxy.pid)
        idle = await connect_many(reactor, port, secret.key, args.idle, lambda c, d: None)
        for c in idle:
            c.transport.write(c.encrypt(payload))
        await task.deferLater(reactor, 2.0, lambda: None)
        rss1 = rss_bytes(proxy.pid)
        print(
            f"idle: {args.idle} pairs, proxy RSS +{(rss1 - rss0) / args.idle / 1024:.1f} kB each"
        )
        for c in idle:
            c.transport.loseConnection()
    finally:
        proxy.terminate()
        proxy.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--megabytes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200, help="round trips per connection")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections for RSS")
    parser.add_argument("--no-fast-mode", action="store_true")
    parser.add_argument("--state-dir", default="/tmp/mtproxy-tw-bench")
    args = parser.parse_args()
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
