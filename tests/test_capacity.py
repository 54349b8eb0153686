"""
Capacity follows the descriptors: a real ``twist mtproxy`` under a low
open-file limit refuses the clients beyond ``--max-connections auto`` by its
own limit, not by failing to accept them.
"""

from __future__ import annotations

import os
import sys

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw.doctor.local import check_open_files
from mtproxy_tw.doctor.result import Status
from mtproxy_tw.testing import FakeDC, ObfuscatedClient, connect_client
from tests.test_process import SECRET, Child, free_port, reactor

#: The open-file limit the proxy runs under (soft and hard).
LIMIT = 200
#: What it holds: (200 - 64 spare - 1 listener) // 2 descriptors per client.
FITS = 67
#: Clients beyond that: enough that, accepted, they would need more
#: descriptors than are left.
EXTRA = 40


class CapacityTests(TestCase):
    timeout = 90

    async def _refused_at_the_bound(self) -> None:
        dc = reactor.listenTCP(0, FakeDC(reactor), interface="127.0.0.1")
        self.addCleanup(dc.stopListening)
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
                f'ulimit -n {LIMIT} && exec "$0" "$@"',
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
                "0",
            ],
            env=env,
        )

        async def kill() -> None:
            if not child.ended.called:
                process.signalProcess("KILL")
                await child.ended

        self.addCleanup(lambda: ensureDeferred(kill()))
        deadline = reactor.seconds() + 30
        while b"tg://proxy" not in child.output:
            if child.ended.called or reactor.seconds() > deadline:
                self.fail(f"the proxy did not start: {child.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIn(
            f"--max-connections {FITS} (from the open-file limit {LIMIT}: "
            "2 descriptors per direct client, 65 reserved)",
            child.output.decode(),
        )
        clients: list[ObfuscatedClient] = []

        def close() -> None:
            for c in clients:
                if c.transport is not None:
                    c.transport.abortConnection()

        self.addCleanup(close)
        payload = b"\x01" + os.urandom(99)
        for _ in range(FITS):
            client = await connect_client(reactor, "127.0.0.1", port, SECRET)
            clients.append(client)
            self.assertEqual(await client.request(payload).addTimeout(10, reactor), payload)
        for _ in range(EXTRA):
            try:
                client = await connect_client(reactor, "127.0.0.1", port, SECRET)
            except ConnectError:
                continue  # closed before the connect was through: refused
            clients.append(client)
            # Closed by the proxy at once, unanswered.
            await client.lost.addTimeout(10, reactor)
            self.assertEqual(client.bytes_received, 0)
        # The established ones are untouched.
        for client in clients[:FITS]:
            self.assertEqual(await client.request(payload).addTimeout(10, reactor), payload)
        process.signalProcess("TERM")
        await child.ended.addTimeout(15, reactor)
        log = child.output.decode()
        full = [line for line in log.splitlines() if "--max-connections is full" in line]
        self.assertEqual(len(full), 1, log)
        self.assertIn("#warn]", full[0])
        self.assertIn("refused 1 new connection(s)", full[0])
        for absent in ("cannot accept clients", "Could not accept", "EMFILE", "Traceback"):
            self.assertNotIn(absent, log)
        self.assertNotIn("open file limit", log)  # nothing to warn about: the limit fits

    def test_refused_at_the_bound(self) -> Deferred[None]:
        """
        Under ``ulimit -n 200`` the default --max-connections is what fits;
        the clients beyond it are refused by the proxy's limit, one warning
        says so, and no accept ever fails.
        """
        return ensureDeferred(self._refused_at_the_bound())


class DoctorTests(SynchronousTestCase):
    def test_auto_is_what_the_hard_limit_holds(self) -> None:
        """
        ``mtproxy-tw doctor`` says what --max-connections auto comes to: the
        proxy raises its soft limit to the hard one.
        """
        result = check_open_files(
            lambda: (1024, LIMIT), None, middle=False, pool_max=0, listeners=1
        )
        self.assertIs(result.status, Status.OK)
        self.assertIn(f"--max-connections {FITS} (from the open-file limit {LIMIT}", result.detail)
