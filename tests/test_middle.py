"""
Middle-proxy mode: the pool and session logic in memory, then whole flows on
loopback (test client -> ProxyService -> FakeMiddleProxy, config from a
FakeConfigServer).
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mtproxy_tw.config.cli import GeneratedOptions
from mtproxy_tw.middle import session as session_module
from mtproxy_tw.middle.address import ExternalAddress
from mtproxy_tw.middle.cache import CONFIG_FILE, CONFIG_V6_FILE, SECRET_FILE
from mtproxy_tw.middle.connection import MEConnection
from mtproxy_tw.middle.settings import MiddleSettings, StaticConfig
from mtproxy_tw.middle.telegramconfig import TelegramConfig
from mtproxy_tw.middle.upstream import MiddleProxy
from mtproxy_tw.middle_options import (
    build_middle,
    middle_settings_from_options,
    parse_size,
)
from mtproxy_tw.proxy.core import ProxyCore
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import (
    DOWNLOAD_CHUNK,
    FakeConfigServer,
    FakeDC,
    FakeMiddleProxy,
    ObfuscatedClient,
    config_text,
    connect_client,
    connect_protocol,
    download_chunk,
    download_request,
)
from mtproxy_tw.wire import rpc
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED
from mtproxy_tw.wire.proxyconfig import parse_proxy_config
from mtproxy_tw.wire.secrets import Secret, parse_secret
from mtproxy_tw.wire.transports import codec_for_tag

reactor: Any = _reactor
T = TypeVar("T")

LOCAL = "127.0.0.1"
CLASSIC = parse_secret("alice=" + "a1" * 16, "x")
SECURE = parse_secret("bob=dd" + "b2" * 16, "x")
SECRETS = (CLASSIC, SECURE)
AD_TAG = bytes.fromhex("0123456789abcdef0123456789abcdef")
PROXY_SECRET = bytes(range(128))
#: Another valid proxy secret (Telegram's next one, or a wrong one).
OTHER_SECRET = bytes(range(128, 256))
MiB = 1 << 20


def _payload(size: int) -> bytes:
    # Never 8 zero bytes in front (that reads as an MTProto key exchange),
    # never the download magic.
    return (b"\x01" + os.urandom(size))[:size]


def _port(port: IListeningPort) -> int:
    host = port.getHost()
    assert isinstance(host, IPv4Address | IPv6Address)
    return host.port


# -- in memory


class StubClient:
    """
    Stands in for relay.ClientProtocol: records what a session does to it.
    """

    def __init__(self, peer: tuple[str, int] = ("198.51.100.7", 50000)) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 443),
            peerAddress=IPv4Address("TCP", *peer),
        )
        self.delivered = bytearray()
        self.backlog = 0
        self.paused = False
        self.pauses = 0
        self.closed = False

    def deliver(self, framed: bytes) -> None:
        self.delivered += framed

    def buffered(self) -> int:
        return self.backlog + len(self.delivered)

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def session_closed(self) -> None:
        self.closed = True


class MemoryHarness(SynchronousTestCase):
    """
    A MiddleProxy on a MemoryReactorClock; connections to the fake middle
    proxy are completed by hand over iosim.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.core = ProxyCore(Settings(secrets=SECRETS), self.reactor)
        self.fake = FakeMiddleProxy(PROXY_SECRET, self.reactor)
        self.observer = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def upstream(
        self, endpoints: dict[int, list[tuple[str, int]]] | None = None, **options: Any
    ) -> MiddleProxy:
        config = parse_proxy_config(config_text(endpoints or {2: [("149.154.162.39", 80)]}))
        settings = MiddleSettings(ad_tag=AD_TAG, **options)
        external = ExternalAddress(self.reactor, [ipaddress.ip_address("203.0.113.5")])
        self.middle = MiddleProxy(
            self.core,
            settings,
            StaticConfig(config, config, PROXY_SECRET),
            external=external,
            random=random.Random(1),
        )
        self.fake.client_ip = "203.0.113.5"
        return self.middle

    def complete(self, local_port: int = 40000) -> tuple[MEConnection, Any, iosim.IOPump]:
        """
        Connect the oldest pending connection attempt to the fake.
        """
        host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        client: Any = factory.buildProtocol(None)
        server = self.fake.buildProtocol(None)
        client_transport = iosim.FakeTransport(
            client,
            isServer=False,
            hostAddress=IPv4Address("TCP", "10.0.0.1", local_port),
            peerAddress=IPv4Address("TCP", host, port),
        )
        server_transport = iosim.FakeTransport(
            server,
            isServer=True,
            hostAddress=IPv4Address("TCP", host, port),
            peerAddress=IPv4Address("TCP", "10.0.0.1", local_port),
        )
        # The clock moves with the bytes: a connection writes once per reactor wake-up.
        pump = iosim.connect(
            server, server_transport, client, client_transport, clock=self.reactor
        )
        protocol = client._wrappedProtocol
        assert isinstance(protocol, MEConnection)
        return protocol, server, pump

    def fail_next(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        self.reactor.tcpClients.pop(0)[2].clientConnectionFailed(
            self.reactor.connectors.pop(0), Failure(ConnectionRefusedError())
        )

    def attach(self, tag: bytes = TAG_INTERMEDIATE, dc: int = 2) -> tuple[StubClient, Any]:
        client = StubClient()
        session = self.middle.attach(client, dc, tag)
        return client, session

    def decode(self, client: StubClient, tag: bytes) -> list[bytes]:
        codec = codec_for_tag(tag)
        packets = [p.payload for p in codec.feed(bytes(client.delivered))]
        client.delivered.clear()
        return packets


class SessionTests(MemoryHarness):
    def test_one_client_through(self) -> None:
        """
        Bytes wait until the connection is ready, then cross both ways.
        """
        self.upstream(pool_min=1)
        client, session = self.attach()
        first, second = _payload(64), _payload(128)
        codec = codec_for_tag(TAG_INTERMEDIATE)
        session.feed(codec.encode(first))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        conn, _server, pump = self.complete()
        pump.flush()
        self.assertTrue(conn.ready)
        self.assertEqual(self.decode(client, TAG_INTERMEDIATE), [first])
        session.feed(codec.encode(second))
        pump.flush()
        self.assertEqual(self.decode(client, TAG_INTERMEDIATE), [second])
        self.assertEqual(self.fake.ad_tags, [AD_TAG, AD_TAG])
        self.assertEqual(
            self.fake.client_addrs, [(ipaddress.ip_address("198.51.100.7"), 50000)] * 2
        )
        # The proxy address: the public one, with the port the client used.
        self.assertEqual(self.fake.proxy_addrs[0], (ipaddress.ip_address("203.0.113.5"), 443))
        self.assertEqual(self.fake.flags[0], 0x20021008)
        self.assertEqual(len(self.fake.conn_ids), 1)

    def test_handshake_pids(self) -> None:
        """
        RPC_HANDSHAKE carries real process ids: ours and the middle proxy's.
        """
        self.upstream(pool_min=1)
        self.attach()
        _, _, pump = self.complete(local_port=40001)
        pump.flush()
        (hs,) = self.fake.handshakes
        self.assertEqual(hs.flags, 0)
        self.assertEqual(hs.sender_pid.ip, ipaddress.IPv4Address("203.0.113.5"))
        self.assertEqual(hs.sender_pid.port, 40001)
        self.assertEqual(hs.sender_pid.pid, os.getpid() & 0xFFFF)
        self.assertEqual(hs.sender_pid.utime, 1_700_000_000)
        self.assertEqual(hs.peer_pid.ip, ipaddress.IPv4Address("149.154.162.39"))
        self.assertEqual(hs.peer_pid.port, 80)

    def test_flags_quick_ack_and_unencrypted(self) -> None:
        self.upstream(pool_min=1)
        _client, session = self.attach(TAG_ABRIDGED)
        _, _, pump = self.complete()
        pump.flush()
        codec = codec_for_tag(TAG_ABRIDGED)
        plain = bytes(8) + _payload(32)
        session.feed(codec.encode(plain) + codec.encode(b"\x01abc" * 4, quick_ack=True))
        pump.flush()
        self.assertEqual(
            self.fake.flags,
            [0x40021008 | rpc.FLAG_NOT_ENCRYPTED, 0x40021008 | rpc.FLAG_QUICKACK],
        )

    def _quick_ack(self, tag: bytes) -> tuple[bytes, bytes]:
        self.upstream(pool_min=1)
        client, session = self.attach(tag)
        _, _, pump = self.complete()
        pump.flush()
        payload = b"\x01\x02\x03\x04" + _payload(60)
        session.feed(codec_for_tag(tag).encode(payload, quick_ack=True))
        pump.flush()
        token = FakeMiddleProxy.ack_token(payload)
        delivered = bytes(client.delivered)
        client.delivered = bytearray(delivered[4:])
        self.assertEqual(self.decode(client, tag), [payload])
        return delivered[:4], token

    def test_quick_ack_abridged_reversed(self) -> None:
        sent, token = self._quick_ack(TAG_ABRIDGED)
        self.assertEqual(sent, token[::-1])
        self.assertTrue(sent[0] & 0x80)

    def test_quick_ack_intermediate_raw(self) -> None:
        sent, token = self._quick_ack(TAG_INTERMEDIATE)
        self.assertEqual(sent, token)

    def test_quick_ack_padded_raw(self) -> None:
        sent, token = self._quick_ack(TAG_PADDED)
        self.assertEqual(sent, token)

    def test_packets_of_one_read_go_in_one_write(self) -> None:
        self.upstream(pool_min=1)
        _client, session = self.attach()
        conn, _, pump = self.complete()
        pump.flush()
        codec = codec_for_tag(TAG_INTERMEDIATE)
        writes = len(conn.transport.stream)
        session.feed(b"".join(codec.encode(_payload(40)) for _ in range(10)))
        self.reactor.advance(0)
        self.assertEqual(len(conn.transport.stream), writes + 1)
        pump.flush()
        self.assertEqual(self.fake.requests, 10)

    def test_padding_noise_drawn_in_blocks(self) -> None:
        draws: list[int] = []

        def urandom(count: int) -> bytes:
            draws.append(count)
            return bytes(range(16 * len(draws), 16 * len(draws) + count))

        self.patch(session_module.os, "urandom", urandom)
        noise = session_module._Noise(block=8)
        taken = [noise.take(4), noise.take(3), noise.take(2)]
        self.assertEqual(taken, [bytes([16, 17, 18, 19]), bytes([20, 21, 22]), bytes([32, 33])])
        self.assertEqual(draws, [8, 8])

    def test_reads_of_one_wake_up_go_in_one_write(self) -> None:
        self.upstream(pool_min=1)
        (_c1, first), (_c2, second) = self.attach(), self.attach()
        conn, _, pump = self.complete()
        pump.flush()
        self.assertIs(first.conn, second.conn)
        codec = codec_for_tag(TAG_INTERMEDIATE)
        writes = len(conn.transport.stream)
        first.feed(codec.encode(_payload(40)))
        second.feed(codec.encode(_payload(40)))
        first.feed(codec.encode(_payload(40)))
        self.assertEqual(len(conn.transport.stream), writes)
        self.reactor.advance(0)
        self.assertEqual(len(conn.transport.stream), writes + 1)
        pump.flush()
        self.assertEqual(self.fake.requests, 3)

    def test_client_close_sends_close_conn(self) -> None:
        self.upstream(pool_min=1)
        _client, session = self.attach()
        conn, _, pump = self.complete()
        pump.flush()
        session.feed(codec_for_tag(TAG_INTERMEDIATE).encode(_payload(16)))
        pump.flush()
        (conn_id,) = self.fake.conn_ids
        session.close()
        pump.flush()
        self.assertEqual(self.fake.closed_conn_ids, [conn_id])
        self.assertEqual(conn.sessions, {})
        session.close()
        session.feed(b"ignored")
        pump.flush()
        self.assertEqual(self.fake.closed_conn_ids, [conn_id])

    def test_close_ext_closes_only_that_client(self) -> None:
        self.upstream(pool_min=1)
        a, sa = self.attach()
        b, sb = self.attach()
        conn, server, pump = self.complete()
        pump.flush()
        server.close_ext(sa.conn_id)
        pump.flush()
        self.assertTrue(a.closed)
        self.assertFalse(b.closed)
        self.assertEqual(list(conn.sessions), [sb.conn_id])
        self.assertEqual(self.fake.closed_conn_ids, [])
        sa.close()  # the relay still calls close(): nothing more is sent
        pump.flush()
        self.assertEqual(self.fake.closed_conn_ids, [])

    def test_answers_of_one_read_in_one_delivery(self) -> None:
        self.upstream(pool_min=1)
        client, session = self.attach(TAG_PADDED)
        _, server, pump = self.complete()
        pump.flush()
        calls: list[bytes] = []
        client.deliver = calls.append  # type: ignore[method-assign,assignment]
        answers = [_payload(4 * n) for n in (1, 2, 200, 3)]
        for answer in answers:
            server.send_answer(session.conn_id, answer)
        pump.flush()
        self.assertEqual(len(calls), 1)
        decoded = codec_for_tag(TAG_PADDED).feed(calls[0])
        self.assertEqual([p.payload for p in decoded], answers)

    def test_answer_for_unknown_conn_id(self) -> None:
        self.upstream(pool_min=1)
        self.attach()
        _, server, pump = self.complete()
        pump.flush()
        server.send_answer(12345, b"\x01" * 16)
        pump.flush()
        self.assertEqual(self.fake.closed_conn_ids, [12345])

    def test_pings_both_ways(self) -> None:
        self.upstream(pool_min=1, ping_interval=5.0, ping_timeout=12.0)
        self.attach()
        conn, server, pump = self.complete()
        pump.flush()
        server.ping(77)
        pump.flush()
        self.assertEqual(server.pongs, [77])
        self.reactor.advance(5)
        pump.flush()
        self.assertEqual(self.fake.pings, 1)
        self.assertTrue(conn.ready)
        # The fake answers, so the connection stays; then it falls silent.
        server.pause_reading()
        server.transport.write = lambda data: None
        for _ in range(3):
            self.reactor.advance(5)
            pump.flush()
        self.assertTrue(conn.dead)

    def test_slow_client_is_cut_alone(self) -> None:
        self.upstream(pool_min=1, client_buffer_cap=64 << 10)
        slow, ss = self.attach()
        fast, fs = self.attach()
        _conn, _, pump = self.complete()
        pump.flush()
        codec = codec_for_tag(TAG_INTERMEDIATE)
        slow.backlog = 60 << 10
        ss.feed(codec.encode(_payload(8 << 10)))
        fs.feed(codec.encode(_payload(8 << 10)))
        pump.flush()
        self.assertTrue(slow.closed)
        self.assertFalse(fast.closed)
        self.assertEqual(self.fake.closed_conn_ids, [ss.conn_id])
        self.assertEqual(self.middle.counters["buffer-cap"], 1)
        payload = _payload(100)
        fs.feed(codec.encode(payload))
        pump.flush()
        self.assertEqual(self.decode(fast, TAG_INTERMEDIATE)[-1], payload)

    def test_full_connection_pauses_its_clients(self) -> None:
        self.upstream(pool_min=1)
        a, _ = self.attach()
        b, _ = self.attach()
        conn, _, pump = self.complete()
        pump.flush()
        conn.pauseProducing()
        self.assertTrue(a.paused and b.paused)
        c, _ = self.attach()
        self.assertTrue(c.paused)
        conn.resumeProducing()
        self.assertFalse(a.paused or b.paused or c.paused)

    def test_pending_bytes_are_bounded(self) -> None:
        self.upstream(pool_min=1, pending_limit=1024)
        client, session = self.attach()
        codec = codec_for_tag(TAG_INTERMEDIATE)
        session.feed(codec.encode(_payload(512)))
        self.assertFalse(client.paused)
        session.feed(codec.encode(_payload(1024)))
        self.assertTrue(client.paused)
        _, _, pump = self.complete()
        pump.flush()
        self.assertFalse(client.paused)
        self.assertEqual(self.fake.requests, 2)

    def test_bad_framing_closes_the_client(self) -> None:
        self.upstream(pool_min=1)
        client, session = self.attach()
        _, _, pump = self.complete()
        pump.flush()
        session.feed(codec_for_tag(TAG_INTERMEDIATE).encode(b"\x01\x02\x03"))
        pump.flush()
        self.assertTrue(client.closed)
        self.assertEqual(self.fake.closed_conn_ids, [session.conn_id])

    def test_wait_timeout(self) -> None:
        self.upstream(pool_min=1, wait_timeout=3.0)
        client, _ = self.attach()
        self.reactor.advance(3)
        self.assertTrue(client.closed)
        self.assertEqual(self.middle.counters["wait-timeout"], 1)


class PoolTests(MemoryHarness):
    def test_many_clients_share_one_connection(self) -> None:
        self.upstream(pool_min=1, pool_max=1)
        clients = [self.attach() for _ in range(200)]
        self.assertEqual(len(self.reactor.tcpClients), 1)
        conn, _, pump = self.complete()
        pump.flush()
        codec = codec_for_tag(TAG_INTERMEDIATE)
        payloads = [_payload(4 * (i + 1)) for i in range(200)]
        for (_, session), payload in zip(clients, payloads, strict=True):
            session.feed(codec.encode(payload))
        pump.flush()
        for (client, _), payload in zip(clients, payloads, strict=True):
            self.assertEqual(self.decode(client, TAG_INTERMEDIATE), [payload])
        self.assertEqual(len(self.fake.conn_ids), 200)
        self.assertEqual(conn.load, 200)

    def test_grows_with_load(self) -> None:
        """
        A connection carrying clients_per_connection clients makes the pool
        open another, up to pool_max; clients go to the least loaded one.
        """
        self.upstream(pool_min=1, pool_max=3, clients_per_connection=2)
        self.attach()
        first, _, p1 = self.complete(40001)
        p1.flush()
        self.assertEqual(self.reactor.tcpClients, [])
        self.attach()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        second, _, p2 = self.complete(40002)
        p2.flush()
        self.attach()
        self.attach()
        self.assertEqual([first.load, second.load], [2, 2])
        third, _, p3 = self.complete(40003)
        p3.flush()
        for _ in range(10):
            self.attach()
        self.assertEqual(self.reactor.tcpClients, [])  # pool_max reached
        self.assertEqual([first.load, second.load, third.load], [5, 5, 4])

    def test_keeps_pool_min(self) -> None:
        self.upstream(pool_min=3, pool_max=4)
        self.attach()
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_unreachable_endpoint_is_skipped(self) -> None:
        class First(random.Random):
            def choice(self, seq: Any) -> Any:
                return seq[0]

        self.upstream(
            {2: [("149.154.162.1", 80), ("149.154.162.2", 80)]},
            pool_min=1,
            backoff_initial=10.0,
        )
        self.middle.random = First()
        client, session = self.attach()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("149.154.162.1", 80))
        self.fail_next()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("149.154.162.2", 80))
        conn, _, pump = self.complete()
        pump.flush()
        self.assertIs(session.conn, conn)
        pool = self.middle.pools[2]
        self.assertEqual(pool.backoff[("149.154.162.1", 80)].failures, 1)
        # Losing the connection: the dead endpoint is still backing off.
        conn.transport.loseConnection()
        pump.flush()
        self.assertTrue(client.closed)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("149.154.162.2", 80))

    def test_all_unreachable_refuses_clients(self) -> None:
        self.upstream(
            {2: [("149.154.162.1", 80), ("149.154.162.2", 80)]}, pool_min=1, backoff_initial=10.0
        )
        client, _ = self.attach()
        self.fail_next()
        self.assertFalse(client.closed)
        self.fail_next()
        self.assertTrue(client.closed)
        self.assertTrue(self.middle.pools[2].down)
        late, _ = self.attach()
        self.assertTrue(late.closed)
        self.assertEqual(self.middle.counters["unavailable"], 2)
        logged = [e for e in self.observer if "unreachable" in e["log_format"]]
        self.assertEqual(len(logged), 1)
        # After the backoff the pool tries again and recovers.
        self.reactor.advance(15)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        _, _, pump = self.complete()
        pump.flush()
        self.assertFalse(self.middle.pools[2].down)
        ok, _ = self.attach()
        self.assertFalse(ok.closed)

    def test_all_unreachable_falls_back_to_direct(self) -> None:
        self.core.settings = Settings(
            secrets=SECRETS, dcs=DCTable({2: Address("127.0.0.1", 9443)})
        )
        self.upstream({2: [("149.154.162.1", 80)]}, pool_min=1, direct_fallback=True)
        client, session = self.attach(TAG_PADDED)
        codec = codec_for_tag(TAG_PADDED)
        payload = _payload(64)
        session.feed(codec.encode(payload))
        self.fail_next()
        self.assertFalse(client.closed)
        self.assertIsNotNone(session.direct)
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", 9443))
        # Complete the direct connection to a FakeDC.
        _, _, factory, _, _ = self.reactor.tcpClients.pop()
        self.reactor.connectors.pop()
        dc = FakeDC(self.reactor)
        server, leg = dc.buildProtocol(None), factory.buildProtocol(None)
        pump = iosim.connect(server, iosim.makeFakeServer(server), leg, iosim.makeFakeClient(leg))
        pump.flush()
        self.assertEqual(dc.seen, [(TAG_PADDED, 2)])
        self.assertEqual(self.decode(client, TAG_PADDED), [payload])
        logged = [e for e in self.observer if "DIRECT" in e.get("what", "")]
        self.assertEqual(len(logged), 1)
        self.assertEqual(logged[0]["log_level"].name, "error")

    def test_lost_connection_closes_only_its_clients(self) -> None:
        self.upstream(pool_min=2)
        a, sa = self.attach()
        c1, _, p1 = self.complete(40001)
        c2, _, p2 = self.complete(40002)
        p1.flush()
        p2.flush()
        b, sb = self.attach()
        self.assertIs(sa.conn, c1)
        self.assertIs(sb.conn, c2)
        c1.transport.loseConnection()
        p1.flush()
        self.assertTrue(a.closed)
        self.assertFalse(b.closed)
        self.assertEqual(self.middle.pools[2].ready, [c2])
        self.assertEqual(len(self.reactor.tcpClients), 1)  # re-established
        c3, _, p3 = self.complete(40003)
        p3.flush()
        self.assertEqual(self.middle.pools[2].ready, [c2, c3])

    def test_unknown_dc_goes_to_default_cluster(self) -> None:
        self.upstream({2: [("149.154.162.1", 80)], 4: [("149.154.164.1", 80)]}, pool_min=1)
        self.attach(dc=999)
        self.attach(dc=0)
        self.assertEqual(list(self.middle.pools), [2])
        self.attach(dc=-4)
        self.attach(dc=4)
        self.assertEqual(sorted(self.middle.pools), [2, 4])

    def test_stop_refuses_new_clients(self) -> None:
        self.upstream(pool_min=1)
        _a, _ = self.attach()
        conn, _, pump = self.complete()
        pump.flush()
        self.middle.startService()
        stopped = self.middle.stopService()
        self.assertFalse(stopped.called)
        late, _ = self.attach()
        self.assertTrue(late.closed)
        a_session = next(iter(conn.sessions.values()))
        a_session.close()
        pump.flush()
        self.reactor.advance(0.1)
        self.assertTrue(stopped.called)


