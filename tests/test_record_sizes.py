"""
The records of the download direction, through the whole proxy: sized as a
TLS 1.3 server with dynamic record sizing sizes them (small at the start of
a burst and after a second without sending, then full 16401-byte records),
read back by the test client and by TDLib itself.
"""

from __future__ import annotations

import functools
import random
import struct
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import (
    REQ_DH_PARAMS,
    REQ_PQ_MULTI,
    TDLIB_FINGERPRINT,
    FakeDC,
    FakeDCProtocol,
    FakeTLSClient,
    download_chunk,
    download_request,
    fakedc,
    tdlib_test_proxy,
)
from mtproxy_tw.testing.memory import MemoryProxy
from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.faketls import FULL_RECORD
from tests.test_fronting import EE, FrontingHarness
from tests.test_integration import LOCAL
from tests.test_tdlib import REACHED_DC, SKIP

MiB = 1 << 20
#: The largest small record (1400 bytes of plaintext and the AEAD overhead)
#: and the medium one of the ramp.
SMALL_MAX = 1400 + 17
MEDIUM = 4229 + 17


def check_burst(test: Any, sizes: list[int]) -> None:
    """
    The record sizes of one burst: small first, never above a full record,
    full ones once the ramp is over. (A record is shorter than
    ``MIN_RECORD`` only where the proxy read fewer bytes than that.)
    """
    test.assertLessEqual(sizes[0], SMALL_MAX)
    test.assertLessEqual(max(sizes), FULL_RECORD)
    first_full = sizes.index(FULL_RECORD)
    test.assertLessEqual(max(sizes[:first_full]), MEDIUM)
    test.assertGreaterEqual(first_full, 80)  # 40 small, 40 medium


def received(client: FakeTLSClient) -> list[bytes]:
    packets = []
    while client._packets:
        packets.append(client._packets.pop(0))
    return packets


class _Echo:
    """
    A middle-proxy session that sends the client back what it sent, in the
    client's own framing, as the middle proxy's answers arrive.
    """

    def __init__(self, client: Any) -> None:
        self.client = client  # what the proxy attached: it has deliver()

    def feed(self, data: bytes) -> None:
        self.client.deliver(data)

    def close(self) -> None:
        pass


class _EchoUpstream:
    def attach(self, client: Any, dc: int, tag: bytes) -> _Echo:
        return _Echo(client)


class MemoryRecordTests(SynchronousTestCase):
    """
    Client, proxy and fake DC in memory, on a clock the test moves.
    """

    packets = 0  # download packets the fake DC sent so far

    def connect(self, proxy: MemoryProxy) -> FakeTLSClient:
        client = FakeTLSClient(EE.key, reactor=proxy.reactor)
        proxy.accept(client)
        proxy.flush()
        self.successResultOf(client.answered)
        client.start()
        proxy.flush()
        return client

    def download(self, proxy: MemoryProxy, client: FakeTLSClient, size: int) -> list[int]:
        """
        Download ``size`` bytes; the sizes of the records they came in.
        """
        before, first = len(client.record_sizes), self.packets
        client.send(download_request(size))
        proxy.flush()
        packets = received(client)
        self.packets += size >> 16
        expected = (download_chunk(i) for i in range(first, self.packets))
        self.assertEqual(b"".join(packets), b"".join(expected))
        self.assertEqual(client.bad_records, [])
        return client.record_sizes[before:]

    def test_direct_download(self) -> None:
        proxy = MemoryProxy(Settings(secrets=(EE,)))
        proxy.serve_dc(2, FakeDC(proxy.reactor))
        client = self.connect(proxy)
        sizes = self.download(proxy, client, MiB)
        check_burst(self, sizes)
        self.assertGreater(sizes.count(FULL_RECORD), 30)
        # Half a second later: the same burst, full records at once.
        proxy.advance(0.5)
        sizes = self.download(proxy, client, 4 * 65536)
        self.assertEqual(sizes[0], FULL_RECORD)
        # After a second without sending, a new burst starts small.
        proxy.advance(1.0)
        check_burst(self, self.download(proxy, client, MiB))

    def test_middle_proxy_delivery(self) -> None:
        proxy = MemoryProxy(Settings(secrets=(EE,)))
        proxy.core.middle = _EchoUpstream()
        client = self.connect(proxy)
        payload = random.Random(3).randbytes(MiB)
        answer = client.request(payload)
        proxy.flush()
        self.assertEqual(self.successResultOf(answer), payload)
        self.assertEqual(client.bad_records, [])
        check_burst(self, client.record_sizes)


