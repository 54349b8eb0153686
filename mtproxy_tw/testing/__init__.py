"""
Test doubles for the proxy, shipped with the package.

- :mod:`~mtproxy_tw.testing.fakedc`: :class:`FakeDC` plays a Telegram data
  centre: it accepts the proxy's obfuscated2 init, answers the first two
  steps of the MTProto auth-key handshake well enough to take TDLib two
  round trips deep, echoes every other packet, and streams a large download
  on request.
- :mod:`~mtproxy_tw.testing.fakemiddle`: :class:`FakeMiddleProxy`, a
  Telegram middle proxy; :mod:`~mtproxy_tw.testing.fakeconfig`:
  :class:`FakeConfigServer`, Telegram's config site.
- :mod:`~mtproxy_tw.testing.fakesite`: :class:`FakeSite`, a web site to
  front to, recording what crosses its sockets.
- :mod:`~mtproxy_tw.testing.clients`: :class:`ObfuscatedClient` speaks to
  the proxy as a Telegram app would; :class:`RawClient` sends raw bytes;
  :mod:`~mtproxy_tw.testing.tlsclient`: :class:`FakeTLSClient`, an app's
  fake-TLS connection.
- :mod:`~mtproxy_tw.testing.tdlib`: :func:`tdlib_test_proxy` runs TDLib's
  own ``testProxy`` through the proxy.
- :mod:`~mtproxy_tw.testing.memory` (imported on its own): the proxy, its
  clients and these doubles connected in memory, on a ``MemoryReactorClock``.
- :mod:`~mtproxy_tw.testing.redisserver` (imported on its own):
  :class:`RedisServer`, a real ``redis-server`` on a loopback port.

Typical use in a trial test::

    dc = FakeDC()
    port = reactor.listenTCP(0, dc, interface="127.0.0.1")
    ...
    client = await connect_client(reactor, "127.0.0.1", proxy_port, secret, dc=2)
    assert await client.request(b"ping") == b"ping"
"""

from __future__ import annotations

from mtproxy_tw.testing.clients import (
    ObfuscatedClient,
    PacketQueue,
    RawClient,
    connect_client,
    connect_protocol,
    connect_raw,
    make_client,
)
from mtproxy_tw.testing.fakeconfig import FakeConfigServer, config_text
from mtproxy_tw.testing.fakedc import (
    DOWNLOAD_CHUNK,
    DOWNLOAD_MAGIC,
    PQ,
    REQ_DH_PARAMS,
    REQ_PQ_MULTI,
    TDLIB_FINGERPRINT,
    TEST_MAX_PACKET,
    FakeDC,
    FakeDCProtocol,
    buffered_bytes,
    download_chunk,
    download_request,
    make_codec,
)
from mtproxy_tw.testing.fakemiddle import FakeMEProtocol, FakeMiddleProxy
from mtproxy_tw.testing.fakesite import BAD_REQUEST, DEFAULT_PAGE, FakeSite, SiteConnection
from mtproxy_tw.testing.tdlib import tdlib_test_proxy
from mtproxy_tw.testing.tlsclient import FakeTLSClient

__all__ = [
    "BAD_REQUEST",
    "DEFAULT_PAGE",
    "DOWNLOAD_CHUNK",
    "DOWNLOAD_MAGIC",
    "PQ",
    "REQ_DH_PARAMS",
    "REQ_PQ_MULTI",
    "TDLIB_FINGERPRINT",
    "TEST_MAX_PACKET",
    "FakeConfigServer",
    "FakeDC",
    "FakeDCProtocol",
    "FakeMEProtocol",
    "FakeMiddleProxy",
    "FakeSite",
    "FakeTLSClient",
    "ObfuscatedClient",
    "PacketQueue",
    "RawClient",
    "SiteConnection",
    "buffered_bytes",
    "config_text",
    "connect_client",
    "connect_protocol",
    "connect_raw",
    "download_chunk",
    "download_request",
    "make_client",
    "make_codec",
    "tdlib_test_proxy",
]
