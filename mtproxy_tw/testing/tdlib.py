"""
TDLib, the library inside Telegram's apps, run against the proxy.

:func:`tdlib_test_proxy` runs TDLib's own ``testProxy`` (PyPI ``tdjson``)
in a thread; ``tdjson`` is imported only when it is called.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from mtproxy_tw.testing._reactor import default_reactor

__all__ = ["tdlib_test_proxy"]

#: TDLib's receive queue is process-wide and must not be read from two
#: threads at once; this serializes every call of :func:`tdlib_test_proxy`.
_TD_LOCK = threading.Lock()


def _td_call(request: dict[str, Any], timeout: float) -> str:
    import tdjson

    def send(client: int, obj: dict[str, Any]) -> None:
        tdjson.td_send(client, json.dumps(obj).encode())

    with _TD_LOCK:
        tdjson.td_execute(
            json.dumps({"@type": "setLogVerbosityLevel", "new_verbosity_level": 0}).encode()
        )
        client: int = tdjson.td_create_client_id()
        send(client, {**request, "@extra": "test"})
        result = f"no answer from TDLib within {timeout} s"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = tdjson.td_receive(min(0.5, max(0.01, deadline - time.monotonic())))
            if raw is None:
                continue
            event = json.loads(raw)
            if event.get("@client_id") == client and event.get("@extra") == "test":
                result = "ok" if event["@type"] == "ok" else str(event.get("message", event))
                break
        send(client, {"@type": "close"})
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            raw = tdjson.td_receive(0.5)
            if raw is None:
                continue
            event = json.loads(raw)
            state = event.get("authorization_state", {}).get("@type")
            if event.get("@client_id") == client and state == "authorizationStateClosed":
                break
        return result


def tdlib_test_proxy(
    server: str,
    port: int,
    secret_text: str,
    dc_id: int,
    timeout: float = 5.0,
    reactor: Any = None,
) -> Deferred[str]:
    """
    Run TDLib's ``testProxy`` against an MTProto proxy, in a thread.

    Fires with ``"ok"`` or TDLib's error message. Against a :class:`FakeDC`
    the expected message is ``"Failed to fetch server_DH_inner_data"``:
    the handshake got two full round trips deep. ``tdjson`` is imported
    only here, so this module works without it.
    """
    if reactor is None:
        reactor = default_reactor()
    proxy = {
        "@type": "proxy",
        "server": server,
        "port": port,
        "type": {"@type": "proxyTypeMtproto", "secret": secret_text},
    }
    # TDLib 1.8.6x wraps the address in a "proxy" object; older releases
    # take the same fields at the top level. Unknown fields are ignored.
    request: dict[str, Any] = {
        "@type": "testProxy",
        "proxy": proxy,
        "server": server,
        "port": port,
        "type": proxy["type"],
        "dc_id": dc_id,
        "timeout": timeout,
    }
    d: Deferred[str] = deferToThreadPool(
        reactor, reactor.getThreadPool(), _td_call, request, timeout + 5.0
    )
    return d
