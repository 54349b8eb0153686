"""
The mask host: reachable, speaking TLS 1.3, and the key-share group it
picks, for the hello of older apps and for that of current ones (which
also offers X25519MLKEM768).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mtproxy_tw.doctor.context import Context
from mtproxy_tw.doctor.net import client_endpoint, connect_time, is_ip
from mtproxy_tw.doctor.result import Result, Status, reason
from mtproxy_tw.fronting.profile import MAX_ANSWER, parse_server_answer
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.faketls import NeedMore, TLSError, build_client_hello

__all__ = ["GROUPS", "ServerHello", "check_mask", "probe", "read_server_hello"]

#: Key-share groups by code point (IANA "TLS Supported Groups").
GROUPS = {
    0x0017: "secp256r1",
    0x0018: "secp384r1",
    0x0019: "secp521r1",
    0x001D: "x25519",
    0x001E: "x448",
    0x11EC: "X25519MLKEM768",
    0x6399: "X25519Kyber768Draft00",
}
_CIPHERS = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
}
#: The ServerHello random that makes it a HelloRetryRequest (RFC 8446 4.1.3).
_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_KEY_SHARE = 0x0033
_SUPPORTED_VERSIONS = 0x002B
_TLS13 = 0x0304


@dataclass(frozen=True, slots=True)
class ServerHello:
    """
    What the first record of a site's answer says.

    :ivar version: the version chosen (supported_versions, else the legacy field).
    :ivar group: the key-share group chosen, None without a key share.
    :ivar retry: it is a HelloRetryRequest (the group is the one asked for).
    """

    version: int
    cipher: int
    group: int | None
    retry: bool


def _group_name(group: int | None) -> str:
    if group is None:
        return "none"
    return GROUPS.get(group, f"0x{group:04x}")


def read_server_hello(data: bytes) -> ServerHello | None:
    """
    The ServerHello at the start of ``data``; None until the record is whole.

    :raises TLSError: the answer is not a ServerHello (an alert, plain HTTP, garbage).
    """
    if len(data) < 5:
        return None
    if data[:5] == b"HTTP/":
        raise TLSError("it answers plain HTTP, not TLS")
    if data[0] == 0x15 and len(data) >= 7:
        if data[6] == 70:  # protocol_version: the versions offered (1.3) are refused
            raise TLSError("it answers with TLS alert 70 (protocol_version): not TLS 1.3")
        raise TLSError(f"it answers with TLS alert {data[6]}")
    if data[0] != 0x16 or data[1] != 3:
        raise TLSError("its answer is not TLS")
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end:
        return None
    body = data[5:end]
    try:
        if body[0] != 0x02:
            raise TLSError("its answer does not start with a ServerHello")
        version = int.from_bytes(body[4:6], "big")
        retry = body[6:38] == _RETRY_RANDOM
        pos = 39 + body[38]
        cipher = int.from_bytes(body[pos : pos + 2], "big")
        pos += 3
        limit = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        group = None
        while pos + 4 <= limit:
            kind = int.from_bytes(body[pos : pos + 2], "big")
            value = body[pos + 4 : pos + 4 + int.from_bytes(body[pos + 2 : pos + 4], "big")]
            if kind == _SUPPORTED_VERSIONS and len(value) == 2:
                version = int.from_bytes(value, "big")
            elif kind == _KEY_SHARE and len(value) >= 2:
                group = int.from_bytes(value[:2], "big")
            pos += 4 + len(value)
    except IndexError:
        raise TLSError("its ServerHello is truncated") from None
    return ServerHello(version, cipher, group, retry)


class _Probe(Protocol):
    """
    Sends a ClientHello; reads the answer until its ServerHello and first
    encrypted record are whole.
    """

    def __init__(self, hello: bytes) -> None:
        self.hello = hello
        self.buffer = b""
        self.result: Deferred[ServerHello] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.hello)

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self.buffer += data
        try:
            hello = read_server_hello(self.buffer)
            if hello is None:
                return
            whole = hello.retry or hello.version != _TLS13
            if not whole and isinstance(parse_server_answer(self.buffer), NeedMore):
                if len(self.buffer) <= MAX_ANSWER:
                    return
                raise TLSError("its answer is too long")
        except TLSError as e:
            self.result.errback(Failure(e))
            return
        self.result.callback(hello)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.result.called:
            self.result.errback(TLSError("it closed the connection without a whole answer"))
        self.lost.callback(None)


async def probe(
    ctx: Context, target: Address, domain: str, *, mlkem: bool, preamble: bytes = b""
) -> ServerHello:
    """
    Send ``target`` the ClientHello an app sends for ``domain``; its answer.
    """
    hello = build_client_hello(
        os.urandom(16), domain, int(time.time()), mlkem=mlkem, consistent_grease=True
    )
    protocol = _Probe(preamble + hello)

    async def exchange() -> ServerHello:
        endpoint = client_endpoint(ctx.reactor, target.host, target.port, ctx.timeout)
        await connectProtocol(endpoint, protocol)
        return await protocol.result

    try:
        return await ensureDeferred(exchange()).addTimeout(ctx.timeout, ctx.reactor)
    finally:
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
            await protocol.lost


async def _attempt(ctx: Context, target: Address, domain: str, mlkem: bool) -> Any:
    preamble = b"PROXY UNKNOWN\r\n" if ctx.settings.mask_proxy_protocol else b""
    try:
        return await probe(ctx, target, domain, mlkem=mlkem, preamble=preamble)
    except TLSError as e:
        return str(e)
    except Exception:
        return reason(Failure(), ctx.timeout)


def _judge(classic: ServerHello | str, current: ServerHello | str) -> tuple[Status, str]:
    if isinstance(classic, str):
        return Status.FAIL, classic
    if classic.version != _TLS13:
        return Status.FAIL, f"it answers TLS 0x{classic.version:04x}, not TLS 1.3"
    cipher = _CIPHERS.get(classic.cipher, f"0x{classic.cipher:04x}")
    group = _group_name(classic.group)
    if classic.retry:
        return Status.WARN, (
            f"TLS 1.3 ({cipher}) but it asks the apps' hello for another key share "
            f"({group}): fake-TLS answers do not look like that"
        )
    detail = f"TLS 1.3 ({cipher}), key share {group}"
    if isinstance(current, str):
        return Status.WARN, f"{detail}; the hello of current apps fails: {current}"
    if current.retry or current.version != _TLS13:
        return Status.WARN, f"{detail}; the hello of current apps gets another answer"
    return Status.OK, f"{detail} ({_group_name(current.group)} to current apps)"


async def check_mask(ctx: Context) -> list[Result]:
    """
    Each place failed handshakes are fronted to, with the domain clients name.
    """
    settings = ctx.settings
    if not (settings.tls_enabled or settings.masking):
        return []
    pairs = [(settings.mask_target(d), d) for d in sorted(settings.tls_domains)]
    if not pairs:
        target = settings.mask_target(None)
        if target is None:
            detail = "fronting is on, but there is no --mask-host or fake-TLS domain"
            return [Result(Status.WARN, "mask host", detail)]
        pairs = [(target, target.host if not is_ip(target.host) else "")]
    results = []
    for target, domain in pairs:
        assert target is not None
        name = f"mask host for {domain}" if domain else "mask host"
        if not domain:
            # No name to put in a hello: only whether it takes a connection.
            try:
                elapsed = await connect_time(ctx.reactor, target.host, target.port, ctx.timeout)
            except Exception:
                results.append(
                    Result(Status.FAIL, name, f"{target}: {reason(Failure(), ctx.timeout)}")
                )
            else:
                detail = (
                    f"{target}: connected in {elapsed * 1000:.1f} ms (no domain to try TLS with)"
                )
                results.append(Result(Status.OK, name, detail))
            continue
        classic, current = await gatherResults(
            [ensureDeferred(_attempt(ctx, target, domain, mlkem)) for mlkem in (False, True)]
        )
        status, detail = _judge(classic, current)
        results.append(Result(status, name, f"{target}: {detail}"))
    return results