class HandshakeRejectionTests(MemoryHarness):
    def _rejected(self, **fake: Any) -> str:
        self.upstream(pool_min=1, backoff_initial=10.0)
        for name, value in fake.items():
            setattr(self.fake, name, value)
        client, _ = self.attach()
        conn, _, pump = self.complete()
        pump.flush()
        self.assertEqual(conn.state, "closed")
        self.assertTrue(client.closed)
        self.assertEqual(self.middle.counters["handshake-rejected"], 1)
        lines = [e for e in self.observer if "rejected the handshake" in e["log_format"]]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["log_level"].name, "warn")
        text = lines[0]["likely"]
        self.assertNotIn(AD_TAG.hex(), repr(lines[0]))
        self.assertNotIn(PROXY_SECRET.hex(), repr(lines[0]))
        return str(text)

    def test_wrong_external_address(self) -> None:
        text = self._rejected(client_ip="198.51.100.99")
        self.assertIn("203.0.113.5", text)
        self.assertIn("--nat-ip", text)
        self.assertEqual(self.fake.handshake_failures, {"keys": 1})

    def test_clock_skew(self) -> None:
        text = self._rejected(clock_offset=120.0)
        self.assertIn("clock", text)
        self.assertEqual(self.fake.handshake_failures, {"clock": 1})

    def test_handshake_error(self) -> None:
        text = self._rejected(reject_handshake=-6)
        self.assertIn("203.0.113.5", text)


