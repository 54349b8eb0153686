"""
TDLib with ``ee`` secrets: fake TLS through the proxy to a FakeDC, and a
wrong secret ending up at the fronted site.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mtproxy_tw.testing import REQ_DH_PARAMS, REQ_PQ_MULTI, tdlib_test_proxy
from mtproxy_tw.wire.faketls import parse_client_hello
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED
from mtproxy_tw.wire.secrets import parse_secret
from tests.test_fronting import DOMAIN, EE, FrontingHarness
from tests.test_integration import LOCAL, WRONG
from tests.test_tdlib import REACHED_DC, SKIP

#: What TDLib reports when a real TLS server, not the proxy, answered.
HASH_MISMATCH = "Response hash mismatch"


class TDLibFakeTLSTests(FrontingHarness):
    skip = SKIP

    async def _handshake(self, secret_text: str, fast: bool) -> None:
        site = await self.site()
        port = await self.start(site=site, fast_mode=fast)
        for dc in (2, 4):
            message = await tdlib_test_proxy(LOCAL, port, secret_text, dc)
            self.assertIn(REACHED_DC, message, f"dc {dc}")
            fake = self.fakes[dc]
            self.assertEqual(fake.seen, [(TAG_PADDED, dc)])
            self.assertEqual(fake.connections[0].requests, [REQ_PQ_MULTI, REQ_DH_PARAMS])
        self.assertEqual(self.stats.accepted, {EE.name: 2})
        self.assertEqual(sum(self.stats.rejected.values()), 0)
        self.assertEqual(self.stats.fronted, {})
        self.assertEqual(self.new_connections(site), [])
        await self.no_clients()

    def test_ee_hex(self) -> Deferred[None]:
        return self.run_async(self._handshake(EE.hex(), True))

    def test_ee_hex_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._handshake(EE.hex(), False))

    def test_ee_base64url(self) -> Deferred[None]:
        return self.run_async(self._handshake(EE.base64url(), True))

    async def _fronted(self, secret_text: str, reason: str, sni: str = DOMAIN) -> str:
        site = await self.site()
        port = await self.start(site=site)
        message = await tdlib_test_proxy(LOCAL, port, secret_text, 2)
        self.assertNotEqual(message, "ok")
        self.assertNotIn(REACHED_DC, message)
        self.assertEqual(self.stats.fronted, {reason: 1})
        self.assertEqual(self.dc_connections(), 0)
        # The site got TDLib's own hello, whole: about 1.7-1.9 KB today.
        (conn,) = self.new_connections(site)
        await self.until(lambda: conn.closed, "the site connection to close")
        size = 5 + int.from_bytes(conn.received[3:5], "big")
        hello = parse_client_hello(bytes(conn.received[:size]))
        self.assertEqual(hello.server_names, (sni,))
        self.assertGreater(size, 1024)
        await self.no_clients()
        return message

    async def _wrong_secret(self) -> None:
        wrong = parse_secret("ee" + WRONG.hex() + DOMAIN.encode().hex(), "x")
        message = await self._fronted(wrong.hex(), "tls-bad-digest")
        # The site answered as a TLS 1.3 server; TDLib found no proxy digest.
        self.assertIn(HASH_MISMATCH, message)

    def test_wrong_ee_secret(self) -> Deferred[None]:
        return self.run_async(self._wrong_secret())

    async def _other_domain(self) -> None:
        # The right key with a domain the proxy does not serve.
        other = parse_secret("ee" + EE.key.hex() + b"other.example".hex(), "x")
        message = await self._fronted(other.hex(), "tls-unknown-sni", "other.example")
        self.assertIn(HASH_MISMATCH, message)

    def test_unknown_domain(self) -> Deferred[None]:
        return self.run_async(self._other_domain())
