"""
The checks of this host alone: the listen endpoints, the state directory and
the open-file limit.
"""

from __future__ import annotations

import errno
import os
import resource
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from mtproxy_tw.doctor.result import Result, Status
from mtproxy_tw.services.descriptors import (
    MIDDLE_POOL_DCS,
    connections_allowed,
    descriptors_needed,
    limit_advice,
)

__all__ = ["check_listen", "check_open_files", "check_state_dir"]


async def check_listen(reactor: Any, description: str) -> Result:
    """
    Listen on ``description`` and let go at once: is it free?
    """
    name = f"listen {description}"
    if description.startswith("systemd:"):
        return Result(Status.OK, name, "the socket comes from systemd; not tried")
    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    try:
        port = await serverFromString(reactor, description).listen(factory)
    except CannotListenError as e:
        detail = str(e.socketError) if e.socketError is not None else str(e)
        if getattr(e.socketError, "errno", None) == errno.EACCES:
            detail += " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
        elif getattr(e.socketError, "errno", None) == errno.EADDRINUSE:
            detail += " (is the proxy, or another server, running on it?)"
        return Result(Status.FAIL, name, detail)
    except Exception as e:
        return Result(Status.FAIL, name, str(e) or type(e).__name__)
    await port.stopListening()
    return Result(Status.OK, name, "free")


def check_state_dir(path: Path) -> Result:
    """
    Whether the proxy can write its state directory (or create it).
    """
    name = "state dir"
    if path.exists():
        if not path.is_dir():
            return Result(Status.FAIL, name, f"{path} is not a directory")
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".doctor-"):
                pass
        except OSError as e:
            return Result(Status.FAIL, name, f"{path} is not writable ({e.strerror})")
        return Result(Status.OK, name, f"{path} is writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return Result(Status.FAIL, name, f"{path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        return Result(Status.FAIL, name, f"{path} cannot be created: {parent} is not writable")
    return Result(Status.OK, name, f"{path} does not exist yet; the proxy will create it")


def check_open_files(
    limits: Callable[[], tuple[int, int]],
    max_connections: int | None,
    *,
    middle: bool,
    pool_max: int,
    listeners: int,
) -> Result:
    """
    The open-file limit against what ``--max-connections`` needs; with
    ``auto`` (``None``), the figure the limit makes it.

    The proxy raises its soft limit to the hard one at start, so the hard
    limit is what counts.
    """
    name = "open files"
    pools = MIDDLE_POOL_DCS * pool_max if middle else 0
    soft, hard = limits()
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if max_connections is None:
        allowed, why = connections_allowed(
            hard, middle=middle, pool_connections=pools, listeners=listeners
        )
        return Result(
            Status.OK,
            name,
            f"soft limit {soft}, hard {shown}: --max-connections {allowed} ({why})",
        )
    need = descriptors_needed(
        max_connections, middle=middle, pool_connections=pools, listeners=listeners
    )
    wants = f"--max-connections {max_connections} needs {need}"
    if hard == resource.RLIM_INFINITY or hard >= need:
        return Result(
            Status.OK,
            name,
            f"soft limit {soft}, hard {shown} (the proxy raises it to the hard one); {wants}",
        )
    return Result(
        Status.FAIL,
        name,
        f"hard limit {hard} (soft {soft}) is below the {need} descriptors "
        f"--max-connections {max_connections} needs; {limit_advice(need)}, "
        "or lower --max-connections",
    )