# -- on loopback


class First(random.Random):
    """
    Picks the first candidate endpoint: makes "the first entry is dead" exact.
    """

    def choice(self, seq: Any) -> Any:
        return seq[0]


class AckClient(ObfuscatedClient):
    """
    Keeps the decrypted stream as it is (quick acks are not framed).
    """

    def __init__(self, key: bytes, tag: bytes, dc: int) -> None:
        super().__init__(key, tag, dc)
        self.stream = bytearray()
        self.grew: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.stream += self.init.decryptor.update(data)
        waiting, self.grew = self.grew, None
        if waiting is not None:
            waiting.callback(None)


class LoopbackHarness(TestCase):
    """
    ProxyService with ``core.middle`` built by build_middle, a FakeMiddleProxy
    and a FakeConfigServer, all on 127.0.0.1.
    """

    timeout = 60

    def run_async(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return ensureDeferred(coro)

    async def start(
        self,
        *,
        middle: dict[str, Any] | None = None,
        fake: dict[str, Any] | None = None,
        endpoints: dict[int, list[tuple[str, int]]] | None = None,
        seed_cache: bool = True,
        site_reachable: bool = True,
        wait_for_config: bool = True,
        pick_first: bool = False,
        secrets: tuple[Secret, ...] = SECRETS,
        me_secret: bytes = PROXY_SECRET,
        site_secret: bytes = PROXY_SECRET,
        **proxy_settings: Any,
    ) -> int:
        self.fake = FakeMiddleProxy(me_secret, reactor, **(fake or {}))
        self.me_listener = reactor.listenTCP(0, self.fake, interface=LOCAL)
        self.me_port = _port(self.me_listener)
        self.addCleanup(self._stop_fake, self.fake)
        self.addCleanup(lambda: self.me_listener.stopListening())
        if endpoints is None:
            endpoints = {dc: [(LOCAL, self.me_port)] for dc in (2, -2, 4)}
        self.config_body = config_text(endpoints)
        self.site = FakeConfigServer(
            reactor, config_v4=self.config_body, config_v6=self.config_body, secret=site_secret
        )
        site_listener = reactor.listenTCP(0, self.site, interface=LOCAL)
        site_port = _port(site_listener)
        self.addCleanup(site_listener.stopListening)
        if not site_reachable:
            await site_listener.stopListening()
        self.http_pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self._close_http)
        self.state_dir = Path(self.mktemp())
        self.state_dir.mkdir(parents=True)
        if seed_cache:
            (self.state_dir / CONFIG_FILE).write_bytes(self.config_body)
            (self.state_dir / CONFIG_V6_FILE).write_bytes(self.config_body)
            (self.state_dir / SECRET_FILE).write_bytes(PROXY_SECRET)
        options: dict[str, Any] = {
            "ad_tag": AD_TAG,
            "proxy_config_url": self.site.url(site_port, "getProxyConfig"),
            "proxy_config_v6_url": self.site.url(site_port, "getProxyConfigV6"),
            "proxy_secret_url": self.site.url(site_port, "getProxySecret"),
            "ip_lookup_url": self.site.url(site_port, "ip"),
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "http_timeout": 5.0,
        }
        options.update(middle or {})
        settings = MiddleSettings(**options)
        self.fake_dc = FakeDC(reactor)
        dc_listener = reactor.listenTCP(0, self.fake_dc, interface=LOCAL)
        self.addCleanup(dc_listener.stopListening)
        self.addCleanup(self._stop_fake_dc)
        dcs = DCTable({dc: Address(LOCAL, _port(dc_listener)) for dc in (2, -2, 4)})
        self.service = ProxyService(
            Settings(secrets=secrets, dcs=dcs, drain_timeout=1.0, **proxy_settings),
            reactor,
            [f"tcp:0:interface={LOCAL}"],
        )
        middle_service, upstream = build_middle(
            self.service.core,
            settings,
            self.state_dir,
            reactor,
            http_client=HTTPClient(Agent(reactor, pool=self.http_pool)),
            random=First() if pick_first else None,
        )
        assert isinstance(upstream, MiddleProxy)
        self.middle = upstream
        assert isinstance(upstream.config, TelegramConfig)
        self.config: TelegramConfig = upstream.config
        self.service.core.middle = upstream
        self.top = MultiService()
        self.service.setServiceParent(self.top)
        middle_service.setServiceParent(self.top)
        self.top.startService()
        self.addCleanup(self._stop_top)
        if wait_for_config:
            await self.within(self.config.next_round())
        ports = await self.service.listening()
        self.port = _port(ports[0])
        return self.port

    async def _stop_top(self) -> None:
        if self.top.running:
            await self.top.stopService()

    async def _close_http(self) -> None:
        await self.http_pool.closeCachedConnections()
        await self.within(self.site.idle())

    async def _stop_fake(self, fake: FakeMiddleProxy) -> None:
        await self.within(fake.drop_all())

    async def _stop_fake_dc(self) -> None:
        for conn in self.fake_dc.live():
            conn.transport.abortConnection()
            await conn.lost

    async def within(self, d: Deferred[T], seconds: float = 10.0) -> T:
        return await d.addTimeout(seconds, reactor)

    async def until(self, predicate: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
        deadline = reactor.seconds() + seconds
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.002, lambda: None)

    async def client(
        self, secret: Secret = CLASSIC, tag: bytes | None = None, dc: int = 2
    ) -> ObfuscatedClient:
        client = await connect_client(reactor, LOCAL, self.port, secret, tag, dc)
        self.addCleanup(self._abort, client)
        return client

    async def _abort(self, client: ObfuscatedClient) -> None:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost

    def pool(self, dc: int = 2) -> Any:
        return self.middle.pools[dc]


