"""
A loopback port that must refuse connections: bound, never listening, and
held for the test's duration, so that no listener (the proxy's own
``tcp:0``, a fake, another process) can be handed it meanwhile.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase


def hold_port(test: SynchronousTestCase, host: str = "127.0.0.1") -> socket.socket:
    """
    A socket bound to a free port of ``host``, not listening, closed at the
    end of ``test`` (or earlier, by the caller, to hand the port over).
    """
    held = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    test.addCleanup(held.close)
    held.bind((host, 0))
    return held
