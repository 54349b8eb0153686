"""
Starting as ``twistd`` does: ``privilegedStartService`` (with the
privileges, before ``--uid``/``--gid`` drop them), then ``startService``.

Each listener must listen once: in the privileged start, not again in the
other.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet import reactor as _reactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mtproxy_tw import tap
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.testing import FakeDC, connect_client
from mtproxy_tw.wire.secrets import parse_secret

from .test_process import Child, free_port

reactor: Any = _reactor
LOCAL = "127.0.0.1"
SECRET = parse_secret("alice=dd" + "5a" * 16, "x")


def listening_ports(factory: object) -> list[tcp.Port]:
    """
    The reactor's listening TCP ports that serve ``factory``.
    """
    return [
        reader
        for reader in reactor.getReaders()
        if isinstance(reader, tcp.Port) and reader.factory is factory
    ]


class PrivilegedStartTests(TestCase):
    timeout = 30

    async def _start_as_twistd(self) -> None:
        fake = FakeDC(reactor)
        dc = reactor.listenTCP(0, fake, interface=LOCAL)
        self.addCleanup(dc.stopListening)
        options = tap.Options()
        options.parseOptions(
            [
                "--listen",
                f"tcp:0:interface={LOCAL}",
                "--secret",
                f"alice={SECRET.hex()}",
                "--dc",
                f"2={LOCAL}:{dc.getHost().port}",
                "--state-dir",
                self.mktemp(),
                "--public-host",
                "proxy.example",
            ]
        )
        top = tap.makeService(options, reactor)
        [proxy] = [s for s in IServiceCollection(top) if isinstance(s, ProxyService)]
        top.privilegedStartService()
        self.assertEqual(len(listening_ports(proxy.factory)), 1)
        top.startService()
        self.addCleanup(top.stopService)
        [port] = await proxy.listening()
        self.assertEqual(listening_ports(proxy.factory), [port])
        client = await connect_client(reactor, LOCAL, port.getHost().port, SECRET)
        self.assertEqual(
            await client.request(b"\x01pingpon").addTimeout(5, reactor), b"\x01pingpon"
        )
        client.transport.loseConnection()
        await client.lost
        await top.stopService()
        self.assertEqual(listening_ports(proxy.factory), [])

    def test_privileged_then_normal_start_listens_once(self) -> Deferred[None]:
        return ensureDeferred(self._start_as_twistd())


class TwistdTests(TestCase):
    timeout = 60

    async def _twistd(self) -> None:
        fake = FakeDC(reactor)
        dc = reactor.listenTCP(0, fake, interface=LOCAL)
        self.addCleanup(dc.stopListening)
        # A fixed port, not 0: listening twice on it fails, and says so.
        port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # As root, --uid/--gid take the switch-user path; to the same user,
        # so the state directory stays writable.
        ids = ["--uid", str(os.getuid()), "--gid", str(os.getgid())] if os.getuid() == 0 else []
        child = Child()
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon",
                "--pidfile=",
                "--logfile=-",
                *ids,
                "mtproxy",
                "--listen",
                f"tcp:{port}:interface={LOCAL}",
                "--secret",
                f"alice={SECRET.hex()}",
                "--dc",
                f"2={LOCAL}:{dc.getHost().port}",
                "--state-dir",
                self.mktemp(),
                "--public-host",
                "proxy.example",
            ],
            env=env,
        )

        def kill() -> Any:
            if child.ended.called:
                return None
            os.kill(process.pid, signal.SIGKILL)
            return child.ended

        self.addCleanup(kill)
        deadline = reactor.seconds() + 30
        while b"tg://proxy" not in child.output:
            if child.ended.called or reactor.seconds() > deadline:
                self.fail(f"twistd did not start the proxy: {child.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)
        client = await connect_client(reactor, LOCAL, port, SECRET)
        self.assertEqual(
            await client.request(b"\x01pingpon").addTimeout(5, reactor), b"\x01pingpon"
        )
        process.signalProcess("TERM")
        await client.lost
        code, sig = await child.ended.addTimeout(10, reactor)
        log = child.output.decode()
        # twistd ends a run stopped by a signal by re-raising that signal.
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], log)
        self.assertIn("Main loop terminated", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Address already in use", log)
        self.assertNotIn("Unhandled", log)

    def test_twistd_starts_and_stops(self) -> Deferred[None]:
        """
        ``twistd -n mtproxy`` starts without a traceback and exits 0 on
        SIGTERM.
        """
        return ensureDeferred(self._twistd())
