"""
The whole direct-mode path on loopback: test client -> ProxyService -> FakeDC.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from mtproxy_tw.proxy.client import ClientProtocol
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import (
    DOWNLOAD_CHUNK,
    FakeDC,
    ObfuscatedClient,
    RawClient,
    buffered_bytes,
    connect_client,
    connect_raw,
    download_chunk,
    download_request,
)
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.obfuscated2 import (
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    InitiatorStreams,
    generate_init,
)
from mtproxy_tw.wire.secrets import Mode, Secret, parse_secret
from mtproxy_tw.wire.transports import IntermediateCodec
from tests.ports import hold_port

reactor: Any = _reactor
T = TypeVar("T")

LOCAL = "127.0.0.1"
CLASSIC = parse_secret("alice=" + "a1" * 16, "x")
SECURE = parse_secret("bob=dd" + "b2" * 16, "x")
OTHER = parse_secret("carol=" + "c3" * 16, "x")
SECRETS = (CLASSIC, SECURE, OTHER)
WRONG = bytes.fromhex("5e" * 16)

#: The DC ids that get their own FakeDC.
DC_IDS = (1, 2, -2, 4)

#: What the proxy may buffer for one pair while a client reads slowly. A
#: Twisted TCP transport pauses its producer once it holds more than its
#: ``bufferSize`` (256 KiB in current Twisted), and the paused side's last
#: read adds at most as much again: about 512 KiB, measured 270..510 KiB.
BUFFER_BOUND = 1 << 20

MiB = 1 << 20


def _port_number(port: IListeningPort) -> int:
    host = port.getHost()
    assert isinstance(host, IPv4Address | IPv6Address)
    return host.port


def _payload(size: int) -> bytes:
    # Never 8 zero bytes in front: the FakeDC would read MTProto.
    return (b"\x01" + os.urandom(size))[:size]


class ProxyHarness(TestCase):
    """
    A running proxy with one FakeDC per id of :data:`DC_IDS`, torn down
    cleanly after each test.
    """

    timeout = 60

    def run_async(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return ensureDeferred(coro)

    host = LOCAL

    async def start(
        self,
        secrets: tuple[Secret, ...] = SECRETS,
        host: str = LOCAL,
        more_dcs: dict[int, Address] | None = None,
        **options: Any,
    ) -> int:
        """
        Start FakeDCs and the proxy on ``host``; return the proxy's port.

        :param more_dcs: overrides added to the FakeDCs' own.
        """
        self.host = host
        self.fakes: dict[int, FakeDC] = {}
        overrides = dict(more_dcs or {})
        for dc in DC_IDS:
            fake = FakeDC(reactor)
            port: IListeningPort = reactor.listenTCP(0, fake, interface=host)
            self.addCleanup(port.stopListening)
            self.addCleanup(self._close_fake, fake)
            self.fakes[dc] = fake
            overrides[dc] = Address(host, _port_number(port))
        settings = Settings(secrets=secrets, dcs=DCTable(overrides=overrides), **options)
        escaped = host.replace(":", "\\:")
        listen = f"tcp6:0:interface={escaped}" if ":" in host else f"tcp:0:interface={host}"
        self.service = ProxyService(settings, reactor, [listen])
        self.service.startService()
        self.addCleanup(self._stop_service)
        ports = await self.service.listening()
        self.port: int = _port_number(ports[0])
        return self.port

    async def _close_fake(self, fake: FakeDC) -> None:
        for conn in fake.live():
            conn.transport.abortConnection()
            await conn.lost

    async def _stop_service(self) -> None:
        if self.service.running:
            await self.service.stopService()

    @property
    def stats(self) -> Any:
        return self.service.core.stats

    def dc_connections(self) -> int:
        return sum(fake.connection_count for fake in self.fakes.values())

    async def client(
        self,
        secret: Secret | bytes,
        tag: bytes | None = None,
        dc: int = 2,
        **kwargs: Any,
    ) -> ObfuscatedClient:
        client = await connect_client(reactor, self.host, self.port, secret, tag, dc, **kwargs)
        self.addCleanup(self._abort, client)
        return client

    async def raw(self, data: bytes) -> RawClient:
        client = await connect_raw(reactor, self.host, self.port, data)
        self.addCleanup(self._abort, client)
        return client

    async def _abort(self, client: ObfuscatedClient | RawClient) -> None:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost

    async def within(self, d: Deferred[T], seconds: float = 5.0) -> T:
        """
        Wait for ``d``, failing the test after ``seconds``.
        """
        return await d.addTimeout(seconds, reactor)

    async def until(self, predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
        """
        Poll ``predicate`` until it holds, failing the test after ``seconds``.
        """
        deadline = reactor.seconds() + seconds
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.002, lambda: None)

    async def no_clients(self) -> None:
        await self.until(lambda: not self.service.core.clients, "no live clients")

    def proxy_pair(self) -> ClientProtocol:
        (pair,) = self.service.core.clients
        return pair


def producer_paused(pair: ClientProtocol) -> bool:
    """
    Whether the proxy stopped reading from the DC for this client: Twisted
    paused it, or its splice pump holds bytes the client has not taken.
    """
    pump = getattr(pair._dc, "pump", None)
    if pump is not None:
        return pump.held > 0
    return bool(getattr(pair.transport, "producerPaused", False))


def _min_payload(tag: bytes) -> int:
    # Abridged counts 4-byte words; padded strips length mod 4 on receipt.
    return 1 if tag == TAG_INTERMEDIATE else 4


class EchoTests(ProxyHarness):
    """
    Payloads of every size cross both ways unchanged, in every framing.
    """

    async def _echo(self, secret: Secret, tag: bytes, fast: bool) -> None:
        await self.start(fast_mode=fast)
        client = await self.client(secret, tag, dc=2)
        sizes = [_min_payload(tag), 1024, 64 * 1024, MiB]
        payloads = [_payload(size) for size in sizes]
        for payload in payloads:
            echoed = await self.within(client.request(payload))
            self.assertEqual(len(echoed), len(payload))
            self.assertEqual(echoed, payload)
        # All at once: the stream keeps its order.
        for payload in payloads:
            client.send(payload)
        for payload in payloads:
            self.assertEqual(await self.within(client.receive()), payload)
        self.assertEqual(self.fakes[2].seen, [(tag, 2)])
        self.assertEqual(self.stats.accepted, {secret.name: 1})
        self.assertEqual(self.fakes[2].connections[0].packets, 2 * len(sizes))

    def test_classic_abridged(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_ABRIDGED, True))

    def test_classic_intermediate(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_INTERMEDIATE, True))

    def test_classic_padded(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_PADDED, True))

    def test_dd_padded(self) -> Deferred[None]:
        return self.run_async(self._echo(SECURE, TAG_PADDED, True))

    def test_classic_abridged_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_ABRIDGED, False))

    def test_classic_intermediate_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_INTERMEDIATE, False))

    def test_classic_padded_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_PADDED, False))

    def test_dd_padded_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(SECURE, TAG_PADDED, False))

    async def _first_bytes_with_init(self, fast: bool) -> None:
        # The init and the first packet in one segment: the proxy must keep
        # the bytes after the init while it connects to the DC.
        await self.start(fast_mode=fast)
        init = generate_init(TAG_INTERMEDIATE, 2, secret=CLASSIC.key)
        payload = _payload(4096)
        first = init.wire + init.encryptor.update(IntermediateCodec().encode(payload))
        together = InitiatorStreams(first, init.encryptor, init.decryptor)
        client = await self.client(CLASSIC, TAG_INTERMEDIATE, 2, init=together)
        self.assertEqual(await self.within(client.receive()), payload)

    def test_first_packet_with_init(self) -> Deferred[None]:
        return self.run_async(self._first_bytes_with_init(True))

    def test_first_packet_with_init_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._first_bytes_with_init(False))


class RoutingTests(ProxyHarness):
    """
    Secrets and DC ids select the right user and the right DC.
    """

    async def _secrets(self) -> None:
        await self.start()
        carol = await self.client(OTHER, TAG_INTERMEDIATE, dc=1)
        bob = await self.client(SECURE, TAG_PADDED, dc=4)
        alice = await self.client(CLASSIC, TAG_PADDED, dc=2)
        for client in (carol, bob, alice):
            self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        self.assertEqual(self.stats.accepted, {"carol": 1, "bob": 1, "alice": 1})
        self.assertEqual(self.fakes[1].seen, [(TAG_INTERMEDIATE, 1)])
        self.assertEqual(self.fakes[4].seen, [(TAG_PADDED, 4)])
        self.assertEqual(self.fakes[2].seen, [(TAG_PADDED, 2)])
        users = sorted(pair.user or "" for pair in self.service.core.clients)
        self.assertEqual(users, ["alice", "bob", "carol"])

    async def _no_delay(self) -> None:
        await self.start()
        client = await self.client(SECURE)
        payload = _payload(100)
        self.assertEqual(await self.within(client.request(payload)), payload)
        pair = self.proxy_pair()
        assert pair._upstream is not None
        transports: list[Any] = [pair.transport, pair._upstream.transport]
        self.assertEqual([t.getTcpNoDelay() for t in transports], [True, True])

    def test_both_sockets_send_without_delay(self) -> Deferred[None]:
        return self.run_async(self._no_delay())

    def test_secret_selects_user(self) -> Deferred[None]:
        return self.run_async(self._secrets())

    async def _route(self, dc: int, expected: int) -> None:
        await self.start()
        client = await self.client(SECURE, dc=dc)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        self.assertEqual(self.fakes[expected].seen, [(TAG_PADDED, dc)])
        self.assertEqual(self.dc_connections(), 1)

    def test_unknown_dc_goes_to_default(self) -> Deferred[None]:
        return self.run_async(self._route(7, 2))

    def test_dc_zero_goes_to_default(self) -> Deferred[None]:
        return self.run_async(self._route(0, 2))

    def test_media_dc_has_its_own_override(self) -> Deferred[None]:
        return self.run_async(self._route(-2, -2))

    def test_known_dc(self) -> Deferred[None]:
        return self.run_async(self._route(4, 4))

    async def _ipv6(self) -> None:
        await self.start(host="::1")
        client = await self.client(CLASSIC, TAG_ABRIDGED, dc=4)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        self.assertEqual(self.fakes[4].seen, [(TAG_ABRIDGED, 4)])

    def test_ipv6_loopback(self) -> Deferred[None]:
        return self.run_async(self._ipv6())

    async def _unreachable(self) -> None:
        # Refused, and no listener of this test (the proxy's own tcp:0) is given it.
        nowhere = Address(LOCAL, hold_port(self, LOCAL).getsockname()[1])
        await self.start(more_dcs={3: nowhere})
        client = await self.client(SECURE, dc=3)
        client.send(b"ping")
        await self.within(client.lost)
        self.assertEqual(client.bytes_received, 0)
        self.assertEqual(self.stats.upstream_failures, {"connect": 1})
        self.assertEqual(self.stats.accepted, {"bob": 1})
        await self.no_clients()

    def test_unreachable_dc_closes_client(self) -> Deferred[None]:
        return self.run_async(self._unreachable())

    async def _split_init(self) -> None:
        # No DC connection until all 64 bytes of a valid init are in.
        await self.start()
        init = generate_init(TAG_PADDED, 2, secret=SECURE.key)
        partial = InitiatorStreams(init.wire[:63], init.encryptor, init.decryptor)
        slow = await self.client(SECURE, TAG_PADDED, 2, init=partial)
        # Another client's full round trip: the proxy has read those 63
        # bytes by now, and has not connected anywhere for them.
        other = await self.client(CLASSIC, TAG_INTERMEDIATE, 2)
        self.assertEqual(await self.within(other.request(b"ping")), b"ping")
        self.assertEqual(len(self.service.core.clients), 2)
        self.assertEqual(self.fakes[2].seen, [(TAG_INTERMEDIATE, 2)])
        self.assertEqual(self.dc_connections(), 1)
        slow.transport.write(init.wire[63:])
        self.assertEqual(await self.within(slow.request(b"pong")), b"pong")
        self.assertEqual(self.fakes[2].seen, [(TAG_INTERMEDIATE, 2), (TAG_PADDED, 2)])

    def test_init_in_pieces(self) -> Deferred[None]:
        return self.run_async(self._split_init())


class RejectionTests(ProxyHarness):
    """
    Bad clients are closed without a byte, and never reach a DC.
    """

    async def _assert_rejected(self, client: ObfuscatedClient | RawClient, reason: str) -> None:
        await self.within(client.lost)
        received = (
            client.bytes_received if isinstance(client, ObfuscatedClient) else len(client.received)
        )
        self.assertEqual(received, 0)
        self.assertEqual(self.stats.rejected[reason], 1)
        self.assertEqual(sum(self.stats.accepted.values()), 0)
        self.assertEqual(self.dc_connections(), 0)
        await self.no_clients()

    async def _wrong_secret(self) -> None:
        await self.start()
        client = await self.client(WRONG, TAG_INTERMEDIATE)
        client.send(b"ping")
        await self._assert_rejected(client, "bad-init")

    def test_wrong_secret(self) -> Deferred[None]:
        return self.run_async(self._wrong_secret())

    async def _garbage(self) -> None:
        await self.start()
        client = await self.raw(b"\x01" + os.urandom(199))
        await self._assert_rejected(client, "bad-init")

    def test_garbage(self) -> Deferred[None]:
        return self.run_async(self._garbage())

    async def _tag_not_allowed(self, secret: Secret, tag: bytes, **options: Any) -> None:
        await self.start(secrets=(secret,), **options)
        client = await self.client(secret.key, tag)
        client.send(b"ping")
        # The right key in a framing its secret does not admit: counted
        # apart from scanners' bad inits.
        await self._assert_rejected(client, "transport-not-allowed")

    def test_abridged_with_dd_secret(self) -> Deferred[None]:
        return self.run_async(self._tag_not_allowed(SECURE, TAG_ABRIDGED))

    def test_intermediate_with_dd_secret(self) -> Deferred[None]:
        return self.run_async(self._tag_not_allowed(SECURE, TAG_INTERMEDIATE))

    def test_classic_disabled(self) -> Deferred[None]:
        return self.run_async(
            self._tag_not_allowed(CLASSIC, TAG_INTERMEDIATE, modes=frozenset({Mode.SECURE}))
        )

    async def _replay(self) -> None:
        await self.start()
        init = generate_init(TAG_PADDED, 2, secret=SECURE.key)
        first = await self.client(SECURE, TAG_PADDED, 2, init=init)
        self.assertEqual(await self.within(first.request(b"ping")), b"ping")
        second = await self.raw(init.wire + os.urandom(32))
        await self.within(second.lost)
        self.assertEqual(bytes(second.received), b"")
        self.assertEqual(self.stats.rejected, {"replay": 1})
        self.assertEqual(self.stats.accepted, {"bob": 1})
        self.assertEqual(self.dc_connections(), 1)
        # The first connection is unharmed.
        self.assertEqual(await self.within(first.request(b"pong")), b"pong")

    def test_replayed_init(self) -> Deferred[None]:
        return self.run_async(self._replay())

    async def _stalled(self) -> None:
        await self.start(handshake_timeout=0.5)
        started = reactor.seconds()
        client = await self.raw(os.urandom(10))
        await self.within(client.lost, 5.0)
        self.assertGreaterEqual(reactor.seconds() - started, 0.45)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(self.stats.rejected, {"handshake-timeout": 1})
        self.assertEqual(self.dc_connections(), 0)
        await self.no_clients()

    def test_stalled_handshake_times_out(self) -> Deferred[None]:
        return self.run_async(self._stalled())


class LifecycleTests(ProxyHarness):
    """
    Either side closing closes the other; stopping the service drains.
    """

    async def _client_closes(self) -> None:
        await self.start()
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        (dc_side,) = self.fakes[2].connections
        await self.within(client.close())
        await self.within(dc_side.lost)
        await self.no_clients()
        self.assertEqual(self.stats.active, 0)

    def test_client_close_closes_dc(self) -> Deferred[None]:
        return self.run_async(self._client_closes())

    async def _dc_closes(self) -> None:
        await self.start()
        client = await self.client(CLASSIC, TAG_ABRIDGED)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        (dc_side,) = self.fakes[2].connections
        dc_side.transport.loseConnection()
        await self.within(client.lost)
        await self.no_clients()
        self.assertEqual(self.stats.active, 0)

    def test_dc_close_closes_client(self) -> Deferred[None]:
        return self.run_async(self._dc_closes())

    async def _drain(self) -> None:
        await self.start(drain_timeout=2.0)
        relayed = await self.client(SECURE)
        self.assertEqual(await self.within(relayed.request(b"ping")), b"ping")
        handshaking = await self.raw(os.urandom(10))
        await self.until(lambda: len(self.service.core.clients) == 2, "two clients")
        await self.within(self.service.stopService())
        await self.within(relayed.lost)
        await self.within(handshaking.lost)
        self.assertEqual(self.service.core.clients, set())
        await self.within(self.fakes[2].connections[0].lost)
        refused = connect_raw(reactor, LOCAL, self.port)
        await self.assertFailure(refused, ConnectionRefusedError)

    def test_stop_service_drains(self) -> Deferred[None]:
        return self.run_async(self._drain())

    async def _drain_busy(self) -> None:
        await self.start(drain_timeout=0.5)
        client = await self.client(SECURE)
        client.on_packet = client.send  # ping-pong for as long as it lasts
        client.send(b"ping")
        fake = self.fakes[2]
        await self.until(lambda: sum(c.packets for c in fake.connections) > 10, "traffic")
        started = reactor.seconds()
        await self.within(self.service.stopService())
        self.assertGreaterEqual(reactor.seconds() - started, 0.45)
        await self.within(client.lost)
        self.assertEqual(self.service.core.clients, set())

    def test_stop_service_cuts_busy_pairs(self) -> Deferred[None]:
        return self.run_async(self._drain_busy())

    async def _idle(self) -> None:
        await self.start(idle_timeout=0.2)
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        await self.within(client.lost)
        await self.within(self.fakes[2].connections[0].lost)
        self.assertEqual(self.stats.idle_closed, 1)
        await self.no_clients()

    def test_idle_pair_closed(self) -> Deferred[None]:
        return self.run_async(self._idle())


class SlowReaderTests(ProxyHarness):
    """
    A large download to a client that reads slowly keeps the proxy's own
    buffers bounded: it stops reading from the DC instead.
    """

    async def _download(self, total: int, fast: bool) -> None:
        step = 4 * MiB
        await self.start(fast_mode=fast)
        client = await self.client(SECURE)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        pair = self.proxy_pair()
        upstream = pair._upstream
        assert upstream is not None
        (dc_side,) = self.fakes[2].connections

        def proxy_buffered() -> int:
            return buffered_bytes(pair.transport) + buffered_bytes(upstream.transport)

        received = 0
        index = 0
        bad: list[int] = []
        stop_at = step
        peak = 0
        samples = 0

        def sample() -> None:
            nonlocal peak, samples
            samples += 1
            peak = max(peak, proxy_buffered())

        def on_packet(payload: bytes) -> None:
            nonlocal received, index, stop_at
            if payload != download_chunk(index, len(payload)):
                bad.append(index)
            index += 1
            received += len(payload)
            sample()
            if received >= stop_at:
                client.pause()

        client.on_packet = on_packet
        sampler = LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(0.001)

        def stop_sampler() -> None:
            if sampler.running:
                sampler.stop()

        self.addCleanup(stop_sampler)

        client.pause()
        client.send(download_request(total))
        stages = 0
        while received < total:
            # Hold the client until the backpressure reached the DC: the
            # proxy stopped reading from the DC and the DC's writes block.
            await self.until(
                lambda: (producer_paused(pair) and dc_side.paused) or not dc_side.downloading,
                "backpressure to reach the DC",
                10.0,
            )
            stages += 1
            sample()
            self.assertLessEqual(proxy_buffered(), BUFFER_BOUND)
            stop_at = target = min(received + step, total)
            client.resume()
            await self.until(
                lambda target=target: received >= target,  # type: ignore[misc]
                "the client to read a step",
                20.0,
            )
        sampler.stop()
        self.assertEqual(received, total)
        self.assertEqual(index, -(-total // DOWNLOAD_CHUNK))
        self.assertEqual(bad, [])
        self.assertGreater(stages, 1)
        self.assertGreater(samples, 10)
        self.assertLessEqual(peak, BUFFER_BOUND, f"the proxy buffered {peak} bytes")
        # The connection still works after the download.
        client.on_packet = None
        client.resume()
        self.assertEqual(await self.within(client.request(b"done")), b"done")

    def test_download_64mb_fast_mode(self) -> Deferred[None]:
        return self.run_async(self._download(64 * MiB, True))

    def test_download_16mb_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._download(16 * MiB, False))
