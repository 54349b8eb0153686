"""
Fake TLS and domain fronting on loopback: clients -> ProxyService -> FakeDC
for good clients, -> FakeSite (the mask host) for everyone else.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from mtproxy_tw.fronting import relay as front_relay
from mtproxy_tw.fronting.profile import Observation, TLSProfile, parse_server_answer
from mtproxy_tw.fronting.store import PROFILE_FILE
from mtproxy_tw.proxy import client as relay
from mtproxy_tw.proxy import legs
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import (
    BAD_REQUEST,
    FakeDC,
    FakeSite,
    FakeTLSClient,
    RawClient,
    SiteConnection,
    connect_protocol,
    connect_raw,
    make_codec,
)
from mtproxy_tw.testing.fakesite import MLKEM_SITES
from mtproxy_tw.testing.memory import MemoryProxy
from mtproxy_tw.testing.tlsclient import CCS, TDLIB_RECORD, records
from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.faketls import (
    MLKEM768_SERVER_SHARE,
    X25519,
    X25519MLKEM768,
    NeedMore,
    build_client_hello,
)
from mtproxy_tw.wire.obfuscated2 import TAG_INTERMEDIATE, TAG_PADDED, generate_init
from mtproxy_tw.wire.secrets import Mode, Secret, parse_secret
from tests.ports import hold_port
from tests.test_integration import (
    CLASSIC,
    DC_IDS,
    LOCAL,
    WRONG,
    ProxyHarness,
    _port_number,
    reactor,
)

DOMAIN = "example.com"
EE = parse_secret("erin=ee" + "e5" * 16 + DOMAIN.encode().hex(), "x")
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: probe\r\n\r\n"
MiB = 1 << 20
#: A mask host that is never served, in memory.
SITE_DOWN = Address("127.0.0.1", 8443)


def _payload(size: int) -> bytes:
    # Never 8 zero bytes in front: the FakeDC would read MTProto.
    return (b"\x01" + os.urandom(size))[:size]


def _app_data_len(flight: bytes) -> int:
    """
    N, the length of the ApplicationData record of a ServerHello flight.
    """
    at = 5 + int.from_bytes(flight[3:5], "big") + len(CCS)
    assert flight[at : at + 3] == b"\x17\x03\x03", flight[at : at + 5].hex()
    return int.from_bytes(flight[at + 3 : at + 5], "big")


def _hello_record(data: bytes | bytearray) -> bytes:
    """
    The first TLS record of ``data``.
    """
    return bytes(data[: 5 + int.from_bytes(data[3:5], "big")])


def _offers_mlkem(hello: bytes | bytearray) -> bool:
    """
    Whether a ClientHello offers an X25519MLKEM768 key share.
    """
    groups = faketls.parse_client_hello(_hello_record(hello)).key_share_groups
    return X25519MLKEM768 in groups


def _key_share(hello: bytes) -> tuple[int, bytes]:
    """
    The group and key of a ServerHello record's key_share extension.
    """
    pos = 5 + 4 + 2 + 32
    pos += 1 + hello[pos] + 3
    end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        if kind == 0x0033:
            body = hello[pos + 4 : pos + 4 + size]
            return int.from_bytes(body[:2], "big"), body[4:]
        pos += 4 + size
    raise AssertionError("no key_share")


class _ReasonClient(RawClient):
    """
    A :class:`RawClient` that keeps why its connection ended.
    """

    reason: Failure | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        super().connectionLost(reason)


def _proxy_calls() -> list[IDelayedCall]:
    """
    Pending delayed calls that belong to a client connection of the proxy.
    """
    owners = (relay.ClientProtocol, legs.Leg)
    return [
        call
        for call in reactor.getDelayedCalls()
        if isinstance(getattr(call.func, "__self__", None), owners)
    ]


class FrontingHarness(ProxyHarness):
    """
    A proxy with an ``ee`` secret whose mask host is a :class:`FakeSite`.
    """

    timeout = 30

    async def site(self, **options: Any) -> FakeSite:
        site = FakeSite(DOMAIN, **options)
        site.listen(reactor, LOCAL)
        self.addCleanup(site.close)
        return site

    async def start(  # type: ignore[override]
        self,
        secrets: tuple[Secret, ...] = (EE,),
        host: str = LOCAL,
        more_dcs: dict[int, Address] | None = None,
        *,
        site: FakeSite | None = None,
        listen_port: int = 0,
        measured: bool = True,
        **options: Any,
    ) -> int:
        """
        Start FakeDCs and the proxy; ``site`` becomes the mask host unless
        ``mask_host`` is given. With ``measured``, wait for the first round
        of TLS profile probes, and remember how many site connections they
        made (:meth:`new_connections` leaves those out).
        """
        self.fakes: dict[int, FakeDC] = {}
        overrides = dict(more_dcs or {})
        for dc in DC_IDS:
            fake = FakeDC(reactor)
            port = reactor.listenTCP(0, fake, interface=host)
            self.addCleanup(port.stopListening)
            self.addCleanup(self._close_fake, fake)
            self.fakes[dc] = fake
            overrides[dc] = Address(host, _port_number(port))
        if site is not None:
            options.setdefault("mask_host", Address(LOCAL, site.port_number))
        settings = Settings(secrets=secrets, dcs=DCTable(overrides=overrides), **options)
        self.service = ProxyService(settings, reactor, [f"tcp:{listen_port}:interface={host}"])
        self.service.startService()
        self.addCleanup(self._stop_service)
        ports = await self.service.listening()
        self.port = _port_number(ports[0])
        self.site_baseline = 0
        if measured and self.service.profiles is not None:
            profiles = self.service.profiles
            # A site that never answers a probe ends the round at the probe timeout.
            await self.until(
                lambda: profiles.rounds >= 1,
                "a round of TLS profile probes",
                seconds=profiles.prober.timeout + 5,
            )
        if site is not None:
            self.site_baseline = len(site.connections)
        return self.port

    def new_connections(self, site: FakeSite) -> list[SiteConnection]:
        return site.connections[self.site_baseline :]

    async def tls_client(self, key: bytes = EE.key, **kwargs: Any) -> FakeTLSClient:
        client = FakeTLSClient(key, **kwargs)
        await connect_protocol(reactor, LOCAL, self.port, client)
        self.addCleanup(self._abort_tls, client)
        return client

    async def _abort_tls(self, client: FakeTLSClient) -> None:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost

    async def answered(self, **kwargs: Any) -> FakeTLSClient:
        """
        A fake-TLS client whose hello the proxy accepted.
        """
        client = await self.tls_client(**kwargs)
        await self.within(client.answered)
        return client

    async def reaches_site(self, site: FakeSite, data: bytes) -> SiteConnection:
        """
        Wait for the one new connection of ``site``; check it received
        exactly ``data``.
        """
        await self.until(lambda: bool(self.new_connections(site)), "a connection to the site")
        # Once connected, the bytes follow at once on loopback.
        await self.until(
            lambda: any(len(c.received) >= len(data) for c in self.new_connections(site)),
            "the bytes to reach the site",
            1.0,
        )
        (conn,) = self.new_connections(site)
        self.assertEqual(bytes(conn.received), data)
        return conn

    async def sees_site(self, client: RawClient, conn: SiteConnection) -> None:
        """
        Wait until the client got exactly what the site sent.
        """
        await self.until(
            lambda: conn.closed and len(client.received) >= len(conn.sent),
            "the site's answer to reach the client",
        )
        self.assertEqual(bytes(client.received), bytes(conn.sent))


class RealTLSClientTests(FrontingHarness):
    """
    A browser-like TLS client that names the fronted domain gets the real
    site through the proxy: its certificate, its page.
    """

    async def _browse(self) -> None:
        site = await self.site()
        port = await self.start(site=site)

        def browse() -> tuple[str | None, bytes | None, bytes]:
            context = ssl.create_default_context(cadata=site.certificate_pem.decode())
            sock = socket.create_connection((LOCAL, port), timeout=10)
            with context.wrap_socket(sock, server_hostname=DOMAIN) as tls:
                tls.sendall(HTTP_REQUEST)
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
                return tls.version(), tls.getpeercert(binary_form=True), answer

        version, certificate, answer = await self.within(deferToThread(browse), 10.0)
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(certificate, site.certificate_der)
        self.assertEqual(answer, site.response)
        self.assertTrue(answer.endswith(site.page))
        (conn,) = self.new_connections(site)
        self.assertEqual(conn.requests, [HTTP_REQUEST])
        self.assertEqual(sum(self.stats.fronted.values()), 1)
        self.assertEqual(self.stats.accepted, {})
        self.assertEqual(self.dc_connections(), 0)
        await self.no_clients()

    def test_browser_gets_the_site(self) -> Deferred[None]:
        return self.run_async(self._browse())


class FakeTLSRelayTests(FrontingHarness):
    """
    A client with the right ``ee`` secret is relayed to its DC: payloads of
    every size cross both ways unchanged inside TLS records.
    """

    async def _echo(self, mlkem: bool, fast: bool) -> None:
        site = await self.site()
        await self.start(site=site, fast_mode=fast)
        client = await self.answered(mlkem=mlkem)
        self.assertGreater(len(client.hello), 1500 if mlkem else 516)
        if not mlkem:
            self.assertEqual(len(client.hello), 517)
        # Padded intermediate carries whole words: multiples of 4 only.
        sizes = [4, 8, 1024, TDLIB_RECORD - 2, TDLIB_RECORD + 2, 64 * 1024, MiB]
        payloads = [_payload(size) for size in sizes]
        for payload in payloads:
            self.assertEqual(await self.within(client.request(payload)), payload)
        # All at once: the stream keeps its order.
        for payload in payloads:
            client.send(payload)
        for payload in payloads:
            self.assertEqual(await self.within(client.receive()), payload)
        # One-byte records.
        small = _payload(64)
        client.send(small, record_size=1)
        self.assertEqual(await self.within(client.receive()), small)
        # Records cut anywhere across writes, headers included.
        rng = random.Random(len(client.hello))
        for size in (12, 5000, 40000):
            payload = _payload(size)
            wire = client.wire(payload)
            cuts = [1, 3, 4, 5, 6, 7, *(rng.randrange(len(wire)) for _ in range(20))]
            await client.send_in_pieces(wire, cuts)
            self.assertEqual(await self.within(client.receive()), payload)
        self.assertEqual(client.bad_records, [])
        self.assertLessEqual(max(client.record_sizes), faketls.MAX_OUTGOING_PAYLOAD)
        self.assertEqual(self.fakes[2].seen, [(TAG_PADDED, 2)])
        self.assertEqual(self.stats.accepted, {"erin": 1})
        self.assertEqual(self.stats.fronted, {})
        self.assertEqual(self.stats.rejected, {})
        self.assertEqual(self.new_connections(site), [])

    def test_517_byte_hello(self) -> Deferred[None]:
        return self.run_async(self._echo(False, True))

    def test_517_byte_hello_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(False, False))

    def test_mlkem_hello(self) -> Deferred[None]:
        return self.run_async(self._echo(True, True))

    def test_mlkem_hello_slow_mode(self) -> Deferred[None]:
        return self.run_async(self._echo(True, False))

    async def _first_packet_in_hello_segment(self) -> None:
        # The hello, the ChangeCipherSpec, the init and a packet in one write:
        # the proxy answers the hello and keeps what followed it.
        site = await self.site()
        await self.start(site=site)
        client = FakeTLSClient(EE.key)
        payload = _payload(1000)
        client.hello = client.hello + client.wire(payload)
        await connect_protocol(reactor, LOCAL, self.port, client)
        self.addCleanup(self._abort_tls, client)
        await self.within(client.answered)
        self.assertEqual(await self.within(client.receive()), payload)
        self.assertEqual(self.stats.accepted, {"erin": 1})

    def test_everything_in_one_segment(self) -> Deferred[None]:
        return self.run_async(self._first_packet_in_hello_segment())

    async def _hello_in_pieces(self) -> None:
        site = await self.site()
        await self.start(site=site)
        client = FakeTLSClient(EE.key, mlkem=True)
        hello, client.hello = client.hello, b""
        await connect_protocol(reactor, LOCAL, self.port, client)
        self.addCleanup(self._abort_tls, client)
        await client.send_in_pieces(hello, [1, 3, 5, 9, 100, len(hello) - 1])
        await self.within(client.answered)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")

    def test_hello_in_pieces(self) -> Deferred[None]:
        return self.run_async(self._hello_in_pieces())


class BadClientTests(FrontingHarness):
    """
    Every failed handshake goes to the mask host with every byte the client
    sent, is counted by reason, and never reaches a DC.
    """

    async def _fronted(self, data: bytes, reason: str) -> None:
        await self._front_case(data, reason)

    async def _front_case(self, data: bytes, reason: str) -> tuple[RawClient, SiteConnection]:
        site = await self.site()
        await self.start(site=site)
        client = await self.raw(data)
        conn = await self.reaches_site(site, data)
        await self.sees_site(client, conn)
        self.assertEqual(self.stats.fronted, {reason: 1})
        self.assertEqual(self.stats.accepted, {})
        self.assertEqual(self.dc_connections(), 0)
        await self.within(client.lost)
        await self.no_clients()
        return client, conn

    def test_wrong_secret(self) -> Deferred[None]:
        hello = build_client_hello(WRONG, DOMAIN, int(time.time()))
        return self.run_async(self._fronted(hello, "tls-bad-digest"))

    def test_wrong_secret_mlkem_hello(self) -> Deferred[None]:
        hello = build_client_hello(WRONG, DOMAIN, int(time.time()), mlkem=True)
        return self.run_async(self._fronted(hello, "tls-bad-digest"))

    def test_stale_timestamp(self) -> Deferred[None]:
        hello = build_client_hello(EE.key, DOMAIN, int(time.time()) - 1000)
        return self.run_async(self._fronted(hello, "tls-stale"))

    def test_timestamp_from_the_future(self) -> Deferred[None]:
        hello = build_client_hello(EE.key, DOMAIN, int(time.time()) + 1000)
        return self.run_async(self._fronted(hello, "tls-stale"))

    def test_unknown_sni(self) -> Deferred[None]:
        hello = build_client_hello(EE.key, "unknown.example", int(time.time()))
        return self.run_async(self._fronted(hello, "tls-unknown-sni"))

    def test_malformed_hello(self) -> Deferred[None]:
        hello = bytearray(build_client_hello(EE.key, DOMAIN, int(time.time())))
        hello[5] = 2  # not a ClientHello
        return self.run_async(self._fronted(bytes(hello), "tls-malformed"))

    def test_garbage(self) -> Deferred[None]:
        return self.run_async(self._fronted(b"\x01" + os.urandom(299), "bad-init"))

    async def _classic_replay(self) -> None:
        site = await self.site()
        await self.start(secrets=(EE, CLASSIC), site=site)
        init = generate_init(TAG_INTERMEDIATE, 2, secret=CLASSIC.key)
        first = await self.client(CLASSIC, TAG_INTERMEDIATE, 2, init=init)
        self.assertEqual(await self.within(first.request(b"ping")), b"ping")
        data = init.wire + os.urandom(36)
        client = await self.raw(data)
        conn = await self.reaches_site(site, data)
        await self.sees_site(client, conn)
        self.assertEqual(self.stats.fronted, {"replay": 1})
        self.assertEqual(self.stats.accepted, {"alice": 1})
        self.assertEqual(self.dc_connections(), 1)

    def test_replayed_classic_init(self) -> Deferred[None]:
        return self.run_async(self._classic_replay())

    async def _http(self) -> None:
        _, conn = await self._front_case(HTTP_REQUEST, "http")
        self.assertEqual(conn.requests, [])  # the TLS site did not take it

    def test_plain_http(self) -> Deferred[None]:
        return self.run_async(self._http())

    async def _plain_http_site(self) -> None:
        site = await self.site(tls=False)
        await self.start(site=site)
        client = await self.raw(HTTP_REQUEST)
        conn = await self.reaches_site(site, HTTP_REQUEST)
        await self.within(client.lost)
        self.assertEqual(bytes(client.received), site.response)
        self.assertEqual(conn.requests, [HTTP_REQUEST])
        self.assertEqual(self.stats.fronted, {"http": 1})

    def test_plain_http_gets_the_page(self) -> Deferred[None]:
        return self.run_async(self._plain_http_site())

    async def _replay(self, mlkem: bool) -> None:
        site = await self.site()
        await self.start(site=site)
        first = await self.answered(mlkem=mlkem)
        client = await self.raw(first.hello)
        conn = await self.reaches_site(site, first.hello)
        await self.sees_site(client, conn)
        self.assertEqual(self.stats.fronted, {"tls-replay": 1})
        self.assertEqual(self.dc_connections(), 0)
        # The first connection is unharmed.
        self.assertEqual(await self.within(first.request(b"ping")), b"ping")
        self.assertEqual(self.stats.accepted, {"erin": 1})
        self.assertEqual(self.dc_connections(), 1)

    def test_replayed_hello(self) -> Deferred[None]:
        return self.run_async(self._replay(False))

    def test_replayed_mlkem_hello(self) -> Deferred[None]:
        return self.run_async(self._replay(True))

    async def _bad_init_after_hello(self) -> None:
        # A valid hello, then records that do not carry a valid init: the
        # proxy has answered as the site would not, so it just closes.
        site = await self.site()
        await self.start(site=site)
        client = await self.answered()
        client.transport.write(CCS + records(os.urandom(64), TDLIB_RECORD))
        await self.within(client.lost)
        self.assertEqual(self.stats.rejected, {"tls-bad-init": 1})
        self.assertEqual(self.stats.fronted, {})
        self.assertEqual(self.dc_connections(), 0)
        self.assertEqual(self.new_connections(site), [])
        await self.no_clients()

    def test_bad_init_after_good_hello_is_closed(self) -> Deferred[None]:
        return self.run_async(self._bad_init_after_hello())


class StalledClientTests(FrontingHarness):
    """
    A client that stops in the middle of its handshake gets the site's own
    timing: its bytes reach the site at once (a shadow connection), and it
    is closed when, and as, the site closes it, whatever the proxy's own
    handshake timeout; it leaves nothing behind when it goes.
    """

    async def _stalled(self, data: bytes, reason: str, site_timeout: float = 0.8) -> None:
        site = await self.site()
        site.timeout = site_timeout
        await self.start(site=site, handshake_timeout=0.2)
        started = reactor.seconds()
        client = await self.raw(data)
        conn = await self.reaches_site(site, data)
        # The site has the bytes long before our own (short) timeout.
        self.assertLess(reactor.seconds() - started, 0.2)
        self.assertEqual(self.dc_connections(), 0)
        await self.within(client.lost, 5)
        elapsed = reactor.seconds() - started
        # Closed at the site's time (within a second), not at ours.
        self.assertGreaterEqual(elapsed, site_timeout - 0.05)
        self.assertLess(elapsed, site_timeout + 1.0)
        await self.within(conn.lost)
        # What the site put on the wire before its close (a TLS stack may
        # still try an alert after the socket is closing).
        self.assertTrue(bytes(conn.sent).startswith(bytes(client.received)))
        self.assertEqual(self.stats.fronted, {reason: 1})
        await self.no_clients()
        self.assertEqual(_proxy_calls(), [])

    def test_partial_hello(self) -> Deferred[None]:
        hello = build_client_hello(EE.key, DOMAIN, int(time.time()))
        return self.run_async(self._stalled(hello[:100], "incomplete"))

    def test_partial_hello_header(self) -> Deferred[None]:
        return self.run_async(self._stalled(b"\x16\x03\x01", "incomplete"))

    def test_one_random_byte_mixed_secrets(self) -> Deferred[None]:
        async def run() -> None:
            site = await self.site()
            site.timeout = 0.8
            await self.start(secrets=(EE, CLASSIC), site=site, handshake_timeout=0.2)
            started = reactor.seconds()
            client = await self.raw(b"\x01")
            await self.reaches_site(site, b"\x01")
            await self.within(client.lost, 5)
            self.assertGreaterEqual(reactor.seconds() - started, 0.75)
            self.assertEqual(self.stats.fronted, {"incomplete": 1})

        return self.run_async(run())

    async def _garbage_ee_only(self) -> None:
        """
        With only ee secrets no init can be valid: a few random bytes go
        to the site at once, and the client sees the site's answer and close
        at once, as from a TLS server given a bad record header.
        """
        site = await self.site()
        site.timeout = 5.0
        await self.start(site=site, handshake_timeout=3)
        started = reactor.seconds()
        data = b"\x01" + os.urandom(9)
        client = await self.raw(data)
        conn = await self.reaches_site(site, data)
        await self.within(client.lost)
        self.assertLess(reactor.seconds() - started, 1.0)
        await self.within(conn.lost)
        self.assertEqual(bytes(client.received), bytes(conn.sent))
        self.assertEqual(self.stats.fronted, {"bad-init": 1})

    def test_partial_obfuscated2_init(self) -> Deferred[None]:
        return self.run_async(self._garbage_ee_only())

    async def _slow_honest_hello(self) -> None:
        """
        A real client's hello split over segments 0.3 s apart still
        connects, although the proxy's handshake timeout is shorter.
        """
        site = await self.site()
        await self.start(site=site, handshake_timeout=0.5)
        hello = build_client_hello(EE.key, DOMAIN, int(reactor.seconds()))
        raw = await self.raw(hello[:5])
        for piece in (hello[5:300], hello[300:900], hello[900:]):
            await deferLater(reactor, 0.3, lambda: None)
            raw.transport.write(piece)
        await self.until(
            lambda: (
                not isinstance(
                    faketls.check_server_hello(bytes(raw.received), EE.key, hello[11:43]), NeedMore
                )
            ),
            "the fake-TLS answer",
        )
        self.assertEqual(self.stats.fronted, {})
        raw.transport.abortConnection()

    def test_slow_honest_hello_connects(self) -> Deferred[None]:
        return self.run_async(self._slow_honest_hello())

    async def _stalled_after_hello(self) -> None:
        site = await self.site()
        await self.start(site=site, handshake_timeout=0.5)
        started = reactor.seconds()
        client = await self.answered()
        await self.within(client.lost)
        self.assertGreaterEqual(reactor.seconds() - started, 0.45)
        self.assertEqual(bytes(client.received), client.flight)
        self.assertEqual(self.stats.rejected, {"handshake-timeout": 1})
        self.assertEqual(self.stats.fronted, {})
        self.assertEqual(self.new_connections(site), [])
        await self.no_clients()
        self.assertEqual(_proxy_calls(), [])

    def test_stalled_after_valid_hello_is_closed(self) -> Deferred[None]:
        return self.run_async(self._stalled_after_hello())

    async def _fronted_then_site_closes(self) -> None:
        site = await self.site()
        await self.start(site=site, handshake_timeout=0.5)
        client = await self.raw(b"\x16\x03\x01")
        conn = await self.reaches_site(site, b"\x16\x03\x01")
        await self.within(conn.abort())
        await self.within(client.lost)
        await self.no_clients()
        self.assertEqual(_proxy_calls(), [])

    def test_site_closing_closes_the_client(self) -> Deferred[None]:
        return self.run_async(self._fronted_then_site_closes())


class ProfileTests(FrontingHarness):
    """
    The ApplicationData record of the proxy's ServerHello flight has the
    size the fronted site's own first encrypted record has.
    """

    async def _raw_probe(self, site: FakeSite, mlkem: bool = False) -> Observation:
        """
        The site's answer to a hello it accepts (the classic one, or the one
        current apps send), read off the wire.
        """
        hello = build_client_hello(
            os.urandom(16), DOMAIN, int(time.time()), consistent_grease=True, mlkem=mlkem
        )
        client = await connect_raw(reactor, LOCAL, site.port_number, hello)
        self.addCleanup(self._abort, client)
        await self.until(
            lambda: not isinstance(parse_server_answer(bytes(client.received)), NeedMore),
            "the site's answer",
        )
        # The whole flight: wait until the site has gone quiet.
        seen = -1
        while len(client.received) != seen:
            seen = len(client.received)
            await deferLater(reactor, 0.3, lambda: None)
        answer = parse_server_answer(bytes(client.received))
        assert isinstance(answer, Observation)
        return answer

    async def _sizes(self, count: int = 6) -> list[Observation]:
        """
        The proxy's answers to ``count`` valid hellos, parsed like a site's.
        """
        seen = []
        for i in range(count):
            client = await self.answered(mlkem=bool(i % 2))
            assert client.flight is not None
            answer = parse_server_answer(client.flight)
            assert isinstance(answer, Observation)
            self.assertEqual(answer.app_data_len, _app_data_len(client.flight))
            seen.append(answer)
            await self._abort_tls(client)
        return seen

    async def _measured(self, **site_options: Any) -> tuple[FakeSite, Observation, Observation]:
        site = await self.site(**site_options)
        await self.start(site=site)
        assert self.service.profiles is not None
        self.assertGreaterEqual(self.service.profiles.rounds, 1)
        probes = site.connections[: self.site_baseline]
        # Each shape of hello, as often.
        shapes = Counter(_offers_mlkem(c.received) for c in probes)
        self.assertEqual(shapes, {False: self.service.profiles.probes, True: shapes[False]})
        # What the probes really got from the site.
        real = [(_offers_mlkem(c.received), parse_server_answer(bytes(c.sent))) for c in probes]
        self.assertIn(DOMAIN, self.service.core.tls_profiles, f"probes got {real!r}")
        profile = self.service.core.tls_profiles[DOMAIN]
        raw = await self._raw_probe(site)
        raw_pq = await self._raw_probe(site, mlkem=True)
        self.assertEqual(set(profile.sizes), {raw.app_data_len})
        assert profile.pq is not None
        self.assertEqual(set(profile.pq.sizes), {raw_pq.app_data_len})
        self.assertEqual(profile.pq.group, raw_pq.group)
        # The probes saw the same flights; the site may add a record (an
        # alert) once a probe has hung up, which the probe never reads.
        for mlkem, seen in real:
            assert isinstance(seen, Observation)
            expected = raw_pq if mlkem else raw
            self.assertGreaterEqual(seen.app_data_len, expected.app_data_len)
            self.assertEqual(seen.cipher_suite, expected.cipher_suite)
            self.assertEqual(seen.group, expected.group)
        self.assertEqual(profile.key_share_first, raw.key_share_first)
        # Answers to each shape of hello are the site's to that shape.
        for i, answer in enumerate(await self._sizes()):
            expected = raw_pq if i % 2 else raw
            self.assertEqual(answer.app_data_len, expected.app_data_len)
            self.assertEqual(answer.key_share_first, expected.key_share_first)
            self.assertEqual(answer.group, expected.group)
        return site, raw, raw_pq

    def test_answer_size_follows_measured_site(self) -> Deferred[None]:
        return self.run_async(self._measured())

    async def _mlkem_site(self) -> None:
        """
        A site that picks X25519MLKEM768 (OpenSSL >= 3.5): the proxy's answer
        to a hello offering it has that group, a 1120-byte share, the
        site's ServerHello length and the site's encrypted size for that
        hello; the classic hello still gets x25519.
        """
        site, raw, raw_pq = await self._measured()
        self.assertEqual((raw.group, raw_pq.group), (X25519, X25519MLKEM768))
        site_pq = await self._raw_flight(site, mlkem=True)
        site_classic = await self._raw_flight(site, mlkem=False)
        for mlkem, site_flight in ((True, site_pq), (False, site_classic)):
            client = await self.answered(mlkem=mlkem)
            assert client.flight is not None
            hello = _hello_record(client.flight)
            self.assertEqual(len(hello), len(_hello_record(site_flight)))
            group, share = _key_share(hello)
            site_group, site_share = _key_share(_hello_record(site_flight))
            self.assertEqual((group, len(share)), (site_group, len(site_share)))
            await self._abort_tls(client)
        self.assertEqual(len(_hello_record(site_pq)), 5 + 1210)
        self.assertEqual(_key_share(_hello_record(site_pq))[0], X25519MLKEM768)
        self.assertEqual(len(_key_share(_hello_record(site_pq))[1]), MLKEM768_SERVER_SHARE)

    def test_answer_follows_site_that_prefers_mlkem(self) -> Deferred[None]:
        return self.run_async(self._mlkem_site())

    if not MLKEM_SITES:
        test_answer_follows_site_that_prefers_mlkem.skip = "no ML-KEM in the bundled OpenSSL"  # type: ignore[attr-defined]

    async def _x25519_site(self) -> None:
        """
        A site without ML-KEM: x25519 and its sizes, whatever the hello.
        """
        _, raw, raw_pq = await self._measured(x25519_only=True)
        self.assertEqual((raw.group, raw_pq.group), (X25519, X25519))
        for mlkem in (True, False):
            client = await self.answered(mlkem=mlkem)
            assert client.flight is not None
            self.assertEqual(len(_hello_record(client.flight)), 5 + 122)
            self.assertEqual(_key_share(_hello_record(client.flight))[0], X25519)
            await self._abort_tls(client)

    def test_answer_follows_site_without_mlkem(self) -> Deferred[None]:
        return self.run_async(self._x25519_site())

    async def _raw_flight(self, site: FakeSite, mlkem: bool) -> bytes:
        """
        The bytes a site sends a hello of one shape, up to its first
        encrypted record.
        """
        hello = build_client_hello(
            os.urandom(16), DOMAIN, int(time.time()), consistent_grease=True, mlkem=mlkem
        )
        client = await connect_raw(reactor, LOCAL, site.port_number, hello)
        self.addCleanup(self._abort, client)
        await self.until(
            lambda: not isinstance(parse_server_answer(bytes(client.received)), NeedMore),
            "the site's answer",
        )
        return bytes(client.received)

    async def _profiled(self) -> None:
        # The relay's side alone: a profile as a probe would record it.
        site = await self.site()
        await self.start(site=site)
        raw = await self._raw_probe(site)
        for first in (False, True):
            self.service.core.tls_profiles[DOMAIN] = TLSProfile(
                (raw.app_data_len,) * 3, raw.cipher_suite, first
            )
            for answer in await self._sizes():
                self.assertLessEqual(abs(answer.app_data_len - raw.app_data_len), 1)
                self.assertEqual(answer.key_share_first, first)
        self.assertEqual(self.stats.fronted, {})
        self.assertEqual(self.stats.rejected, {})
        await self.no_clients()

    def test_answer_size_follows_profile(self) -> Deferred[None]:
        return self.run_async(self._profiled())

    async def _cipher(self) -> None:
        site = await self.site()
        await self.start(site=site)
        profiles = self.service.core.tls_profiles
        profiles[DOMAIN] = TLSProfile((3000,), 0x1302, True)
        self.assertEqual({a.cipher_suite for a in await self._sizes(2)}, {0x1302})
        # A suite the client did not offer is never answered.
        profiles[DOMAIN] = TLSProfile((3000,), 0x1305, True)
        self.assertEqual({a.cipher_suite for a in await self._sizes(2)}, {0x1301})

    def test_cipher_suite_follows_profile_when_offered(self) -> Deferred[None]:
        return self.run_async(self._cipher())

    async def _fallback(self) -> None:
        # Refused, and never handed to the proxy's tcp:0.
        nowhere = Address(LOCAL, hold_port(self, LOCAL).getsockname()[1])
        await self.start(mask_host=nowhere)
        assert self.service.profiles is not None
        self.assertEqual(self.service.core.tls_profiles, {})
        sizes = [answer.app_data_len for answer in await self._sizes(8)]
        for size in sizes:
            self.assertTrue(2500 <= size <= 3619, sizes)
        # A failed handshake finds the mask host gone: closed after a short
        # wait, with a FIN, nothing sent.
        self.patch(front_relay, "SITE_DOWN_CLOSE", (0.3, 0.4))
        started = reactor.seconds()
        client = _ReasonClient(b"\x01" + os.urandom(99))
        await connect_protocol(reactor, LOCAL, self.port, client)
        self.addCleanup(self._abort, client)
        await self.within(client.lost)
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertEqual(bytes(client.received), b"")
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        self.assertEqual(self.stats.upstream_failures["mask-host"], 1)
        await self.no_clients()

    def test_unreachable_site_gives_fallback_sizes(self) -> Deferred[None]:
        return self.run_async(self._fallback())


class FrontingOptionTests(FrontingHarness):
    """
    Half-closes, the PROXY header, --no-mask, --modes tls, mask loops.
    """

    async def _half_close(self) -> None:
        site = await self.site(tls=False, answer_on_eof=True)
        await self.start(site=site)
        client = await self.raw(HTTP_REQUEST)
        client.transport.loseWriteConnection()
        conn = await self.reaches_site(site, HTTP_REQUEST)
        await self.within(client.lost)
        self.assertTrue(conn.eof)
        self.assertEqual(conn.requests, [HTTP_REQUEST])
        self.assertEqual(bytes(client.received), site.response)
        self.assertEqual(self.stats.fronted, {"http": 1})
        await self.no_clients()

    def test_half_close_passes_through(self) -> Deferred[None]:
        return self.run_async(self._half_close())

    async def _site_half_close(self) -> None:
        # The site answers and closes while the client is still sending:
        # the client gets the answer and an EOF, and may still write.
        site = await self.site(tls=False)
        await self.start(site=site)
        hello = build_client_hello(WRONG, DOMAIN, int(time.time()))
        client = await self.raw(hello)
        conn = await self.reaches_site(site, hello)
        await self.within(client.lost)
        self.assertEqual(bytes(client.received), BAD_REQUEST)
        self.assertTrue(conn.closed)
        await self.no_clients()

    def test_site_close_reaches_client(self) -> Deferred[None]:
        return self.run_async(self._site_half_close())

    async def _proxy_protocol(self) -> None:
        site = await self.site(tls=False)
        await self.start(site=site, mask_proxy_protocol=True)
        data = build_client_hello(WRONG, DOMAIN, int(time.time()))
        client = await self.raw(data)
        here = client.transport.getHost()
        header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {here.port} {self.port}\r\n".encode()
        await self.reaches_site(site, header + data)

    def test_proxy_protocol_header(self) -> Deferred[None]:
        return self.run_async(self._proxy_protocol())

    async def _no_mask(self) -> None:
        site = await self.site()
        await self.start(site=site, mask=False)
        client = await self.raw(b"\x01" + os.urandom(199))
        await self.within(client.lost)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(self.stats.rejected, {"bad-init": 1})
        self.assertEqual(self.new_connections(site), [])
        # Fake-TLS failures are still fronted.
        hello = build_client_hello(WRONG, DOMAIN, int(time.time()))
        await self.raw(hello)
        await self.reaches_site(site, hello)
        self.assertEqual(self.stats.fronted, {"tls-bad-digest": 1})
        self.assertEqual(self.dc_connections(), 0)

    def test_no_mask_closes_bad_classic_inits(self) -> Deferred[None]:
        return self.run_async(self._no_mask())

    async def _tls_only(self) -> None:
        site = await self.site()
        await self.start(secrets=(EE, CLASSIC), site=site, modes=frozenset({Mode.TLS}))
        init = generate_init(TAG_INTERMEDIATE, 2, secret=CLASSIC.key)
        packet = init.encryptor.update(make_codec(TAG_INTERMEDIATE).encode(b"ping"))
        await self.raw(init.wire + packet)
        await self.reaches_site(site, init.wire + packet)
        self.assertEqual(self.stats.fronted, {"not-tls": 1})
        self.assertEqual(self.stats.accepted, {})
        self.assertEqual(self.dc_connections(), 0)
        # The ee secret still works.
        client = await self.answered()
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")

    def test_tls_only_fronts_classic_init(self) -> Deferred[None]:
        return self.run_async(self._tls_only())

    async def _free_port(self) -> int:
        port = reactor.listenTCP(0, Factory(), interface=LOCAL)
        number = _port_number(port)
        await port.stopListening()
        return number

    async def _mask_is_self(self) -> None:
        number = await self._free_port()
        await self.start(listen_port=number, mask_host=Address(LOCAL, number))
        self.assertTrue(self.service.core.mask_disabled)
        rejected_before = dict(self.stats.rejected)
        client = await self.raw(b"\x01" + os.urandom(199))
        await self.within(client.lost)
        hello = build_client_hello(WRONG, DOMAIN, int(time.time()))
        tls = await self.raw(hello)
        await self.within(tls.lost)
        self.assertEqual(bytes(client.received) + bytes(tls.received), b"")
        self.assertEqual(self.stats.fronted, {})
        rejected = dict(self.stats.rejected)
        for reason, count in rejected_before.items():
            rejected[reason] -= count
        self.assertEqual(+Counter(rejected), {"bad-init": 1, "tls-bad-digest": 1})
        await self.no_clients()

    def test_mask_host_is_the_proxy(self) -> Deferred[None]:
        return self.run_async(self._mask_is_self())

    async def _self_probe(self) -> None:
        number = await self._free_port()
        await self.start(listen_port=number, mask_host=Address(LOCAL, number))
        self.assertEqual(self.stats.rejected, {})

    def test_profile_probes_do_not_hit_the_proxy_itself(self) -> Deferred[None]:
        return self.run_async(self._self_probe())

    async def _loop_found_late(self) -> None:
        # A mask host that turns out to be this proxy only when connecting
        # (a name, say): the connection is cut, not looped.
        site = await self.site()
        await self.start(site=site)
        settings = self.service.core.settings
        self.service.core.settings = dataclasses.replace(
            settings, mask_host=Address(LOCAL, self.port)
        )
        client = await self.raw(b"\x01" + os.urandom(199))
        await self.within(client.lost)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(self.stats.upstream_failures["mask-loop"], 1)
        self.assertEqual(self.stats.fronted, {"bad-init": 1})
        await self.no_clients()
        self.assertEqual(self.new_connections(site), [])

    def test_mask_loop_found_when_connecting(self) -> Deferred[None]:
        return self.run_async(self._loop_found_late())


class MaskHostDownTests(SynchronousTestCase):
    """
    While the mask host cannot be reached, a failed handshake is closed as a
    TLS server too busy to answer closes: after a short wait, with a FIN,
    never with an instant reset (in memory, on the clock).
    """

    def _proxy(self, **options: Any) -> MemoryProxy:
        return MemoryProxy(Settings(secrets=(EE,), mask_host=SITE_DOWN, **options))

    def _connect(self, proxy: MemoryProxy, data: bytes) -> _ReasonClient:
        client = _ReasonClient(data)
        proxy.accept(client)
        proxy.flush()
        self.assertEqual(proxy.pending(), [(SITE_DOWN.host, SITE_DOWN.port)])
        proxy.refuse()
        proxy.flush()
        return client

    def _closed_like_a_busy_server(self, proxy: MemoryProxy, client: _ReasonClient) -> None:
        low, high = front_relay.SITE_DOWN_CLOSE
        proxy.advance(low - 0.01)
        self.assertIsNone(client.reason)
        # What it sends meanwhile is read, so the close stays a FIN.
        client.transport.write(os.urandom(3000))
        proxy.flush()
        self.assertIsNone(client.reason)
        proxy.advance(high - low + 0.02)
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(proxy.core.stats.upstream_failures["mask-host"], 1)
        self.assertEqual(proxy.core.clients, set())

    def test_garbage(self) -> None:
        proxy = self._proxy()
        client = self._connect(proxy, b"\x01" + os.urandom(99))
        self._closed_like_a_busy_server(proxy, client)

    def test_bad_hello(self) -> None:
        proxy = self._proxy()
        hello = build_client_hello(os.urandom(16), DOMAIN, int(proxy.reactor.seconds()))
        client = self._connect(proxy, hello)
        self._closed_like_a_busy_server(proxy, client)

    def test_partial_hello(self) -> None:
        """
        A hello that never completes, its site connection (opened early)
        refused: closed the same way once the handshake has failed.
        """
        proxy = self._proxy(handshake_timeout=10.0, idle_timeout=30.0)
        client = self._connect(proxy, b"\x16\x03\x01\x02")
        for _ in range(200):
            if client.reason is not None:
                break
            proxy.advance(1.0)
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(proxy.core.stats.upstream_failures["mask-host"], 1)

    def test_delay_is_drawn(self) -> None:
        seen = set()
        for _ in range(20):
            proxy = self._proxy()
            client = self._connect(proxy, b"\x01" + os.urandom(99))
            steps = 0
            while client.reason is None:
                proxy.advance(0.1)
                steps += 1
            seen.add(steps)
        low, high = front_relay.SITE_DOWN_CLOSE
        self.assertTrue(all(low * 10 <= s <= high * 10 + 1 for s in seen), seen)
        self.assertGreater(len(seen), 1)

    def test_client_that_leaves_first(self) -> None:
        proxy = self._proxy()
        client = self._connect(proxy, b"\x01" + os.urandom(99))
        client.transport.loseConnection()
        proxy.flush()
        self.assertTrue(client.lost.called)
        self.assertEqual(proxy.core.clients, set())
        # Nothing of it is left on the clock.
        self.assertEqual(proxy.reactor.getDelayedCalls(), [])


class ProfileRestartTests(FrontingHarness):
    """
    The site's measured answer is kept in the state directory: a proxy
    restarted while the site is down answers as the site did.
    """

    async def _restart(self) -> None:
        state = FilePath(self.mktemp())
        state.makedirs()
        site = await self.site()
        await self.start(site=site, state_dir=Path(state.path))
        measured = self.service.core.tls_profiles[DOMAIN]
        self.assertTrue(state.child(PROFILE_FILE).exists())
        await self.service.stopService()
        site_port = site.port_number
        await site.close()
        # The site is gone (its port closed); a new proxy starts.
        await self.start(mask_host=Address(LOCAL, site_port), state_dir=Path(state.path))
        self.assertEqual(self.service.core.tls_profiles, {DOMAIN: measured})
        assert self.service.profiles is not None
        self.assertEqual(self.service.profiles.outages, {DOMAIN: 1})
        assert measured.pq is not None
        for mlkem, expected in ((False, measured), (True, measured.pq)):
            client = await self.answered(mlkem=mlkem)
            assert client.flight is not None
            answer = parse_server_answer(client.flight)
            assert isinstance(answer, Observation)
            self.assertIn(answer.app_data_len, expected.sizes)
            self.assertEqual(answer.group, expected.group)
            await self._abort_tls(client)

    def test_restart_while_the_site_is_down(self) -> Deferred[None]:
        return self.run_async(self._restart())
