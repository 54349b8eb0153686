"""
What Twisted alone costs for the set-up that ``bench/middle.py --phases
setup`` measures, run by hand (not part of the test suite).

A child process runs the least a Twisted server can do for that pattern: it
accepts a client, arms a timer (as the proxy's handshake timeout, replaced
by a longer one at the first read as the proxy's idle check), reads the 64
bytes of an init and then a 104-byte packet, and answers that with one
write of 108 bytes. No cryptography, no framing, no session. The
clients connect one after the other as the middle-mode bench's do, then
all send their packet, and the script reports the server's CPU per client
to its first answer and per close, from /proc.

The difference between this figure and the proxy's in the same run is what
the proxy's own work costs per client: handshake, replay check, session,
framing and encryption.

    python bench/floor.py [--setup 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from _common import Meter, free_port, react, sleep, start_process, stop_process
from twisted.internet import defer, protocol

INIT, PACKET, ANSWER = 64, 104, 108

#: The server child: the least the proxy's reactor does per client.
_SERVER = f"""
import sys
from twisted.internet import endpoints, protocol, reactor

class Least(protocol.Protocol):
    read = 0
    def connectionMade(self):
        self.timer = reactor.callLater(10, self.transport.abortConnection)
    def dataReceived(self, data):
        before, self.read = self.read, self.read + len(data)
        if not before:  # as the proxy's handshake timer gives way to its idle check
            self.timer.cancel()
            self.timer = reactor.callLater(600, self.transport.abortConnection)
        if before < {INIT + PACKET} <= self.read:
            self.transport.write(bytes({ANSWER}))
    def connectionLost(self, reason):
        if self.timer.active():
            self.timer.cancel()

factory = protocol.Factory.forProtocol(Least)
factory.noisy = False
endpoint = endpoints.serverFromString(reactor, "tcp:" + sys.argv[1] + ":interface=127.0.0.1")
endpoint.listen(factory)
reactor.run()
"""


class Client(protocol.Protocol):
    def __init__(self, answered: Any) -> None:
        self.answered = answered
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.done = False

    def connectionMade(self) -> None:
        self.transport.write(os.urandom(INIT))
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self.done:  # the answer may come in more than one read
            return
        self.done = True
        self.answered()


def _countdown(count: int, done: defer.Deferred[None]) -> Any:
    left = [count]

    def answered() -> None:
        left[0] -= 1
        if not left[0]:
            done.callback(None)

    return answered


async def run(reactor: Any, args: argparse.Namespace) -> None:
    port = free_port()
    server = await start_process(reactor, [sys.executable, "-c", _SERVER, str(port)], port)
    try:
        await sleep(reactor, 0.5)
        meter = Meter(server.pid)
        count = args.setup
        print(f"Twisted alone, {count} clients, {os.cpu_count()} CPUs")
        for _ in range(args.repeat):
            done: defer.Deferred[None] = defer.Deferred()
            answered = _countdown(count, done)
            meter.start()
            clients = []
            for _ in range(count):
                client = Client(answered)
                creator = protocol.ClientCreator(reactor, lambda c=client: c)
                await creator.connectTCP("127.0.0.1", port)
                await client.ready
                clients.append(client)
            for client in clients:
                client.transport.write(os.urandom(PACKET))
            await done.addTimeout(60, reactor)
            elapsed, cpu = meter.stop()
            meter.start()
            for client in clients:
                client.transport.loseConnection()
            await sleep(reactor, 1.0)
            _, close_cpu = meter.stop()
            print(
                f"set-up: {count / elapsed:.0f} clients/s, server {cpu / count * 1e6:.0f} CPU us "
                f"per client to its first answer, {close_cpu / count * 1e6:.0f} to close"
            )
    finally:
        stop_process(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setup", type=int, default=3000, help="clients per round")
    p.add_argument("--repeat", type=int, default=3, help="rounds")
    args = p.parse_args()
    react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()
