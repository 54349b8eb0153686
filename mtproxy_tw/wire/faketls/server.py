"""
The ServerHello flight the proxy answers a valid hello with.
"""

from __future__ import annotations

import hmac
import os
import random

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mtproxy_tw.wire.faketls.base import (
    _APP_DATA_PREFIX,
    _APPLICATION_DATA,
    _CCS_RECORD,
    _HANDSHAKE,
    _RANDOM,
    _ZERO_RANDOM,
    MAX_OUTGOING_PAYLOAD,
    MLKEM768_SERVER_SHARE,
    X25519,
    X25519MLKEM768,
    NeedMore,
    TLSError,
    _extension,
    _vector16,
)
from mtproxy_tw.wire.faketls.records import _record

# --- ServerHello flight --------------------------------------------------------------------


def fallback_app_data_len(rng: random.Random | None = None) -> int:
    """A plausible ApplicationData size (2500..3619) when the real site's is unknown.

    A certificate chain's worth of bytes, as the official proxy uses when its probe fails.
    """
    rng = rng or random.SystemRandom()
    return 2500 + rng.randrange(1120)


def build_server_hello(
    secret: bytes,
    client_random: bytes,
    session_id: bytes,
    *,
    cipher_suite: int = 0x1301,
    app_data_len: int | None = None,
    filler: bytes | None = None,
    public_key: bytes | None = None,
    key_share_first: bool = True,
    group: int = X25519,
) -> bytes:
    """Build the answer to a valid hello: ServerHello + ChangeCipherSpec + ApplicationData.

    The ApplicationData payload is ``filler`` if given, else ``app_data_len`` random bytes
    (default: random length 2500..3619). ``public_key`` defaults to a fresh X25519 key.
    With ``group`` :data:`X25519MLKEM768` the key share is the 1120 bytes a server sends
    for it (an ML-KEM-768 ciphertext's worth of random bytes, then the X25519 key), and the
    ServerHello record grows from 122 to 1210 bytes (with a 32-byte session id).
    Bytes 11..42 carry ``HMAC(secret, client_random ‖ flight with those bytes zeroed)``.
    """
    if filler is None:
        if app_data_len is None:
            app_data_len = fallback_app_data_len()
        filler = os.urandom(app_data_len)
    elif app_data_len is not None and app_data_len != len(filler):
        raise ValueError("app_data_len does not match the filler")
    if not 0 < len(filler) <= MAX_OUTGOING_PAYLOAD:
        raise ValueError(f"bad ApplicationData length {len(filler)}")
    if public_key is None:
        public_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    if group == X25519MLKEM768:
        share = os.urandom(MLKEM768_SERVER_SHARE - len(public_key)) + public_key
    elif group == X25519:
        share = public_key
    else:
        raise ValueError(f"no key share for group {group:#06x}")
    key_share = _extension(0x0033, group.to_bytes(2, "big") + _vector16(share))
    versions = _extension(0x002B, b"\x03\x04")
    extensions = key_share + versions if key_share_first else versions + key_share
    body = b"".join(
        (
            b"\x03\x03",
            _ZERO_RANDOM,
            bytes((len(session_id),)),
            session_id,
            cipher_suite.to_bytes(2, "big"),
            b"\x00",
            _vector16(extensions),
        )
    )
    flight = b"".join(
        (
            _record(_HANDSHAKE, b"\x02" + len(body).to_bytes(3, "big") + body),
            _CCS_RECORD,
            _record(_APPLICATION_DATA, filler),
        )
    )
    digest = hmac.digest(secret, client_random + flight, "sha256")
    return flight[:11] + digest + flight[43:]


def check_server_hello(data: bytes, secret: bytes, client_random: bytes) -> int | NeedMore:
    """Client side: validate the flight at the start of ``data`` and return its length.

    Checks the ``16 03 03`` / ``14 03 03 00 01 01`` / ``17 03 03`` structure and the server
    digest; raises :class:`TLSError` on mismatch, returns :class:`NeedMore` while incomplete.
    """
    if len(data) < 5:
        return NeedMore(5)
    if data[:3] != b"\x16\x03\x03":
        raise TLSError("flight does not start with a TLS 1.2 handshake record")
    hello_len = int.from_bytes(data[3:5], "big")
    if hello_len < 38:
        raise TLSError("ServerHello record too short")
    app_start = 5 + hello_len + len(_CCS_RECORD)
    if len(data) < app_start + 5:
        return NeedMore(app_start + 5)
    if data[app_start - len(_CCS_RECORD) : app_start + 3] != _CCS_RECORD + _APP_DATA_PREFIX:
        raise TLSError("ServerHello is not followed by ChangeCipherSpec and ApplicationData")
    end = app_start + 5 + int.from_bytes(data[app_start + 3 : app_start + 5], "big")
    if len(data) < end:
        return NeedMore(end)
    zeroed = data[:11] + _ZERO_RANDOM + data[43:end]
    expected = hmac.digest(secret, client_random + zeroed, "sha256")
    if not hmac.compare_digest(expected, data[_RANDOM]):
        raise TLSError("bad ServerHello digest")
    return end
