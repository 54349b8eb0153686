"""
TLS for a test site on the standard library's :mod:`ssl` module, whose
context can choose the key-exchange groups (pyOpenSSL's cannot): a site
offering x25519 only, as one on a TLS library without ML-KEM does.

:class:`StdlibTLSFactory` wraps a server factory the way Twisted's
``TLSMemoryBIOFactory`` does: the wrapped protocols see plain bytes, the
transport below sees TLS records.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

__all__ = ["StdlibTLSFactory", "server_context"]


def server_context(
    certificate_pem: bytes, key_pem: bytes, groups: str = "X25519"
) -> ssl.SSLContext:
    """
    A TLS 1.2-1.3 server context for one certificate, with ``groups`` only
    (an OpenSSL group name) and ALPN ``http/1.1``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ecdh_curve(groups)
    context.set_alpn_protocols(["http/1.1"])
    # load_cert_chain reads files only.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "site.pem")
        with open(path, "wb") as f:
            f.write(key_pem + certificate_pem)
        context.load_cert_chain(path)
    return context


class _StdlibTLS(ProtocolWrapper):
    """
    Server-side TLS between a transport and a protocol, on memory BIOs.
    """

    factory: StdlibTLSFactory
    transport: Any

    def makeConnection(self, transport: Any) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = self.factory.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._ready = False
        self._waiting: list[bytes] = []
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._incoming.write(data)
        plain: list[bytes] = []
        try:
            if not self._ready:
                self._tls.do_handshake()
                self._ready = True
                waiting, self._waiting = self._waiting, []
                for chunk in waiting:
                    self._tls.write(chunk)
            while chunk := self._tls.read(65536):
                plain.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            # An alert, if any, is in the outgoing BIO: sent, then closed,
            # as a server does (a close_notify from the peer ends here too).
            self._flush()
            self.transport.loseConnection()
            return
        self._flush()
        if plain:
            self.wrappedProtocol.dataReceived(b"".join(plain))

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.transport.write(data)

    def write(self, data: bytes) -> None:
        if not self._ready:
            self._waiting.append(data)
            return
        self._tls.write(data)
        self._flush()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._ready:
            # The close_notify goes out; the peer's is not waited for.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)  # type: ignore[arg-type]


class StdlibTLSFactory(WrappingFactory):
    """
    Serves ``wrapped``'s protocols over TLS with ``context``.
    """

    protocol = _StdlibTLS
    noisy = False

    def __init__(self, context: ssl.SSLContext, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.context = context
