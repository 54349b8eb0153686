"""
Listeners that wrap the TCP connection: ``ssl:`` (TLS) and ``haproxy:``.

The relayed bytes must go through the wrapper, never straight onto the
socket beneath it (see :mod:`mtproxy_tw._twisted`): a client behind TLS
gets its echo and its download back byte-exact, through TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import struct
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase

from mtproxy_tw import _twisted
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.settings import Settings
from mtproxy_tw.testing import (
    DOWNLOAD_CHUNK,
    FakeDC,
    ObfuscatedClient,
    download_chunk,
    download_request,
)
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED
from mtproxy_tw.wire.secrets import parse_secret

reactor: Any = _reactor

LOCAL = "127.0.0.1"
SECRET = parse_secret("bob=dd" + "b2" * 16, "x")
MiB = 1 << 20


def self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    """
    A key and a certificate for ``localhost`` and 127.0.0.1 in ``directory``:
    the key's path, the certificate's and the certificate in PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCAL))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return key_path, cert_path, pem


class One(Factory):
    """
    A factory for one protocol already built.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class HAProxyClient(ObfuscatedClient):
    """
    An :class:`ObfuscatedClient` behind a load balancer that announces it
    with a PROXY protocol v1 line.
    """

    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n"

    def connectionMade(self) -> None:
        self.transport.write(self.header)
        super().connectionMade()


def proxy_v2_header(source: str, source_port: int, destination: str, port: int) -> bytes:
    """
    A binary PROXY protocol v2 header (``PROXY`` command, TCP) as a load
    balancer sends it, for IPv4 or IPv6 addresses.
    """
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source_port, port)
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    return signature + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class HAProxyV2Client(HAProxyClient):
    """
    The same behind a load balancer speaking PROXY protocol v2.
    """

    header = proxy_v2_header("198.51.100.8", 40001, LOCAL, 443)


class HAProxyV2IPv6Client(HAProxyClient):
    header = proxy_v2_header("2001:db8::8", 40002, "2001:db8::1", 443)


class WrappedListenerTests(TestCase):
    timeout = 60

    async def start(self, listen: str) -> int:
        self.fake = FakeDC(reactor)
        dc: IListeningPort = reactor.listenTCP(0, self.fake, interface=LOCAL)
        self.addCleanup(dc.stopListening)
        self.addCleanup(self._close_fake)
        settings = Settings(
            secrets=(SECRET,),
            dcs=DCTable(overrides={2: Address(LOCAL, dc.getHost().port)}),
        )
        self.service = ProxyService(settings, reactor, [listen])
        self.service.startService()
        self.addCleanup(self._stop)
        [port] = await self.service.listening()
        return int(port.getHost().port)

    async def _stop(self) -> None:
        if self.service.running:
            await self.service.stopService()

    async def _close_fake(self) -> None:
        for conn in self.fake.live():
            conn.transport.abortConnection()
            await conn.lost

    async def connect(self, endpoint: Any, client: ObfuscatedClient) -> ObfuscatedClient:
        await endpoint.connect(One(client))
        self.addCleanup(self._abort, client)
        return client

    async def _abort(self, client: ObfuscatedClient) -> None:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost

    async def relay(self, client: ObfuscatedClient) -> None:
        """
        Echoes of every size, then a download, byte-exact.
        """
        for size in (4, 1024, 64 * 1024, MiB):
            payload = (b"\x01" + os.urandom(size))[:size]
            echoed = await client.request(payload).addTimeout(10, reactor)
            self.assertEqual(echoed, payload)
        total = 4 * MiB
        done: Deferred[None] = Deferred()
        received = 0
        index = 0
        bad: list[int] = []

        def on_packet(payload: bytes) -> None:
            nonlocal received, index
            if payload != download_chunk(index, len(payload)):
                bad.append(index)
            index += 1
            received += len(payload)
            if received >= total and not done.called:
                done.callback(None)

        client.on_packet = on_packet
        client.send(download_request(total))
        await done.addTimeout(20, reactor)
        self.assertEqual((received, index, bad), (total, -(-total // DOWNLOAD_CHUNK), []))
        client.on_packet = None
        self.assertEqual(await client.request(b"done").addTimeout(10, reactor), b"done")
        self.assertEqual(self.service.core.stats.accepted, {SECRET.name: 1})

    def proxy_side(self) -> Any:
        (pair,) = self.service.core.clients
        return pair.transport

    async def _tls(self) -> None:
        key, cert, pem = self_signed(Path(self.mktemp()))
        port = await self.start(f"ssl:0:privateKey={key}:certKey={cert}:interface={LOCAL}")
        options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOCAL, port))
        client = await self.connect(endpoint, ObfuscatedClient(SECRET.key, TAG_PADDED, 2))
        await self.relay(client)
        transport = self.proxy_side()
        self.assertIsInstance(transport, TLSMemoryBIOProtocol)
        self.assertFalse(_twisted.plain_tcp(transport))
        (pair,) = self.service.core.clients
        self.assertIsNone(pair._dc.pump)  # TLS wraps every byte: nothing spliced

    def test_tls_listener(self) -> Deferred[None]:
        """
        ``--listen ssl:...``: the client's TLS carries obfuscated2 both ways.
        """
        return ensureDeferred(self._tls())

    async def _haproxy(self, kind: type[HAProxyClient] = HAProxyClient) -> Any:
        port = await self.start(f"haproxy:tcp:0:interface={LOCAL}")
        endpoint = TCP4ClientEndpoint(reactor, LOCAL, port)
        client = await self.connect(endpoint, kind(SECRET.key, TAG_PADDED, 2))
        await self.relay(client)
        transport = self.proxy_side()
        self.assertIsInstance(transport, ProtocolWrapper)
        return transport.getPeer()

    async def _haproxy_v1(self) -> None:
        peer = await self._haproxy()
        self.assertEqual((peer.host, peer.port), ("198.51.100.7", 40000))

    def test_haproxy_listener(self) -> Deferred[None]:
        """
        ``--listen haproxy:tcp:...``: the PROXY line is read, the rest relayed.
        """
        return ensureDeferred(self._haproxy_v1())

    async def _haproxy_v2(self) -> None:
        peer = await self._haproxy(HAProxyV2Client)
        self.assertEqual((peer.type, peer.host, peer.port), ("TCP", "198.51.100.8", 40001))

    def test_haproxy_v2_listener(self) -> Deferred[None]:
        """
        PROXY protocol v2 (binary): the client's address is the one the load
        balancer gives, and the rest is relayed.
        """
        return ensureDeferred(self._haproxy_v2())

    async def _haproxy_v2_ipv6(self) -> None:
        peer = await self._haproxy(HAProxyV2IPv6Client)
        self.assertIsInstance(peer, IPv6Address)
        # Twisted writes it uncompressed (2001:db8:0:0:0:0:0:8).
        self.assertEqual(ipaddress.ip_address(peer.host), ipaddress.ip_address("2001:db8::8"))
        self.assertEqual(peer.port, 40002)

    def test_haproxy_v2_ipv6_client(self) -> Deferred[None]:
        """
        PROXY protocol v2 naming an IPv6 client, on an IPv4 listener.
        """
        return ensureDeferred(self._haproxy_v2_ipv6())
