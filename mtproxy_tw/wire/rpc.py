"""
The TCP RPC protocol spoken with Telegram's middle proxies (PROTOCOL.md section 8).

Pure codec, no I/O: the caller feeds received bytes to a :class:`FrameDecoder`
and writes what a :class:`FrameEncoder` returns. Payload builders and parsers
cover the handshake (RPC_NONCE, RPC_HANDSHAKE) and the data messages of both
ends, so a fake middle proxy for tests can be built from the same pieces.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import md5, sha1
from typing import TypeAlias

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = [
    "FLAG_ABRIDGED",
    "FLAG_DROPPED",
    "FLAG_EXTMODE2",
    "FLAG_HAS_AD_TAG",
    "FLAG_INTERMEDIATE",
    "FLAG_MAGIC",
    "FLAG_NOT_ENCRYPTED",
    "FLAG_PAD",
    "FLAG_QUICKACK",
    "HANDSHAKE_ERRORS",
    "HANDSHAKE_FLAG_CRC32C",
    "MAX_CLOCK_SKEW",
    "MAX_FRAME_LEN",
    "PADDING_WORD",
    "RPC_CLOSE_CONN",
    "RPC_CLOSE_EXT",
    "RPC_HANDSHAKE",
    "RPC_HANDSHAKE_ERROR",
    "RPC_NONCE",
    "RPC_PING",
    "RPC_PONG",
    "RPC_PROXY_ANS",
    "RPC_PROXY_REQ",
    "RPC_SIMPLE_ACK",
    "TL_PROXY_TAG",
    "Address",
    "CloseConn",
    "CloseExt",
    "FrameDecoder",
    "FrameEncoder",
    "Handshake",
    "HandshakeRejected",
    "KeyIV",
    "Message",
    "Nonce",
    "Ping",
    "Pong",
    "ProcessId",
    "ProxyAns",
    "ProxyReq",
    "RPCError",
    "SessionKeys",
    "SimpleAck",
    "UnknownMessage",
    "answer_handshake",
    "build_close_conn",
    "build_close_ext",
    "build_handshake",
    "build_handshake_error",
    "build_nonce",
    "build_ping",
    "build_pong",
    "build_proxy_ans",
    "build_proxy_req",
    "build_simple_ack",
    "derive_keys",
    "kdf_input",
    "parse_handshake",
    "parse_message",
    "parse_nonce",
    "parse_proxy_req",
    "proxy_req_flags",
]

# Message types (u32le on the wire).
RPC_NONCE = 0x7ACB87AA
RPC_HANDSHAKE = 0x7682EEF5
RPC_HANDSHAKE_ERROR = 0x6A27BEDA
RPC_PROXY_REQ = 0x36CEF1EE
RPC_PROXY_ANS = 0x4403DA0D
RPC_CLOSE_EXT = 0x5EB634A2
RPC_CLOSE_CONN = 0x1FCF425D
RPC_SIMPLE_ACK = 0x3BAC409B
RPC_PING = 0x5730A2DF
RPC_PONG = 0x8430EAA7
#: TL constructor that introduces the ad tag in RPC_PROXY_REQ's extra section.
TL_PROXY_TAG = 0xDB1E26AE

# RPC_PROXY_REQ flags.
FLAG_NOT_ENCRYPTED = 0x2
FLAG_HAS_AD_TAG = 0x8
FLAG_MAGIC = 0x1000
FLAG_EXTMODE2 = 0x20000
FLAG_PAD = 0x8000000
FLAG_DROPPED = 0x10000000
FLAG_INTERMEDIATE = 0x20000000
FLAG_ABRIDGED = 0x40000000
FLAG_QUICKACK = 0x80000000
_FLAGS_EXTRA = 0x0C

#: RPC_HANDSHAKE flag asking for CRC32C frames (not supported here).
HANDSHAKE_FLAG_CRC32C = 0x800
#: Error codes carried by RPC_HANDSHAKE_ERROR.
HANDSHAKE_ERRORS = {
    -3: "bad length",
    -4: "peer pid mismatch",
    -6: "sender pid mismatch",
    -7: "unsupported flags",
    -8: "CRC32C not supported",
}

CRYPTO_SCHEMA_AES = 1
#: Largest accepted ``|their crypto_ts - now|`` in an RPC_NONCE.
MAX_CLOCK_SKEW = 30
#: Largest accepted frame (``total_len``), as [PY] and [ERL].
MAX_FRAME_LEN = 1 << 24
#: A 4-byte no-op frame used to pad writes to the cipher block size.
PADDING_WORD = b"\x04\x00\x00\x00"

_TAG_ABRIDGED = b"\xef" * 4
_TAG_INTERMEDIATE = b"\xee" * 4
_TAG_PADDED = b"\xdd" * 4

_PURPOSE_CLIENT = b"CLIENT"
_PURPOSE_SERVER = b"SERVER"

_u16 = struct.Struct("<H")
_u32 = struct.Struct("<I")
_i32 = struct.Struct("<i")
_u64 = struct.Struct("<Q")
_frame_header = struct.Struct("<Ii")
_nonce = struct.Struct("<I4sII16s")
_process_id = struct.Struct("<IHHI")
_handshake = struct.Struct("<II12s12s")
_handshake_error = struct.Struct("<Ii12s")
_proxy_req = struct.Struct("<IIQ16sI16sI")
_proxy_ans = struct.Struct("<IIQ")
_conn_msg = struct.Struct("<IQ")  # CLOSE_EXT, CLOSE_CONN, PING, PONG
_simple_ack = struct.Struct("<IQ4s")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
#: An ``(ip, port)`` pair; the ip may be a string or an :mod:`ipaddress` object.
Address: TypeAlias = tuple[str | IPAddress, int]


class RPCError(Exception):
    """
    The peer broke the RPC protocol; the connection must be closed.
    """


class HandshakeRejected(RPCError):
    """
    The middle proxy answered RPC_HANDSHAKE_ERROR.
    """

    def __init__(self, code: int) -> None:
        super().__init__(f"handshake rejected: {code} ({HANDSHAKE_ERRORS.get(code, 'unknown')})")
        self.code = code


# -- helpers ---------------------------------------------------------------------------------


def _ip(value: str | IPAddress) -> IPAddress:
    ip = ipaddress.ip_address(value) if isinstance(value, str) else value
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _check_u64(value: int, name: str) -> None:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} out of range: {value}")


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad port: {port}")


def _type_of(payload: bytes) -> int:
    if len(payload) < 4:
        raise RPCError(f"message too short ({len(payload)} bytes)")
    return int(_u32.unpack_from(payload)[0])


def _expect(payload: bytes, msg_type: int, size: int, name: str, exact: bool = False) -> None:
    got = _type_of(payload)
    if got != msg_type:
        raise RPCError(f"expected {name}, got type {got:#010x}")
    if len(payload) < size or (exact and len(payload) != size):
        raise RPCError(f"bad {name} length {len(payload)}")


def _aes_cbc(key: bytes, iv: bytes) -> Cipher[modes.CBC]:
    if len(key) != 32 or len(iv) != 16:
        raise ValueError("AES-256-CBC needs a 32-byte key and a 16-byte IV")
    return Cipher(algorithms.AES(key), modes.CBC(iv))


# -- key derivation --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyIV:
    key: bytes
    iv: bytes


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """
    The AES-256-CBC material of one end: what it encrypts and decrypts with.
    """

    encrypt: KeyIV
    decrypt: KeyIV


def kdf_input(
    purpose: bytes,
    *,
    secret: bytes,
    nonce_srv: bytes,
    nonce_clt: bytes,
    client_ts: int,
    client_addr: Address,
    server_addr: Address,
) -> bytes:
    """
    The string hashed into a key and IV (section 8.7); purpose is b"CLIENT" or b"SERVER".

    client_addr is the proxy's address as the middle proxy sees it (public IP,
    local port); both addresses must be of the same IP version.
    """
    if purpose not in (_PURPOSE_CLIENT, _PURPOSE_SERVER):
        raise ValueError(f"bad purpose {purpose!r}")
    if len(nonce_srv) != 16 or len(nonce_clt) != 16:
        raise ValueError("nonces must be 16 bytes")
    client_ip, server_ip = _ip(client_addr[0]), _ip(server_addr[0])
    _check_port(client_addr[1])
    _check_port(server_addr[1])
    if isinstance(client_ip, ipaddress.IPv4Address) and isinstance(
        server_ip, ipaddress.IPv4Address
    ):
        client_v4, server_v4, v6 = _u32.pack(int(client_ip)), _u32.pack(int(server_ip)), b""
    elif isinstance(client_ip, ipaddress.IPv6Address) and isinstance(
        server_ip, ipaddress.IPv6Address
    ):
        client_v4 = server_v4 = bytes(4)
        v6 = client_ip.packed + server_ip.packed
    else:
        raise ValueError("mixed IPv4/IPv6 endpoints")
    return b"".join(
        (
            nonce_srv,
            nonce_clt,
            _u32.pack(client_ts),
            server_v4,
            _u16.pack(client_addr[1]),
            purpose,
            client_v4,
            _u16.pack(server_addr[1]),
            secret,
            nonce_srv,
            v6,
            nonce_clt,
        )
    )


def derive_keys(
    *,
    secret: bytes,
    nonce_srv: bytes,
    nonce_clt: bytes,
    client_ts: int,
    client_addr: Address,
    server_addr: Address,
    server_side: bool = False,
) -> SessionKeys:
    """
    Session keys after the nonce exchange.

    The proxy (RPC client) encrypts with the "CLIENT" key and decrypts with
    the "SERVER" one; ``server_side=True`` gives the middle proxy's view.
    """

    def key_iv(purpose: bytes) -> KeyIV:
        data = kdf_input(
            purpose,
            secret=secret,
            nonce_srv=nonce_srv,
            nonce_clt=nonce_clt,
            client_ts=client_ts,
            client_addr=client_addr,
            server_addr=server_addr,
        )
        return KeyIV(md5(data[1:]).digest()[:12] + sha1(data).digest(), md5(data[2:]).digest())

    client, server = key_iv(_PURPOSE_CLIENT), key_iv(_PURPOSE_SERVER)
    return SessionKeys(server, client) if server_side else SessionKeys(client, server)


# -- framing ---------------------------------------------------------------------------------


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


# -- handshake -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nonce:
    key_select: bytes
    schema: int
    crypto_ts: int
    nonce: bytes


def build_nonce(secret: bytes, crypto_ts: int, nonce: bytes) -> bytes:
    """
    RPC_NONCE payload: key_select (the secret's first 4 bytes), schema AES, time, nonce.
    """
    if len(secret) < 4 or len(nonce) != 16:
        raise ValueError("need a secret of >= 4 bytes and a 16-byte nonce")
    return _nonce.pack(RPC_NONCE, secret[:4], CRYPTO_SCHEMA_AES, crypto_ts, nonce)


def parse_nonce(
    payload: bytes, secret: bytes, *, now: int | None = None, max_skew: int = MAX_CLOCK_SKEW
) -> Nonce:
    """
    Validate the peer's RPC_NONCE; with ``now``, also its clock against ours.
    """
    _expect(payload, RPC_NONCE, _nonce.size, "RPC_NONCE", exact=True)
    _, key_select, schema, crypto_ts, nonce = _nonce.unpack(payload)
    if key_select != secret[:4]:
        raise RPCError(f"RPC_NONCE key_select {key_select.hex()} does not match the secret")
    if schema != CRYPTO_SCHEMA_AES:
        raise RPCError(f"unsupported crypto schema {schema}")
    if now is not None and abs(crypto_ts - now) > max_skew:
        raise RPCError(f"clock skew of {crypto_ts - now} s")
    return Nonce(key_select, schema, crypto_ts, nonce)


@dataclass(frozen=True, slots=True)
class ProcessId:
    """
    A process id in RPC_HANDSHAKE: IPv4 address, port, pid (16 bits), start time.
    """

    ip: ipaddress.IPv4Address
    port: int
    pid: int
    utime: int

    def encode(self) -> bytes:
        try:
            return _process_id.pack(int(self.ip), self.port, self.pid, self.utime)
        except struct.error as e:
            raise ValueError(f"bad process id: {e}") from None

    @classmethod
    def decode(cls, data: bytes) -> ProcessId:
        if len(data) != _process_id.size:
            raise RPCError("process id must be 12 bytes")
        ip, port, pid, utime = _process_id.unpack(data)
        return cls(ipaddress.IPv4Address(ip), port, pid, utime)


@dataclass(frozen=True, slots=True)
class Handshake:
    flags: int
    sender_pid: ProcessId
    peer_pid: ProcessId


def build_handshake(sender_pid: ProcessId, peer_pid: ProcessId, flags: int = 0) -> bytes:
    return _handshake.pack(RPC_HANDSHAKE, flags, sender_pid.encode(), peer_pid.encode())


def build_handshake_error(code: int, sender_pid: ProcessId) -> bytes:
    return _handshake_error.pack(RPC_HANDSHAKE_ERROR, code, sender_pid.encode())


def parse_handshake(payload: bytes, *, expected_peer_pid: ProcessId | None = None) -> Handshake:
    """
    Validate an RPC_HANDSHAKE; raises :class:`HandshakeRejected` on RPC_HANDSHAKE_ERROR.

    ``expected_peer_pid`` is the sender_pid we sent, which the reply must echo.
    """
    if _type_of(payload) == RPC_HANDSHAKE_ERROR:
        _expect(payload, RPC_HANDSHAKE_ERROR, _handshake_error.size, "RPC_HANDSHAKE_ERROR")
        raise HandshakeRejected(_handshake_error.unpack_from(payload)[1])
    _expect(payload, RPC_HANDSHAKE, _handshake.size, "RPC_HANDSHAKE", exact=True)
    _, flags, sender, peer = _handshake.unpack(payload)
    if flags & 0xFF:
        raise RPCError(f"unsupported handshake flags {flags:#x}")
    if flags & HANDSHAKE_FLAG_CRC32C:
        raise RPCError("CRC32C frames are not supported")
    hs = Handshake(flags, ProcessId.decode(sender), ProcessId.decode(peer))
    if expected_peer_pid is not None and hs.peer_pid != expected_peer_pid:
        raise RPCError("handshake peer pid mismatch")
    return hs


def answer_handshake(payload: bytes, own_pid: ProcessId) -> bytes:
    """
    Middle-proxy side: validate the proxy's RPC_HANDSHAKE and build the reply.
    """
    hs = parse_handshake(payload)
    return build_handshake(own_pid, hs.sender_pid)


# -- data messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyReq:
    flags: int
    conn_id: int
    client_addr: tuple[IPAddress, int]
    proxy_addr: tuple[IPAddress, int]
    ad_tag: bytes | None
    data: bytes


@dataclass(frozen=True, slots=True)
class ProxyAns:
    flags: int
    conn_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SimpleAck:
    conn_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class CloseExt:
    conn_id: int


@dataclass(frozen=True, slots=True)
class CloseConn:
    conn_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: int


@dataclass(frozen=True, slots=True)
class Pong:
    ping_id: int


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    msg_type: int
    payload: bytes


Message: TypeAlias = (
    ProxyReq | ProxyAns | SimpleAck | CloseExt | CloseConn | Ping | Pong | UnknownMessage
)


def proxy_req_flags(
    tag: bytes,
    *,
    has_ad_tag: bool,
    not_encrypted: bool = False,
    quickack: bool = False,
    pad_flag: bool = False,
) -> int:
    """
    RPC_PROXY_REQ flags for a client using the transport with this protocol tag.

    ``pad_flag`` adds FLAG_PAD for padded-intermediate clients ([PY], [ERL],
    [RS]); it is off by default, as in [C].
    """
    flags = FLAG_MAGIC | FLAG_EXTMODE2
    if tag == _TAG_ABRIDGED:
        flags |= FLAG_ABRIDGED
    elif tag == _TAG_INTERMEDIATE:
        flags |= FLAG_INTERMEDIATE
    elif tag == _TAG_PADDED:
        flags |= FLAG_INTERMEDIATE | (FLAG_PAD if pad_flag else 0)
    else:
        raise ValueError(f"unknown protocol tag {tag.hex()}")
    if has_ad_tag:
        flags |= FLAG_HAS_AD_TAG
    if not_encrypted:
        flags |= FLAG_NOT_ENCRYPTED
    if quickack:
        flags |= FLAG_QUICKACK
    return flags


def _encode_addr(addr: Address) -> tuple[bytes, int]:
    ip = _ip(addr[0])
    _check_port(addr[1])
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed, addr[1]
    return ip.packed, addr[1]


def _decode_addr(raw: bytes, port: int) -> tuple[IPAddress, int]:
    if port > 0xFFFF:
        raise RPCError(f"bad port {port}")
    return _ip(ipaddress.IPv6Address(raw)), port


def _tl_string(data: bytes) -> bytes:
    head = bytes([len(data)]) if len(data) < 254 else b"\xfe" + len(data).to_bytes(3, "little")
    body = head + data
    return body + bytes(-len(body) % 4)


def _parse_tl_string(data: bytes, pos: int) -> bytes:
    if pos >= len(data):
        raise RPCError("truncated TL string")
    if data[pos] < 254:
        start, length = pos + 1, data[pos]
    elif data[pos] == 254 and pos + 4 <= len(data):
        start, length = pos + 4, int.from_bytes(data[pos + 1 : pos + 4], "little")
    else:
        raise RPCError("bad TL string")
    if start + length > len(data):
        raise RPCError("truncated TL string")
    return data[start : start + length]


def build_proxy_req(
    *,
    conn_id: int,
    client_addr: Address,
    proxy_addr: Address,
    data: bytes,
    tag: bytes,
    ad_tag: bytes | None = None,
    quickack: bool = False,
    pad_flag: bool = False,
) -> bytes:
    """
    RPC_PROXY_REQ carrying one client packet (transport framing removed).

    ``tag`` is the client's protocol tag; NOT_ENCRYPTED is set when the packet
    starts with a zero auth_key_id. Without an ad tag the extra section is omitted.
    """
    _check_u64(conn_id, "conn_id")
    if len(data) % 4:
        raise ValueError("packet length must be a multiple of 4")
    if ad_tag is not None and len(ad_tag) != 16:
        raise ValueError("ad tag must be 16 bytes")
    flags = proxy_req_flags(
        tag,
        has_ad_tag=ad_tag is not None,
        not_encrypted=len(data) >= 8 and not any(data[:8]),
        quickack=quickack,
        pad_flag=pad_flag,
    )
    client_ip, client_port = _encode_addr(client_addr)
    proxy_ip, proxy_port = _encode_addr(proxy_addr)
    head = _proxy_req.pack(
        RPC_PROXY_REQ, flags, conn_id, client_ip, client_port, proxy_ip, proxy_port
    )
    if ad_tag is None:
        return head + data
    extra = _u32.pack(TL_PROXY_TAG) + _tl_string(ad_tag)
    return b"".join((head, _u32.pack(len(extra)), extra, data))


def parse_proxy_req(payload: bytes) -> ProxyReq:
    """
    Middle-proxy side: decode an RPC_PROXY_REQ.
    """
    _expect(payload, RPC_PROXY_REQ, _proxy_req.size, "RPC_PROXY_REQ")
    _, flags, conn_id, client_ip, client_port, proxy_ip, proxy_port = _proxy_req.unpack_from(
        payload
    )
    pos, ad_tag = _proxy_req.size, None
    if flags & _FLAGS_EXTRA:
        if len(payload) < pos + 4:
            raise RPCError("truncated RPC_PROXY_REQ extra section")
        (extra_size,) = _u32.unpack_from(payload, pos)
        pos += 4
        if extra_size % 4 or extra_size > len(payload) - pos:
            raise RPCError(f"bad RPC_PROXY_REQ extra size {extra_size}")
        extra = payload[pos : pos + extra_size]
        pos += extra_size
        if flags & FLAG_HAS_AD_TAG:
            if len(extra) < 4 or _u32.unpack_from(extra)[0] != TL_PROXY_TAG:
                raise RPCError("RPC_PROXY_REQ without the announced ad tag")
            ad_tag = _parse_tl_string(extra, 4)
    return ProxyReq(
        flags,
        conn_id,
        _decode_addr(client_ip, client_port),
        _decode_addr(proxy_ip, proxy_port),
        ad_tag,
        payload[pos:],
    )


def build_proxy_ans(conn_id: int, data: bytes, flags: int = 0) -> bytes:
    _check_u64(conn_id, "conn_id")
    return _proxy_ans.pack(RPC_PROXY_ANS, flags, conn_id) + data


def build_simple_ack(conn_id: int, token: bytes) -> bytes:
    _check_u64(conn_id, "conn_id")
    if len(token) != 4:
        raise ValueError("quick-ack token must be 4 bytes")
    return _simple_ack.pack(RPC_SIMPLE_ACK, conn_id, token)


def _conn_msg_build(msg_type: int, value: int, name: str) -> bytes:
    _check_u64(value, name)
    return _conn_msg.pack(msg_type, value)


def build_close_ext(conn_id: int) -> bytes:
    return _conn_msg_build(RPC_CLOSE_EXT, conn_id, "conn_id")


def build_close_conn(conn_id: int) -> bytes:
    return _conn_msg_build(RPC_CLOSE_CONN, conn_id, "conn_id")


def build_ping(ping_id: int) -> bytes:
    return _conn_msg_build(RPC_PING, ping_id, "ping_id")


def build_pong(ping_id: int) -> bytes:
    return _conn_msg_build(RPC_PONG, ping_id, "ping_id")


def _parse_proxy_ans(payload: bytes) -> ProxyAns:
    _expect(payload, RPC_PROXY_ANS, _proxy_ans.size, "RPC_PROXY_ANS")
    _, flags, conn_id = _proxy_ans.unpack_from(payload)
    return ProxyAns(flags, conn_id, payload[_proxy_ans.size :])


def _parse_simple_ack(payload: bytes) -> SimpleAck:
    _expect(payload, RPC_SIMPLE_ACK, _simple_ack.size, "RPC_SIMPLE_ACK")
    _, conn_id, token = _simple_ack.unpack_from(payload)
    return SimpleAck(conn_id, token)


def _conn_msg_parser(
    msg_type: int, cls: Callable[[int], Message], name: str
) -> Callable[[bytes], Message]:
    def parse(payload: bytes) -> Message:
        _expect(payload, msg_type, _conn_msg.size, name)
        return cls(_conn_msg.unpack_from(payload)[1])

    return parse


_PARSERS: dict[int, Callable[[bytes], Message]] = {
    RPC_PROXY_REQ: parse_proxy_req,
    RPC_PROXY_ANS: _parse_proxy_ans,
    RPC_SIMPLE_ACK: _parse_simple_ack,
    RPC_CLOSE_EXT: _conn_msg_parser(RPC_CLOSE_EXT, CloseExt, "RPC_CLOSE_EXT"),
    RPC_CLOSE_CONN: _conn_msg_parser(RPC_CLOSE_CONN, CloseConn, "RPC_CLOSE_CONN"),
    RPC_PING: _conn_msg_parser(RPC_PING, Ping, "RPC_PING"),
    RPC_PONG: _conn_msg_parser(RPC_PONG, Pong, "RPC_PONG"),
}


def parse_message(payload: bytes) -> Message:
    """
    Decode a data-phase message (either direction); unknown types become UnknownMessage.

    Trailing bytes after a fixed-size message are ignored; short ones raise RPCError.
    """
    msg_type = _type_of(payload)
    parser = _PARSERS.get(msg_type)
    return parser(payload) if parser else UnknownMessage(msg_type, payload)
