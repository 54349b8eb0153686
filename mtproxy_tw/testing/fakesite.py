"""
A web site to front to, for tests.

:class:`FakeSite` serves one small fixed page over TLS, with a self-signed
certificate made at start-up for its domain (TLS 1.2 and 1.3, pyOpenSSL
through Twisted), or over plain TCP. Every connection is recorded as the
raw bytes that crossed the TCP socket, *before* TLS, both ways, so a test
can check that the site received exactly what a client sent through the
proxy, and what the site's own TLS answer looked like on the wire.

Typical use in a trial test::

    site = FakeSite("example.com")
    port = site.listen(reactor)
    self.addCleanup(site.close)
    ...
    (conn,) = site.connections
    assert bytes(conn.received) == hello
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mtproxy_tw.testing.sslsite import StdlibTLSFactory, server_context

__all__ = ["BAD_REQUEST", "DEFAULT_PAGE", "MLKEM_SITES", "FakeSite", "SiteConnection"]

#: Whether a default :class:`FakeSite` picks X25519MLKEM768 when offered:
#: the OpenSSL that ``cryptography`` bundles has ML-KEM from 3.5.
MLKEM_SITES = openssl_backend.openssl_version_number() >= 0x30500000

#: The page a :class:`FakeSite` serves unless told otherwise.
DEFAULT_PAGE = (
    b"<!doctype html>\n<html><head><title>Example Domain</title></head>\n"
    b"<body><h1>Example Domain</h1><p>This domain is for use in examples.</p></body></html>\n"
)


#: The answer to bytes that do not start like an HTTP request.
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

#: A prefix of an HTTP request line: a method, then a space.
_HTTP_START = re.compile(rb"^[A-Z]{1,10}( |$)")


@functools.cache
def _private_key() -> rsa.RSAPrivateKey:
    # One RSA key per process: generating it is the slow part. RSA-PSS
    # signatures have a fixed length, so the site's handshake records have
    # the same sizes on every connection.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _self_signed(domain: str, key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


class SiteConnection:
    """
    What crossed one TCP connection of a :class:`FakeSite`.

    :ivar received: every byte read from the socket, before TLS.
    :ivar sent: every byte written to the socket, after TLS.
    :ivar requests: the HTTP requests read (decrypted), one per answer.
    :ivar eof: whether the peer shut down its sending side (or closed).
    :ivar lost: fires when the connection is closed.
    """

    def __init__(self, peer: IAddress) -> None:
        self.peer = peer
        self.received = bytearray()
        self.sent = bytearray()
        self.requests: list[bytes] = []
        self.eof = False
        self.lost: Deferred[None] = Deferred()
        self.transport: Any = None

    @property
    def closed(self) -> bool:
        return self.lost.called

    def abort(self) -> Deferred[None]:
        """
        Abort the connection; fires once it is closed.
        """
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()
        return self.lost


class _Recorder(ProtocolWrapper):
    """
    Sits on the TCP transport, under TLS, and records both directions.
    """

    factory: _RecordingFactory

    def makeConnection(self, transport: Any) -> None:
        self.record = SiteConnection(transport.getPeer())
        self.record.transport = transport
        site = self.factory.site
        site.connections.append(self.record)
        super().makeConnection(transport)
        if site.timeout is not None and site.reactor is not None:
            # A real server's own handshake/request timeout: it closes
            # (with a FIN) a client that never completes its request.
            self._timeout = site.reactor.callLater(site.timeout, transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        self.record.received += data
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self.record.sent += data
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.record.eof = True
        timeout = getattr(self, "_timeout", None)
        if timeout is not None and timeout.active():
            timeout.cancel()
        super().connectionLost(reason)
        self.record.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class _HalfCloseRecorder(_Recorder):
    """
    A recorder for plain TCP: the page protocol sees half-closes.
    """

    def readConnectionLost(self) -> None:
        self.record.eof = True
        wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if wrapped is not None:
            wrapped.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if wrapped is not None:
            wrapped.writeConnectionLost()


class _RecordingFactory(WrappingFactory):
    noisy = False

    def __init__(self, site: FakeSite, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.site = site
        self.protocol = _Recorder if site.tls else _HalfCloseRecorder


def _record_of(protocol: Protocol) -> SiteConnection | None:
    transport: Any = protocol.transport
    while transport is not None:
        if isinstance(transport, _Recorder):
            return transport.record
        transport = getattr(transport, "transport", None)
    return None


@implementer(IHalfCloseableProtocol)
class _PageProtocol(Protocol):
    """
    Answers the first complete HTTP request head with the page, then closes;
    answers anything that is not HTTP at once with :data:`BAD_REQUEST`.
    """

    transport: Any

    def __init__(self, site: FakeSite) -> None:
        self.site = site
        self.buffer = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        self.buffer += data
        if not _HTTP_START.match(self.buffer[:16]):
            # Not HTTP (a TLS hello on the plain port, say): answer like a
            # web server does, without waiting for more.
            self.answered = True
            self.transport.write(BAD_REQUEST)
            self.transport.loseConnection()
            return
        head, sep, _ = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        record = _record_of(self)
        if record is not None:
            record.requests.append(head + sep)
        if not self.site.answer_on_eof:
            self._answer()

    def readConnectionLost(self) -> None:
        if self.site.answer_on_eof and not self.answered:
            self._answer()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _answer(self) -> None:
        self.answered = True
        self.transport.write(self.site.response)
        self.transport.loseConnection()


class _PageFactory(Factory):
    noisy = False

    def __init__(self, site: FakeSite) -> None:
        self.site = site

    def buildProtocol(self, addr: IAddress | None) -> _PageProtocol:
        return _PageProtocol(self.site)


class FakeSite:
    """
    A web site on a loopback port that records what reaches it.

    :param domain: the name in the certificate (CN and subjectAltName).
    :param page: the body of the one page served, to any request.
    :param tls: serve over TLS (default) or plain TCP.
    :param tls13: allow TLS 1.3 (default); ``False`` caps the site at 1.2.
    :param x25519_only: offer the x25519 key-exchange group only, as a site
        on a TLS library without ML-KEM does (served with the standard
        library's :mod:`ssl`, see :mod:`.sslsite`). By default the site runs
        on the OpenSSL that ``cryptography`` bundles, with its own groups:
        from OpenSSL 3.5 (:data:`MLKEM_SITES`) it picks X25519MLKEM768 when
        a hello offers a share of it, as the big CDNs do.
    :param answer_on_eof: answer only once the client shut down its
        sending side (a half-close), not when the request head is complete.

    :ivar connections: a :class:`SiteConnection` per accepted connection,
        in order.
    :ivar certificate: the site's certificate (``cryptography`` object);
        :attr:`certificate_der` and :attr:`certificate_pem` are its
        encodings.
    """

    def __init__(
        self,
        domain: str = "example.com",
        page: bytes = DEFAULT_PAGE,
        *,
        tls: bool = True,
        tls13: bool = True,
        x25519_only: bool = False,
        answer_on_eof: bool = False,
    ) -> None:
        self.domain = domain
        self.page = page
        self.tls = tls
        self.answer_on_eof = answer_on_eof
        #: Seconds after which the site closes any connection (its own
        #: timeout on a request that never completes); ``None``: never.
        self.timeout: float | None = None
        self.reactor: Any = None
        self.connections: list[SiteConnection] = []
        self.port: IListeningPort | None = None
        key = _private_key()
        self.certificate = _self_signed(domain, key)
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        inner: IProtocolFactory = _PageFactory(self)
        if tls and x25519_only:
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            inner = StdlibTLSFactory(server_context(self.certificate_pem, key_pem), inner)
        elif tls:
            options = CertificateOptions(
                # pyOpenSSL takes cryptography objects directly (its own
                # wrappers are deprecated); Twisted only hands them on.
                privateKey=key,  # type: ignore[arg-type]
                certificate=self.certificate,  # type: ignore[arg-type]
                lowerMaximumSecurityTo=None if tls13 else TLSVersion.TLSv1_2,
                # Without a protocol of its own, Twisted's ALPN callback
                # selects an empty one, which the bundled OpenSSL answers
                # with an internal_error alert to any client offering ALPN.
                acceptableProtocols=[b"http/1.1"],
            )
            inner = TLSMemoryBIOFactory(options, False, inner)
        self.factory = _RecordingFactory(self, inner)

    @property
    def response(self) -> bytes:
        """
        The whole HTTP answer to any request.
        """
        head = (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/html; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(self.page)
        )
        return head + self.page

    def listen(self, reactor: Any, interface: str = "127.0.0.1", port: int = 0) -> IListeningPort:
        """
        Start listening on ``interface`` (port 0: any free port).
        """
        self.reactor = reactor
        listening: IListeningPort = reactor.listenTCP(port, self.factory, interface=interface)
        self.port = listening
        return listening

    @property
    def port_number(self) -> int:
        if self.port is None:
            raise RuntimeError("the site is not listening")
        port: int = self.port.getHost().port  # type: ignore[attr-defined]
        return port

    def live(self) -> list[SiteConnection]:
        """
        The connections not closed yet.
        """
        return [c for c in self.connections if not c.closed]

    def close(self) -> Deferred[None]:
        """
        Stop listening and abort every open connection; fires when all are
        closed.
        """
        waiting: list[Deferred[Any]] = [conn.abort() for conn in self.live()]
        port, self.port = self.port, None
        if port is not None:
            stopped = port.stopListening()
            if stopped is not None:
                waiting.append(stopped)
        if not waiting:
            return succeed(None)
        done: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        return done.addCallback(lambda _: None)