class LoopbackTests(LoopbackHarness):
    async def _echo(self, secret: Secret, tag: bytes) -> None:
        await self.start()
        client = await self.client(secret, tag)
        sizes = [4, 1024, 64 * 1024, MiB - 4]
        payloads = [_payload(size) for size in sizes]
        for payload in payloads:
            self.assertEqual(await self.within(client.request(payload)), payload)
        for payload in payloads:
            client.send(payload)
        for payload in payloads:
            self.assertEqual(await self.within(client.receive()), payload)
        self.assertEqual(self.fake.ad_tags, [AD_TAG] * 8)
        local = client.transport.getHost()
        self.assertEqual(set(self.fake.client_addrs), {(ipaddress.ip_address(LOCAL), local.port)})
        self.assertEqual(len(self.fake.conn_ids), 1)
        self.assertEqual(self.service.core.stats.accepted, {secret.name: 1})
        await client.close()
        await self.until(lambda: self.fake.closed_conn_ids == list(self.fake.conn_ids), "close")

    def test_classic_abridged(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_ABRIDGED))

    def test_classic_intermediate(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_INTERMEDIATE))

    def test_classic_padded(self) -> Deferred[None]:
        return self.run_async(self._echo(CLASSIC, TAG_PADDED))

    def test_dd_padded(self) -> Deferred[None]:
        return self.run_async(self._echo(SECURE, TAG_PADDED))

    async def _quick_ack(self, tag: bytes) -> None:
        await self.start()
        client = AckClient(CLASSIC.key, tag, 2)
        await connect_protocol(reactor, LOCAL, self.port, client)
        self.addCleanup(self._abort, client)
        payload = b"\x05\x06\x07\x08" + _payload(28)
        client.send_stream(codec_for_tag(tag).encode(payload, quick_ack=True))
        header = 1 if tag == TAG_ABRIDGED else 4
        while len(client.stream) < 4 + header + len(payload):
            client.grew = Deferred()
            await self.within(client.grew)
        token = FakeMiddleProxy.ack_token(payload)
        expected = token[::-1] if tag == TAG_ABRIDGED else token
        self.assertEqual(bytes(client.stream[:4]), expected)
        self.assertEqual(codec_for_tag(tag).feed(bytes(client.stream[4:]))[0].payload, payload)

    def test_quick_ack_abridged(self) -> Deferred[None]:
        return self.run_async(self._quick_ack(TAG_ABRIDGED))

    def test_quick_ack_intermediate(self) -> Deferred[None]:
        return self.run_async(self._quick_ack(TAG_INTERMEDIATE))

    def test_quick_ack_padded(self) -> Deferred[None]:
        return self.run_async(self._quick_ack(TAG_PADDED))

    async def _many(self) -> None:
        await self.start(middle={"pool_min": 1, "pool_max": 1})
        count = 200
        clients = [
            await self.client(*[(CLASSIC, TAG_ABRIDGED), (CLASSIC, None), (SECURE, None)][i % 3])
            for i in range(count)
        ]
        payloads = [struct.pack("<I", i + 1) * (1 + i % 50) for i in range(count)]
        for client, payload in zip(clients, payloads, strict=True):
            client.send(payload)
            client.send(payload[::-1])
        for client, payload in zip(clients, payloads, strict=True):
            self.assertEqual(await self.within(client.receive()), payload)
            self.assertEqual(await self.within(client.receive()), payload[::-1])
        self.assertEqual(self.fake.ready_count, 1)
        self.assertEqual(len(self.fake.conn_ids), count)
        (conn,) = self.pool(2).ready
        self.assertEqual(conn.load, count)

    def test_200_clients_on_one_connection(self) -> Deferred[None]:
        return self.run_async(self._many())

    async def _slow_client(self) -> None:
        await self.start(middle={"pool_min": 1, "pool_max": 1, "client_buffer_cap": 1 * MiB})
        slow = await self.client()
        fast = await self.client()
        self.assertEqual(await self.within(fast.request(b"\x01" * 8)), b"\x01" * 8)
        slow.pause()
        slow.send(download_request(256 * MiB))
        # The others keep flowing while the slow one fills up.
        while not self.middle.counters["buffer-cap"]:
            payload = _payload(4096)
            self.assertEqual(await self.within(fast.request(payload)), payload)
        # The slow one was cut (a paused reader only notices once it reads).
        slow.resume()
        await self.within(slow.lost)
        self.assertEqual(self.middle.counters["buffer-cap"], 1)
        (slow_id,) = [cid for cid in self.fake.conn_ids if cid in self.fake.closed_conn_ids]
        self.assertEqual(self.fake.closed_conn_ids, [slow_id])
        for _ in range(5):
            payload = _payload(64 * 1024)
            self.assertEqual(await self.within(fast.request(payload)), payload)
        (virtual,) = [v for v in self.fake.virtual_dcs if v.conn_id == slow_id]
        self.assertFalse(virtual.downloading)
        self.assertLess(virtual.sent, 200 * MiB)

    def test_slow_client_cut_at_cap(self) -> Deferred[None]:
        return self.run_async(self._slow_client())

    async def _download(self) -> None:
        await self.start(middle={"pool_min": 1})
        client = await self.client(SECURE)
        size = 16 * MiB
        client.send(download_request(size))
        got = 0
        index = 0
        while got < size:
            chunk = await self.within(client.receive())
            self.assertEqual(chunk, download_chunk(index, min(DOWNLOAD_CHUNK, size - got)))
            got += len(chunk)
            index += 1

    def test_download(self) -> Deferred[None]:
        return self.run_async(self._download())

    async def _me_backpressure(self) -> None:
        # The echo comes back in one burst; a slow test machine must not turn
        # this into a test of the per-client cap (test_slow_client_cut_at_cap).
        await self.start(middle={"pool_min": 1, "pool_max": 1, "client_buffer_cap": 1 << 30})
        a = await self.client()
        b = await self.client()
        self.assertEqual(await self.within(a.request(b"\x01" * 4)), b"\x01" * 4)
        self.assertEqual(await self.within(b.request(b"\x02" * 4)), b"\x02" * 4)
        (conn,) = self.pool().ready
        for server in self.fake.live():
            server.pause_reading()
        payload = _payload(MiB - 4)
        sent = 0
        while not conn.paused:
            a.send(payload)
            sent += 1
            await deferLater(reactor, 0, lambda: None)
            self.assertLess(sent, 200, "the connection never paused")
        sessions = list(conn.sessions.values())
        self.assertTrue(all("me" in s._pauses for s in sessions))
        for server in self.fake.live():
            server.resume_reading()
        for _ in range(sent):
            self.assertEqual(await self.within(a.receive(), 30), payload)
        await self.until(lambda: not conn.paused, "the connection to drain")
        self.assertEqual(await self.within(b.request(b"\x03" * 4)), b"\x03" * 4)

    def test_full_me_connection_pauses_clients(self) -> Deferred[None]:
        return self.run_async(self._me_backpressure())


