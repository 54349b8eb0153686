"""
Framing of one connection: length, sequence number, CRC32, padding, and the
AES-256-CBC stream once the keys are set.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

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
        for payload in payloads:
            if not payload or len(payload) % 4 or len(payload) + 12 > self.max_frame_len:
                raise ValueError(f"bad payload length {len(payload)}")
        parts: list[bytes] = []
        for payload in payloads:
            header = _frame_header.pack(len(payload) + 12, self.seq)
            crc = zlib.crc32(payload, zlib.crc32(header))
            parts += (header, payload, _u32.pack(crc))
            self.seq += 1
        data = b"".join(parts)
        if self._encryptor is None:
            return data
        data += PADDING_WORD * ((-len(data) % 16) // 4)
        return self._encryptor.update(data)


class FrameDecoder:
    """
    Receiving side of one connection: takes chunks of any size, yields payloads.

    Checks length bounds, CRC32 and the expected sequence number (starting at
    -2) and skips padding words. Call :meth:`set_key` right after reading the
    plaintext nonce frame; bytes received later are decrypted as one CBC stream.
    """

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN, max_buffer: int | None = None) -> None:
        self.max_frame_len = max_frame_len
        self.max_buffer = max_frame_len + (1 << 20) if max_buffer is None else max_buffer
        #: Sequence number expected in the next frame.
        self.seq = -2
        self._decryptor: CipherContext | None = None
        self._buf = bytearray()  # plaintext; frames start at _pos
        self._pos = 0
        self._raw = b""  # ciphertext short of a whole block

    @property
    def encrypted(self) -> bool:
        return self._decryptor is not None

    @property
    def buffered(self) -> int:
        """
        Bytes received but not yet returned as frames.
        """
        return len(self._buf) - self._pos + len(self._raw)

    def set_key(self, key: bytes, iv: bytes) -> None:
        """
        Decrypt everything from now on; only padding words may still be buffered.
        """
        if self._decryptor is not None:
            raise ValueError("keys already set")
        rest = self._buf[self._pos :]
        if rest != PADDING_WORD * (len(rest) // 4):
            raise RPCError("unexpected plaintext before encryption")
        self._buf.clear()
        self._pos = 0
        self._decryptor = _aes_cbc(key, iv).decryptor()

    def feed(self, data: bytes) -> None:
        """
        Buffer (and decrypt) a received chunk; read frames with :meth:`frames`.
        """
        if self.buffered + len(data) > self.max_buffer:
            raise RPCError("receive buffer overflow")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if self._decryptor is None:
            self._buf += data
            return
        raw = self._raw + data if self._raw else data
        whole = len(raw) - len(raw) % 16
        if whole:
            self._buf += self._decryptor.update(memoryview(raw)[:whole])
        self._raw = raw[whole:]

    def next_frame(self) -> bytes | None:
        """
        The next complete payload, or None until more data arrives.
        """
        buf, pos = self._buf, self._pos
        try:
            while len(buf) - pos >= 4:
                (total,) = _u32.unpack_from(buf, pos)
                if total == 4:
                    pos += 4
                    continue
                if total < 16 or total % 4 or total > self.max_frame_len:
                    raise RPCError(f"bad frame length {total}")
                if len(buf) - pos < total:
                    return None
                (crc,) = _u32.unpack_from(buf, pos + total - 4)
                # One copy of the payload; the CRC reads the buffer in place.
                # (The views are gone before the buffer is resized below.)
                with memoryview(buf) as view:
                    if zlib.crc32(view[pos : pos + total - 4]) != crc:
                        raise RPCError("frame CRC mismatch")
                    payload = bytes(view[pos + 8 : pos + total - 4])
                (seq,) = _i32.unpack_from(buf, pos + 4)
                if seq != self.seq:
                    raise RPCError(f"frame seq {seq}, expected {self.seq}")
                self.seq += 1
                pos += total
                return payload
            return None
        finally:
            if pos == len(buf):
                buf.clear()
                pos = 0
            self._pos = pos

    def frames(self) -> Iterator[bytes]:
        """
        Iterate over the complete payloads buffered now (lazily, so keys may be set between).
        """
        while (payload := self.next_frame()) is not None:
            yield payload
