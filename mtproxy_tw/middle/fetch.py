"""
One HTTP download with a size cap and a deadline, for the config refresh and
the external address look-up.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

__all__ = [
    "MAX_BODY",
    "FetchError",
    "Fetched",
    "default_http_client",
    "describe",
    "fetch",
    "upstream_http_client",
]

#: Largest body accepted from any of the URLs.
MAX_BODY = 1 << 20


class FetchError(Exception):
    """
    A download failed: HTTP status, size, or the connection.
    """


@dataclass(frozen=True, slots=True)
class Fetched:
    """
    A downloaded body and the server's clock (``Date`` header) if it sent one.
    """

    body: bytes
    server_time: float | None


def default_http_client(reactor: Any) -> Any:
    """
    A treq client whose HTTPS connections verify certificates (the Agent default).
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    return HTTPClient(Agent(reactor))


def upstream_http_client(reactor: Any, upstreams: Any) -> Any:
    """
    A treq client whose connections go through the upstream SOCKS5 servers
    (a :class:`~mtproxy_tw.proxy.socks.Upstreams`), HTTPS verified as the
    Agent default does.
    """
    from treq.client import HTTPClient
    from twisted.internet.endpoints import wrapClientTLS
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    policy = BrowserLikePolicyForHTTPS()

    class Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            host = uri.host.decode("ascii")
            endpoint = upstreams.endpoint(host, uri.port)
            if uri.scheme == b"https":
                return wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), endpoint)
            return endpoint

    return HTTPClient(Agent.usingEndpointFactory(reactor, Endpoints()))


def _server_time(headers: Any) -> float | None:
    values = headers.getRawHeaders(b"date") or []
    for value in values:
        try:
            return email.utils.parsedate_to_datetime(value.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError):
            continue
    return None


def fetch(
    http_client: Any, url: str, *, clock: IReactorTime, timeout: float, limit: int = MAX_BODY
) -> Deferred[Fetched]:
    """
    GET ``url`` with a treq-like client; fails unless the answer is 200 and small.

    ``timeout`` covers the whole exchange, body included.
    """
    import treq

    async def run() -> Fetched:
        response = await http_client.get(url, unbuffered=True, reactor=clock)
        if response.code != 200:
            response.deliverBody(_Discard())
            raise FetchError(f"HTTP status {response.code}")
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:
                raise FetchError(f"body larger than {limit} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return Fetched(b"".join(chunks), _server_time(response.headers))

    d: Deferred[Fetched] = ensureDeferred(run())

    def timed_out(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure):
            raise FetchError(f"timed out after {timeout:g} s")
        return result

    return d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)


class _Discard(Protocol):
    """
    A body protocol that drops the connection instead of reading the body.
    """

    transport: Any

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


def describe(failure: Failure) -> str:
    """
    One line for a failed download (the first reason of a treq failure that has several).
    """
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    return failure.getErrorMessage() or repr(failure.value)
