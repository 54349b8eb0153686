"""
TDLib, the library inside the official apps, through the proxy to a FakeDC.

TDLib's ``testProxy`` runs the auth-key handshake; the FakeDC answers its
first two steps, so TDLib fails only at "Failed to fetch
server_DH_inner_data": both directions crossed the proxy intact, twice.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mtproxy_tw.testing import REQ_DH_PARAMS, REQ_PQ_MULTI, tdlib_test_proxy
from mtproxy_tw.wire.obfuscated2 import TAG_INTERMEDIATE, TAG_PADDED
from mtproxy_tw.wire.secrets import Secret
from tests.test_integration import CLASSIC, LOCAL, SECURE, WRONG, ProxyHarness

try:
    import tdjson  # noqa: F401
except ImportError:
    SKIP: str | None = "tdjson is not installed"
else:
    SKIP = None

REACHED_DC = "Failed to fetch server_DH_inner_data"


class TDLibTests(ProxyHarness):
    skip = SKIP

    async def _handshake(self, secret_text: str, secret: Secret, tag: bytes, fast: bool) -> None:
        port = await self.start(fast_mode=fast)
        for dc in (2, 4):
            message = await tdlib_test_proxy(LOCAL, port, secret_text, dc)
            self.assertIn(REACHED_DC, message, f"dc {dc}")
            fake = self.fakes[dc]
            self.assertEqual(fake.seen, [(tag, dc)])
            self.assertEqual(fake.connections[0].requests, [REQ_PQ_MULTI, REQ_DH_PARAMS])
        self.assertEqual(self.stats.accepted, {secret.name: 2})
        self.assertEqual(sum(self.stats.rejected.values()), 0)
        await self.no_clients()

    def test_classic(self) -> Deferred[None]:
        return self.run_async(self._handshake(CLASSIC.hex(), CLASSIC, TAG_INTERMEDIATE, True))

    def test_classic_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._handshake(CLASSIC.hex(), CLASSIC, TAG_INTERMEDIATE, False))

    def test_dd(self) -> Deferred[None]:
        return self.run_async(self._handshake(SECURE.hex(), SECURE, TAG_PADDED, True))

    def test_dd_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._handshake(SECURE.hex(), SECURE, TAG_PADDED, False))

    def test_dd_base64url(self) -> Deferred[None]:
        return self.run_async(self._handshake(SECURE.base64url(), SECURE, TAG_PADDED, True))

    def test_classic_secret_in_dd_form(self) -> Deferred[None]:
        # A classic secret also admits padded intermediate.
        text = "dd" + CLASSIC.key.hex()
        return self.run_async(self._handshake(text, CLASSIC, TAG_PADDED, True))

    async def _rejected(self, secret_text: str, reason: str = "bad-init") -> None:
        port = await self.start()
        message = await tdlib_test_proxy(LOCAL, port, secret_text, 2)
        self.assertNotEqual(message, "ok")
        self.assertNotIn(REACHED_DC, message)
        self.assertEqual(self.stats.rejected, {reason: 1})
        self.assertEqual(self.dc_connections(), 0)
        await self.no_clients()

    def test_wrong_secret(self) -> Deferred[None]:
        return self.run_async(self._rejected(WRONG.hex()))

    def test_wrong_dd_secret(self) -> Deferred[None]:
        return self.run_async(self._rejected("dd" + WRONG.hex()))

    def test_dd_secret_in_classic_form(self) -> Deferred[None]:
        # A dd secret admits only padded intermediate.
        # The key is right, the framing (TDLib's for a classic link) is not
        # one a dd secret admits: counted apart from bad inits.
        return self.run_async(self._rejected(SECURE.key.hex(), "transport-not-allowed"))
