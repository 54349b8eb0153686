"""
What the fronted web site's TLS answer looks like, so ours can look the same.

The proxy sends the site ClientHellos of its own, of the two shapes Telegram
apps send (the classic one, and the current one offering an X25519MLKEM768
key share), and reads the answers: the cipher suite, extension order and
key-share group of the ServerHello, and the size of the encrypted records
that carry the site's certificate chain. Fake-TLS answers then take one of
the sizes seen for a hello of that shape, that extension order and that
group (PROTOCOL.md sections 4.6 and 4.8, section 13 item 5).

:func:`parse_server_answer` is pure; :mod:`mtproxy_tw.fronting.prober` is the
Twisted side that fetches it.
"""

from __future__ import annotations

import random as _random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from mtproxy_tw.wire.faketls import (
    X25519,
    X25519MLKEM768,
    NeedMore,
    TLSError,
    fallback_app_data_len,
)

__all__ = ["Observation", "TLSProfile", "fallback_size", "parse_server_answer"]

_KEY_SHARE = 0x0033
_SUPPORTED_VERSIONS = 0x002B
#: The ServerHello random that marks a HelloRetryRequest (RFC 8446, 4.1.3).
_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
MAX_ANSWER = 64 * 1024
#: The key-share groups a fake-TLS answer can carry.
ANSWERABLE_GROUPS = frozenset({X25519, X25519MLKEM768})


@dataclass(frozen=True, slots=True)
class Observation:
    """
    One answer of the site.
    """

    cipher_suite: int
    key_share_first: bool
    app_data_len: int
    group: int = X25519


@dataclass(frozen=True, slots=True)
class TLSProfile:
    """
    What several answers of one site to one shape of hello had in common.

    :ivar sizes: the first encrypted flight's sizes seen, one per answer
        (sorted, repeats kept: answers draw from them as the site's came).
    :ivar group: the key-share group the site chose.
    :ivar pq: the site's answers to a hello that offers X25519MLKEM768 (as
        current apps send), when measured; this profile is then the answer
        to the classic hello.
    """

    sizes: tuple[int, ...]
    cipher_suite: int
    key_share_first: bool
    group: int = X25519
    pq: TLSProfile | None = None

    @classmethod
    def from_observations(
        cls, seen: list[Observation], pq: list[Observation] | None = None
    ) -> TLSProfile:
        """
        The profile of ``seen`` (the classic hello's answers) and of ``pq``
        (the answers to the hello offering X25519MLKEM768), either of which
        may be empty but not both.
        """
        classic = _summary(seen) if seen else None
        post_quantum = _summary(pq) if pq else None
        base = classic or post_quantum
        if base is None:
            raise ValueError("no observation")
        if classic is None:
            # Only the current hello was answered: the classic one gets the
            # same sizes, with the group it can have.
            base = replace(base, group=X25519)
        return replace(base, pq=post_quantum)

    def answer(self, key_share_groups: Iterable[int]) -> TLSProfile:
        """
        What to answer a hello whose key shares are ``key_share_groups``:
        the measured answer to a hello of its shape, its group kept only
        when the client offered it (else x25519).
        """
        offered = frozenset(key_share_groups)
        chosen = self.pq if self.pq is not None and X25519MLKEM768 in offered else self
        if chosen.group in offered and chosen.group in ANSWERABLE_GROUPS:
            return replace(chosen, pq=None)
        return replace(chosen, group=X25519, pq=None)

    def pick_size(self, rng: _random.Random | None = None) -> int:
        """
        A size for one answer: one of those seen, as often as it was seen.

        A site's first flight varies as its certificate chain, its
        signatures and its tickets do, and by no more: a fixed jitter would
        show sizes the site never sends.
        """
        rng = rng or _random.SystemRandom()
        return max(1, min(16384, rng.choice(self.sizes)))

    def to_json(self) -> dict[str, Any]:
        """
        The profile as JSON-ready data (:meth:`from_json` reads it back).
        """
        data: dict[str, Any] = {
            "sizes": list(self.sizes),
            "cipher_suite": self.cipher_suite,
            "key_share_first": self.key_share_first,
            "group": self.group,
        }
        if self.pq is not None:
            data["pq"] = self.pq.to_json()
        return data

    @classmethod
    def from_json(cls, data: object, nested: bool = False) -> TLSProfile:
        """
        Read :meth:`to_json`'s data back; :class:`ValueError` if it is not.
        """
        if not isinstance(data, Mapping):
            raise ValueError("a profile is not an object")
        sizes = data.get("sizes")
        if (
            not isinstance(sizes, list)
            or not sizes
            or len(sizes) > 256
            or not all(_is_int(s) and 1 <= s <= 16384 for s in sizes)
        ):
            raise ValueError("bad sizes")
        cipher, first, group = (data.get(k) for k in ("cipher_suite", "key_share_first", "group"))
        if not _is_int(cipher) or not 0 <= cipher <= 0xFFFF:
            raise ValueError("bad cipher_suite")
        if not isinstance(first, bool):
            raise ValueError("bad key_share_first")
        if not _is_int(group) or not 0 <= group <= 0xFFFF:
            raise ValueError("bad group")
        pq = data.get("pq")
        if pq is not None and nested:
            raise ValueError("nested pq profile")
        return cls(
            tuple(sorted(sizes)),
            cipher,
            first,
            group,
            None if pq is None else cls.from_json(pq, nested=True),
        )

    def describe(self) -> str:
        """
        One line for the log: sizes, cipher, group, for each hello shape.
        """
        text = f"first flight {list(self.sizes)} bytes, cipher {self.cipher_suite:04x}"
        if self.pq is not None:
            pq = self.pq
            text += (
                f"; to an X25519MLKEM768 hello {list(pq.sizes)} bytes, "
                f"cipher {pq.cipher_suite:04x}, group {pq.group:04x}"
            )
        return text


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _summary(seen: list[Observation]) -> TLSProfile:
    last = seen[-1]
    return TLSProfile(
        tuple(sorted(o.app_data_len for o in seen)),
        last.cipher_suite,
        last.key_share_first,
        last.group,
    )


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

    :raises TLSError: on anything else (an alert, TLS 1.2, a
        HelloRetryRequest, garbage).
    """
    hello = _read_record(data, 0)
    if isinstance(hello, NeedMore):
        return hello
    kind, body = hello
    if kind != 0x16:
        raise TLSError(f"the answer starts with a record of type {kind}, not a handshake")
    cipher, order, group = _parse_server_hello(body)
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
    return Observation(cipher, first, min(wire - 5, 16384), group)


def _parse_server_hello(hello: bytes) -> tuple[int, list[int], int]:
    group = X25519
    try:
        if hello[0] != 0x02:
            raise TLSError("not a ServerHello")
        if hello[6:38] == _RETRY_RANDOM:
            raise TLSError("the server asked for another key share (HelloRetryRequest)")
        pos = 4 + 2 + 32
        pos += 1 + hello[pos]
        cipher = int.from_bytes(hello[pos : pos + 2], "big")
        pos += 3
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        order = []
        while pos + 4 <= end:
            ext_type = int.from_bytes(hello[pos : pos + 2], "big")
            size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
            if ext_type == _KEY_SHARE:
                if size < 2 or pos + 6 > end:
                    raise TLSError("malformed key_share")
                group = int.from_bytes(hello[pos + 4 : pos + 6], "big")
            order.append(ext_type)
            pos += 4 + size
    except IndexError:
        raise TLSError("truncated ServerHello") from None
    if pos != end or end > len(hello):
        raise TLSError("malformed ServerHello extensions")
    return cipher, order, group