class ResilienceTests(LoopbackHarness):
    async def _drop_and_return(self) -> None:
        await self.start(middle={"pool_min": 1})
        a = await self.client()
        self.assertEqual(await self.within(a.request(b"\x01" * 8)), b"\x01" * 8)
        a.send(download_request(64 * MiB))
        await self.within(a.receive())
        await self.fake.drop_all()  # mid-stream
        await self.within(a.lost)
        # Re-established for the next clients.
        b = await self.client()
        self.assertEqual(await self.within(b.request(b"\x02" * 8)), b"\x02" * 8)
        # Now the middle proxy goes away for a while.
        await self.me_listener.stopListening()
        await self.fake.drop_all()
        await self.within(b.lost)
        await self.until(lambda: self.pool().down, "the pool to notice")
        c = await self.client()
        await self.within(c.lost)
        self.me_listener = reactor.listenTCP(self.me_port, self.fake, interface=LOCAL)
        await self.until(lambda: bool(self.pool().ready), "the pool to reconnect")
        d = await self.client()
        self.assertEqual(await self.within(d.request(b"\x03" * 8)), b"\x03" * 8)

    def test_me_drops_and_comes_back(self) -> Deferred[None]:
        return self.run_async(self._drop_and_return())

    async def _dead_first_entry(self) -> None:
        dead = reactor.listenTCP(0, FakeDC(reactor), interface=LOCAL)
        dead_port = _port(dead)
        await dead.stopListening()
        placeholder = FakeMiddleProxy(PROXY_SECRET, reactor)
        live = reactor.listenTCP(0, placeholder, interface=LOCAL)
        await live.stopListening()
        await self.start(
            middle={"pool_min": 1, "backoff_initial": 30.0, "backoff_max": 30.0},
            pick_first=True,
            endpoints={2: [(LOCAL, dead_port)]},
            seed_cache=False,
            wait_for_config=False,
        )
        # Publish a config whose first entry is dead, the second the fake.
        body = config_text({2: [(LOCAL, dead_port), (LOCAL, self.me_port)]})
        self.site.bodies["/getProxyConfig"] = body
        await self.within(self.config.next_round())
        await self.within(self.config.refresh())
        client = await self.client()
        self.assertEqual(await self.within(client.request(b"\x01" * 8)), b"\x01" * 8)
        pool = self.pool()
        self.assertEqual(pool.backoff[(LOCAL, dead_port)].failures, 1)
        self.assertEqual(self.fake.ready_count, 1)

    def test_unreachable_first_entry(self) -> Deferred[None]:
        return self.run_async(self._dead_first_entry())

    async def _fallback(self) -> None:
        dead = reactor.listenTCP(0, FakeDC(reactor), interface=LOCAL)
        dead_port = _port(dead)
        await dead.stopListening()
        await self.start(
            middle={"pool_min": 1, "direct_fallback": True, "backoff_initial": 30.0},
            endpoints={2: [(LOCAL, dead_port)]},
        )
        client = await self.client(SECURE)
        payload = _payload(1000)
        self.assertEqual(await self.within(client.request(payload)), payload)
        self.assertEqual(self.fake_dc.seen, [(TAG_PADDED, 2)])
        self.assertEqual(self.middle.counters["direct-fallback"], 1)

    def test_direct_fallback(self) -> Deferred[None]:
        return self.run_async(self._fallback())

    async def _new_config(self) -> None:
        await self.start(middle={"pool_min": 1, "pool_max": 2, "clients_per_connection": 2})
        a = await self.client()
        self.assertEqual(await self.within(a.request(b"\x01" * 8)), b"\x01" * 8)
        # A broken download keeps the old config.
        self.site.bodies["/getProxyConfig"] = b"proxy_for 2 garbage"
        self.site.status["/getProxySecret"] = 500
        await self.within(self.config.refresh())
        self.assertEqual(self.config.config_v4, parse_proxy_config(self.config_body))
        self.assertEqual(self.config.secret, PROXY_SECRET)
        self.assertEqual(self.config.failures["config"], 1)
        self.assertEqual(self.config.failures["secret"], 1)
        self.assertEqual((self.state_dir / CONFIG_FILE).read_bytes(), self.config_body)
        # A new middle proxy appears: new connections use it, old ones stay.
        other = FakeMiddleProxy(PROXY_SECRET, reactor)
        other_listener = reactor.listenTCP(0, other, interface=LOCAL)
        self.addCleanup(self._stop_fake, other)
        self.addCleanup(other_listener.stopListening)
        new_body = config_text({2: [(LOCAL, _port(other_listener))]})
        self.site.bodies["/getProxyConfig"] = new_body
        del self.site.status["/getProxySecret"]
        await self.within(self.config.refresh())
        self.assertEqual((self.state_dir / CONFIG_FILE).read_bytes(), new_body)
        b = await self.client()  # fills the old connection: the pool grows
        await self.until(lambda: len(self.pool().ready) == 2, "a second connection")
        c = await self.client()
        self.assertEqual(await self.within(c.request(b"\x03" * 8)), b"\x03" * 8)
        self.assertEqual(other.requests, 1)
        self.assertEqual(await self.within(a.request(b"\x04" * 8)), b"\x04" * 8)
        self.assertEqual(await self.within(b.request(b"\x05" * 8)), b"\x05" * 8)
        self.assertEqual(self.fake.requests, 3)

    def test_broken_download_then_new_config(self) -> Deferred[None]:
        return self.run_async(self._new_config())

    async def _site_down(self) -> None:
        await self.start(site_reachable=False)
        self.assertEqual(self.config.sources, dict.fromkeys(self.config.sources, "cache"))
        self.assertEqual(self.config.failures, dict.fromkeys(self.config.sources, 1))
        client = await self.client()
        self.assertEqual(await self.within(client.request(b"\x01" * 8)), b"\x01" * 8)

    def test_site_unreachable_uses_cache(self) -> Deferred[None]:
        return self.run_async(self._site_down())

    async def _empty_state(self) -> None:
        await self.start(seed_cache=False)
        # The downloaded secret is in use once a middle proxy has accepted it.
        self.assertEqual(self.config.candidate, PROXY_SECRET)
        client = await self.client()
        self.assertEqual(await self.within(client.request(b"\x01" * 8)), b"\x01" * 8)
        self.assertEqual(self.config.sources, dict.fromkeys(self.config.sources, "download"))
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), PROXY_SECRET)

    def test_empty_state_dir_fetches_at_start(self) -> Deferred[None]:
        return self.run_async(self._empty_state())


