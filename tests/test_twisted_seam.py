"""
The direct-send shortcut and the Twisted internals it relies on.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw import _twisted


class FakeSocket:
    def __init__(self, accept: int | Exception) -> None:
        self.accept = accept
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if isinstance(self.accept, Exception):
            raise self.accept
        self.sent.append(data[: self.accept])
        return min(self.accept, len(data))


class FakeTransport:
    def __init__(self, sock: FakeSocket, queued: bytes = b"") -> None:
        self.socket = sock
        self.dataBuffer = queued
        self._tempDataLen = 0
        self.connected = True
        self.disconnecting = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class WriteTests(SynchronousTestCase):
    def test_sends_at_once(self) -> None:
        transport = FakeTransport(FakeSocket(100))
        _twisted.write(transport, b"x" * 10)
        self.assertEqual((transport.socket.sent, transport.written), ([b"x" * 10], []))

    def test_rest_is_queued(self) -> None:
        transport = FakeTransport(FakeSocket(3))
        _twisted.write(transport, b"abcdef")
        self.assertEqual((transport.socket.sent, transport.written), ([b"abc"], [b"def"]))

    def test_queue_not_empty(self) -> None:
        """
        Bytes already queued go first: the new ones are queued behind them.
        """
        transport = FakeTransport(FakeSocket(100), queued=b"old")
        _twisted.write(transport, b"new")
        self.assertEqual((transport.socket.sent, transport.written), ([], [b"new"]))

    def test_would_block_and_errors(self) -> None:
        for error in (BlockingIOError(), ConnectionResetError()):
            transport = FakeTransport(FakeSocket(error))
            _twisted.write(transport, b"data")
            self.assertEqual(transport.written, [b"data"])

    def test_other_transport(self) -> None:
        written: list[bytes] = []

        class Plain:
            def write(self, data: bytes) -> None:
                written.append(data)

        _twisted.write(Plain(), b"data")
        self.assertEqual(written, [b"data"])

    def test_twisted_attributes(self) -> None:
        """
        The installed Twisted's TCP connections have the attributes used.
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        connection = tcp.Connection(a, None)
        for name in ("dataBuffer", "_tempDataLen", "connected", "disconnecting", "socket"):
            self.assertTrue(hasattr(connection, name), name)


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


class MallocTests(SynchronousTestCase):
    def test_tune(self) -> None:
        self.assertIsInstance(_twisted.tune_malloc(), bool)
