"""
:class:`ProxyService` on a memory reactor: its listeners' lifecycle and
the stats line.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.services.proxy import Listener, ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.wire.secrets import parse_secret
from tests.logs import observe

SECRET = parse_secret("alice=dd" + "5a" * 16, "x")


class Port:
    def __init__(self) -> None:
        self.stopped = 0

    def stopListening(self) -> Deferred[None]:
        self.stopped += 1
        return succeed(None)


class Endpoint:
    """
    Answers each ``listen`` with the next of ``answers``.
    """

    def __init__(self, *answers: Deferred[Any]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def listen(self, factory: Any) -> Deferred[Any]:
        self.calls += 1
        return self.answers.pop(0)


class ListenerTests(SynchronousTestCase):
    def test_listens_once(self) -> None:
        """
        ``privilegedStartService`` listens; ``startService`` after it does
        not listen again.
        """
        port = Port()
        endpoint = Endpoint(succeed(port))
        listener = Listener(endpoint, Factory())  # type: ignore[arg-type]
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual(endpoint.calls, 1)
        assert listener.port is not None
        self.assertIs(self.successResultOf(listener.port), port)
        self.assertIsNone(self.successResultOf(listener.stopService()))
        self.assertEqual((port.stopped, listener.port), (1, None))

    def test_start_alone_listens(self) -> None:
        endpoint = Endpoint(succeed(Port()))
        listener = Listener(endpoint, Factory())  # type: ignore[arg-type]
        listener.startService()
        self.assertEqual(endpoint.calls, 1)

    def test_refusal_raised_at_once(self) -> None:
        error = CannotListenError("127.0.0.1", 1, OSError("in use"))
        listener = Listener(Endpoint(fail(error)), Factory())  # type: ignore[arg-type]
        self.assertRaises(CannotListenError, listener.privilegedStartService)
        self.assertIsNone(listener.port)

    def test_stop_while_listening_cancels(self) -> None:
        pending: Deferred[Any] = Deferred()
        listener = Listener(Endpoint(pending), Factory())  # type: ignore[arg-type]
        listener.startService()
        self.assertIsNone(self.successResultOf(listener.stopService()))

    def test_tcp_clients_start_without_nagle(self) -> None:
        """
        A TCP listener's socket has ``TCP_NODELAY``, for the clients it
        accepts to inherit (Linux).
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from mtproxy_tw import _twisted

        listener = Listener(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),  # type: ignore[arg-type]
            Factory(),
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        assert listener.port is not None
        port: Any = self.successResultOf(listener.port)
        option = port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.assertEqual(bool(option), _twisted._INHERITS_NO_DELAY)

    def test_restart_listens_again(self) -> None:
        endpoint = Endpoint(succeed(Port()), succeed(Port()))
        listener = Listener(endpoint, Factory())  # type: ignore[arg-type]
        listener.startService()
        listener.stopService()
        listener.startService()
        self.assertEqual(endpoint.calls, 2)


class StatsTests(SynchronousTestCase):
    def service(self, interval: float) -> tuple[ProxyService, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        settings = Settings(secrets=(SECRET,), stats_interval=interval)
        service = ProxyService(settings, reactor, ["tcp:0:interface=127.0.0.1"])
        service.open_file_limit = lambda: (1 << 20, 1 << 20)
        return service, reactor

    def test_every_interval_and_at_stop(self) -> None:
        events = observe(self)
        service, reactor = self.service(60)
        service.startService()
        reactor.advance(59)
        reactor.advance(1)
        reactor.advance(60)
        service.stopService()
        lines = [t for t in map(formatEvent, events) if t and t.startswith("stats:")]
        # At start, after each interval, and the last counts at stop.
        self.assertEqual(len(lines), 4, lines)
        self.assertIsNotNone(service.stats_timer)
        assert service.stats_timer is not None
        self.assertFalse(service.stats_timer.running)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_zero_turns_it_off(self) -> None:
        events = observe(self)
        service, reactor = self.service(0)
        service.startService()
        reactor.advance(3600)
        service.stopService()
        self.assertIsNone(service.stats_timer)
        self.assertFalse(any((formatEvent(e) or "").startswith("stats:") for e in events))
