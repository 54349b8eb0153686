"""
``--workers`` in memory: what a worker takes from its parent, the parent's
listeners, and the pool of workers on a fake reactor that records the
processes it would start.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.services import worker as worker_module
from mtproxy_tw.services import workers
from mtproxy_tw.services.proxy import ListenError
from mtproxy_tw.services.worker import (
    SOCKETS_ENV,
    WORKER_ENV,
    AdoptedEndpoint,
    WorkerChannel,
    WorkerSpec,
    worker_endpoints,
)
from mtproxy_tw.services.workers import WorkerPool, open_listeners, worker_command
from mtproxy_tw.shared.amp import RemoteState, StateServer
from mtproxy_tw.shared.channel import ClaimsClient, ClaimsServer
from mtproxy_tw.shared.local import LocalState
from mtproxy_tw.wire.replay import ReplayCache
from tests.logs import at_least_warnings, observe

LOOPBACK = "tcp:0:interface=127.0.0.1"


def close(fd: int) -> None:
    if not closed(fd):
        os.close(fd)


def hang_up(protocol: Any) -> None:
    assert protocol.transport is not None
    protocol.transport.loseConnection()


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


# -- a worker's side


class WorkerSpecTests(SynchronousTestCase):
    def test_no_variables_is_no_worker(self) -> None:
        self.assertIsNone(WorkerSpec.from_environment({}))
        self.assertIsNone(WorkerSpec.from_environment({SOCKETS_ENV: "4:2"}))

    def test_the_parents_variables(self) -> None:
        env = {WORKER_ENV: "2", SOCKETS_ENV: f"4:{int(socket.AF_INET)},5:10"}
        spec = WorkerSpec.from_environment(env)
        self.assertEqual(spec, WorkerSpec(2, ((4, int(socket.AF_INET)), (5, 10))))
        self.assertEqual(WorkerSpec.from_environment({WORKER_ENV: "1"}), WorkerSpec(1, ()))

    def test_bad_variables(self) -> None:
        for env in (
            {WORKER_ENV: "one"},
            {WORKER_ENV: ""},
            {WORKER_ENV: "1", SOCKETS_ENV: "4"},
            {WORKER_ENV: "1", SOCKETS_ENV: "four:2"},
            {WORKER_ENV: "1", SOCKETS_ENV: "4:inet"},
        ):
            with self.subTest(env=env):
                self.assertRaises(ValueError, WorkerSpec.from_environment, env)


class WorkerEndpointTests(SynchronousTestCase):
    def handed_down(self, family: int = socket.AF_INET) -> int:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        fd = os.dup(sock.fileno())
        self.addCleanup(close, fd)
        return fd

    def test_adopted_endpoint_adopts_and_closes_its_copy(self) -> None:
        reactor = MemoryReactor()
        fd = self.handed_down(socket.AF_INET6)
        factory = Factory.forProtocol(Protocol)
        port = self.successResultOf(AdoptedEndpoint(reactor, fd, socket.AF_INET6).listen(factory))
        self.assertEqual(reactor.adoptedPorts, [(fd, socket.AF_INET6, factory)])
        self.assertIsInstance(port.getHost(), IPv6Address)
        self.assertTrue(closed(fd))

    def test_haproxy_listeners_are_wrapped(self) -> None:
        reactor = MemoryReactor()
        fds = [self.handed_down(), self.handed_down()]
        spec = WorkerSpec(1, ((fds[0], socket.AF_INET), (fds[1], socket.AF_INET)))
        plain, wrapped = worker_endpoints(
            reactor, spec, ["tcp:443", "haproxy:tcp:8443:interface=127.0.0.1"]
        )
        self.assertIsInstance(plain, AdoptedEndpoint)
        self.assertNotIsInstance(wrapped, AdoptedEndpoint)
        factory = Factory.forProtocol(Protocol)
        self.successResultOf(plain.listen(factory))
        self.successResultOf(wrapped.listen(factory))
        [(fd0, _, first), (fd1, _, second)] = reactor.adoptedPorts
        self.assertEqual((fd0, fd1), tuple(fds))
        self.assertIs(first, factory)
        self.assertIsInstance(second, WrappingFactory)
        self.assertIs(second.wrappedFactory, factory)

    def test_a_socket_per_listener(self) -> None:
        spec = WorkerSpec(1, ((4, int(socket.AF_INET)),))
        with self.assertRaises(ValueError):
            worker_endpoints(MemoryReactor(), spec, ["tcp:443", "tcp:8443"])
        with self.assertRaises(ValueError):
            worker_endpoints(MemoryReactor(), WorkerSpec(1, ()), ["tcp:443"])
        two = WorkerSpec(1, ((4, int(socket.AF_INET)), (5, int(socket.AF_INET))))
        with self.assertRaises(ValueError):
            worker_endpoints(MemoryReactor(), two, ["tcp:443"])

    def inherited(self, name: str) -> int:
        """
        One end of a socket pair as the descriptor ``worker_module.NAME``
        (as a worker inherits it), all closed when the test ends.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        fd = os.dup(theirs.fileno())
        self.addCleanup(close, fd)
        self.patch(worker_module, name, fd)
        return fd

    def channel(self, reactor: MemoryReactor) -> tuple[WorkerChannel, RemoteState, int]:
        fd = self.inherited("CHANNEL_FD")
        self.inherited("CLAIMS_FD")
        remote = RemoteState()
        return WorkerChannel(reactor, remote, 2), remote, fd

    def stops(self, reactor: MemoryReactor) -> list[None]:
        """
        Records ``reactor.stop()`` calls (MemoryReactor's own ``hasStopped``
        starts true on some Twisted releases).
        """
        stops: list[None] = []
        reactor.stop = lambda: stops.append(None)  # type: ignore[method-assign]
        return stops

    def test_channel_adopts_its_descriptor(self) -> None:
        reactor = MemoryReactor()
        stops = self.stops(reactor)
        channel, remote, fd = self.channel(reactor)
        channel.startService()
        [(adopted, family, factory), (_, claims_family, claims)] = reactor.adoptedStreamConnections
        self.assertEqual((adopted, family, claims_family), (fd, socket.AF_UNIX, socket.AF_UNIX))
        self.assertIs(factory.buildProtocol(None), remote)
        self.assertIs(claims.buildProtocol(None), remote.claims)
        self.assertTrue(closed(fd))
        self.assertEqual(stops, [])
        remote.on_lost()
        self.assertEqual(stops, [None])

    def test_a_stopping_worker_is_not_stopped_again(self) -> None:
        reactor = MemoryReactor()
        stops = self.stops(reactor)
        channel, remote, _ = self.channel(reactor)
        channel.startService()
        channel.stopService()
        remote.on_lost()
        self.assertEqual(stops, [])


