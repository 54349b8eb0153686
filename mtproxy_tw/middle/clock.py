"""
The local clock against Telegram's.

The ``Date`` header of every answer from core.telegram.org is compared with
the local clock: a middle proxy rejects a handshake from a clock more than
30 s off, and fake TLS checks client timestamps against it, so a large skew
is logged.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtproxy_tw.wire.rpc import MAX_CLOCK_SKEW

__all__ = ["FAKE_TLS_WINDOW", "ClockCheck"]

#: Fake TLS accepts client timestamps this far from the local clock (section 13.2).
FAKE_TLS_WINDOW = 300


class ClockCheck:
    """
    Compares server times with the local clock; warns at each answer while
    they disagree, and says so once when they agree again.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._warned = False

    def compare(self, server_time: float) -> float:
        """
        The skew: ``server_time`` minus the local time, in seconds.
        """
        # The Date header has a resolution of one second.
        skew = server_time - self.clock.seconds()
        if abs(skew) <= MAX_CLOCK_SKEW + 1:
            if self._warned:
                self.log.info("the local clock agrees with Telegram's again")
            self._warned = False
            return skew
        self._warned = True
        effects = "middle proxies will reject the handshake"
        if abs(skew) > FAKE_TLS_WINDOW:
            effects += " and fake-TLS clients will be refused"
        self.log.warn(
            "the local clock is {skew:.0f} s {direction} Telegram's: {effects}; fix the clock",
            skew=abs(skew),
            direction="behind" if skew > 0 else "ahead of",
            effects=effects,
        )
        return skew
