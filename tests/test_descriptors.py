"""
File descriptors: the need, and the warnings when accepts fail.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.services.descriptors import (
    SPARE_DESCRIPTORS,
    UNLIMITED_DESCRIPTORS,
    AcceptFailures,
    connections_allowed,
    descriptors_needed,
)

PORT = "twisted.internet.tcp.Port"


def port_event(log_format: str, **fields: object) -> LogEvent:
    """
    An event as ``tcp.Port`` logs it (see ``twisted.internet.tcp._accept``).
    """
    return {
        "log_format": log_format,
        "log_level": LogLevel.info,
        "log_namespace": PORT,
        "log_source": None,
        **fields,
    }


NOT_ACCEPTED = port_event("Could not accept new connection ({acceptError})", acceptError="EMFILE")
CLOSED = port_event("EMFILE recovery: Closed socket from {address}", address=("192.0.2.1", 5))
RELEASED = port_event("EMFILE encountered; releasing reserved file descriptor.")
REUSED = port_event("Re-reserving EMFILE recovery file descriptor.")


class Harness:
    def __init__(self, limit: int = 1024, need: int = 20065) -> None:
        self.clock = Clock()
        self.forwarded: list[LogEvent] = []
        self.told: list[LogEvent] = []
        self.failures = AcceptFailures(
            self.clock,
            need=lambda: need,
            limit=lambda: limit,
            forward=cast(ILogObserver, self.forwarded.append),
        )
        self.failures.log = Logger(observer=cast(ILogObserver, self.told.append))

    def burst(self, refused: int, failed: int = 1) -> None:
        self.failures(RELEASED)
        for _ in range(refused):
            self.failures(CLOSED)
        self.failures(REUSED)
        for _ in range(failed):
            self.failures(NOT_ACCEPTED)

    def warnings(self) -> list[str]:
        assert all(e["log_level"] is LogLevel.warn for e in self.told)
        return [formatEvent(e) for e in self.told]


class AcceptFailuresTests(SynchronousTestCase):
    def test_one_warning_a_minute_with_a_count(self) -> None:
        """
        However many refusals, one warning when they start and one a minute
        after, each with the count since the one before.
        """
        h = Harness()
        h.burst(400, failed=2)
        self.assertEqual(h.warnings(), [])  # the rest of the burst is counted first
        h.clock.advance(0)
        [first] = h.warnings()
        self.assertTrue(
            first.startswith(
                "cannot accept clients: 400 connections closed unserved, "
                "2 accepts failed (EMFILE 2); the open file limit 1024 is below the 20065"
            ),
            first,
        )
        self.assertIn("LimitNOFILE=20065", first)
        self.assertIn("ulimit -n 20065", first)
        for _ in range(59):
            h.clock.advance(1)
            h.burst(10)
        self.assertEqual(len(h.warnings()), 1)
        h.clock.advance(1)
        self.assertEqual(len(h.warnings()), 2)
        self.assertTrue(
            h.warnings()[1].startswith(
                "cannot accept clients in the last 60 s: 590 connections closed unserved, "
                "59 accepts failed (EMFILE 59)"
            ),
            h.warnings()[1],
        )
        self.assertEqual(h.forwarded, [])

    def test_quiet_minute_ends_the_series(self) -> None:
        h = Harness()
        h.burst(1)
        h.clock.advance(0)
        h.clock.advance(60)  # nothing new: no warning, and no timer left
        self.assertEqual(len(h.warnings()), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(3600)
        h.burst(2, failed=0)
        h.clock.advance(0)
        self.assertEqual(len(h.warnings()), 2)
        self.assertTrue(h.warnings()[1].startswith("cannot accept clients: 2 connections closed"))

    def test_stop_tells_the_rest(self) -> None:
        h = Harness()
        h.burst(1)
        h.clock.advance(10)
        h.burst(5, failed=0)
        h.failures.stop()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(len(h.warnings()), 2)
        self.assertTrue(
            h.warnings()[1].startswith(
                "cannot accept clients since the last warning: 5 connections closed"
            )
        )
        h.failures.stop()
        self.assertEqual(len(h.warnings()), 2)

    def test_other_events_pass(self) -> None:
        """
        Everything else, a client that gave up in the backlog included, goes
        to the log unchanged.
        """
        h = Harness()
        aborted = port_event(
            "Could not accept new connection ({acceptError})", acceptError="ECONNABORTED"
        )
        other = port_event("{name} starting on {port}", name="Factory", port=443)
        h.failures(aborted)
        h.failures(other)
        self.assertEqual(h.forwarded, [aborted, other])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_system_table_full(self) -> None:
        h = Harness()
        h.failures(port_event(NOT_ACCEPTED["log_format"], acceptError="ENFILE"))
        h.clock.advance(0)
        [warning] = h.warnings()
        self.assertIn("ENFILE 1", warning)
        self.assertIn("fs.file-max", warning)

    def test_limit_not_below_need(self) -> None:
        h = Harness(limit=4096, need=2065)
        h.burst(3)
        h.clock.advance(0)
        [warning] = h.warnings()
        self.assertIn("the open file limit 4096 is reached", warning)
        self.assertIn("LimitNOFILE=8192", warning)
        self.assertIn("lower --max-connections", warning)

    def test_watch_only_tcp_ports(self) -> None:
        self.assertFalse(Harness().failures.watch(object()))


class NeedTests(SynchronousTestCase):
    def test_need(self) -> None:
        self.assertEqual(descriptors_needed(100, middle=False), 200 + 1 + SPARE_DESCRIPTORS)
        self.assertEqual(
            descriptors_needed(100, middle=True, pool_connections=80, listeners=2),
            100 + 80 + 2 + SPARE_DESCRIPTORS,
        )
        self.assertEqual(
            descriptors_needed(100, middle=False, pool_connections=80),
            200 + 1 + SPARE_DESCRIPTORS,
        )


class ConnectionsAllowedTests(SynchronousTestCase):
    def test_inverse_of_the_need(self) -> None:
        """
        ``--max-connections auto``: the most clients whose need fits the limit.
        """
        for middle, pools in ((False, 0), (True, 80)):
            for limit in (200, 1024, 20000, 65536):
                allowed, _ = connections_allowed(limit, middle=middle, pool_connections=pools)
                need = descriptors_needed(allowed, middle=middle, pool_connections=pools)
                self.assertLessEqual(need, limit)
                more = descriptors_needed(allowed + 1, middle=middle, pool_connections=pools)
                self.assertGreater(more, limit)

    def test_says_why(self) -> None:
        self.assertEqual(
            connections_allowed(20000, middle=False),
            (9967, "from the open-file limit 20000: 2 descriptors per direct client, 65 reserved"),
        )
        allowed, why = connections_allowed(20000, middle=True, pool_connections=80, listeners=2)
        self.assertEqual(allowed, 20000 - 80 - 2 - SPARE_DESCRIPTORS)
        self.assertIn("1 descriptor per middle-proxy client, 146 reserved, 80 of them", why)

    def test_at_least_one(self) -> None:
        self.assertEqual(connections_allowed(10, middle=False)[0], 1)

    def test_unlimited(self) -> None:
        allowed, why = connections_allowed(-1, middle=False)
        self.assertEqual(allowed, (UNLIMITED_DESCRIPTORS - SPARE_DESCRIPTORS - 1) // 2)
        self.assertIn("open-file limit unlimited", why)
