"""
Telegram's config site for tests.

:class:`FakeConfigServer` serves getProxyConfig, getProxyConfigV6,
getProxySecret (and an address look-up) over plain HTTP with a ``Date``
header; a test may change, break or stall any of them. :func:`config_text`
writes a getProxyConfig body.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mtproxy_tw.middle.telegramconfig import DEFAULT_PROXY_SECRET
from mtproxy_tw.testing._reactor import default_reactor

__all__ = ["FakeConfigServer", "config_text"]


def config_text(endpoints: dict[int, list[tuple[str, int]]], default: int | None = None) -> bytes:
    """
    A getProxyConfig body listing ``endpoints`` per DC id.
    """
    lines = ["# fake config"]
    if default is not None:
        lines.append(f"default {default};")
    for dc, entries in endpoints.items():
        for host, port in entries:
            shown = f"[{host}]" if ":" in host else host
            lines.append(f"proxy_for {dc} {shown}:{port};")
    return ("\n".join(lines) + "\n").encode()


class _ConfigResource(Resource):
    isLeaf = True

    def __init__(self, server: FakeConfigServer) -> None:
        super().__init__()
        self.fake = server

    def render_GET(self, request: Request) -> bytes | int:
        server = self.fake
        path = (request.path or b"").decode("latin-1")
        server.requests[path] += 1
        if server.date_offset is not None:
            now = server.clock.seconds() + server.date_offset
            request.setHeader(b"date", datetimeToString(now))
        if path in server.stalled:
            server.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        status = server.status.get(path, 200)
        body = server.bodies.get(path)
        if body is None:
            status = 404
            body = b"not found\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/octet-stream")
        return body


class _TrackedProtocol(ProtocolWrapper):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        factory = self.factory
        assert isinstance(factory, FakeConfigServer)
        factory._closed()


class FakeConfigServer(WrappingFactory):
    """
    Telegram's config site for tests, over plain HTTP.

    Paths: ``/getProxyConfig``, ``/getProxyConfigV6``, ``/getProxySecret``
    and ``/ip`` (an address look-up). Change :attr:`bodies` to publish new
    content, :attr:`status` to answer errors, :attr:`stalled` to never
    answer a path. Every answer carries ``Date`` = clock + :attr:`date_offset`
    (None: the web server's own).

    :ivar requests: requests per path.
    """

    noisy = False
    protocol = _TrackedProtocol

    def __init__(
        self,
        clock: IReactorTime | None = None,
        *,
        config_v4: bytes = b"proxy_for 2 127.0.0.1:8888;\n",
        config_v6: bytes = b"proxy_for 2 [::1]:8888;\n",
        secret: bytes = DEFAULT_PROXY_SECRET,
        ip: bytes = b"203.0.113.7\n",
        date_offset: float | None = 0.0,
    ) -> None:
        self.clock: IReactorTime = clock if clock is not None else default_reactor()
        self.bodies: dict[str, bytes] = {
            "/getProxyConfig": config_v4,
            "/getProxyConfigV6": config_v6,
            "/getProxySecret": secret,
            "/ip": ip,
        }
        self.status: dict[str, int] = {}
        self.stalled: set[str] = set()
        self.hanging: list[Request] = []
        self.date_offset = date_offset
        self.requests: Counter[str] = Counter()
        self._idle_waiters: list[Deferred[None]] = []
        site = Site(_ConfigResource(self))
        site.displayTracebacks = False
        site.noisy = False
        super().__init__(site)

    def url(self, port: int, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{port}/{path.lstrip('/')}"

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    def _closed(self) -> None:
        if not self.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def idle(self) -> Deferred[None]:
        """
        Fires when no connection is open (after cutting stalled requests).
        """
        hanging, self.hanging = self.hanging, []
        for request in hanging:
            channel: Any = request.channel
            if channel is not None:
                channel.transport.abortConnection()
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d
