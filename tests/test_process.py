"""
The real command: ``python -m twisted mtproxy`` as a child process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mtproxy_tw.testing import FakeDC, connect_client
from mtproxy_tw.wire.secrets import parse_secret

reactor: Any = _reactor
SECRET = parse_secret("alice=dd" + "5a" * 16, "x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, ProcessDone | ProcessTerminated)
        self.ended.callback((value.exitCode, value.signal))


class CommandTests(TestCase):
    timeout = 60

    async def _serve_and_drain(self) -> None:
        fake = FakeDC(reactor)
        dc = reactor.listenTCP(0, fake, interface="127.0.0.1")
        self.addCleanup(dc.stopListening)
        port = free_port()
        child = Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-format",
                "text",
                "mtproxy",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--secret",
                f"alice={SECRET.hex()}",
                "--dc",
                f"2=127.0.0.1:{dc.getHost().port}",
                "--state-dir",
                self.mktemp(),
                "--public-host",
                "proxy.example",
                "--drain-timeout",
                "1",
            ],
            env=env,
        )
        self.addCleanup(lambda: child.ended if child.ended.called else self._kill(process, child))
        deadline = reactor.seconds() + 30
        while b"tg://proxy" not in child.output:
            if child.ended.called or reactor.seconds() > deadline:
                self.fail(f"the proxy did not start: {child.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)
        client = await connect_client(reactor, "127.0.0.1", port, SECRET)
        payload = b"\x01" + os.urandom(99)
        self.assertEqual(await client.request(payload).addTimeout(5, reactor), payload)
        started = reactor.seconds()
        process.signalProcess("TERM")
        code, sig = await child.ended.addTimeout(10, reactor)
        # twist ends a run stopped by a signal by re-raising that signal.
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], child.output.decode())
        self.assertIn(b"Main loop terminated", child.output)
        self.assertLess(reactor.seconds() - started, 5)
        await client.lost
        log = child.output.decode()
        self.assertIn(f"tg://proxy?server=proxy.example&port={port}&secret={SECRET.hex()}", log)
        # Outside the links, the secret never reaches the log.
        self.assertEqual(log.count(SECRET.key.hex()), 2, log)
        self.assertNotIn("Traceback", log)

    async def _kill(self, process: Any, child: Child) -> None:
        os.kill(process.pid, signal.SIGKILL)
        await child.ended

    def test_serves_and_drains_on_sigterm(self) -> Deferred[None]:
        return ensureDeferred(self._serve_and_drain())

    async def _out_of_descriptors(self) -> None:
        port = free_port()
        child = Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # ulimit -n sets the hard limit too: the proxy cannot raise it.
        process = reactor.spawnProcess(
            child,
            "/bin/sh",
            [
                "sh",
                "-c",
                'ulimit -n 48 && exec "$0" "$@"',
                sys.executable,
                "-m",
                "twisted",
                "--log-format",
                "text",
                "mtproxy",
                # More than fit: an explicit number is kept, with a warning.
                "--max-connections",
                "10000",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--secret",
                f"alice={SECRET.hex()}",
                "--state-dir",
                self.mktemp(),
                "--public-host",
                "proxy.example",
            ],
            env=env,
        )
        self.addCleanup(lambda: child.ended if child.ended.called else self._kill(process, child))
        deadline = reactor.seconds() + 30
        while b"tg://proxy" not in child.output:
            if child.ended.called or reactor.seconds() > deadline:
                self.fail(f"the proxy did not start: {child.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)
        factory = Factory.forProtocol(Protocol)
        clients: list[Protocol] = []
        for _ in range(80):
            clients.append(await _connect(port, factory))

        def close() -> None:
            for c in clients:
                if c.transport is not None:
                    c.transport.loseConnection()

        self.addCleanup(close)
        told = (b"cannot accept clients", b"Could not accept", b"EMFILE recovery")
        deadline = reactor.seconds() + 10
        while not any(t in child.output for t in told):
            if child.ended.called or reactor.seconds() > deadline:
                self.fail(f"no word of the refused clients: {child.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)
        process.signalProcess("TERM")
        await child.ended.addTimeout(10, reactor)
        log = child.output.decode()
        lines = log.splitlines()
        start = [line for line in lines if "open file limit 48 (hard 48)" in line]
        self.assertEqual(len(start), 1, log)
        self.assertIn("#warn]", start[0])
        self.assertIn("LimitNOFILE=", start[0])
        self.assertIn("ulimit -n", start[0])
        refused = [line for line in lines if "cannot accept clients" in line]
        self.assertIn(len(refused), (1, 2), log)
        self.assertTrue(all("#warn]" in line for line in refused), refused)
        self.assertNotIn("Could not accept", log)
        self.assertNotIn("EMFILE", log)
        counted = sum(int(n) for n in re.findall(r"(\d+) connections closed unserved", log))
        self.assertGreater(counted, 0, log)
        self.assertLessEqual(counted, 80)
        self.assertNotIn("Traceback", log)

    def test_out_of_descriptors(self) -> Deferred[None]:
        """
        Under a low open-file limit the proxy warns at start, and the clients
        it cannot accept are told in one warning with a count, not a line
        each.
        """
        return ensureDeferred(self._out_of_descriptors())


async def _connect(port: int, factory: IProtocolFactory) -> Protocol:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    protocol = await endpoint.connect(factory)
    assert isinstance(protocol, Protocol)
    return protocol