# -- the parent's listeners


class WorkerCommandTests(SynchronousTestCase):
    def test_twist_options_are_kept(self) -> None:
        argv = ["/x/twist", "--log-format", "text", "mtproxy", "--port", "1"]
        self.assertEqual(
            worker_command(["--port", "1"], argv),
            [sys.executable, "-m", "twisted", "--log-format", "text", "mtproxy", "--port", "1"],
        )

    def test_no_twist_options(self) -> None:
        self.assertEqual(
            worker_command([], ["/x/twist", "mtproxy"]),
            [sys.executable, "-m", "twisted", "mtproxy"],
        )

    def test_argv_not_ending_with_the_plugin_options(self) -> None:
        for argv in (
            ["/x/something", "--port", "2"],
            ["/x/twist", "--log-format", "text", "mtproxy", "--port", "2"],
            ["x"],
            [],
            ["/x/twist", "mtproxy"],
        ):
            with self.subTest(argv=argv):
                self.assertEqual(
                    worker_command(["--port", "1"], argv),
                    [sys.executable, "-m", "twisted", "mtproxy", "--port", "1"],
                )


class OpenListenersTests(SynchronousTestCase):
    def opened(self, made: list[list[socket.socket]]) -> list[list[socket.socket]]:
        for sockets in made:
            for sock in sockets:
                self.addCleanup(sock.close)
        return made

    def test_reuseport_sockets_on_one_port(self) -> None:
        listen = [LOOPBACK, "haproxy:" + LOOPBACK]
        made = self.opened(open_listeners(listen, [f"--listen {d}" for d in listen], 3))
        self.assertEqual([len(sockets) for sockets in made], [3, 3])
        for sockets in made:
            ports = {sock.getsockname() for sock in sockets}
            self.assertEqual(len(ports), 1)
            [(host, port)] = ports
            self.assertEqual(host, "127.0.0.1")
            self.assertNotEqual(port, 0)
            for sock in sockets:
                self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
                self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        self.assertNotEqual(made[0][0].getsockname(), made[1][0].getsockname())

    def test_other_listeners_are_refused_by_name(self) -> None:
        with self.assertRaises(ListenError) as caught:
            open_listeners(["unix:/tmp/x"], ["--listen unix:/tmp/x"], 2)
        message = str(caught.exception)
        self.assertTrue(message.startswith("--listen unix:/tmp/x: "), message)
        self.assertIn("tcp:", message)
        self.assertIn("systemd:", message)

    def test_a_port_in_use_is_one_line(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        listen = f"tcp:{port}:interface=127.0.0.1"
        with self.assertRaises(ListenError) as caught:
            open_listeners([listen], ["listen = [...] in the config"], 2)
        message = str(caught.exception)
        self.assertEqual(
            message, f"listen = [...] in the config: cannot listen: {os.strerror(98)}"
        )

    def test_what_was_opened_is_closed_on_failure(self) -> None:
        made: list[socket.socket] = []
        real = workers._reuseport_sockets

        def recording(description: str, count: int) -> list[socket.socket]:
            sockets = real(description, count)
            made.extend(sockets)
            return sockets

        self.patch(workers, "_reuseport_sockets", recording)
        listen = [LOOPBACK, "unix:/tmp/x"]
        self.assertRaises(ListenError, open_listeners, listen, listen, 2)
        self.assertEqual(len(made), 2)
        self.assertEqual([sock.fileno() for sock in made], [-1, -1])


# -- the pool


class _Process:
    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []
        self.gone = False

    def signalProcess(self, name: str) -> None:
        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(name)


class _Worker:
    """
    One worker process as the fake reactor started it, and its channel.
    """

    def __init__(self, reactor: _Reactor, process: _Process, call: tuple[Any, ...]) -> None:
        self.reactor = reactor
        self.process = process
        self.executable, self.args, self.env, self.fds = call
        self.channel: StateServer | None = None
        self.remote: RemoteState | None = None
        self.pump: IOPump | None = None
        self.claims_pump: IOPump | None = None
        self.middle: list[tuple[str, bytes]] = []
        self.metrics = b""

    def end(self, reason: Exception) -> None:
        self.process.gone = True
        if self.remote is not None and self.pump is not None:
            if self.remote.transport is not None:
                hang_up(self.remote)
            self.pump.flush()
        self.process.protocol.processEnded(Failure(reason))


class _Reactor(MemoryReactorClock):
    """
    Records the processes it would start; a channel it adopts is connected
    in memory to a worker's end.
    """

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[_Worker] = []
        self.pending: tuple[StateServer, RemoteState, IOPump, _Worker] | None = None
        self.from_thread: list[Any] = []

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        super().adoptStreamConnection(fd, family, factory)
        server = factory.buildProtocol(None)
        if isinstance(server, ClaimsServer):  # the second channel of the same worker
            assert self.pending is not None
            worker = self.pending[3]
            client = ClaimsClient()
            worker.claims_pump = connect(
                server, makeFakeServer(server), client, makeFakeClient(client), clock=self
            )
            worker.remote.claims = client
            return
        holder: list[_Worker] = []
        remote = RemoteState(
            metrics=lambda: holder[0].metrics,
            middle_config=lambda kind, body: holder[0].middle.append((kind, body)),
        )
        pump = connect(server, makeFakeServer(server), remote, makeFakeClient(remote), clock=self)
        worker = _Worker(self, _Process(None, 0), ((), (), {}, {}))
        worker.channel, worker.remote, worker.pump = server, remote, pump
        holder.append(worker)
        self.pending = (server, remote, pump, worker)

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: Any
    ) -> _Process:
        process = _Process(protocol, 100 + len(self.workers))
        assert self.pending is not None, "the channel is adopted first"
        worker = self.pending[3]
        self.pending = None
        worker.process = process
        worker.executable, worker.args, worker.env, worker.fds = (
            executable,
            list(args),
            dict(env),
            dict(childFDs),
        )
        self.workers.append(worker)
        protocol.makeConnection(process)
        return process

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.from_thread.append(f)
        f(*args, **kwargs)

    def flush(self) -> None:
        for worker in self.workers:
            for pump in (worker.pump, worker.claims_pump):
                if pump is not None:
                    pump.flush()


