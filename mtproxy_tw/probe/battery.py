"""
The probes ``mtproxy-tw probe`` sends: what a censor's scanner sends to a
suspected proxy, each as the bytes of its first flight. Pure: no I/O.

One battery is built per run and sent to both the proxy and the site, so
both see exactly the same bytes (the random ones included).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from mtproxy_tw.wire.faketls import build_client_hello
from mtproxy_tw.wire.secrets import Secret

__all__ = ["Probe", "battery", "short_client_hello"]

#: How old the stale probe's timestamp is, in seconds.
STALE_BY = 3600


@dataclass(frozen=True)
class Probe:
    """
    One probe.

    :ivar name: a short name, the key of its result line.
    :ivar what: what it sends, in a few words.
    :ivar payload: the bytes written as soon as the connection is up.
    :ivar tls: make a real TLS client handshake (and an HTTP request in
        it) instead of writing ``payload``.
    :ivar replay: write ``payload`` on a first connection, wait for the
        answer, then write it again on a second: the second is observed.
    :ivar needs_secret: what it needs to run, when it cannot (else empty).
    """

    name: str
    what: str
    payload: bytes = b""
    tls: bool = False
    replay: bool = False
    needs_secret: bool = False


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack(">HH", kind, len(body)) + body


def _vector(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


#: The cipher suites ``openssl s_client`` (OpenSSL 3) offers, in its order.
_OPENSSL_SUITES = bytes.fromhex(
    "130213031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067"
    "c00ac0140039c009c0130033009d009c003d003c0035002f00ff"
)
_OPENSSL_GROUPS = bytes.fromhex("001d0017001e0019001801000101010201030104")
_OPENSSL_SIGNATURES = bytes.fromhex(
    "040305030603080708080809080a080b080408050806040105010601030303010302040205020602"
)


def short_client_hello(domain: str) -> bytes:
    """
    A TLS 1.3 ClientHello the way ``openssl s_client -servername DOMAIN``
    sends it: about 300 bytes, under the 512 a Telegram app's hello has.
    """
    name = domain.encode("ascii")
    extensions = b"".join(
        (
            _extension(0x0000, _vector(b"\x00" + _vector(name))),
            _extension(0x000B, b"\x03\x00\x01\x02"),
            _extension(0x000A, _vector(_OPENSSL_GROUPS)),
            _extension(0x0023, b""),
            _extension(0x0016, b""),
            _extension(0x0017, b""),
            _extension(0x000D, _vector(_OPENSSL_SIGNATURES)),
            _extension(0x002B, b"\x04\x03\x04\x03\x03"),
            _extension(0x002D, b"\x01\x01"),
            _extension(0x0033, _vector(b"\x00\x1d" + _vector(os.urandom(32)))),
        )
    )
    body = b"".join(
        (
            b"\x03\x03",
            os.urandom(32),
            b"\x20" + os.urandom(32),
            _vector(_OPENSSL_SUITES),
            b"\x01\x00",
            _vector(extensions),
        )
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _vector(handshake)


def _garbage(size: int) -> bytes:
    return os.urandom(size)


def battery(sni: str, now: float, secret: Secret | None = None) -> list[Probe]:
    """
    The probes of one run, for a site named ``sni``; ``now`` is the time
    the TDLib-shaped hellos carry. The probes that need an ``ee``
    ``secret`` (a valid hello) are listed without a payload when there is
    none.
    """
    stamp = int(now)
    wrong = build_client_hello(os.urandom(16), sni, stamp, mlkem=True, consistent_grease=True)
    probes = [
        Probe("tls-browser", "a TLS 1.3 handshake as a browser makes it, then GET /", tls=True),
        Probe(
            "tls-short", "an openssl s_client ClientHello (under 512 B)", short_client_hello(sni)
        ),
        Probe("tdlib-wrong-key", "a Telegram app's ClientHello signed with a wrong key", wrong),
        Probe(
            "http-get",
            "a plain HTTP GET",
            b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
            % sni.encode("ascii"),
        ),
        Probe("garbage-1", "1 random byte", _garbage(1)),
        Probe("garbage-10", "10 random bytes", _garbage(10)),
        Probe("garbage-200", "200 random bytes", _garbage(200)),
        Probe("tls-header", "a bare TLS record header, 16 03 01", b"\x16\x03\x01"),
        Probe("hello-100", "the first 100 bytes of a ClientHello", wrong[:100]),
    ]
    valid = stale = replayed = b""
    if secret is not None:
        key, domain = secret.key, secret.domain or sni
        valid = build_client_hello(key, domain, stamp, mlkem=True, consistent_grease=True)
        replayed = build_client_hello(key, domain, stamp, mlkem=True, consistent_grease=True)
        stale = build_client_hello(
            key, domain, stamp - STALE_BY, mlkem=True, consistent_grease=True
        )
    needs = secret is None
    probes += [
        Probe("tdlib-valid", "a Telegram app's valid ClientHello", valid, needs_secret=needs),
        Probe(
            "tdlib-replay",
            "a valid ClientHello sent again (a replay)",
            replayed,
            replay=True,
            needs_secret=needs,
        ),
        Probe(
            "tdlib-stale",
            "a valid ClientHello an hour old",
            stale,
            needs_secret=needs,
        ),
    ]
    return probes
