"""
Middle-proxy-mode benchmark, run by hand (not part of the test suite).

Starts the proxy as a child process with an ad tag, a fake middle proxy (ME)
as another child process, and a fake config site and N clients in this
process, all on loopback, and reports:

- download and upload throughput (MB/s) over N concurrent connections;
- the proxy's CPU seconds per GB relayed (from /proc, the proxy child only;
  the fake ME's own CPU is shown alongside, to tell which side limits);
- the proxy's CPU per small request (100-byte ping-pong through the ME);
- the proxy's RSS per idle connection (N handshaken, bound sessions).

The fake ME does as little as it can: it checks the handshake like a real
one, then answers each RPC_PROXY_REQ from its first word: ``DOWN`` + size
asks for one RPC_PROXY_ANS of that many bytes, ``SINK`` is dropped, and
anything else is echoed. Downloads are requests for ``--part-kib`` parts
with ``--window`` of them in flight per client, as an app fetching a file.

    python bench/middle.py --connections 50 --megabytes 1000 [--kind ee]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import struct
import subprocess
import sys
from typing import Any

from _common import (
    BenchClient,
    Meter,
    Pump,
    client_tag,
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
from twisted.internet import defer

from mtproxy_tw._twisted import tune_malloc
from mtproxy_tw.testing import FakeConfigServer, FakeMEProtocol, FakeMiddleProxy, config_text
from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.secrets import Mode, Secret
from mtproxy_tw.wire.transports import codec_for_tag

_u32 = struct.Struct("<I")
_REQ = _u32.pack(rpc.RPC_PROXY_REQ)
_ANS = _u32.pack(rpc.RPC_PROXY_ANS) + bytes(4)  # type, flags
#: RPC_PROXY_REQ up to the optional extra section: type, flags, conn_id, two addresses.
_REQ_HEAD = 4 + 4 + 8 + 20 + 20
#: Flags announcing that extra section (the ad tag is in it).
_FLAGS_EXTRA = 0x0C
DOWN, SINK, PING = b"DOWN", b"SINK", b"PING"
MAX_PART = 1 << 20
BLOB = memoryview(os.urandom(MAX_PART))
PHASES = ("download", "upload", "small", "setup", "idle")


# -- the fake ME (child process)


class BenchME(FakeMEProtocol):
    """
    The handshake of :class:`FakeMEProtocol`, then the cheapest answers:
    all those of one read go out in one encrypted write.
    """

    def __init__(self, factory: FakeMiddleProxy) -> None:
        super().__init__(factory)
        self._out: list[bytes] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.bufferSize = 1 << 18
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._out:
            out, self._out = self._out, []
            self.send(*out)

    def _message(self, payload: bytes) -> None:
        if payload[:4] != _REQ:
            msg = rpc.parse_message(payload)
            if isinstance(msg, rpc.Ping):
                self._out.append(rpc.build_pong(msg.ping_id))
            return
        (flags,) = _u32.unpack_from(payload, 4)
        pos = _REQ_HEAD
        if flags & _FLAGS_EXTRA:
            pos += 4 + _u32.unpack_from(payload, pos)[0]
        command = payload[pos : pos + 4]
        if command == SINK:
            return
        head = _ANS + payload[8:16]
        if command == DOWN:
            (size,) = _u32.unpack_from(payload, pos + 4)
            self._out.append(head + BLOB[:size])
        else:
            self._out.append(head + payload[pos:])


class BenchMEFactory(FakeMiddleProxy):
    def buildProtocol(self, addr: Any) -> BenchME:
        return BenchME(self)


def serve_me() -> None:
    """
    Run the fake ME on a free loopback port; print the port, then serve.
    """
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    tune_malloc()
    listening = reactor.listenTCP(0, BenchMEFactory(reactor=reactor), interface="127.0.0.1")
    print(listening.getHost().port, flush=True)
    reactor.run()


# -- the clients


class MiddleClient(BenchClient):
    """
    Sends packets in its transport framing; decrypts what it receives to
    find the answers' length words, and reports each answer's size to
    ``on_answer`` (without copying the answers).
    """

    def __init__(self, secret: Secret, on_answer: Any) -> None:
        super().__init__(secret, lambda c, d: None)
        self.codec = codec_for_tag(client_tag(secret))
        self.decrypt = self.init.decryptor.update
        self.on_answer = on_answer
        self.answers = 0
        self.requested = 0
        self._head = b""
        self._left = 0
        self._size = 0

    def packet(self, payload: bytes) -> None:
        self.send(self.codec.encode(payload))

    def ping(self) -> None:
        self.packet(PING + bytes(4))

    def got(self, data: bytes) -> None:
        data = self.decrypt(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self.answers += 1
                    self.on_answer(self, self._size)
                continue
            need = 4 - len(self._head)
            self._head += data[pos : pos + need]
            pos += need
            if len(self._head) == 4:
                # Intermediate length word; padded intermediate adds 0..3 bytes.
                self._left = _u32.unpack(self._head)[0] & 0x7FFFFFFF
                self._size = self._left & ~3
                self._head = b""


# -- the benchmark


async def middle_proxy(
    reactor: Any, stack: contextlib.ExitStack, extra: list[str]
) -> tuple[FakeConfigServer, subprocess.Popen[bytes]]:
    """
    Start the fake ME child and the fake config site; add their options.
    """
    me = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--fake-me"], stdout=subprocess.PIPE
    )
    stack.callback(stop_process, me)
    assert me.stdout is not None
    line = me.stdout.readline()
    if not line:
        raise RuntimeError("the fake ME did not start")
    me_port = int(line)
    site = FakeConfigServer(
        reactor,
        config_v4=config_text({2: [("127.0.0.1", me_port)]}, default=2),
        config_v6=config_text({2: [("::1", me_port)]}, default=2),
        ip=b"127.0.0.1\n",
    )
    site_port = reactor.listenTCP(0, site, interface="127.0.0.1").getHost().port
    extra += [
        "--ad-tag",
        os.urandom(16).hex(),
        "--nat-ip",
        "127.0.0.1",
        "--proxy-config-url",
        site.url(site_port, "getProxyConfig"),
        "--proxy-config-v6-url",
        site.url(site_port, "getProxyConfigV6"),
        "--proxy-secret-url",
        site.url(site_port, "getProxySecret"),
        "--ip-lookup-url",
        site.url(site_port, "ip"),
    ]
    return site, me


async def run(reactor: Any, args: argparse.Namespace) -> None:
    secret = make_secret(args.kind)
    part = args.part_kib << 10
    if not 0 < part <= MAX_PART:
        raise SystemExit(f"--part-kib: at most {MAX_PART >> 10}")
    n = args.connections
    phases = set(args.phases.split(","))
    if not phases <= set(PHASES):
        raise SystemExit(f"--phases: of {','.join(PHASES)}")
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        site, me = await middle_proxy(reactor, stack, extra)
        if secret.kind is Mode.TLS:
            extra += ["--mask-host", f"127.0.0.1:{stack.enter_context(closed_port())}"]
        state = stack.enter_context(state_dir(args.state_dir))
        port = free_port()
        command = proxy_command(port, secret, state, max(10000, args.idle * 2), extra)
        if args.profile:
            # The proxy under cProfile; the statistics are written when it exits.
            command[1:3] = ["-c", _PROFILED, args.profile]
        proxy = await start_process(reactor, command, port)
        stack.callback(stop_process, proxy)
        if args.profile:
            stack.callback(print_profile, args.profile)
            stack.callback(stop_process, proxy)
        paths = ("/getProxyConfig", "/getProxyConfigV6", "/getProxySecret")
        for _ in range(100):
            if all(site.requests[path] for path in paths):
                break
            await sleep(reactor, 0.1)
        else:
            raise RuntimeError("the proxy did not fetch its config from the fake site")
        await sleep(reactor, 0.5)
        print(
            f"middle mode, {args.kind} secret, {n} connections, "
            f"{args.part_kib} KiB parts x {args.window} in flight, {os.cpu_count()} CPUs"
        )

        def make(on_answer: Any) -> Any:
            return lambda: MiddleClient(secret, on_answer)

        # Warm-up: the first client makes the pool connect to the fake ME.
        warmed: defer.Deferred[None] = defer.Deferred()
        (first,) = await connect_many(reactor, port, 1, make(lambda c, s: warmed.callback(None)))
        first.ping()
        await warmed.addTimeout(20, reactor)
        first.transport.loseConnection()
        await sleep(reactor, 0.5)

        proxy_meter, me_meter = Meter(proxy.pid), Meter(me.pid)

        def start() -> None:
            proxy_meter.start()
            me_meter.start()

        def stop() -> tuple[float, float, float]:
            elapsed, cpu = proxy_meter.stop()
            return elapsed, cpu, me_meter.stop()[1]

        parts = max(1, math.ceil(args.megabytes * (1 << 20) / n / part))
        if "download" in phases:
            # Download: each client asks for parts, ``window`` at a time.
            total = parts * part * n
            down = DOWN + _u32.pack(part)
            arrived = [0]
            downloaded: defer.Deferred[None] = defer.Deferred()

            def fetched(c: MiddleClient, size: int) -> None:
                arrived[0] += size
                if c.requested < parts:
                    c.requested += 1
                    c.packet(down)
                elif arrived[0] >= total and not downloaded.called:
                    downloaded.callback(None)

            clients = await connect_many(reactor, port, n, make(fetched))
            start()
            for c in clients:
                for _ in range(min(args.window, parts)):
                    c.requested += 1
                    c.packet(down)
            await downloaded
            elapsed, cpu, me_cpu = stop()
            print(
                f"download: {total / elapsed / 1e6:.0f} MB/s, proxy {cpu / (total / 1e9):.2f} "
                f"CPU s/GB (fake ME {me_cpu / (total / 1e9):.2f})"
            )
            for c in clients:
                c.transport.loseConnection()

        if "upload" in phases:
            # Upload: clients stream ``SINK`` parts, then a ping whose echo
            # shows that everything before it went through.
            per = parts * part
            left = [n]
            uploaded: defer.Deferred[None] = defer.Deferred()

            def acked(c: MiddleClient, size: int) -> None:
                left[0] -= 1
                if not left[0]:
                    uploaded.callback(None)

            clients = await connect_many(reactor, port, n, make(acked))
            start()
            block = SINK + BLOB[: part - 4]
            pumps = [Pump(c, c.codec.encode(block), per, c.ping) for c in clients]
            await uploaded
            elapsed, cpu, me_cpu = stop()
            sent = sum(p.sent // len(p.block) for p in pumps) * part
            print(
                f"upload: {sent / elapsed / 1e6:.0f} MB/s, proxy {cpu / sent * 1e9:.2f} "
                f"CPU s/GB (fake ME {me_cpu / sent * 1e9:.2f})"
            )
            for c in clients:
                c.transport.loseConnection()

        payload = PING + os.urandom(96)
        if "small" in phases:
            # Small requests: 100-byte ping-pong, echoed by the fake ME.
            rounds = args.requests
            remaining = [rounds * n]
            finished: defer.Deferred[None] = defer.Deferred()

            def pong(c: MiddleClient, size: int) -> None:
                remaining[0] -= 1
                if c.answers < rounds:
                    c.packet(payload)
                if remaining[0] == 0:
                    finished.callback(None)

            clients = await connect_many(reactor, port, n, make(pong))
            start()
            for c in clients:
                c.packet(payload)
            await finished
            elapsed, cpu, me_cpu = stop()
            print(
                f"small requests: {rounds * n / elapsed:.0f} round trips/s, "
                f"proxy {cpu / (rounds * n) * 1e6:.0f} CPU us per request "
                f"(fake ME {me_cpu / (rounds * n) * 1e6:.0f})"
            )
            for c in clients:
                c.transport.loseConnection()

        if "idle" in phases:
            # Idle connections: RSS growth per handshaken client with a session.
            await sleep(reactor, 1.0)
            rss0 = rss_bytes(proxy.pid)
            idle = await connect_many(reactor, port, args.idle, make(lambda c, s: None))
            for c in idle:
                c.packet(payload)
            await sleep(reactor, 2.0)
            rss1 = rss_bytes(proxy.pid)
            answered = sum(c.answers for c in idle)
            print(
                f"idle: {args.idle} clients ({answered} answered), "
                f"proxy RSS +{(rss1 - rss0) / args.idle / 1024:.1f} kB each"
            )
            for c in idle:
                c.transport.loseConnection()
            await sleep(reactor, 0.5)

        if "setup" in phases:
            # Connection set-up: handshake, session and first round trip; then close.
            count = args.setup
            answered = [0]
            all_answered: defer.Deferred[None] = defer.Deferred()

            def first(c: MiddleClient, size: int) -> None:
                answered[0] += 1
                if answered[0] == count:
                    all_answered.callback(None)

            start()
            fresh = await connect_many(reactor, port, count, make(first))
            for c in fresh:
                c.packet(payload)
            await all_answered.addTimeout(60, reactor)
            elapsed, cpu, me_cpu = stop()
            start()
            for c in fresh:
                c.transport.loseConnection()
            await sleep(reactor, 1.0)
            _, close_cpu, _ = stop()
            print(
                f"set-up: {count / elapsed:.0f} clients/s, proxy {cpu / count * 1e6:.0f} CPU us "
                f"per client to its first answer, {close_cpu / count * 1e6:.0f} to close"
            )


#: Runs ``twist`` under cProfile; the statistics are written once the reactor
#: has stopped (twist then ends itself with the signal it got, skipping atexit).
_PROFILED = """
import cProfile, sys
from twisted.internet import reactor
from twisted.application.twist._twist import Twist
path = sys.argv[1]
del sys.argv[1]
profile = cProfile.Profile()
def dump():
    profile.disable()
    profile.dump_stats(path)
reactor.addSystemEventTrigger("after", "shutdown", dump)
profile.enable()
Twist.main()
"""


def print_profile(path: str, top: int = 25) -> None:
    """
    The proxy's functions that took the most time of their own.
    """
    import pstats

    if os.path.exists(path):
        pstats.Stats(path, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main() -> None:
    if sys.argv[1:] == ["--fake-me"]:
        serve_me()
        return
    p = parser(__doc__)
    p.add_argument("--part-kib", type=int, default=128, help="size of a download/upload part")
    p.add_argument("--window", type=int, default=4, help="download parts in flight per client")
    p.add_argument("--phases", default=",".join(PHASES), help="what to measure (comma-separated)")
    p.add_argument("--setup", type=int, default=1000, help="clients for the set-up measurement")
    p.add_argument(
        "--profile", metavar="FILE", help="run the proxy under cProfile, write FILE, print the top"
    )
    args = p.parse_args()
    react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()