class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = observe(self)
        self.reactor = _Reactor()
        self.time = _FakeTime()
        self.patch(workers, "time", self.time)
        self.listen = [LOOPBACK, "haproxy:" + LOOPBACK]
        self.hup = signal.getsignal(signal.SIGHUP)
        self.pool = WorkerPool(
            self.reactor,
            2,
            self.listen,
            [f"--listen {d}" for d in self.listen],
            ["/py", "-m", "twisted", "mtproxy"],
            LocalState(ReplayCache(self.reactor)),
            drain_timeout=10.0,
        )
        self.addCleanup(self.finish)

    def finish(self) -> None:
        if self.pool.running:
            d = self.pool.stopService()
            for worker in self.live():
                worker.end(ProcessDone(0))
            self.successResultOf(d)
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.hup)

    def start(self) -> list[_Worker]:
        self.pool.startService()
        started = list(self.reactor.workers)
        #: The workers asked over their channel to stop, by index.
        self.asked: list[int] = []
        for i, worker in enumerate(started, 1):
            assert worker.remote is not None
            worker.remote.on_stop = lambda i=i: self.asked.append(i)  # type: ignore[misc]
        return started

    def stop(self) -> Deferred[None]:
        d: Deferred[None] = self.pool.stopService()
        self.reactor.flush()
        return d

    def live(self) -> list[_Worker]:
        return [w for w in self.reactor.workers if not w.process.gone]

    def delays(self) -> list[float]:
        now = self.reactor.seconds()
        return [call.getTime() - now for call in self.reactor.getDelayedCalls()]

    def warnings(self) -> list[str]:
        return at_least_warnings(self.events)

    def test_start_spawns_each_worker_with_its_sockets(self) -> None:
        started = self.start()
        self.assertEqual(len(started), 2)
        assert self.pool.sockets is not None
        family = int(socket.AF_INET)
        for i, worker in enumerate(started):
            self.assertEqual(worker.executable, "/py")
            self.assertEqual(worker.args, ["/py", "-m", "twisted", "mtproxy"])
            self.assertEqual(sorted(worker.fds), [0, 1, 2, 3, 4, 5, 6])
            self.assertEqual((worker.fds[0], worker.fds[1], worker.fds[2]), ("w", 1, 2))
            self.assertIsInstance(worker.fds[3], int)  # AMP
            self.assertIsInstance(worker.fds[4], int)  # the claims channel
            self.assertEqual(worker.fds[5], self.pool.sockets[0][i].fileno())
            self.assertEqual(worker.fds[6], self.pool.sockets[1][i].fileno())
            self.assertEqual(worker.env[WORKER_ENV], str(i + 1))
            self.assertEqual(worker.env[SOCKETS_ENV], f"5:{family},6:{family}")
            self.assertEqual(worker.env.get("PATH"), os.environ.get("PATH"))
            assert worker.channel is not None
            self.assertEqual(worker.channel.prefix, f"{i + 1}.1:")
        self.assertNotEqual(started[0].fds[5], started[1].fds[5])
        self.assertEqual(
            [family for _, family, _ in self.reactor.adoptedStreamConnections],
            [socket.AF_UNIX] * 4,  # two channels per worker
        )
        self.assertEqual(self.pool.pids(), [100, 101])

    def test_a_worker_that_dies_is_started_again(self) -> None:
        one, two = self.start()
        self.time.now = 1.0
        one.end(ProcessTerminated(signal=9))
        [warning] = self.warnings()
        self.assertIn("worker 1 (pid 100) was killed by signal 9; starting it again in", warning)
        [delay] = self.delays()
        self.assertEqual(self.pool.pids(), [101])
        self.reactor.advance(delay)
        self.assertEqual(len(self.reactor.workers), 3)
        again = self.reactor.workers[2]
        self.assertEqual(again.env[WORKER_ENV], "1")
        self.assertEqual(again.fds[5], one.fds[5])  # the same sockets
        assert again.channel is not None
        self.assertEqual(again.channel.prefix, "1.2:")
        self.assertEqual(self.pool.pids(), [102, 101])
        self.assertEqual(two.process.signals, [])

    def test_an_exit_is_said_with_its_code(self) -> None:
        one, _ = self.start()
        one.end(ProcessTerminated(exitCode=3))
        [warning] = self.warnings()
        self.assertIn("worker 1 (pid 100) exited (", warning)
        self.assertIn("exit code 3", warning)

    def test_quick_deaths_back_off(self) -> None:
        self.start()
        delays = []
        for _ in range(6):
            [worker] = [w for w in self.live() if w.env[WORKER_ENV] == "1"]
            self.time.now += 1.0
            worker.end(ProcessTerminated(signal=11))
            [delay] = self.delays()
            delays.append(delay)
            self.reactor.advance(delay)
        self.assertGreater(delays[0], 0.0)
        self.assertLess(delays[0], 2.0)
        self.assertGreater(delays[5], 5.0)
        self.assertLessEqual(max(delays), 31.0)

    def test_a_worker_that_lived_long_is_started_at_once(self) -> None:
        self.start()
        for lived in (1.0, 1.0, 60.0):
            [worker] = [w for w in self.live() if w.env[WORKER_ENV] == "2"]
            self.time.now += lived
            worker.end(ProcessTerminated(signal=9))
            [delay] = self.delays()
            self.reactor.advance(delay)
        self.assertEqual(delay, 0.0)

    def test_stop_waits_for_every_worker(self) -> None:
        one, two = self.start()
        assert self.pool.sockets is not None
        sockets = [sock for listener in self.pool.sockets for sock in listener]
        d = self.stop()
        # Asked over the channel, not signalled: one that got SIGTERM from
        # elsewhere too stops once.
        self.assertEqual(self.asked, [1, 2])
        self.assertEqual((one.process.signals, two.process.signals), ([], []))
        one.end(ProcessDone(0))
        self.assertNoResult(d)
        self.assertEqual(self.delays(), [10.0 + workers._KILL_GRACE])  # no restart
        two.end(ProcessTerminated(exitCode=1))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.workers), 2)
        self.assertIsNone(self.pool.sockets)
        self.assertEqual({sock.fileno() for sock in sockets}, {-1})
        self.assertEqual(self.warnings(), [])

    def test_a_worker_whose_channel_is_gone_gets_sigterm(self) -> None:
        one, two = self.start()
        assert one.remote is not None
        one.remote.transport.loseConnection()
        self.reactor.flush()
        self.stop()
        self.assertEqual(self.asked, [2])
        self.assertEqual((one.process.signals, two.process.signals), (["TERM"], []))

    def test_kill_follows_drain_and_grace(self) -> None:
        one, two = self.start()
        d = self.stop()
        one.end(ProcessDone(0))
        self.reactor.advance(10.0 + workers._KILL_GRACE - 0.1)
        self.assertEqual(two.process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(two.process.signals, ["KILL"])
        self.assertEqual(one.process.signals, [])
        [warning] = self.warnings()
        self.assertIn("worker 2 did not stop in time; killing it", warning)
        self.assertNoResult(d)
        two.end(ProcessTerminated(signal=9))
        self.successResultOf(d)

    def test_stop_cancels_a_pending_restart(self) -> None:
        one, two = self.start()
        one.end(ProcessTerminated(signal=9))
        d = self.stop()
        self.assertEqual(self.asked, [2])
        two.end(ProcessDone(0))
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.workers), 2)

    def test_reload_sends_hup_to_each_live_worker(self) -> None:
        one, two = self.start()
        one.end(ProcessTerminated(signal=9))
        self.pool.reload()
        self.assertEqual((one.process.signals, two.process.signals), ([], ["HUP"]))
        two.process.gone = True  # gone, and the reactor not told yet
        self.pool.reload()
        self.assertEqual(two.process.signals, ["HUP"])
        two.process.gone = False

    def test_sighup_is_handled_while_running(self) -> None:
        _, two = self.start()
        handler = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(handler, self.hup)
        assert callable(handler)
        handler(signal.SIGHUP, None)
        self.assertEqual(self.reactor.from_thread, [self.pool.reload])
        self.assertEqual(two.process.signals, ["HUP"])

    def test_hand_down_remembers_the_latest_body_per_kind(self) -> None:
        one, two = self.start()
        self.pool.hand_down("proxy-secret", b"first")
        self.reactor.flush()
        self.assertEqual(one.middle, [("proxy-secret", b"first")])
        big = os.urandom(100_000)
        self.pool.hand_down("proxy-secret", b"second")
        self.pool.hand_down("config", big)
        self.reactor.flush()
        self.assertEqual(two.middle[1:], [("proxy-secret", b"second"), ("config", big)])
        self.assertEqual(self.pool.middle_bodies, {"proxy-secret": b"second", "config": big})
        one.end(ProcessTerminated(signal=9))
        [delay] = self.delays()
        self.reactor.advance(delay)
        self.reactor.flush()
        again = self.reactor.workers[2]
        self.assertEqual(sorted(again.middle), [("config", big), ("proxy-secret", b"second")])

    def test_gather_asks_the_workers_that_answer(self) -> None:
        one, two = self.start()
        one.metrics, two.metrics = b"a 1\n", b"b 2\n"
        self.reactor.flush()
        d = self.pool.gather()
        self.reactor.flush()
        texts: list[bytes] = self.successResultOf(d)
        self.assertEqual(sorted(texts), [b"a 1\n", b"b 2\n"])
        d = self.pool.gather()
        assert one.pump is not None
        one.pump.flush()  # two does not answer
        self.assertNoResult(d)
        self.reactor.advance(workers._SCRAPE_TIMEOUT)
        self.assertEqual(self.successResultOf(d), [b"a 1\n"])

    def test_a_lost_channel_is_not_asked(self) -> None:
        one, two = self.start()
        two.metrics = b"b 2\n"
        assert one.remote is not None
        hang_up(one.remote)
        self.reactor.flush()
        d = self.pool.gather()
        self.reactor.flush()
        self.assertEqual(self.successResultOf(d), [b"b 2\n"])

    def test_a_late_loss_of_an_old_channel_leaves_the_new_one(self) -> None:
        one, _ = self.start()
        one.process.gone = True
        one.process.protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        [delay] = self.delays()
        self.reactor.advance(delay)
        again = self.reactor.workers[2]
        again.metrics = b"again 1\n"
        assert one.remote is not None and one.pump is not None
        hang_up(one.remote)  # the old channel closes only now
        one.pump.flush()
        d = self.pool.gather()
        self.reactor.flush()
        texts: list[bytes] = self.successResultOf(d)
        self.assertIn(b"again 1\n", texts)
