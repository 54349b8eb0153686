"""
:mod:`mtproxy_tw._twisted` and the Twisted internals it relies on.

Each ``TwistedAssumptionTests`` test checks one assumption against the
installed Twisted, so an upgrade that breaks one fails the test named
after it; the other classes test the seam's own behaviour.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import main, tcp
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogEvent
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mtproxy_tw import _twisted

reactor: Any = _reactor


class Received(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Pair:
    """
    A ``tcp.Server`` over one end of a socket pair, on a reactor that only
    records; the test reads the other end itself.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        self.far.setblocking(False)
        test.addCleanup(self.near.close)
        test.addCleanup(self.far.close)
        self.reactor = MemoryReactor()
        self.protocol = Received()
        self.transport = tcp.Server(
            self.near, self.protocol, ("127.0.0.1", 1), None, 0, self.reactor
        )
        self.protocol.makeConnection(self.transport)

    def drain(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.far.recv(1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk


class FakeSocket:
    def __init__(self, accept: int | Exception) -> None:
        self.accept = accept
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if isinstance(self.accept, Exception):
            raise self.accept
        self.sent.append(data[: self.accept])
        return min(self.accept, len(data))


class Recording:
    def __init__(self, transport: Any) -> None:
        self.written: list[bytes] = []
        self.real_write = transport.write
        transport.write = self.write

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.real_write(data)


class TwistedAssumptionTests(SynchronousTestCase):
    """
    One test per thing :mod:`mtproxy_tw._twisted` assumes of Twisted.
    """

    def test_write_queue_is_dataBuffer_offset_tempDataLen(self) -> None:
        """
        ``FileDescriptor.write`` queues in ``_tempDataBuffer``, counted by
        ``_tempDataLen``; ``doWrite`` joins it into ``dataBuffer`` and sends
        from ``offset``: the unsent bytes are ``len(dataBuffer) - offset +
        _tempDataLen``, and the queue is empty when ``dataBuffer`` and
        ``_tempDataLen`` are.
        """
        pair = Pair(self)
        transport = pair.transport
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))
        size = 16 << 20  # more than a socket pair holds
        transport.write(b"q" * size)
        self.assertEqual(transport._tempDataLen, size)
        self.assertEqual(_twisted.buffered(transport), size)
        received = 0
        for _ in range(3):
            transport.doWrite()
            received += len(pair.drain())
            self.assertGreater(transport.offset, 0)
            self.assertEqual(_twisted.buffered(transport), size - received)
        while _twisted.buffered(transport):
            transport.doWrite()
            received += len(pair.drain())
        self.assertEqual(received, size)
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))

    def test_socket_is_the_connected_socket(self) -> None:
        """
        ``tcp.Connection.socket`` is the socket it reads and writes.
        """
        pair = Pair(self)
        self.assertIs(pair.transport.socket, pair.near)

    def test_connected_and_disconnecting(self) -> None:
        """
        ``connected`` is true once the connection is made; ``disconnecting``
        turns true at ``loseConnection``, after which nothing may be sent.
        """
        pair = Pair(self)
        transport = pair.transport
        self.assertTrue(transport.connected)
        self.assertFalse(transport.disconnecting)
        transport.write(b"pending")  # else it closes at once
        transport.loseConnection()
        self.assertTrue(transport.disconnecting)

    def test_bufferSize_is_read_size_and_pause_threshold(self) -> None:
        """
        ``bufferSize`` is what one ``doRead`` asks the socket for, and the
        write buffer size above which a streaming producer is paused.
        """
        pair = Pair(self)
        transport = pair.transport
        _twisted.set_read_size(transport)
        self.assertEqual(transport.bufferSize, _twisted.READ_SIZE)
        transport.bufferSize = 10
        pair.far.sendall(b"x" * 25)
        transport.doRead()
        self.assertEqual(pair.protocol.data, b"x" * 10)

        paused: list[bool] = []

        class Producer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Producer(), True)
        transport.write(b"y" * 10)
        self.assertEqual(paused, [])
        transport.write(b"y")
        self.assertEqual(paused, [True])

    def test_reactor_tcp_transports_are_tcp_Server_and_Client(self) -> None:
        """
        A reactor's TCP connections are exactly ``tcp.Server`` (accepted)
        and ``tcp.Client`` (made), and not ``ISSLTransport``.
        """
        self.assertTrue(issubclass(tcp.Server, tcp.Connection))
        self.assertTrue(issubclass(tcp.Client, tcp.Connection))
        pair = Pair(self)
        self.assertTrue(_twisted.plain_tcp(pair.transport))
        self.assertFalse(ISSLTransport.providedBy(pair.transport))
        # The live check, on the reactor, is LiveTransportTests below.

    def test_startTLS_provides_ISSLTransport(self) -> None:
        """
        ``startTLS`` on a TCP connection makes its ``write`` encrypt, and
        marks it ``ISSLTransport``: it is no longer plain.
        """
        pair = Pair(self)
        pair.transport.startTLS(CertificateOptions(), normal=False)  # the TLS client side
        self.assertTrue(ISSLTransport.providedBy(pair.transport))
        self.assertFalse(_twisted.plain_tcp(pair.transport))
        pair.transport.doWrite()
        sent = pair.drain()
        self.assertTrue(sent.startswith(b"\x16\x03"), sent[:8])  # a ClientHello record
        pair.transport.socket = FakeSocket(1 << 20)
        _twisted.write(pair.transport, b"secret bytes")
        self.assertEqual(pair.transport.socket.sent, [])

    def test_tls_and_haproxy_are_ProtocolWrappers(self) -> None:
        """
        TLS and ``haproxy:`` wrap the TCP connection in a
        ``ProtocolWrapper``, whose ``transport`` is the connection.
        """
        self.assertTrue(issubclass(TLSMemoryBIOProtocol, ProtocolWrapper))
        self.assertTrue(issubclass(TLSMemoryBIOFactory, WrappingFactory))
        given: list[Any] = []

        class Endpoint:
            def listen(self, factory: Any) -> Deferred[Any]:
                given.append(factory)
                return Deferred()

        proxyEndpoint(Endpoint()).listen(Factory.forProtocol(Protocol))  # type: ignore[arg-type]
        self.assertIsInstance(given[0].buildProtocol(None), ProtocolWrapper)
        pair = Pair(self)
        wrapped = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapped.makeConnection(pair.transport)
        self.assertIs(wrapped.transport, pair.transport)

    def test_port_logs_accept_failures_through_its_logger(self) -> None:
        """
        ``tcp.Port`` logs the connections it cannot accept through
        ``self._logger``, which an instance attribute overrides, with the
        texts of :data:`~mtproxy_tw._twisted.ACCEPT_FAILED`,
        :data:`~mtproxy_tw._twisted.EMFILE_CLOSED` and
        :data:`~mtproxy_tw._twisted.EMFILE_NOISE`.
        """
        clock = MemoryReactorClock()
        port = tcp.Port(0, Factory.forProtocol(Protocol), 50, "127.0.0.1", clock)
        port.startListening()
        self.addCleanup(clock.advance, 0)
        self.addCleanup(port.stopListening)
        events: list[LogEvent] = []
        self.assertTrue(_twisted.route_accept_log(port, events.append))
        real = port.socket

        class Listener:
            def __init__(self, answers: list[Exception | None]) -> None:
                self.answers = answers

            def accept(self) -> tuple[socket.socket, tuple[str, int]]:
                answer = self.answers.pop(0)
                if answer is not None:
                    raise answer
                client, other = socket.socketpair()
                other.close()
                return client, ("192.0.2.1", 40000)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        def fail(code: int) -> OSError:
            return OSError(code, os.strerror(code))

        port.socket = Listener([fail(errno.ENOBUFS)])
        port.doRead()
        port.socket = Listener([fail(errno.EMFILE), None, fail(errno.EAGAIN)])
        port.doRead()
        port.socket = real
        formats = [e["log_format"] for e in events]
        self.assertEqual(formats[0], _twisted.ACCEPT_FAILED)
        self.assertEqual(events[0]["acceptError"], "ENOBUFS")
        self.assertEqual(set(formats[1:]) - _twisted.EMFILE_NOISE, {_twisted.EMFILE_CLOSED})
        self.assertEqual(len(formats), 4, formats)
        self.assertTrue(all(e["log_namespace"] == "twisted.internet.tcp.Port" for e in events))

    def test_ProtocolWrapper_passes_setTcpNoDelay_on(self) -> None:
        """
        A wrapper hands attributes it lacks, ``setTcpNoDelay`` among them,
        to the transport beneath.
        """
        pair = Pair(self)
        wrapped = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapped.makeConnection(pair.transport)
        self.assertEqual(wrapped.setTcpNoDelay, pair.transport.setTcpNoDelay)

    def test_systemd_descriptors_are_read_once_into_the_systemd_parser(self) -> None:
        from twisted.internet import endpoints
        from twisted.python.systemd import ListenFDs

        daemon = endpoints._SystemdParser._sddaemon
        self.assertIsInstance(daemon, ListenFDs)
        self.assertEqual(_twisted.systemd_descriptors(), daemon.inheritedDescriptors())
        patched = ListenFDs([3, 4], ("a", "b"))
        self.patch(endpoints._SystemdParser, "_sddaemon", patched)
        self.assertEqual(_twisted.systemd_descriptors(), [3, 4])

    def test_Port_socket_is_the_listening_socket(self) -> None:
        """
        A listening ``tcp.Port`` (and so ``ssl.Port`` and the ports that
        ``haproxy:`` and ``systemd:`` endpoints make) keeps its socket in
        ``socket``; a UNIX ``Port`` is a ``tcp.Port`` too.
        """
        from twisted.internet import ssl, unix

        port = listening_port(self)
        here = port.getHost()
        self.assertIsInstance(port.socket, socket.socket)
        self.assertEqual(port.socket.getsockname(), (here.host, here.port))
        self.assertEqual(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        self.assertTrue(issubclass(ssl.Port, tcp.Port))
        self.assertTrue(issubclass(unix.Port, tcp.Port))

    def test_tcp_Connection_calls_its_protocol_attribute(self) -> None:
        """
        A TCP connection calls ``dataReceived`` and ``connectionLost`` on
        whatever its ``protocol`` attribute holds when they happen
        (:func:`_twisted.hand_over` replaces it).
        """
        pair = Pair(self)
        first, second = pair.protocol, Received()
        lost: list[object] = []
        second.connectionLost = lost.append  # type: ignore[method-assign]
        self.assertTrue(_twisted.hand_over(pair.transport, second))
        self.assertIs(pair.transport.protocol, second)
        pair.far.send(b"after")
        pair.transport.doRead()
        self.assertEqual((first.data, second.data), (b"", b"after"))
        pair.far.close()
        reason = pair.transport.doRead()
        self.assertIsNotNone(reason)
        pair.transport.connectionLost(Failure(reason))
        self.assertEqual(len(lost), 1)
        self.assertFalse(_twisted.hand_over(object(), second))


class WriteTests(SynchronousTestCase):
    def test_sends_at_once(self) -> None:
        pair = Pair(self)
        record = Recording(pair.transport)
        _twisted.write(pair.transport, b"x" * 10)
        self.assertEqual((pair.drain(), record.written), (b"x" * 10, []))

    def test_rest_is_queued(self) -> None:
        pair = Pair(self)
        pair.transport.socket = sock = FakeSocket(3)
        record = Recording(pair.transport)
        _twisted.write(pair.transport, b"abcdef")
        self.assertEqual((sock.sent, record.written), ([b"abc"], [b"def"]))

    def test_queue_not_empty(self) -> None:
        """
        Bytes already queued go first: the new ones are queued behind them.
        """
        pair = Pair(self)
        pair.transport.write(b"old")
        record = Recording(pair.transport)
        _twisted.write(pair.transport, b"new")
        self.assertEqual((pair.drain(), record.written), (b"", [b"new"]))
        pair.transport.doWrite()
        self.assertEqual(pair.drain(), b"oldnew")

    def test_would_block_and_errors(self) -> None:
        for error in (BlockingIOError(), ConnectionResetError()):
            pair = Pair(self)
            pair.transport.socket = FakeSocket(error)
            record = Recording(pair.transport)
            _twisted.write(pair.transport, b"data")
            self.assertEqual(record.written, [b"data"])

    def test_closing(self) -> None:
        pair = Pair(self)
        pair.transport.disconnecting = True
        pair.transport.socket = sock = FakeSocket(100)
        _twisted.write(pair.transport, b"data")
        self.assertEqual(sock.sent, [])

    def test_other_transport(self) -> None:
        written: list[bytes] = []

        class Plain:
            dataBuffer = b""
            _tempDataLen = 0
            connected = True
            disconnecting = False
            socket = FakeSocket(100)

            def write(self, data: bytes) -> None:
                written.append(data)

        _twisted.write(Plain(), b"data")
        self.assertEqual((written, Plain.socket.sent), ([b"data"], []))

    def test_subclass_is_not_plain(self) -> None:
        """
        Only the exact classes are trusted: a subclass may write otherwise.
        """

        class Special(tcp.Server):
            pass

        near, far = socket.socketpair()
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        transport = Special(near, Protocol(), ("127.0.0.1", 1), None, 0, MemoryReactor())
        self.assertFalse(_twisted.plain_tcp(transport))

    def test_wrapper_gets_its_own_write(self) -> None:
        """
        Through a wrapper the bytes go to the wrapper's ``write``, never to
        the socket beneath: the wrapper (TLS) may change them.
        """
        pair = Pair(self)
        pair.transport.socket = sock = FakeSocket(100)
        wrapped = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapped.makeConnection(pair.transport)
        record = Recording(wrapped)
        _twisted.write(wrapped, b"data")
        self.assertEqual((sock.sent, record.written), ([], [b"data"]))


class BufferedTests(SynchronousTestCase):
    def test_through_wrappers(self) -> None:
        """
        A wrapper's queue is that of the TCP connection beneath it, and so
        is its read size.
        """
        pair = Pair(self)
        wrapped = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapped.makeConnection(pair.transport)
        outer = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        outer.makeConnection(wrapped)
        pair.transport.write(b"12345")
        self.assertEqual(_twisted.buffered(outer), 5)
        _twisted.set_read_size(outer)
        self.assertEqual(pair.transport.bufferSize, _twisted.READ_SIZE)
        self.assertNotIn("bufferSize", vars(outer))

    def test_other_kinds(self) -> None:
        """
        Another kind of transport holds nothing, unless it models the queue
        with the same attributes (a test double's full buffer).
        """
        self.assertEqual(_twisted.buffered(object()), 0)

        class Double:
            dataBuffer = b"x" * 100

        self.assertEqual(_twisted.buffered(Double()), 100)
        unconnected = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        self.assertEqual(_twisted.buffered(unconnected), 0)
        _twisted.set_read_size(object())


class LiveTransportTests(TestCase):
    def test_reactor_makes_plain_tcp(self) -> None:
        """
        The installed reactor's TCP connections, both ends, are plain TCP.
        """
        made: list[Deferred[Any]] = [Deferred(), Deferred()]
        lost: list[Deferred[None]] = [Deferred(), Deferred()]

        class End(Protocol):
            def __init__(self, index: int) -> None:
                self.index = index

            def connectionMade(self) -> None:
                made[self.index].callback(self.transport)

            def connectionLost(self, reason: object = None) -> None:
                lost[self.index].callback(None)

        class Ends(ClientFactory):
            def __init__(self, index: int) -> None:
                self.index = index

            def buildProtocol(self, addr: Any) -> End:
                return End(self.index)

        port = reactor.listenTCP(0, Ends(0), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reactor.connectTCP("127.0.0.1", port.getHost().port, Ends(1))

        async def check() -> None:
            server, client = [await d for d in made]
            self.assertIs(type(server), tcp.Server)
            self.assertIs(type(client), tcp.Client)
            self.assertTrue(_twisted.plain_tcp(server))
            self.assertTrue(_twisted.plain_tcp(client))
            server.loseConnection()
            for d in lost:
                await d

        return ensureDeferred(check())

    def test_accepted_connection_has_its_port_as_server(self) -> None:
        """
        ``tcp.Server.server`` is the port that accepted the connection.
        """
        made: Deferred[Any] = Deferred()

        class End(Protocol):
            def connectionMade(self) -> None:
                made.callback(self.transport)

        port = reactor.listenTCP(0, Factory.forProtocol(End), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)

        async def check() -> None:
            server = await made
            self.assertIs(server.server, port)
            server.loseConnection()

        return ensureDeferred(check())

    def test_accepted_sockets_inherit_TCP_NODELAY(self) -> None:
        """
        On Linux a socket accepted from a listening socket with
        ``TCP_NODELAY`` has it too.
        """
        if not _twisted._INHERITS_NO_DELAY:
            raise SkipTest("not Linux: the option is set on each connection")
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_STREAM) as listening:
                listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                listening.bind((host, 0))
                listening.listen(1)
                with socket.create_connection(listening.getsockname()[:2]):
                    accepted, _ = listening.accept()
                    with accepted:
                        option = accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                        self.assertTrue(option, family)


class AcceptLogTests(SynchronousTestCase):
    def test_other_ports_left_alone(self) -> None:
        self.assertFalse(_twisted.route_accept_log(object(), lambda e: None))


class NoDelayTests(SynchronousTestCase):
    def test_sets_option(self) -> None:
        calls: list[bool] = []

        class TCP:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        class Failing:
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError("not a TCP socket")

        _twisted.no_delay(TCP())
        _twisted.no_delay(Failing())
        _twisted.no_delay(object())
        self.assertEqual(calls, [True])


def listening_port(test: SynchronousTestCase) -> tcp.Port:
    """
    A ``tcp.Port`` listening on loopback, on a reactor that only records;
    closed when ``test`` ends.
    """
    clock = MemoryReactorClock()
    port = tcp.Port(0, Factory.forProtocol(Protocol), 50, "127.0.0.1", clock)
    port.startListening()

    def close() -> None:
        port.stopListening()
        clock.advance(0)

    test.addCleanup(close)
    return port


class ListenNoDelayTests(TestCase):
    def test_sets_the_listening_socket_option(self) -> None:
        port = listening_port(self)
        self.assertEqual(_twisted.listen_no_delay(port), _twisted._INHERITS_NO_DELAY)
        option = port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.assertEqual(bool(option), _twisted._INHERITS_NO_DELAY)

    def test_other_ports_left_alone(self) -> None:
        self.assertFalse(_twisted.listen_no_delay(object()))
        self.assertFalse(_twisted.listen_no_delay(MemoryReactor().listenTCP(0, Factory())))

    def test_unix_port_left_alone(self) -> None:
        path = os.path.join(self.mktemp())
        port = reactor.listenUNIX(path, Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        self.assertFalse(_twisted.listen_no_delay(port))

    def test_accepted_connections_skip_the_call(self) -> None:
        """
        A connection accepted by a port with the option is not asked to set
        it again, and has it; one of another port is asked.
        """
        asked: list[bool] = []
        made: list[Deferred[Any]] = [Deferred(), Deferred()]

        class End(Protocol):
            def connectionMade(self) -> None:
                transport: Any = self.transport
                transport.setTcpNoDelay = asked.append
                _twisted.no_delay(transport)
                made[self.factory.index].callback(transport)  # type: ignore[attr-defined]

        ports = []
        for index in range(2):
            factory: Any = Factory.forProtocol(End)
            factory.index = index
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            ports.append(port)
        if not _twisted.listen_no_delay(ports[0]):
            raise SkipTest("accepted sockets do not inherit TCP_NODELAY here")
        clients = [socket.create_connection(("127.0.0.1", p.getHost().port)) for p in ports]
        for client in clients:
            self.addCleanup(client.close)

        async def check() -> None:
            first, second = [await d for d in made]
            self.assertEqual(asked, [True])  # the second port's connection only
            self.assertTrue(first.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            first.loseConnection()
            second.loseConnection()

        return ensureDeferred(check())


class ClampMSSTests(SynchronousTestCase):
    def test_sets_the_listening_socket_option(self) -> None:
        port = listening_port(self)
        self.assertTrue(_twisted.clamp_mss(port, 256))
        self.assertEqual(port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), 256)

    def test_a_value_the_kernel_refuses(self) -> None:
        port = listening_port(self)
        self.assertFalse(_twisted.clamp_mss(port, 40))

    def test_other_ports_left_alone(self) -> None:
        self.assertFalse(_twisted.clamp_mss(object(), 256))
        self.assertFalse(_twisted.clamp_mss(MemoryReactor().listenTCP(0, Factory()), 256))

    def test_unix_port_left_alone(self) -> None:
        from twisted.internet import unix

        clock = MemoryReactorClock()
        path = self.mktemp()
        port = unix.Port(path, Factory.forProtocol(Protocol), reactor=clock)
        port.startListening()
        self.addCleanup(lambda: (port.stopListening(), clock.advance(0)))
        self.assertFalse(_twisted.clamp_mss(port, 256))


class MallocTests(SynchronousTestCase):
    def test_tune(self) -> None:
        self.assertIsInstance(_twisted.tune_malloc(), bool)


# -- splicing: the reactor's calls into a transport, taken over


class ClockPair(Pair):
    """
    A :class:`Pair` whose reactor also has a clock (``abortConnection``
    schedules the loss).
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        super().__init__(test)
        self.reactor = self.transport.reactor = MemoryReactorClock()


class SpliceAssumptionTests(SynchronousTestCase):
    """
    What :func:`_twisted.take_reads` and :func:`_twisted.take_writes` assume.
    """

    def test_fileno_is_the_sockets(self) -> None:
        """
        A TCP transport's ``socket.fileno()`` is the descriptor it reads.
        """
        pair = Pair(self)
        self.assertEqual(_twisted.fileno(pair.transport), pair.near.fileno())
        self.assertEqual(pair.transport.fileno(), pair.near.fileno())

    def test_watching_is_startReading_and_startWriting(self) -> None:
        """
        ``startReading``/``stopReading`` and ``startWriting`` (re)register
        the transport itself with the reactor, one registration each.
        """
        pair = Pair(self)
        transport = pair.transport
        transport.startReading()
        self.assertIn(transport, pair.reactor.getReaders())
        _twisted.watch_reads(transport, False)
        self.assertNotIn(transport, pair.reactor.getReaders())
        _twisted.watch_reads(transport, True)
        self.assertIn(transport, pair.reactor.getReaders())
        _twisted.watch_writes(transport)
        self.assertIn(transport, pair.reactor.getWriters())

    def test_own_doWrite_with_nothing_queued_stops_watching(self) -> None:
        """
        Twisted's ``doWrite`` with an empty queue stops watching for
        writability, and after ``loseConnection`` ends the connection
        (returns ``CONNECTION_DONE`` to the reactor).
        """
        pair = Pair(self)
        transport = pair.transport
        calls: list[int] = []
        own = _twisted.take_writes(transport, lambda: calls.append(1))
        transport.startWriting()
        self.assertIsNone(own())
        self.assertNotIn(transport, pair.reactor.getWriters())
        transport.loseConnection()
        self.assertIn(transport, pair.reactor.getWriters())
        self.assertIs(own(), main.CONNECTION_DONE)
        self.assertEqual(calls, [])

    def test_abortConnection_puts_its_own_doRead_and_doWrite(self) -> None:
        """
        ``abortConnection`` replaces ``doRead`` and ``doWrite`` on the
        instance, so giving ours back must leave its own in place.
        """
        pair = ClockPair(self)
        transport = pair.transport

        def read() -> None:
            return None

        _twisted.take_reads(transport, read)
        _twisted.take_writes(transport, read)
        transport.abortConnection()
        _twisted.give_back(transport, read)
        self.assertIn("doRead", transport.__dict__)
        self.assertIn("doWrite", transport.__dict__)
        self.assertIsNot(transport.doRead, read)
        self.assertIsNone(transport.doRead())

    def test_give_back_restores_the_class_methods(self) -> None:
        pair = Pair(self)
        transport = pair.transport

        def read() -> None:
            return None

        _twisted.take_reads(transport, read)
        _twisted.take_writes(transport, read)
        self.assertIs(transport.doRead, read)
        _twisted.give_back(transport, read)
        self.assertEqual(transport.doRead, type(transport).doRead.__get__(transport))
        self.assertEqual(transport.doWrite, type(transport).doWrite.__get__(transport))


class SpliceLiveTests(TestCase):
    """
    The installed reactor calls the instance's ``doRead``, and acts on what
    it returns.
    """

    async def pair(self) -> tuple[Any, Any, Deferred[None]]:
        made: list[Deferred[Any]] = [Deferred(), Deferred()]
        lost: Deferred[None] = Deferred()

        class End(Protocol):
            def __init__(self, index: int) -> None:
                self.index = index

            def connectionMade(self) -> None:
                made[self.index].callback(self.transport)

            def connectionLost(self, reason: object = None) -> None:
                if self.index == 0:
                    lost.callback(None)

        class Ends(ClientFactory):
            def __init__(self, index: int) -> None:
                self.index = index

            def buildProtocol(self, addr: Any) -> End:
                return End(self.index)

        port = reactor.listenTCP(0, Ends(0), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reactor.connectTCP("127.0.0.1", port.getHost().port, Ends(1))
        server, client = [await d for d in made]
        self.addCleanup(client.abortConnection)
        self.addCleanup(server.abortConnection)
        return server, client, lost

    def test_reactor_calls_the_instance_doRead(self) -> Deferred[None]:
        """
        A readable socket makes the reactor call ``transport.doRead`` as
        found on the instance; ``CONNECTION_DONE`` from it loses the
        connection (``connectionLost``).
        """

        async def check() -> None:
            server, client, lost = await self.pair()
            read: Deferred[bytes] = Deferred()

            def on_read() -> object:
                data = server.socket.recv(100)
                if not read.called:
                    read.callback(data)
                return main.CONNECTION_DONE

            _twisted.take_reads(server, on_read)
            client.write(b"spliced")
            self.assertEqual(await read.addTimeout(5, reactor), b"spliced")
            await lost.addTimeout(5, reactor)

        return ensureDeferred(check())

    def test_reactor_calls_the_instance_doWrite(self) -> Deferred[None]:
        """
        A watched writable socket makes the reactor call ``transport.doWrite``
        as found on the instance.
        """

        async def check() -> None:
            server, _client, _lost = await self.pair()
            wrote: Deferred[None] = Deferred()

            def on_write() -> object:
                result = own()
                if not wrote.called:
                    wrote.callback(None)
                return result

            own = _twisted.take_writes(server, on_write)
            _twisted.watch_writes(server)
            await wrote.addTimeout(5, reactor)
            self.assertNotIn(server, reactor.getWriters())

        return ensureDeferred(check())
