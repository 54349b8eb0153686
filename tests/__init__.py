"""
The test suite. Importing it (trial does, before any test module) installs
a guard: a test may only connect to loopback.

``socket.socket.connect`` and ``connect_ex`` refuse an ``AF_INET`` or
``AF_INET6`` address outside 127.0.0.0/8 and ::1 (the unspecified address,
which Linux connects to this host, and ``localhost`` are allowed; so is
``AF_UNIX``), and name resolution through ``socket.getaddrinfo`` refuses
any name but ``localhost`` and this host's own name (IP literals resolve
without a look-up and pass). Either raises at once, so a Twisted connection
attempt fails at once, and also logs the error, so trial fails the test
even when the code under test handles the failed connection.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import socket
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["NonLoopbackConnection", "NonLoopbackName", "loopback_only"]

_log = Logger(namespace="tests.guard")


class NonLoopbackConnection(PermissionError):
    """
    A test tried to connect beyond loopback.
    """


class NonLoopbackName(socket.gaierror):
    """
    A test tried to resolve a name that is not this host's.
    """


def _host_text(host: Any) -> str:
    return host.decode("idna") if isinstance(host, bytes) else str(host)


def _local_name(name: str) -> bool:
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or name == socket.gethostname()


def loopback_only(host: str) -> bool:
    """
    Whether a test may connect to ``host``.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.lower().rstrip(".") == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _refuse(error: OSError) -> OSError:
    _log.failure("{error}", Failure(error), error=error)
    return error


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return
    host = _host_text(address[0])
    if not loopback_only(host):
        raise _refuse(
            NonLoopbackConnection(errno.EACCES, f"tests may only connect to loopback, not {host}")
        )


def _install() -> None:
    if getattr(socket.socket, "_loopback_guard", False):
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    getaddrinfo = _socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _check(self, address)
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        _check(self, address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None:
            name = _host_text(host)
            try:
                ipaddress.ip_address(name.split("%", 1)[0])
            except ValueError:
                if name and not _local_name(name):
                    raise _refuse(
                        NonLoopbackName(
                            socket.EAI_NONAME,
                            f"tests may only resolve localhost or IP literals, not {name}",
                        )
                    ) from None
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign,assignment]
    socket.socket._loopback_guard = True  # type: ignore[attr-defined]
    # socket.getaddrinfo (and every reference to it taken earlier, such as
    # Twisted's GAIResolver's) looks this up at each call.
    _socket.getaddrinfo = guarded_getaddrinfo


_install()
