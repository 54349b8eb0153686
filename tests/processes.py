"""
What the tests of real proxy processes share (``tests/test_workers.py``,
``tests/test_fleet.py``): a fake DC for every process, clients closed at
the end, an echo through the proxy, and waiting on a process's log.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from mtproxy_tw.testing import FakeDC
from mtproxy_tw.testing.clients import ObfuscatedClient
from mtproxy_tw.testing.proxyprocess import ProxyProcess

reactor: Any = _reactor


class ProcessCase(TestCase):
    """
    :ivar fake: the DC every proxy of the test reaches, at :attr:`dc_port`.
    """

    timeout = 120

    def setUp(self) -> None:
        self.fake = FakeDC(reactor)
        dc = reactor.listenTCP(0, self.fake, interface="127.0.0.1")
        self.addCleanup(dc.stopListening)
        self.addCleanup(self._stop_fake_dc)
        self.dc_port = dc.getHost().port

    async def _stop_fake_dc(self) -> None:
        # After the proxy is gone: its connections may not have closed yet.
        for conn in self.fake.live():
            conn.transport.abortConnection()
            await conn.lost

    async def until(self, proxy: ProxyProcess, condition: Any, seconds: float = 30) -> None:
        try:
            await proxy.until(condition, seconds)
        except AssertionError as e:
            self.fail(str(e))

    def track(self, client: Any) -> Any:
        """
        Close ``client`` at the end of the test, whatever happened.
        """

        def close() -> Any:
            if client.lost.called:
                return None
            client.transport.abortConnection()
            return client.lost

        self.addCleanup(close)
        return client

    async def echo(self, client: ObfuscatedClient, size: int = 100) -> bool:
        """
        Whether a packet of ``size`` bytes comes back through the proxy.
        """
        payload = b"\x01" + os.urandom(size - 1)
        try:
            answer = await client.request(payload).addTimeout(5, reactor)
        except Exception:
            return False
        return bool(answer == payload)
