"""
The middle leg of a client: its place on a shared middle-proxy connection,
seen from the client's side.

The session (:class:`mtproxy_tw.middle.session.ClientSession`) is fed the
client's decrypted stream and hands back answers already in the client's
framing; this leg encrypts them for the client (and wraps them in TLS
records for a fake-TLS client). Flow control is the session's: one slow
client never pauses a shared connection, it is paused or cut alone.
"""

from __future__ import annotations

from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers import CipherContext

from mtproxy_tw import _twisted
from mtproxy_tw.proxy.interfaces import MiddleSession, MiddleUpstream
from mtproxy_tw.proxy.legs import LegClient
from mtproxy_tw.wire.faketls import RecordWriter

__all__ = ["MiddleClient", "MiddleLeg"]


class MiddleClient(LegClient, Protocol):
    """
    What the middle leg uses of the client protocol.
    """

    def session_closed(self) -> None: ...


class MiddleLeg:
    """
    One client's session, and the ciphers either side of it.
    """

    __slots__ = (
        "_clock",
        "_from_client",
        "_to_client",
        "_writer",
        "ad_tag",
        "client",
        "session",
    )

    def __init__(
        self,
        client: MiddleClient,
        *,
        from_client: CipherContext,
        to_client: CipherContext,
        writer: RecordWriter | None,
        clock: Any,
        ad_tag: bytes | None = None,
    ) -> None:
        self.client = client
        #: The user's own ad tag (``[users.NAME] ad_tag``), if any.
        self.ad_tag = ad_tag
        self._from_client = from_client
        self._to_client = to_client
        self._writer = writer
        self._clock = clock
        self.session: MiddleSession | None = None

    def attach(self, upstream: MiddleUpstream, dc: int, tag: bytes) -> None:
        # The session may end at once (no middle proxy for the DC, say).
        self.session = upstream.attach(self, dc, tag)  # type: ignore[arg-type]

    @property
    def transport(self) -> Any:
        """
        The client's transport, for its addresses.
        """
        return self.client.transport

    def relay(self, data: bytes) -> None:
        """
        Bytes from the client.
        """
        assert self.session is not None
        self.client.bytes_in += len(data)
        self.session.feed(self._from_client.update(data))

    def client_lost(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    # -- what the session calls

    def deliver(self, framed: bytes) -> None:
        """
        Send bytes already in the client's transport framing.
        """
        client = self.client
        if client.closed:
            return
        client.bytes_out += len(framed)
        data = self._to_client.update(framed)
        if self._writer is not None:
            data = self._writer.wrap(data, self._clock.seconds())
        _twisted.write(client.transport, data)

    def buffered(self) -> int:
        """
        Bytes waiting in the client's write buffer.
        """
        return _twisted.buffered(self.client.transport)

    def pause_reading(self) -> None:
        if not self.client.closed:
            self.client.transport.pauseProducing()

    def resume_reading(self) -> None:
        if not self.client.closed:
            self.client.transport.resumeProducing()

    def session_closed(self) -> None:
        """
        The middle proxy or the pool ended this client's session.
        """
        self.session = None
        self.client.session_closed()
