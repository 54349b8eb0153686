"""
What the fronted web site's TLS answer looks like, so ours can look the same.

The proxy sends the site a ClientHello of its own (the shape Telegram apps
send) and reads the answer: the cipher suite and extension order of the
ServerHello, and the size of the first encrypted record, which carries the
site's certificate chain. Fake-TLS answers then use that size, with the
small jitter a real site shows, and that extension order (PROTOCOL.md
sections 4.6 and 4.8, section 13 item 5).

:func:`parse_server_answer` is pure; :mod:`mtproxy_tw.fronting.prober` is the
Twisted side that fetches it.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass

from mtproxy_tw.wire.faketls import NeedMore, TLSError, fallback_app_data_len

__all__ = ["Observation", "TLSProfile", "fallback_size", "parse_server_answer"]

_KEY_SHARE = 0x0033
_SUPPORTED_VERSIONS = 0x002B
MAX_ANSWER = 64 * 1024


@dataclass(frozen=True, slots=True)
class Observation:
    """
    One answer of the site.
    """

    cipher_suite: int
    key_share_first: bool
    app_data_len: int


@dataclass(frozen=True, slots=True)
class TLSProfile:
    """
    What several answers of one site had in common.

    :ivar sizes: the first encrypted record's sizes seen.
    """

    sizes: tuple[int, ...]
    cipher_suite: int
    key_share_first: bool

    @classmethod
    def from_observations(cls, seen: list[Observation]) -> TLSProfile:
        last = seen[-1]
        return cls(
            tuple(sorted(o.app_data_len for o in seen)), last.cipher_suite, last.key_share_first
        )

    def pick_size(self, rng: _random.Random | None = None) -> int:
        """
        A size for one answer: one seen, moved by at most one byte.
        """
        rng = rng or _random.SystemRandom()
        return max(1, min(16384, rng.choice(self.sizes) + rng.randint(-1, 1)))


#: The size used when a site has no profile (the codec's own fallback).
fallback_size = fallback_app_data_len


def _read_record(data: bytes, pos: int) -> tuple[int, bytes] | NeedMore:
    if len(data) < pos + 5:
        return NeedMore(pos + 5)
    length = int.from_bytes(data[pos + 3 : pos + 5], "big")
    if data[pos + 1] != 3 or length > 16384 + 256:
        raise TLSError("not a TLS record")
    if len(data) < pos + 5 + length:
        return NeedMore(pos + 5 + length)
    return data[pos], data[pos + 5 : pos + 5 + length]


def parse_server_answer(data: bytes) -> Observation | NeedMore:
    """
    Read a TLS 1.3 answer from the start of ``data``: ServerHello,
    ChangeCipherSpec, then the encrypted records that follow.

    The observed size is what one ApplicationData record would need to take
    the same room on the wire as all the encrypted records read so far (a
    site may send its flight as several records; a fake-TLS answer is one).
    Each record is checked as soon as it is complete.

    :raises TLSError: on anything else (an alert, TLS 1.2, garbage).
    """
    hello = _read_record(data, 0)
    if isinstance(hello, NeedMore):
        return hello
    kind, body = hello
    if kind != 0x16:
        raise TLSError(f"the answer starts with a record of type {kind}, not a handshake")
    cipher, order = _parse_server_hello(body)
    if _SUPPORTED_VERSIONS not in order or _KEY_SHARE not in order:
        raise TLSError("the server did not answer with TLS 1.3")
    first = order.index(_KEY_SHARE) < order.index(_SUPPORTED_VERSIONS)
    pos = 5 + len(body)
    ccs = _read_record(data, pos)
    if isinstance(ccs, NeedMore):
        return ccs
    if ccs != (0x14, b"\x01"):
        raise TLSError("the ServerHello is not followed by ChangeCipherSpec")
    pos += 6
    wire = 0
    while True:
        record = _read_record(data, pos)
        if isinstance(record, NeedMore):
            if wire:
                break
            return record
        kind, body = record
        if kind != 0x17:
            if wire:
                break
            raise TLSError("no ApplicationData record after ChangeCipherSpec")
        wire += 5 + len(body)
        pos += 5 + len(body)
    return Observation(cipher, first, min(wire - 5, 16384))


def _parse_server_hello(hello: bytes) -> tuple[int, list[int]]:
    try:
        if hello[0] != 0x02:
            raise TLSError("not a ServerHello")
        pos = 4 + 2 + 32
        pos += 1 + hello[pos]
        cipher = int.from_bytes(hello[pos : pos + 2], "big")
        pos += 3
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        order = []
        while pos + 4 <= end:
            order.append(int.from_bytes(hello[pos : pos + 2], "big"))
            pos += 4 + int.from_bytes(hello[pos + 2 : pos + 4], "big")
    except IndexError:
        raise TLSError("truncated ServerHello") from None
    if pos != end or end > len(hello):
        raise TLSError("malformed ServerHello extensions")
    return cipher, order
