"""
The shipped systemd units (``contrib/systemd/``): ``systemd-analyze verify``
finds nothing to say, their command lines are options the proxy accepts,
and the socket-activated one serves clients on a socket it inherits.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtproxy_tw import tap
from mtproxy_tw.services.descriptors import descriptors_needed
from mtproxy_tw.testing import FakeDC, connect_client, connect_raw
from mtproxy_tw.wire.secrets import parse_secret

from .test_process import Child

reactor: Any = _reactor

CONTRIB = Path(__file__).parent.parent / "contrib" / "systemd"
SERVICES = ("mtproxy-tw.service", "mtproxy-tw-standalone.service")
UNITS = (*SERVICES, "mtproxy-tw.socket")
PROGRAM = "/opt/mtproxy-tw/bin/twist"
CONFIG = "/etc/mtproxy-tw/mtproxy-tw.toml"


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """
    A unit file's sections, each key with every value it is given, lines
    ending in a backslash joined to the next (as systemd reads them).
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    logical = ""
    for line in path.read_text().splitlines():
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical, line = "", logical + line
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            current = sections.setdefault(stripped.strip("[]"), {})
            continue
        key, _, value = stripped.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def proxy_arguments(service: str, state: Path) -> tuple[list[str], list[str]]:
    """
    A service's ``ExecStart``: the program part (up to the ``mtproxy``
    plugin name) and the proxy's options, with the specifier ``%S`` and the
    config file's path made this test's.
    """
    [line] = read_unit(CONTRIB / service)["Service"]["ExecStart"]
    words = shlex.split(line)
    cut = words.index("mtproxy") + 1
    program, options = words[:cut], words[cut:]
    options = [
        w.replace("%S", str(state)).replace(CONFIG, str(CONTRIB / "mtproxy-tw.toml"))
        for w in options
    ]
    return program, options


