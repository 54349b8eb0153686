"""
Direct-mode benchmark, run by hand (not part of the test suite).

Starts the proxy as a child process, a sink/source DC and N clients in this
process, all on loopback, and reports:

- download and upload throughput (MB/s) over N concurrent connections;
- the proxy's CPU seconds per GB relayed (from /proc, the child only);
- the proxy's CPU per small request (100-byte ping-pong through the relay);
- the proxy's RSS per idle connection (N handshaken, silent connections).

``--kind`` picks the secret: classic, dd (default) or ee. With ee the
clients do the fake-TLS handshake and wrap what they send in TLS records;
the proxy's mask host is a closed local port, so its TLS profiling fails at
once and it answers with random sizes.

    python bench/direct.py --connections 50 --megabytes 2000 [--kind ee] [--no-fast-mode]
        [--no-splice]

``--chain KIND`` starts a second proxy, the back, with a secret of that
kind, and makes the measured one its front (``--upstream mtproxy://...``):
the CPU figures are the front's.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from _common import (
    CHUNK,
    BenchClient,
    Meter,
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
    users_config,
)
from twisted.internet import defer, protocol

from mtproxy_tw.wire.secrets import Mode, Secret


class DC(protocol.Protocol):
    """
    Skips the proxy's init, then sends ``download`` bytes or echoes.
    """

    transport: Any

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
        if data:
            if self.factory.echo:
                self.transport.write(data)
            self.factory.count(len(data))


class DCFactory(protocol.Factory):
    noisy = False

    def __init__(self) -> None:
        self.download = 0
        self.echo = False
        self.received = 0
        self._expected = 0
        self._arrived: defer.Deferred[None] | None = None

    def expect(self, total: int) -> defer.Deferred[None]:
        """
        Fires once ``total`` bytes from the clients have arrived, counting from now.
        """
        self.received, self._expected = 0, total
        self._arrived = defer.Deferred()
        return self._arrived

    def count(self, size: int) -> None:
        self.received += size
        arrived = self._arrived
        if arrived is not None and self.received >= self._expected:
            self._arrived = None
            arrived.callback(None)

    def buildProtocol(self, addr: Any) -> DC:
        return DC(self)


async def start_back(
    reactor: Any, stack: contextlib.ExitStack, kind: str, dc: list[str]
) -> list[str]:
    """
    Start a back proxy toward the DC; return the front's ``--upstream`` options.
    """
    secret = make_secret(kind)
    port = free_port()
    extra = list(dc)
    if secret.kind is Mode.TLS:
        extra += ["--mask-host", f"127.0.0.1:{stack.enter_context(closed_port())}"]
    state = stack.enter_context(state_dir(None))
    back = await start_process(reactor, proxy_command(port, secret, state, 20000, extra), port)
    stack.callback(stop_process, back)
    return ["--upstream", f"mtproxy://127.0.0.1:{port}?secret={secret.hex()}"]


async def run(reactor: Any, args: Any) -> None:
    secret = make_secret(args.kind)
    dcs = DCFactory()
    dc_port = reactor.listenTCP(0, dcs, interface="127.0.0.1").getHost().port
    port = free_port()
    n = args.connections
    with contextlib.ExitStack() as stack:
        extra = ["--dc", f"2=127.0.0.1:{dc_port}"]
        if args.chain:  # this proxy is the front; a back proxy goes to the DC
            extra = await start_back(reactor, stack, args.chain, extra)
        if secret.kind is Mode.TLS:
            extra += ["--mask-host", f"127.0.0.1:{stack.enter_context(closed_port())}"]
        if args.no_fast_mode:
            extra.append("--no-fast-mode")
        if args.no_splice:
            extra.append("--no-splice")
        state = stack.enter_context(state_dir(args.state_dir))
        given: Secret | None = secret
        if args.users:
            extra += users_config(state, secret, args.users)
            given = None
        command = proxy_command(port, given, state, max(10000, args.idle * 2), extra)
        proxy = await start_process(reactor, command, port)
        stack.callback(stop_process, proxy)
        await sleep(reactor, 0.5)
        mode = "fast mode" if not args.no_fast_mode else "no fast mode"
        mode += ", no splice" if args.no_splice else ""
        chain = f", through a back proxy ({args.chain} secret)" if args.chain else ""
        print(
            f"direct mode, {args.kind} secret, {mode}{chain}, {n} connections, "
            f"{os.cpu_count()} CPUs (CPU figures: the {'front' if chain else 'proxy'} only)"
        )

        def make(on_data: Any) -> Any:
            return lambda: BenchClient(secret, on_data)

        # Download: the DC streams, clients count.
        per = args.megabytes * (1 << 20) // n
        total = per * n
        dcs.download, dcs.echo = per, False
        arrived = [0]
        downloaded: defer.Deferred[None] = defer.Deferred()

        def count(c: BenchClient, data: bytes) -> None:
            arrived[0] += len(data)
            if arrived[0] >= total and not downloaded.called:
                downloaded.callback(None)

        meter = Meter(proxy.pid)
        clients = await connect_many(reactor, port, n, make(count))
        await downloaded
        elapsed, cpu = meter.stop()
        print(
            f"download: {total / elapsed / 1e6:.0f} MB/s, proxy {cpu / (total / 1e9):.2f} CPU s/GB"
        )
        for c in clients:
            c.transport.loseConnection()

        # Upload: clients stream encrypted bytes, the DC counts.
        dcs.download, dcs.echo = 0, False
        clients = await connect_many(reactor, port, n, make(lambda c, d: None))
        per = -(-per // len(CHUNK)) * len(CHUNK)
        arrived_all = dcs.expect(per * n)
        meter.start()
        pumps = [Pump(c, CHUNK, per, c.transport.loseConnection) for c in clients]
        await arrived_all
        elapsed, cpu = meter.stop()
        sent = sum(p.sent for p in pumps)
        print(f"upload: {sent / elapsed / 1e6:.0f} MB/s, proxy {cpu / sent * 1e9:.2f} CPU s/GB")

        # Small requests: 100-byte ping-pong, echoed by the DC.
        dcs.echo = True
        rounds = args.requests
        payload = os.urandom(100)
        remaining = [rounds * n]
        finished: defer.Deferred[None] = defer.Deferred()

        def pong(c: BenchClient, data: bytes) -> None:
            if c.received % 100 == 0:
                remaining[0] -= 1
                if c.received < rounds * 100:
                    c.send(payload)
                if remaining[0] == 0:
                    finished.callback(None)

        clients = await connect_many(reactor, port, n, make(pong))
        meter.start()
        for c in clients:
            c.send(payload)
        await finished
        elapsed, cpu = meter.stop()
        print(
            f"small requests: {rounds * n / elapsed:.0f} round trips/s, "
            f"proxy {cpu / (rounds * n) * 1e6:.0f} CPU us per request"
        )
        for c in clients:
            c.transport.loseConnection()

        # Idle connections: RSS growth per handshaken, silent pair.
        dcs.echo = False
        await sleep(reactor, 1.0)
        rss0 = rss_bytes(proxy.pid)
        idle = await connect_many(reactor, port, args.idle, make(lambda c, d: None))
        for c in idle:
            c.send(payload)
        await sleep(reactor, 2.0)
        rss1 = rss_bytes(proxy.pid)
        print(
            f"idle: {args.idle} pairs, proxy RSS +{(rss1 - rss0) / args.idle / 1024:.1f} kB each"
        )
        for c in idle:
            c.transport.loseConnection()
        await sleep(reactor, 0.5)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--no-fast-mode", action="store_true")
    p.add_argument("--no-splice", action="store_true")
    p.add_argument(
        "--chain",
        choices=["classic", "dd", "ee"],
        help="put a back proxy with a secret of this kind between the proxy and the DC "
        "(--upstream mtproxy://...)",
    )
    args = p.parse_args()
    react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()