class SecretRotationTests(LoopbackHarness):
    """
    A downloaded proxy secret replaces the one in use only once a middle
    proxy has accepted a handshake made with it.
    """

    async def _rotated(self) -> None:
        # Telegram moved to a new secret; the middle proxies already use it.
        await self.start(middle={"pool_min": 1}, me_secret=OTHER_SECRET, site_secret=OTHER_SECRET)
        self.assertEqual(self.config.secret, PROXY_SECRET)
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), PROXY_SECRET)
        client = await self.client()
        self.assertEqual(await self.within(client.request(b"\x01" * 8)), b"\x01" * 8)
        self.assertEqual(self.config.secret, OTHER_SECRET)
        self.assertEqual(self.config.sources["secret"], "download")
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), OTHER_SECRET)
        self.assertEqual(self.fake.handshake_failures, {})

    def test_new_secret_is_promoted_after_a_handshake(self) -> Deferred[None]:
        return self.run_async(self._rotated())

    async def _refused(self, downloaded: bytes, failure: str) -> None:
        # The download looks right, but the middle proxies do not know it.
        await self.start(middle={"pool_min": 1}, site_secret=downloaded)
        self.assertEqual(self.config.secret, PROXY_SECRET)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        client = await self.client()
        self.assertEqual(await self.within(client.request(b"\x01" * 8)), b"\x01" * 8)
        self.assertEqual(self.fake.handshake_failures, {failure: 1})
        self.assertEqual(self.config.secret, PROXY_SECRET)
        self.assertEqual(self.config.sources["secret"], "cache")
        self.assertEqual((self.state_dir / SECRET_FILE).read_bytes(), PROXY_SECRET)
        warnings = [e for e in observer if e["log_level"] == LogLevel.warn]
        (warning,) = warnings
        self.assertIn("refused", warning["log_format"])
        for event in observer:
            self.assertNotIn(downloaded.hex(), repr(event))
            self.assertNotIn(PROXY_SECRET.hex(), repr(event))
        # No backoff from the middle proxy: it was not at fault.
        self.assertEqual(self.pool().backoff, {})
        # Further clients use the proven secret.
        other = await self.client()
        self.assertEqual(await self.within(other.request(b"\x02" * 8)), b"\x02" * 8)
        self.assertEqual(self.fake.handshake_failures, {failure: 1})

    def test_refused_secret_falls_back(self) -> Deferred[None]:
        return self.run_async(self._refused(OTHER_SECRET, "nonce"))

    def test_refused_secret_with_the_same_key_select_falls_back(self) -> Deferred[None]:
        return self.run_async(self._refused(PROXY_SECRET[:4] + OTHER_SECRET[4:], "keys"))


