"""
The claims channel between a worker and its parent (``--workers``), as
bytes: the calls every connection makes (a replay check, its claims, their
release), framed so that a handful of them cost one read and one write.

A request is ``op`` (one byte), the payload's length (three bytes, big
endian) and the payload; :data:`SEEN` and :data:`ACQUIRE` are answered, in
the order asked, with the answer's length (two bytes) and the answer;
:data:`RELEASE` is not answered. Claims travel as lines of tab-separated
fields. No Twisted here: :mod:`mtproxy_tw.shared.channel` wires it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ACQUIRE",
    "RELEASE",
    "SEEN",
    "ChannelError",
    "FrameReader",
    "answer",
    "decode_claims",
    "encode_claims",
    "request",
]

SEEN = b"S"
ACQUIRE = b"A"
RELEASE = b"R"
OPS = frozenset({SEEN, ACQUIRE, RELEASE})
#: The largest request payload (a holder and a few claims are far less).
MAX_PAYLOAD = 1 << 16

#: A claim as it travels: name, counter, limit, member, fleet.
ClaimFields = tuple[str, str, int | None, str | None, bool]


class ChannelError(ValueError):
    """
    Bytes no peer of ours would send; the channel is closed.
    """


def request(op: bytes, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ChannelError("request too large")
    return op + len(payload).to_bytes(3, "big") + payload


def answer(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


class FrameReader:
    """
    Requests (``requests=True``: ``(op, payload)``) or answers (``(b"",
    payload)``) out of a byte stream, however it is cut.
    """

    __slots__ = ("_buffer", "_header", "_requests")

    def __init__(self, requests: bool) -> None:
        self._requests = requests
        self._header = 4 if requests else 2
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        header = self._header
        start = 0
        end = len(buffer)
        while end - start >= header:
            if self._requests:
                op = bytes(buffer[start : start + 1])
                if op not in OPS:
                    raise ChannelError(f"unknown request {op!r}")
                size = int.from_bytes(buffer[start + 1 : start + 4], "big")
                if size > MAX_PAYLOAD:
                    raise ChannelError("request too large")
            else:
                op = b""
                size = int.from_bytes(buffer[start : start + 2], "big")
            if end - start < header + size:
                break
            frames.append((op, bytes(buffer[start + header : start + header + size])))
            start += header + size
        if start:
            del buffer[:start]
        return frames


def _field(text: str) -> str:
    if "\t" in text or "\n" in text:
        raise ChannelError("a claim field holds a tab or a newline")
    return text


def encode_claims(holder: str, claims: Sequence[ClaimFields]) -> bytes:
    lines = [_field(holder)]
    for name, counter, limit, member, fleet in claims:
        lines.append(
            "\t".join(
                (
                    _field(name),
                    _field(counter),
                    "" if limit is None else str(int(limit)),
                    "" if member is None else "=" + _field(member),
                    "1" if fleet else "0",
                )
            )
        )
    return "\n".join(lines).encode("utf-8")


def decode_claims(payload: bytes) -> tuple[str, list[ClaimFields]]:
    try:
        holder, *lines = payload.decode("utf-8").split("\n")
        claims: list[ClaimFields] = []
        for line in lines:
            name, counter, limit, member, fleet = line.split("\t")
            claims.append(
                (
                    name,
                    counter,
                    int(limit) if limit else None,
                    member[1:] if member.startswith("=") else None,
                    fleet == "1",
                )
            )
    except (UnicodeDecodeError, ValueError) as e:
        raise ChannelError(f"bad claims: {e}") from None
    return holder, claims
