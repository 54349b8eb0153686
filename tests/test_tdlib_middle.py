"""
TDLib through the proxy in middle-proxy mode: testProxy's key exchange goes
client -> proxy -> FakeMiddleProxy (as RPC_PROXY_REQ with the ad tag) and
back, two full round trips, for classic, dd and ee secrets.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory

from mtproxy_tw.testing import REQ_DH_PARAMS, REQ_PQ_MULTI, tdlib_test_proxy
from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.secrets import Secret, parse_secret
from tests.test_middle import AD_TAG, CLASSIC, LOCAL, SECURE, LoopbackHarness, reactor

try:
    import tdjson  # noqa: F401
except ImportError:
    SKIP: str | None = "tdjson is not installed"
else:
    SKIP = None

#: TDLib's error once the fake answered req_pq_multi and req_DH_params.
REACHED_DC = "Failed to fetch server_DH_inner_data"
DOMAIN = "example.com"
EE = parse_secret("erin=ee" + "e5" * 16 + DOMAIN.encode().hex(), "x")


class TDLibMiddleTests(LoopbackHarness):
    skip = SKIP

    async def _handshake(self, secret_text: str, secret: Secret) -> None:
        # Failed fake-TLS handshakes would go to the mask host: a closed
        # loopback port, so nothing leaves the machine.
        closed = reactor.listenTCP(0, Factory(), interface=LOCAL)
        mask = Address(LOCAL, closed.getHost().port)
        await closed.stopListening()
        port = await self.start(secrets=(CLASSIC, SECURE, EE), mask_host=mask)
        for dc in (2, 4):
            before = len(self.fake.virtual_dcs)
            message = await tdlib_test_proxy(LOCAL, port, secret_text, dc)
            self.assertIn(REACHED_DC, message, f"dc {dc}")
            (virtual,) = self.fake.virtual_dcs[before:]
            self.assertEqual(virtual.requests, [REQ_PQ_MULTI, REQ_DH_PARAMS])
        self.assertEqual(self.fake.ad_tags, [AD_TAG] * 4)
        for flags in self.fake.flags:
            self.assertTrue(flags & rpc.FLAG_NOT_ENCRYPTED)
            self.assertTrue(flags & rpc.FLAG_HAS_AD_TAG)
        self.assertEqual(self.service.core.stats.accepted, {secret.name: 2})
        self.assertEqual(sum(self.service.core.stats.rejected.values()), 0)
        await self.until(lambda: not self.service.core.clients, "no live clients")
        await self.until(lambda: len(self.fake.closed_conn_ids) == 2, "RPC_CLOSE_CONN")

    def test_classic(self) -> Deferred[None]:
        return self.run_async(self._handshake(CLASSIC.hex(), CLASSIC))

    def test_dd(self) -> Deferred[None]:
        return self.run_async(self._handshake(SECURE.hex(), SECURE))

    def test_ee(self) -> Deferred[None]:
        return self.run_async(self._handshake(EE.hex(), EE))
