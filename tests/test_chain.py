"""
Another MTProxy as the upstream: two of our proxies chained on loopback
(client -> front -> back -> FakeDC), the front speaking to the back as a
Telegram app would, with every kind of secret on either hop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python import usage

from mtproxy_tw.config import values
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.tap import Options, settings_from_options
from mtproxy_tw.testing import (
    DOWNLOAD_CHUNK,
    REQ_DH_PARAMS,
    REQ_PQ_MULTI,
    FakeTLSClient,
    connect_protocol,
    download_chunk,
    download_request,
    tdlib_test_proxy,
)
from mtproxy_tw.testing.clients import PacketQueue
from mtproxy_tw.wire import faketls, obfuscated2
from mtproxy_tw.wire.chain import BackProxy, BackStream, ChainError, Reframer, parse_back_proxy
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED
from mtproxy_tw.wire.secrets import Secret, parse_secret
from mtproxy_tw.wire.transports import IntermediateCodec, PaddedIntermediateCodec
from tests.test_fronting import EE, SITE_DOWN
from tests.test_integration import (
    CLASSIC,
    DC_IDS,
    LOCAL,
    MiB,
    ProxyHarness,
    _payload,
    _port_number,
    reactor,
)
from tests.test_tdlib import REACHED_DC, SKIP

#: The back's own secrets, one of each kind (the front holds CLASSIC, SECURE, EE).
BACK_CLASSIC = parse_secret("back=" + "71" * 16, "x")
BACK_SECURE = parse_secret("back=dd" + "72" * 16, "x")
BACK_EE = parse_secret("back=ee" + "73" * 16 + b"back.example".hex(), "x")
FRONT_SECURE = parse_secret("bob=dd" + "b2" * 16, "x")
#: Where the front would go if it (wrongly) went to a DC itself: nothing listens.
NOWHERE = DCTable(overrides={dc: SITE_DOWN for dc in DC_IDS})


def _url(secret: Secret, port: int) -> str:
    return f"mtproxy://{LOCAL}:{port}?secret={secret.hex()}"


class ParseTests(ProxyHarness):
    """
    ``--upstream`` takes middle, direct or an mtproxy:// URL, and never
    repeats the secret when it refuses one.
    """

    def test_kinds(self) -> None:
        self.assertEqual(values.upstream("middle"), "middle")
        self.assertEqual(values.upstream("direct"), "direct")
        for secret in (BACK_CLASSIC, BACK_SECURE, BACK_EE):
            back = values.upstream(_url(secret, 443))
            assert isinstance(back, BackProxy)
            self.assertEqual(back.address, Address(LOCAL, 443))
            self.assertEqual((back.secret.key, back.secret.kind), (secret.key, secret.kind))
            self.assertNotIn(secret.key.hex(), repr(back) + str(back))
        back = parse_back_proxy(f"mtproxy://[::1]:8443?secret={BACK_CLASSIC.base64url()}")
        self.assertEqual((back.address, str(back)), (Address("::1", 8443), "mtproxy://[::1]:8443"))

    def test_refused(self) -> None:
        key = "7a" * 16
        for bad in (
            "socks5://h:1",
            "mtproxy://h?secret=" + key,
            "mtproxy://h:0?secret=" + key,
            "mtproxy://h:99999?secret=" + key,
            "mtproxy://h:443",
            "mtproxy://h:443?secret=" + key + "&x=1",
            "mtproxy://h:443?secret=" + key + "&secret=" + key,
            "mtproxy://h:443?secret=" + key[:-2],
            "mtproxy://u@h:443?secret=" + key,
            "mtproxy://h:443/path?secret=" + key,
            "sideways",
        ):
            with self.assertRaises(ValueError, msg=bad) as caught:
                values.upstream(bad)
            self.assertNotIn(key[:-2], str(caught.exception))

    def test_command_line(self) -> None:
        options = Options()
        options.parseOptions(["--upstream", _url(BACK_EE, 443), "--secret", CLASSIC.hex()])
        settings = settings_from_options(options, tuple(options["secrets"]))
        assert settings.upstream is not None
        self.assertEqual(settings.upstream.secret.key, BACK_EE.key)
        self.assertIsNone(options["middle"])  # direct mode, through the back
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--upstream", "mtproxy://h:443?secret=" + "7a" * 15])
        message = str(caught.exception)
        self.assertTrue(message.startswith("--upstream"), message)
        self.assertNotIn("7a" * 15, message)
        options = Options()
        options.parseOptions(["--upstream", "direct"])
        self.assertIsNone(settings_from_options(options, ()).upstream)

    def test_config_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text(f'upstream = "{_url(BACK_SECURE, 8443)}"\n')
        options = Options()
        options.parseOptions(["--config", str(path)])
        back = options["upstream"]
        assert isinstance(back, BackProxy)
        self.assertEqual((back.address.port, back.secret.key), (8443, BACK_SECURE.key))
        path.write_text('upstream = "mtproxy://h:1?secret=zz"\n')
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", str(path)])
        self.assertIn("upstream", str(caught.exception))


class StreamTests(ProxyHarness):
    """
    :class:`BackStream` as a codec: what the back receives and answers.
    """

    def test_obfuscated(self) -> None:
        stream = BackStream(BackProxy(Address(LOCAL, 1), BACK_SECURE), TAG_PADDED, -2, 0.0)
        self.assertTrue(stream.up)
        wire = stream.opening() + stream.outgoing(b"hello")
        accepted = obfuscated2.accept_init(wire[:64], BACK_SECURE.key)
        assert accepted is not None
        self.assertEqual((accepted.tag, accepted.dc), (TAG_PADDED, -2))
        self.assertEqual(accepted.decryptor.update(wire[64:]), b"hello")
        plain, send = stream.incoming(accepted.encryptor.update(b"answer"))
        self.assertEqual((plain, send), (b"answer", b""))

    def _tls(self) -> tuple[BackStream, bytes]:
        stream = BackStream(BackProxy(Address(LOCAL, 1), BACK_EE), TAG_PADDED, 4, 1e9)
        hello = stream.opening()
        match = faketls.verify_client_hello(hello, [("back", BACK_EE.key)])
        assert match is not None
        self.assertEqual(match.name, "back")
        flight = faketls.build_server_hello(BACK_EE.key, hello[11:43], hello[44:76])
        return stream, flight

    def test_fake_tls(self) -> None:
        stream, flight = self._tls()
        self.assertFalse(stream.up)
        self.assertEqual(stream.outgoing(b"held"), b"")  # until the flight is checked
        plain, send = stream.incoming(flight[:-1])
        self.assertEqual((plain, send, stream.up), (b"", b"", False))
        plain, send = stream.incoming(flight[-1:])
        self.assertTrue(stream.up)
        self.assertTrue(send.startswith(b"\x14\x03\x03\x00\x01\x01\x17\x03\x03"))
        reader = faketls.TLSRecordReader()
        inner = reader.feed(send) + reader.feed(stream.outgoing(b"more"))
        accepted = obfuscated2.accept_init(inner[:64], BACK_EE.key)
        assert accepted is not None
        self.assertEqual((accepted.tag, accepted.dc), (TAG_PADDED, 4))
        self.assertEqual(accepted.decryptor.update(inner[64:]), b"heldmore")
        answer = faketls.wrap_records(accepted.encryptor.update(b"x" * 40000))
        self.assertEqual(stream.incoming(answer), (b"x" * 40000, b""))

    def test_fake_tls_init_alone(self) -> None:
        # A client that sends nothing after its init: the back still gets it.
        stream, flight = self._tls()
        _, send = stream.incoming(flight)
        inner = faketls.TLSRecordReader().feed(send)
        self.assertEqual(len(inner), 64)
        accepted = obfuscated2.accept_init(inner, BACK_EE.key)
        assert accepted is not None
        self.assertEqual(accepted.dc, 4)

    def test_bad_flight(self) -> None:
        stream, flight = self._tls()
        forged = flight[:20] + bytes([flight[20] ^ 1]) + flight[21:]
        with self.assertRaises(ChainError):
            stream.incoming(forged)

    def test_reframer(self) -> None:
        reframer = Reframer(TAG_INTERMEDIATE, TAG_PADDED)
        wire = IntermediateCodec().encode(b"abcd" * 3) + IntermediateCodec().encode(b"efgh")
        out = reframer.feed(wire[:7]) + reframer.feed(wire[7:])
        packets = PaddedIntermediateCodec().feed(out)
        self.assertEqual([p.payload for p in packets], [b"abcd" * 3, b"efgh"])
        with self.assertRaises(ChainError):
            Reframer(TAG_ABRIDGED, TAG_PADDED).feed(b"\x00")

    def test_reframer_from_back(self) -> None:
        # The back's padded packets and quick acks, in the client's framing.
        ack = (0x80000000 | 0x1234).to_bytes(4, "little")
        padded = PaddedIntermediateCodec().encode(b"wxyz" * 2)
        wire = padded + ack + PaddedIntermediateCodec().encode(b"abcd")
        to_intermediate = Reframer(TAG_PADDED, TAG_INTERMEDIATE, from_back=True)
        out = b"".join(to_intermediate.feed(wire[i : i + 3]) for i in range(0, len(wire), 3))
        codec = IntermediateCodec()
        self.assertEqual(out, codec.encode(b"wxyz" * 2) + ack + codec.encode(b"abcd"))
        to_abridged = Reframer(TAG_PADDED, TAG_ABRIDGED, from_back=True)
        self.assertEqual(to_abridged.feed(ack + padded), ack[::-1] + b"\x02" + b"wxyz" * 2)
        with self.assertRaises(ChainError):
            to_abridged.feed(b"\x00\x00\x00\x00")


class ChainHarness(ProxyHarness):
    """
    A back proxy (with the FakeDCs) and a front whose upstream it is.
    """

    async def start_chain(self, back_secret: Secret) -> int:
        self.back_secret = back_secret
        self.back_port = await self.start(
            secrets=(back_secret,), mask_host=SITE_DOWN, drain_timeout=0.2
        )
        self.back = self.service
        self.addCleanup(self._stop, self.back)
        upstream = BackProxy(Address(LOCAL, self.back_port), back_secret)
        self.front = self.service = ProxyService(
            Settings(
                secrets=(CLASSIC, FRONT_SECURE, EE),
                dcs=NOWHERE,
                upstream=upstream,
                mask_host=SITE_DOWN,
                drain_timeout=0.2,
            ),
            reactor,
            [f"tcp:0:interface={LOCAL}"],
        )
        self.front.startService()
        self.addCleanup(self._stop, self.front)
        self.port = _port_number((await self.front.listening())[0])
        return self.port

    async def restart_back(self) -> None:
        self.back = ProxyService(
            self.back.settings, reactor, [f"tcp:{self.back_port}:interface={LOCAL}"]
        )
        self.back.startService()
        self.addCleanup(self._stop, self.back)
        await self.back.listening()

    async def _stop(self, service: ProxyService) -> None:
        if service.running:
            await service.stopService()

    async def front_client(self, kind: str, dc: int = 2) -> PacketQueue:
        if kind == "ee":
            client = FakeTLSClient(EE.key, dc=dc)
            await connect_protocol(reactor, LOCAL, self.port, client)
            self.addCleanup(self._abort_any, client)
            await self.within(client.answered)
            return client
        secret, tag = {
            "abridged": (CLASSIC, TAG_ABRIDGED),
            "classic": (CLASSIC, TAG_INTERMEDIATE),
            "dd": (FRONT_SECURE, TAG_PADDED),
        }[kind]
        return await self.client(secret, tag, dc=dc)

    async def _abort_any(self, client: Any) -> None:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost


FRONT_TAGS = {
    "abridged": TAG_ABRIDGED,
    "classic": TAG_INTERMEDIATE,
    "dd": TAG_PADDED,
    "ee": TAG_PADDED,
}
FRONT_NAMES = {"abridged": "alice", "classic": "alice", "dd": "bob", "ee": "erin"}


class ChainedTests(ChainHarness):
    """
    Every client kind at the front times every kind toward the back: echoes
    and a download cross byte for byte.
    """

    async def _chain(self, front: str, back_secret: Secret) -> None:
        logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            logged.append(repr(event) + (formatEvent(event) or ""))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await self.start_chain(back_secret)
        client = await self.front_client(front)
        for size in (4, 1024, 64 * 1024, MiB):
            payload = _payload(size)
            self.assertEqual(await self.within(client.request(payload)), payload)
        total = 3 * MiB + 1024
        client.send(download_request(total))
        received = 0
        index = 0
        while received < total:
            payload = await self.within(client.receive(), 10.0)
            self.assertEqual(payload, download_chunk(index, len(payload)), f"packet {index}")
            index += 1
            received += len(payload)
        self.assertEqual((received, index), (total, -(-total // DOWNLOAD_CHUNK)))
        self.assertEqual(await self.within(client.request(b"done")), b"done")
        # The back saw one more client, asking for the client's DC.
        tag = FRONT_TAGS[front] if back_secret is BACK_CLASSIC else TAG_PADDED
        self.assertEqual(self.fakes[2].seen, [(tag, 2)])
        self.assertEqual(self.back.core.stats.accepted, {"back": 1})
        self.assertEqual(self.front.core.stats.accepted, {FRONT_NAMES[front]: 1})
        self.assertEqual(sum(self.back.core.stats.rejected.values()), 0)
        self.assertFalse([line for line in logged if back_secret.key.hex() in line])

    for _front in ("abridged", "classic", "dd", "ee"):
        for _name, _secret in (("classic", BACK_CLASSIC), ("dd", BACK_SECURE), ("ee", BACK_EE)):

            def _test(self: ChainedTests, f: str = _front, s: Secret = _secret) -> Deferred[None]:
                return self.run_async(self._chain(f, s))

            locals()[f"test_{_front}_to_{_name}"] = _test
    del _front, _name, _secret, _test

    async def _media_dc(self) -> None:
        await self.start_chain(BACK_EE)
        client = await self.front_client("dd", dc=-2)
        self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        self.assertEqual(self.fakes[-2].seen, [(TAG_PADDED, -2)])

    def test_media_dc(self) -> Deferred[None]:
        return self.run_async(self._media_dc())

    async def _wrong_back_secret(self) -> None:
        await self.start_chain(BACK_EE)
        wrong = parse_secret("back=ee" + "74" * 16 + b"back.example".hex(), "x")
        settings = self.front.settings
        object.__setattr__(settings, "upstream", BackProxy(Address(LOCAL, self.back_port), wrong))
        client = await self.front_client("dd")
        client.send(b"ping")
        await self.within(client.lost)  # type: ignore[attr-defined]
        await self.until(lambda: not self.front.core.clients, "the front's client gone")
        self.assertEqual(self.front.core.stats.upstream_failures["connect"], 1)
        self.assertEqual(self.dc_connections(), 0)

    def test_wrong_back_secret(self) -> Deferred[None]:
        # The back fronts a hello it cannot verify; the front sees no valid
        # ServerHello and closes its client.
        return self.run_async(self._wrong_back_secret())


class RestartTests(ChainHarness):
    """
    The back going away mid-stream closes the clients relayed through it,
    and the front reaches the new back for new clients.
    """

    async def _restart(self) -> None:
        await self.start_chain(BACK_SECURE)
        relayed = [await self.front_client(kind) for kind in ("classic", "ee")]
        for client in relayed:
            self.assertEqual(await self.within(client.request(b"ping")), b"ping")
        waiting = await self.raw(CLASSIC.key[:10])  # still in its handshake
        relayed[0].send(download_request(64 * MiB))  # mid-stream
        await self.within(relayed[0].receive())
        await self.back.stopService()
        for client in relayed:
            await self.within(client.lost)  # type: ignore[attr-defined]
        await self.until(lambda: len(self.front.core.clients) == 1, "only the relayed closed")
        self.assertFalse(waiting.lost.called)
        self.assertTrue(self.front.running)
        await self.restart_back()
        for kind in ("dd", "ee"):
            client = await self.front_client(kind)
            self.assertEqual(await self.within(client.request(b"redo")), b"redo")
        self.assertEqual(self.back.core.stats.accepted, {"back": 2})

    def test_back_restarts(self) -> Deferred[None]:
        return self.run_async(self._restart())

    async def _back_down(self) -> None:
        await self.start_chain(BACK_CLASSIC)
        await self.back.stopService()
        client = await self.front_client("classic")
        client.send(b"ping")
        await self.within(client.lost)  # type: ignore[attr-defined]
        self.assertEqual(self.front.core.stats.upstream_failures["connect"], 1)

    def test_back_down(self) -> Deferred[None]:
        return self.run_async(self._back_down())


class SilentBackTests(ChainHarness):
    """
    A back that takes the connection and never answers the ClientHello:
    the client is closed after the connect timeout, not left hanging.
    """

    async def _silent(self) -> None:
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface=LOCAL)
        self.addCleanup(silent.stopListening)
        back = BackProxy(Address(LOCAL, _port_number(silent)), BACK_EE)
        self.service = ProxyService(
            Settings(secrets=(CLASSIC,), dcs=NOWHERE, upstream=back, connect_timeout=0.3),
            reactor,
            [f"tcp:0:interface={LOCAL}"],
        )
        self.service.startService()
        self.addCleanup(self._stop, self.service)
        self.port = _port_number((await self.service.listening())[0])
        client = await self.front_client("classic")
        client.send(b"ping")
        await self.within(client.lost)  # type: ignore[attr-defined]
        self.assertEqual(self.service.core.stats.upstream_failures["connect"], 1)

    def test_silent_back(self) -> Deferred[None]:
        return self.run_async(self._silent())


class TDLibChainTests(ChainHarness):
    """
    TDLib through the chain reaches the DC's third step, as it does
    through one proxy.
    """

    skip = SKIP

    async def _tdlib(self, front_text: str, back_secret: Secret) -> None:
        port = await self.start_chain(back_secret)
        message = await tdlib_test_proxy(LOCAL, port, front_text, 2)
        self.assertIn(REACHED_DC, message)
        self.assertEqual(self.fakes[2].connections[0].requests, [REQ_PQ_MULTI, REQ_DH_PARAMS])
        self.assertEqual(self.back.core.stats.accepted, {"back": 1})

    def test_classic_through_ee(self) -> Deferred[None]:
        return self.run_async(self._tdlib(CLASSIC.hex(), BACK_EE))

    def test_ee_through_dd(self) -> Deferred[None]:
        return self.run_async(self._tdlib(EE.hex(), BACK_SECURE))