# -- options


class _Options(GeneratedOptions):
    pass


def _parse(*argv: str) -> MiddleSettings | None:
    options = _Options()
    options.parseOptions(list(argv))
    return middle_settings_from_options(options)


class OptionsTests(SynchronousTestCase):
    def test_direct_by_default(self) -> None:
        self.assertIsNone(_parse())

    def test_ad_tag_turns_middle_on(self) -> None:
        settings = _parse("--ad-tag", AD_TAG.hex().upper())
        assert settings is not None
        self.assertEqual(settings.ad_tag, AD_TAG)
        self.assertFalse(settings.direct_fallback)
        self.assertFalse(settings.prefer_ipv6)
        self.assertEqual(settings.proxy_config_url, "https://core.telegram.org/getProxyConfig")
        self.assertEqual(
            settings.proxy_config_v6_url, "https://core.telegram.org/getProxyConfigV6"
        )
        self.assertEqual(settings.proxy_secret_url, "https://core.telegram.org/getProxySecret")
        self.assertEqual(settings.config_refresh, 3600)
        self.assertEqual(settings.client_buffer_cap, 8 * MiB)
        self.assertNotIn(AD_TAG.hex(), repr(settings))

    def test_upstream_overrides(self) -> None:
        self.assertIsNone(_parse("--ad-tag", AD_TAG.hex(), "--upstream", "direct"))
        settings = _parse("--upstream", "middle")
        assert settings is not None
        self.assertIsNone(settings.ad_tag)
        self.assertTrue(settings.direct_fallback)

    def test_everything(self) -> None:
        settings = _parse(
            "--ad-tag",
            AD_TAG.hex(),
            "--nat-ip",
            "203.0.113.9",
            "--nat-ip",
            "[2001:db8::9]",
            "--proxy-config-url",
            "http://127.0.0.1:8080/c",
            "--proxy-config-v6-url",
            "http://127.0.0.1:8080/c6",
            "--proxy-secret-url",
            "http://127.0.0.1:8080/s",
            "--ip-lookup-url",
            "http://127.0.0.1:8080/ip",
            "--config-refresh",
            "600",
            "--middle-pool-min",
            "1",
            "--middle-pool-max",
            "4",
            "--middle-clients-per-connection",
            "50",
            "--client-buffer-cap",
            "512K",
            "--direct-fallback",
            "--prefer-ipv6",
            "--connect-timeout",
            "3",
        )
        assert settings is not None
        self.assertEqual(
            settings.nat_ips,
            (ipaddress.ip_address("203.0.113.9"), ipaddress.ip_address("2001:db8::9")),
        )
        self.assertEqual(settings.proxy_secret_url, "http://127.0.0.1:8080/s")
        self.assertEqual(settings.config_refresh, 600)
        self.assertEqual((settings.pool_min, settings.pool_max), (1, 4))
        self.assertEqual(settings.clients_per_connection, 50)
        self.assertEqual(settings.client_buffer_cap, 512 << 10)
        self.assertTrue(settings.direct_fallback)
        self.assertTrue(settings.prefer_ipv6)
        self.assertEqual(settings.handshake_timeout, 3.0)

    def test_errors_name_the_option(self) -> None:
        tag = AD_TAG.hex()
        for argv, option in [
            (("--ad-tag", "xyz"), "--ad-tag"),
            (("--ad-tag", tag[:-2]), "--ad-tag"),
            (("--upstream", "sideways"), "--upstream"),
            (("--nat-ip", "example.com"), "--nat-ip"),
            (("--nat-ip", "0.0.0.0"), "--nat-ip"),
            (("--nat-ip", "1.2.3.4", "--nat-ip", "5.6.7.8"), "--nat-ip"),
            (("--ad-tag", tag, "--proxy-config-url", "ftp://x/y"), "--proxy-config-url"),
            (("--ad-tag", tag, "--proxy-secret-url", "nonsense"), "--proxy-secret-url"),
            (("--ad-tag", tag, "--config-refresh", "0"), "--config-refresh"),
            (("--ad-tag", tag, "--config-refresh", "soon"), "--config-refresh"),
            (("--ad-tag", tag, "--middle-pool-min", "0"), "--middle-pool-min"),
            (("--ad-tag", tag, "--middle-pool-max", "2000"), "--middle-pool-max"),
            (("--ad-tag", tag, "--middle-pool-min", "9"), "--middle-pool-max"),
            (("--ad-tag", tag, "--client-buffer-cap", "lots"), "--client-buffer-cap"),
            (("--ad-tag", tag, "--client-buffer-cap", "1K"), "--client-buffer-cap"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                _parse(*argv)
            message = str(raised.exception)
            self.assertTrue(message.startswith(option + ":"), message)
            self.assertNotIn("\n", message)
            self.assertNotIn(tag, message)

    def test_usage_lists_the_options(self) -> None:
        text = _Options().getUsage()
        for name in (
            "--ad-tag",
            "--upstream",
            "--nat-ip",
            "--ip-lookup-url",
            "--proxy-config-url",
            "--proxy-config-v6-url",
            "--proxy-secret-url",
            "--config-refresh",
            "--direct-fallback",
            "--client-buffer-cap",
        ):
            self.assertIn(name, text)

    def test_parse_size(self) -> None:
        self.assertEqual(parse_size("1048576"), MiB)
        self.assertEqual(parse_size("64K"), 64 << 10)
        self.assertEqual(parse_size("8m"), 8 * MiB)
        self.assertEqual(parse_size("1G"), 1 << 30)
        self.assertEqual(parse_size("2MiB"), 2 * MiB)
        with self.assertRaises(ValueError):
            parse_size("-1")

    def test_settings_check_themselves(self) -> None:
        with self.assertRaises(ValueError):
            MiddleSettings(ad_tag=b"short")
        with self.assertRaises(ValueError):
            MiddleSettings(pool_min=3, pool_max=2)


class ExternalAddressTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def resolved(self, external: ExternalAddress, local: str, peer: str) -> str:
        d = external.for_connection(ipaddress.ip_address(local), ipaddress.ip_address(peer))
        return str(self.successResultOf(d))

    def test_order(self) -> None:
        nat = ExternalAddress(self.reactor, [ipaddress.ip_address("203.0.113.1")])
        # A middle proxy on a private network sees the local address.
        self.assertEqual(self.resolved(nat, "10.0.0.2", "10.0.0.3"), "10.0.0.2")
        self.assertEqual(self.resolved(nat, "10.0.0.2", "149.154.175.50"), "203.0.113.1")
        plain = ExternalAddress(self.reactor)
        self.assertEqual(self.resolved(plain, "8.8.4.4", "149.154.175.50"), "8.8.4.4")

    def test_lookup(self) -> None:
        class Response:
            code = 200
            headers = None

        calls: list[str] = []

        class Client:
            def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
                calls.append(url)
                return Deferred()

        external = ExternalAddress(self.reactor, [], "http://lookup.invalid/", Client(), 5.0)
        d1 = external.for_connection(
            ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("149.154.175.50")
        )
        d2 = external.for_connection(
            ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("149.154.175.50")
        )
        self.assertEqual(calls, ["http://lookup.invalid/"])  # one look-up for both
        self.reactor.advance(5)  # it times out: the local address is used
        self.assertEqual(str(self.successResultOf(d1)), "10.0.0.2")
        self.assertEqual(str(self.successResultOf(d2)), "10.0.0.2")
        # Not asked again for a while.
        self.resolved(external, "10.0.0.2", "149.154.175.50")
        self.assertEqual(len(calls), 1)


class LookupTests(LoopbackHarness):
    async def _lookup(self) -> None:
        await self.start()
        external = self.middle.external
        d = external.for_connection(
            ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("149.154.175.50")
        )
        self.assertEqual(str(await self.within(d)), "203.0.113.7")
        self.assertEqual(external.public(4), ipaddress.ip_address("203.0.113.7"))
        self.site.bodies["/ip"] = b"not an address"
        external.forget()
        d = external.for_connection(
            ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("149.154.175.50")
        )
        self.assertEqual(str(await self.within(d)), "10.0.0.2")

    def test_http_lookup(self) -> Deferred[None]:
        return self.run_async(self._lookup())


class FlapTests(MemoryHarness):
    def test_flapping_middle_proxy_backs_off(self) -> None:
        """
        Connections dropped right after the handshake are re-made at once,
        but the third in a row makes the pool back off from that endpoint.
        """
        self.upstream(pool_min=1, backoff_initial=10.0)
        self.attach()
        for attempt in range(3):
            self.assertEqual(len(self.reactor.tcpClients), 1, f"attempt {attempt}")
            conn, _, pump = self.complete()
            pump.flush()
            conn.transport.loseConnection()
            pump.flush()
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(13)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        conn, _, pump = self.complete()
        pump.flush()
        self.reactor.advance(6)  # lived long enough: the count starts again
        conn.transport.loseConnection()
        pump.flush()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertNotIn(("149.154.162.39", 80), self.middle.pools[2].flaps)

    def test_endpoints_follow_the_dc_across_files(self) -> None:
        config_v4 = parse_proxy_config(config_text({2: [("149.154.162.1", 80)]}))
        config_v6 = parse_proxy_config(
            config_text({2: [("2001:db8::2", 80)], 5: [("2001:db8::5", 80)]})
        )
        self.middle = MiddleProxy(
            self.core,
            MiddleSettings(ad_tag=AD_TAG),
            StaticConfig(config_v4, config_v6, PROXY_SECRET),
        )
        self.assertEqual(self.middle.pool(5).endpoints(), (("2001:db8::5", 80),))
        self.assertEqual(self.middle.pool(2).endpoints(), (("149.154.162.1", 80),))
        self.assertEqual(self.middle.pool(9).endpoints(), (("149.154.162.1", 80),))


class PerUserAdTagTests(LoopbackHarness):
    """
    A user's own ``ad_tag`` goes in its requests; everyone else's carry the
    proxy's.
    """

    async def _per_user(self) -> None:
        from mtproxy_tw.config.users import Limits, UserSpec
        from mtproxy_tw.proxy.users import Registry

        own = bytes.fromhex("fedcba9876543210fedcba9876543210")
        await self.start()
        self.service.core.users = Registry((UserSpec("bob", (SECURE,), ad_tag=own),), Limits())
        client = await self.client(SECURE, TAG_PADDED)
        self.assertEqual(await self.within(client.request(b"\x01" * 64)), b"\x01" * 64)
        other = await self.client(CLASSIC, TAG_INTERMEDIATE)
        self.assertEqual(await self.within(other.request(b"\x02" * 64)), b"\x02" * 64)
        self.assertEqual(self.fake.ad_tags, [own, AD_TAG])

    def test_user_ad_tag(self) -> Deferred[None]:
        return self.run_async(self._per_user())