class UnitFileTests(SynchronousTestCase):
    def verify(self, replace: tuple[str, str] | None = None) -> str:
        """
        ``systemd-analyze verify`` of copies of the units, with a program
        that exists on this machine; what it said.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest("systemd-analyze is not installed (the systemd package)")
        directory = Path(self.mktemp())
        directory.mkdir()
        for name in UNITS:
            text = (CONTRIB / name).read_text().replace(PROGRAM, sys.executable)
            if replace is not None:
                text = text.replace(*replace)
            (directory / name).write_text(text)
        done = subprocess.run(
            [analyze, "verify", "--man=no", *(str(directory / n) for n in UNITS)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        )
        said = (done.stdout + done.stderr).strip()
        self.assertEqual(done.returncode, 0, said)
        return said

    def test_verify(self) -> None:
        """
        systemd finds nothing wrong (it warns, and still exits 0, for an
        unknown key or an unknown system call group: the output is checked).
        """
        self.assertEqual(self.verify(), "")

    def test_verify_speaks_up(self) -> None:
        """
        The check above can fail: a misspelt key is reported.
        """
        said = self.verify(("ProtectHome=yes", "ProtectHom=yes"))
        self.assertIn("ProtectHom", said)

    def test_exec_start_parses(self) -> None:
        """
        Each service's ``ExecStart`` (with the shipped example config) is a
        command line ``twist mtproxy`` accepts.
        """
        for service in SERVICES:
            state = Path(self.mktemp())
            program, arguments = proxy_arguments(service, state)
            self.assertEqual(program, [PROGRAM, "--log-format=text", "mtproxy"])
            self.assertFalse([a for a in arguments if "%" in a], arguments)
            options = tap.Options()
            options.parseOptions(arguments)
            self.assertEqual(options["state-dir"], state / "mtproxy-tw")
            self.assertEqual(len(options["listen"]), 1)
            self.assertEqual(options["config"], str(CONTRIB / "mtproxy-tw.toml"))

    def test_settings(self) -> None:
        """
        What the docs promise of the units.
        """
        socket_unit = read_unit(CONTRIB / "mtproxy-tw.socket")
        self.assertEqual(socket_unit["Socket"]["ListenStream"], ["443"])
        options = tap.Options()
        options.parseOptions(["--config", str(CONTRIB / "mtproxy-tw.toml")])
        for service in SERVICES:
            unit = read_unit(CONTRIB / service)["Service"]
            self.assertEqual(unit["ExecReload"], ["/bin/kill -HUP $MAINPID"], service)
            self.assertEqual(unit["DynamicUser"], ["yes"])
            self.assertEqual(unit["StateDirectory"], ["mtproxy-tw"])
            self.assertIn("--state-dir %S/mtproxy-tw", unit["ExecStart"][0])
            for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
                self.assertEqual(unit[key], ["yes"], key)
            self.assertEqual(unit["ProtectSystem"], ["strict"])
            self.assertIn("@system-service", unit["SystemCallFilter"])
            # Room for the example config's --max-connections.
            need = descriptors_needed(options["max-connections"], middle=False)
            self.assertGreaterEqual(int(unit["LimitNOFILE"][0]), need)
        activated = read_unit(CONTRIB / "mtproxy-tw.service")
        self.assertIn("mtproxy-tw.socket", activated["Unit"]["Requires"])
        self.assertEqual(activated["Service"]["AmbientCapabilities"], [""])
        self.assertIn(
            "--listen systemd:domain=INET6:index=0", activated["Service"]["ExecStart"][0]
        )
        standalone = read_unit(CONTRIB / "mtproxy-tw-standalone.service")["Service"]
        self.assertEqual(standalone["AmbientCapabilities"], ["CAP_NET_BIND_SERVICE"])
        self.assertEqual(standalone["CapabilityBoundingSet"], ["CAP_NET_BIND_SERVICE"])


def _ipv6_loopback_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return int(s.getsockname()[1])
    except OSError:
        return None


class SocketActivationTests(TestCase):
    timeout = 90

    async def _serve(self, *extra: str) -> None:
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise self.skipTest("systemd-socket-activate is not installed (the systemd package)")
        port = _ipv6_loopback_port()
        if port is None:
            raise self.skipTest("no IPv6 loopback here")
        fake = FakeDC(reactor)
        dc = reactor.listenTCP(0, fake, interface="127.0.0.1")
        self.addCleanup(dc.stopListening)
        state = Path(self.mktemp())
        program, arguments = proxy_arguments("mtproxy-tw.service", state)
        # As systemd runs it, with this machine's Python for the program and
        # the fake DC for Telegram's.
        command = [
            activate,
            # systemd names every descriptor it passes; Twisted wants the names.
            "--fdname=mtproxy-tw.socket",
            # It passes on none of its own environment unless told.
            "--setenv=PYTHONPATH",
            "--listen",
            f"[::1]:{port}",
            sys.executable,
            "-m",
            "twisted",
            *program[1:],
            *arguments,
            "--dc",
            f"2=127.0.0.1:{dc.getHost().port}",
            "--drain-timeout",
            "1",
            *extra,
        ]
        child = Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        process = reactor.spawnProcess(child, activate, command, env=env)

        async def stop() -> None:
            if not child.ended.called:
                os.kill(process.pid, signal.SIGKILL)
                await child.ended

        self.addCleanup(stop)
        await self.until(child, b"Listening on")
        # The proxy starts at the first connection, as with systemd.
        waiting = await connect_raw(reactor, "::1", port)
        await self.until(child, b"tg://proxy")
        waiting.transport.loseConnection()
        log = child.output.decode()
        # Text, not twist's JSON for a log that is not a terminal.
        self.assertFalse([line for line in log.splitlines() if line.startswith("{")], log)
        self.assertIn("generated a new secret", log)
        # The adopted socket's own address (domain=INET would misread it).
        self.assertIn(f"tg://proxy?server=::1&port={port}&", log)
        kept = state / "mtproxy-tw" / "secret"
        secret = parse_secret(kept.read_text().strip(), "default")
        client = await connect_client(reactor, "::1", port, secret)
        payload = b"\x01" + os.urandom(99)
        self.assertEqual(await client.request(payload).addTimeout(10, reactor), payload)
        if extra:  # --workers 2: both workers serve on the one inherited socket
            from mtproxy_tw.testing.proxyprocess import children, socket_owners

            await self.until(child, b"worker 2 started")
            # systemd-socket-activate became the proxy: the workers are its children.
            workers = children(process.pid)
            self.assertEqual(len(workers), 2)
            clients = [await connect_client(reactor, "::1", port, secret) for _ in range(30)]
            for each in clients:
                self.assertEqual(await each.request(payload).addTimeout(10, reactor), payload)
            owners = socket_owners(workers, port)
            served = {owners.get(c.transport.getHost().port) for c in clients}
            self.assertEqual(served, set(workers), child.output.decode())
            for each in clients:
                each.transport.loseConnection()
        # ExecReload.
        process.signalProcess("HUP")
        await self.until(child, b"secrets reloaded")
        process.signalProcess("TERM")
        code, sig = await child.ended.addTimeout(20, reactor)
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], child.output.decode())
        await client.lost
        self.assertNotIn("Traceback", child.output.decode())

    async def until(self, child: Child, text: bytes) -> None:
        deadline = reactor.seconds() + 30
        while text not in child.output:
            if child.ended.called or reactor.seconds() > deadline:
                self.fail(f"no {text!r} from the proxy: {child.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)

    def test_socket_activation_with_workers(self) -> Deferred[None]:
        """
        The same with ``--workers 2``: the parent takes the inherited
        socket, both workers accept on it, SIGHUP reaches both.
        """
        return ensureDeferred(self._serve("--workers", "2"))

    def test_socket_activation(self) -> Deferred[None]:
        """
        ``mtproxy-tw.service``'s command line under socket activation: the
        proxy adopts the socket (IPv6, as ``ListenStream=443`` makes it),
        generates its secret in the state directory, relays a client, reloads
        on SIGHUP (``ExecReload``) and stops on SIGTERM.
        """
        return ensureDeferred(self._serve())
