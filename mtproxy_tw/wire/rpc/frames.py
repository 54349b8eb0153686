"""
Framing of one connection: length, sequence number, CRC32, padding, and the
AES-256-CBC stream once the keys are set.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import TypeAlias

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from mtproxy_tw.wire.rpc.base import MAX_FRAME_LEN, PADDING_WORD, RPCError

__all__ = ["FrameDecoder", "FrameEncoder"]

_u32 = struct.Struct("<I")
_i32 = struct.Struct("<i")
_frame_header = struct.Struct("<Ii")


def _aes_cbc(key: bytes, iv: bytes) -> Cipher[modes.CBC]:
    if len(key) != 32 or len(iv) != 16:
        raise ValueError("AES-256-CBC needs a 32-byte key and a 16-byte IV")
    return Cipher(algorithms.AES(key), modes.CBC(iv))


#: A payload given as the pieces it is the concatenation of.
Pieces: TypeAlias = "Sequence[bytes | memoryview]"


class FrameEncoder:
    """
    Sending side of one connection: numbers, checksums, pads and encrypts frames.

    Frames are plaintext until :meth:`set_key`; afterwards each call's output
    is padded with :data:`PADDING_WORD` to a multiple of 16 and encrypted as
    one continuous CBC stream.
    """

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self.max_frame_len = max_frame_len
        #: Sequence number of the next frame.
        self.seq = -2
        self._encryptor: CipherContext | None = None

    @property
    def encrypted(self) -> bool:
        return self._encryptor is not None

    def set_key(self, key: bytes, iv: bytes) -> None:
        if self._encryptor is not None:
            raise ValueError("keys already set")
        self._encryptor = _aes_cbc(key, iv).encryptor()

    def encode(self, *payloads: bytes) -> bytes:
        """
        Frame the payloads (each a non-empty multiple of 4 bytes) into one write.
        """
        return self.encode_pieces([(payload,) for payload in payloads])

    def encode_pieces(self, payloads: Sequence[Pieces]) -> bytes:
        """
        :meth:`encode` for payloads given in pieces: each byte is copied
        once, into the frames, and once more by the encryption.
        """
        sizes = [sum(map(len, pieces)) for pieces in payloads]
        for size in sizes:
            if not size or size % 4 or size + 12 > self.max_frame_len:
                raise ValueError(f"bad payload length {size}")
        parts: list[bytes | memoryview] = []
        seq, length, crc32 = self.seq, 0, zlib.crc32
        for pieces, size in zip(payloads, sizes, strict=True):
            header = _frame_header.pack(size + 12, seq)
            crc = crc32(header)
            for piece in pieces:
                crc = crc32(piece, crc)
            parts.append(header)
            parts += pieces
            parts.append(_u32.pack(crc))
            seq += 1
            length += size + 12
        self.seq = seq
        if self._encryptor is None:
            return b"".join(parts)
        parts.append(PADDING_WORD * ((-length % 16) // 4))
        return self._encryptor.update(b"".join(parts))


class FrameDecoder:
    """
    Receiving side of one connection: takes chunks of any size, yields payloads.

    Checks length bounds, CRC32 and the expected sequence number (starting at
    -2) and skips padding words. Call :meth:`set_key` right after reading the
    plaintext nonce frame; bytes received later are decrypted as one CBC stream.

    Each chunk is decrypted once, into a buffer reused from chunk to chunk;
    the frames that lie whole in it are read in place (:meth:`views`), and
    only a frame cut by the chunk's end is copied, into a buffer completed
    by the next chunks.
    """

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN, max_buffer: int | None = None) -> None:
        self.max_frame_len = max_frame_len
        self.max_buffer = max_frame_len + (1 << 20) if max_buffer is None else max_buffer
        #: Sequence number expected in the next frame.
        self.seq = -2
        self._decryptor: CipherContext | None = None
        self._chunk: bytes | memoryview = b""  # plaintext of the last chunk, from _pos
        self._plain = bytearray()  # where chunks are decrypted, reused
        self._pos = 0
        self._cut = bytearray()  # the start of a frame the chunks so far cut off
        self._partial = 0  # ciphertext bytes short of a whole block (in the decryptor)

    @property
    def encrypted(self) -> bool:
        return self._decryptor is not None

    @property
    def buffered(self) -> int:
        """
        Bytes received but not yet returned as frames.
        """
        return len(self._cut) + len(self._chunk) - self._pos + self._partial

    def set_key(self, key: bytes, iv: bytes) -> None:
        """
        Decrypt everything from now on; only padding words may still be buffered.
        """
        if self._decryptor is not None:
            raise ValueError("keys already set")
        rest = bytes(self._cut) + self._chunk[self._pos :]
        if rest != PADDING_WORD * (len(rest) // 4):
            raise RPCError("unexpected plaintext before encryption")
        self._cut.clear()
        self._chunk, self._pos = b"", 0
        self._decryptor = _aes_cbc(key, iv).decryptor()

    def feed(self, data: bytes) -> None:
        """
        Buffer (and decrypt) a received chunk; read frames with :meth:`frames`.
        """
        if self.buffered + len(data) > self.max_buffer:
            raise RPCError("receive buffer overflow")
        if self._pos < len(self._chunk):
            # Frames left unread: keep them ahead of the new chunk.
            self._cut += memoryview(self._chunk)[self._pos :]
        if self._decryptor is None:
            self._chunk, self._pos = data, 0
            return
        # The context keeps a partial block until the rest arrives.
        self._partial = (self._partial + len(data)) % 16
        plain = self._plain
        if len(plain) < len(data) + 15:
            # A new buffer (views of the old one stay valid): the largest read so far.
            plain = self._plain = bytearray(len(data) + 15)
        size = self._decryptor.update_into(data, plain)
        self._chunk, self._pos = memoryview(plain)[:size], 0

    def next_frame(self) -> bytes | None:
        """
        The next complete payload, or None until more data arrives.
        """
        payload = self.next_view()
        return payload if payload is None or isinstance(payload, bytes) else bytes(payload)

    def next_view(self) -> bytes | memoryview | None:
        """
        :meth:`next_frame`, but a frame that lies whole in the last chunk
        comes as a view of it, valid until the next :meth:`feed`.
        """
        if self._cut:
            payload = self._complete_cut()
            if payload is not None or self._cut:
                return payload
        chunk, pos = self._chunk, self._pos
        end = len(chunk)
        while end - pos >= 4:
            (total,) = _u32.unpack_from(chunk, pos)
            if total == 4:
                pos += 4
                continue
            self._check_length(total)
            if end - pos < total:
                break
            view = memoryview(chunk)[pos : pos + total]
            self._pos = pos + total
            return self._payload(view, total)
        # Less than a frame left: it waits in the buffer for the next chunk.
        self._cut += memoryview(chunk)[pos:]
        self._chunk, self._pos = b"", 0
        return None

    def _complete_cut(self) -> bytes | None:
        """
        Complete the frame at the start of the buffer from the last chunk:
        its payload, or None (and the buffer empty) when only padding was there.
        """
        cut = self._cut
        while cut:
            if len(cut) < 4:
                self._take(4 - len(cut))
                if len(cut) < 4:
                    return None
            (total,) = _u32.unpack_from(cut)
            if total == 4:
                del cut[:4]
                continue
            self._check_length(total)
            if len(cut) < total:
                self._take(total - len(cut))
                if len(cut) < total:
                    return None
            with memoryview(cut) as view:  # released before the buffer is resized
                payload = bytes(self._payload(view, total))
            del cut[:total]
            return payload
        return None

    def _take(self, count: int) -> None:
        """
        Move up to ``count`` bytes from the last chunk to the buffer.
        """
        pos = self._pos
        taken = memoryview(self._chunk)[pos : pos + count]
        self._cut += taken
        self._pos = pos + len(taken)

    def _check_length(self, total: int) -> None:
        if total < 16 or total % 4 or total > self.max_frame_len:
            raise RPCError(f"bad frame length {total}")

    def _payload(self, frame: memoryview, total: int) -> memoryview:
        """
        Check one whole frame's CRC and sequence number; its payload.
        """
        (crc,) = _u32.unpack_from(frame, total - 4)
        if zlib.crc32(frame[: total - 4]) != crc:
            raise RPCError("frame CRC mismatch")
        (seq,) = _i32.unpack_from(frame, 4)
        if seq != self.seq:
            raise RPCError(f"frame seq {seq}, expected {self.seq}")
        self.seq += 1
        return frame[8 : total - 4]

    def frames(self) -> Iterator[bytes]:
        """
        Iterate over the complete payloads buffered now (lazily, so keys may be set between).
        """
        while (payload := self.next_frame()) is not None:
            yield payload

    def views(self) -> Iterator[bytes | memoryview]:
        """
        :meth:`frames` as :meth:`next_view` returns them.
        """
        while (payload := self.next_view()) is not None:
            yield payload
