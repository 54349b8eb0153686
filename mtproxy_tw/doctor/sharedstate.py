"""
The check of ``--shared-state``: the fleet's Redis answers, with the
password and database of the URL (which the line never shows).
"""

from __future__ import annotations

from typing import Any

from mtproxy_tw.connecting import connect_protocol
from mtproxy_tw.doctor.result import Result, Status
from mtproxy_tw.shared.redislink import redis_endpoint

__all__ = ["check_shared_state"]

NAME = "shared-state"


def _version(info: object) -> str:
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return "?"


async def check_shared_state(reactor: Any, url: Any, timeout: float) -> list[Result]:
    """
    ``OK`` with the server's version and the round trip, or ``FAIL`` with why.
    """
    if url is None:
        return []
    import txredisapi  # imports the global reactor: not before it is chosen

    proto = txredisapi.RedisProtocol(convertNumbers=False)
    try:
        await connect_protocol(redis_endpoint(reactor, url, timeout), proto).addTimeout(
            timeout, reactor
        )
        if url.password is not None:
            await proto.auth(url.password).addTimeout(timeout, reactor)
        if url.db:
            await proto.select(url.db).addTimeout(timeout, reactor)
        started = reactor.seconds()
        await proto.ping().addTimeout(timeout, reactor)
        took = reactor.seconds() - started
        info = await proto.info("server").addTimeout(timeout, reactor)
    except Exception as e:
        why = str(e).strip() or type(e).__name__
        if url.password is not None:
            why = why.replace(url.password, "...")
        return [Result(Status.FAIL, NAME, f"{url}: {why}; the proxy would serve on its own state")]
    finally:
        if proto.transport is not None:
            proto.transport.abortConnection()
    detail = f"{url} answers (Redis {_version(info)}, {took * 1000:.1f} ms)"
    return [Result(Status.OK, NAME, detail)]
