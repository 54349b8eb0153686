"""
kurigram (a maintained Pyrogram fork with MTProxy support) through the
proxy: its own obfuscated2 and fake-TLS client code carries packets to a
FakeDC and back, in direct mode, fast and slow.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from mtproxy_tw.wire.obfuscated2 import TAG_PADDED
from mtproxy_tw.wire.secrets import Secret
from tests.test_fronting import EE, FrontingHarness
from tests.test_integration import LOCAL, SECURE

try:
    from pyrogram.connection.proxy import MTProxy
    from pyrogram.connection.transport.tcp import TCPIntermediatePadded
except ImportError:  # pragma: no cover - kurigram is a test dependency
    SKIP: str | None = "kurigram is not installed"
else:
    SKIP = None


def _payloads() -> list[bytes]:
    # Whole 4-byte words, never 8 zero bytes in front (the FakeDC would read
    # MTProto).
    return [b"\x01" + os.urandom(size - 1) for size in (4, 1024, 64 * 1024, 400 * 1024)]


def _echo(port: int, secret: Secret, dc: int, payloads: list[bytes]) -> list[bytes]:
    """
    In a thread of its own: kurigram's transport to the proxy, each payload
    sent and its echo read back.
    """

    async def run() -> list[bytes]:
        # kurigram keeps the dd marker, and for ee takes the bare key with
        # the domain apart.
        marked = secret.key if secret.domain else b"\xdd" + secret.key
        proxy = MTProxy(LOCAL, port, marked, sni_hostname=secret.domain)
        transport = TCPIntermediatePadded(proxy=proxy, dc_id=dc)
        await transport.connect(("149.154.167.51", 443))  # never dialled: the proxy is
        answers = []
        try:
            for payload in payloads:
                await transport.send(payload)
                answer = await asyncio.wait_for(transport.recv(), 20)
                answers.append(bytes(answer or b""))
        finally:
            await transport.close()
        return answers

    return asyncio.run(run())


class KurigramTests(FrontingHarness):
    skip = SKIP

    async def _echo(self, secret: Secret, fast: bool) -> None:
        site = await self.site()
        port = await self.start(secrets=(secret,), site=site, fast_mode=fast)
        payloads = _payloads()
        answers: Any = await self.within(deferToThread(_echo, port, secret, 2, payloads), 60)
        # Padded framing hides a packet's true length (up to 15 bytes of
        # padding either way), so the echo is the payload give or take its
        # padding: byte for byte up to the shorter of the two.
        for answer, payload in zip(answers, payloads, strict=True):
            self.assertLess(abs(len(answer) - len(payload)), 16)
            common = min(len(answer), len(payload))
            self.assertEqual(answer[:common], payload[:common])
        self.assertEqual(self.fakes[2].seen, [(TAG_PADDED, 2)])
        self.assertEqual(self.stats.fronted, {})
        self.assertEqual(self.new_connections(site), [])

    def test_ee_echo(self) -> Deferred[None]:
        return self.run_async(self._echo(EE, fast=True))

    def test_ee_echo_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(EE, fast=False))

    def test_dd_echo(self) -> Deferred[None]:
        return self.run_async(self._echo(SECURE, fast=True))