class _BigResPQ(FakeDCProtocol):
    """
    Answers ``req_pq_multi`` with a ``resPQ`` of about 320 kB: ``fingerprints``
    unknown key fingerprints before TDLib's. TDLib can only go on to
    ``req_DH_params`` if it read every record of it intact.
    """

    fingerprints = 40_000

    def _mtproto(self, payload: bytes) -> bytes | None:
        answer = super()._mtproto(payload)
        if answer is None or self.requests[-1] != REQ_PQ_MULTI:
            return answer
        body = answer[20:]
        assert body[-16:-12] == struct.pack("<I", fakedc.VECTOR)
        rng = random.Random(self.fingerprints)
        fingerprints = [rng.getrandbits(64) for _ in range(self.fingerprints)]
        body = (
            body[:-16]
            + struct.pack("<II", fakedc.VECTOR, len(fingerprints) + 1)
            + struct.pack(f"<{len(fingerprints)}Q", *fingerprints)
            + struct.pack("<Q", TDLIB_FINGERPRINT)
        )
        return answer[:16] + struct.pack("<I", len(body)) + body


class TDLibRecordTests(FrontingHarness):
    """
    TDLib reads the proxy's records: full 16401-byte ones, and larger ones
    still (its reader takes any 16-bit record length).
    """

    skip = SKIP

    async def _big_answer(self, **writer: Any) -> list[int]:
        site = await self.site()
        port = await self.start(site=site)
        fake = self.fakes[2]
        self.patch(fake, "buildProtocol", lambda addr: _BigResPQ(fake))
        sizes: list[int] = []

        class Writer(faketls.RecordWriter):
            __slots__ = ()

            def wrap(self, data: bytes, now: float) -> bytes:
                wire = super().wrap(data, now)
                pos = 0
                while pos < len(wire):
                    size = int.from_bytes(wire[pos + 3 : pos + 5], "big")
                    sizes.append(size)
                    pos += 5 + size
                return wire

        self.patch(faketls, "RecordWriter", functools.partial(Writer, **writer))
        message = await tdlib_test_proxy(LOCAL, port, EE.hex(), 2, timeout=10.0)
        self.assertIn(REACHED_DC, message)
        self.assertEqual(fake.connections[0].requests, [REQ_PQ_MULTI, REQ_DH_PARAMS])
        self.assertGreater(sum(sizes), 320_000)
        return sizes

    async def _full_records(self) -> None:
        sizes = await self._big_answer()
        check_burst(self, sizes)
        self.assertGreater(sizes.count(FULL_RECORD), 3)

    def test_full_tls13_records(self) -> Deferred[None]:
        return self.run_async(self._full_records())

    async def _largest_records(self) -> None:
        sizes = await self._big_answer(full=0xFFFF, ramp=0)
        self.assertEqual(max(sizes), 0xFFFF)

    def test_largest_records(self) -> Deferred[None]:
        return self.run_async(self._largest_records())


class TCPDownloadTests(FrontingHarness):
    """
    A 1 MiB download over loopback TCP, read by the test client.
    """

    async def _download(self, fast: bool) -> None:
        site = await self.site()
        await self.start(site=site, fast_mode=fast)
        client = await self.answered()
        client.start()
        client.send(download_request(MiB))
        for index in range(MiB >> 16):
            self.assertEqual(await self.within(client.receive()), download_chunk(index))
        self.assertEqual(client.bad_records, [])
        check_burst(self, client.record_sizes)
        self.assertGreater(client.record_sizes.count(FULL_RECORD), 20)

    def test_download(self) -> Deferred[None]:
        return self.run_async(self._download(True))

    def test_download_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._download(False))
