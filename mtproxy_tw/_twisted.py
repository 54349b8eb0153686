"""
The one seam into Twisted's internals.

Everything here leans on something Twisted does not promise: attributes of
``twisted.internet.abstract.FileDescriptor`` and ``tcp.Port`` that are not
part of any interface, or the texts of its log events. Nothing else in
:mod:`mtproxy_tw` touches them. ``tests/test_twisted_seam.py`` has one test
per assumption, run against the installed Twisted, so an upgrade that
breaks one fails a test named after it; ``tox.ini`` runs the suite on the
lowest Twisted ``setup.cfg`` accepts and on the latest.

The hot path. ``transport.write()`` on an idle TCP transport only queues
the bytes and asks the reactor to watch for writability: two ``epoll_ctl``
calls and an extra loop turn per chunk. When nothing is queued,
:func:`write` sends at once and hands only the unsent rest to ``write()``,
which keeps Twisted's ordering, flow control and error handling for
everything that does not fit. It does so only on a plain TCP connection
(:func:`plain_tcp`): on anything wrapped around one (TLS, ``haproxy:``, any
``ProtocolWrapper``) the bytes must go through the wrapper, so it calls
``write()``.

The listening socket. :func:`clamp_mss` sets ``TCP_MAXSEG`` on
``tcp.Port.socket``, the port's socket (an attribute, in no interface).
:func:`listen_no_delay` sets ``TCP_NODELAY`` there: Linux hands it to every
socket it accepts, so :func:`no_delay` can skip its ``setsockopt`` for a
connection whose ``tcp.Server.server`` (the port that accepted it) has it,
one system call less per client.

Accept failures. ``tcp.Port`` logs one event per connection it cannot
accept; :func:`route_accept_log` sends one port's events to an observer
that counts them (:class:`mtproxy_tw.services.descriptors.AcceptFailures`).

Splicing (:mod:`mtproxy_tw.proxy.splice`). The reactor calls a readable
descriptor's ``doRead`` and a writable one's ``doWrite``, looked up on the
instance, and acts on what they return (``CONNECTION_DONE`` or
``CONNECTION_LOST``: ``connectionLost``). :func:`take_reads` and
:func:`take_writes` put a function of ours there, so the bytes of one
direction move socket to socket while Twisted still owns the connection:
its reading and writing of the other direction, its flow control
(``startReading``/``stopReading``, ``startWriting``/``stopWriting``: there
is one registration per descriptor in the reactor, so the same transport
must be used to watch its socket) and its closing. A drained write hands
on to Twisted's own ``doWrite``, which finishes a ``loseConnection``.
:func:`give_back` removes them, unless ``abortConnection`` already put
its own there.

Systemd's sockets. Twisted reads ``LISTEN_FDS`` once, when
``twisted.internet.endpoints`` is imported, into
``_SystemdParser._sddaemon`` (a ``ListenFDs``), and takes the variables out
of the environment; :func:`systemd_descriptors` reads them from there, for
the parent of ``--workers``, which hands the sockets down instead of
listening through the endpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import socket
import sys
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import ILogObserver, Logger
from twisted.protocols.policies import ProtocolWrapper

__all__ = [
    "ACCEPT_FAILED",
    "EMFILE_CLOSED",
    "EMFILE_NOISE",
    "READ_SIZE",
    "buffered",
    "clamp_mss",
    "fileno",
    "give_back",
    "hand_over",
    "listen_no_delay",
    "no_delay",
    "plain_tcp",
    "route_accept_log",
    "set_read_size",
    "systemd_descriptors",
    "take_reads",
    "take_writes",
    "tune_malloc",
    "watch_reads",
    "watch_writes",
    "write",
]


#: Bytes read per ``dataReceived`` and the write-buffer size at which a
#: transport pauses its producer: large reads amortise the per-call costs.
READ_SIZE = 1 << 18

#: The transports of connections the reactor accepted or made over TCP.
_PLAIN_TCP = (tcp.Server, tcp.Client)

#: What ``tcp.Port`` logs, at info, for each connection it could not accept
#: (``twisted.internet.tcp._accept``): an ``accept`` that failed, the client
#: waiting in the backlog; and, out of descriptors, a client accepted on
#: Twisted's reserve descriptor and closed unserved, with two more lines
#: around each burst of those.
ACCEPT_FAILED = "Could not accept new connection ({acceptError})"
EMFILE_CLOSED = "EMFILE recovery: Closed socket from {address}"
EMFILE_NOISE = frozenset(
    {
        "EMFILE encountered; releasing reserved file descriptor.",
        "Re-reserving EMFILE recovery file descriptor.",
    }
)


def plain_tcp(transport: object) -> bool:
    """
    Whether ``transport`` is the reactor's own TCP connection, with nothing
    wrapped around it or started inside it (``startTLS``).

    The class is checked exactly: a subclass may write differently.
    """
    return type(transport) in _PLAIN_TCP and not ISSLTransport.providedBy(transport)


def _beneath(transport: object) -> object:
    """
    The plain TCP connection under ``transport``'s wrappers, else ``transport``.
    """
    while isinstance(transport, ProtocolWrapper) and transport.transport is not None:
        transport = transport.transport
    return transport


def set_read_size(transport: Any) -> None:
    """
    Read up to :data:`READ_SIZE` bytes at a time, and let that much queue
    before the producer is paused, on the TCP connection ``transport`` is
    or is wrapped around.

    ``FileDescriptor.bufferSize`` is both sizes.
    """
    transport = _beneath(transport)
    if plain_tcp(transport):
        transport.bufferSize = READ_SIZE


def buffered(transport: Any) -> int:
    """
    Bytes queued in the write buffer of the TCP connection ``transport`` is
    or is wrapped around.

    The queue is ``dataBuffer`` from ``offset`` on plus ``_tempDataLen``
    bytes not yet joined to it. Only read, so a transport of another kind
    is read the same way, each attribute it lacks counting as empty: a test
    double may model a full queue with them, and anything else holds 0.
    """
    transport = _beneath(transport)
    if plain_tcp(transport):
        data: bytes = transport.dataBuffer
        offset: int = transport.offset
        temp: int = transport._tempDataLen
    else:
        data = getattr(transport, "dataBuffer", b"")
        offset = getattr(transport, "offset", 0)
        temp = getattr(transport, "_tempDataLen", 0)
    return len(data) - offset + temp


def write(transport: Any, data: bytes) -> None:
    """
    Send ``data`` on ``transport`` now if it is a plain TCP connection with
    nothing queued; else, and for what does not fit, ``transport.write``.
    """
    if (
        plain_tcp(transport)
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted notice and report the broken connection.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


#: Listening ports whose accepted sockets have ``TCP_NODELAY`` already.
_NO_DELAY_PORTS: weakref.WeakSet[tcp.Port] = weakref.WeakSet()

#: Whether accepted sockets inherit ``TCP_NODELAY`` from the listening one.
_INHERITS_NO_DELAY = sys.platform.startswith("linux")


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off: MTProto packets are small and latency-bound,
    and every write here is already one whole chunk.

    ``setTcpNoDelay`` is public (``ITCPTransport``); a wrapper passes it on.
    A connection accepted by a port of :func:`listen_no_delay` has it already.
    """
    if type(transport) is tcp.Server and transport.server in _NO_DELAY_PORTS:
        return
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        with contextlib.suppress(OSError):
            set_no_delay(True)


def clamp_mss(port: object, mss: int) -> bool:
    """
    Announce a TCP MSS of ``mss`` bytes to every client of the listening
    ``port``; return whether it applied (a TCP port on a system with
    ``TCP_MAXSEG``).

    Linux puts a listening socket's ``TCP_MAXSEG`` in the MSS option of
    its SYN-ACKs and gives it to the sockets it accepts, so the client's
    kernel cuts what it sends into segments of at most that size. The
    socket is ``tcp.Port.socket``; other ports (UNIX sockets, a test's
    fake) are left alone.
    """
    option = getattr(socket, "TCP_MAXSEG", None)
    listening = getattr(port, "socket", None) if isinstance(port, tcp.Port) else None
    if option is None or not isinstance(listening, socket.socket):
        return False
    if listening.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        listening.setsockopt(socket.IPPROTO_TCP, option, mss)
    except OSError:
        return False
    return True


def listen_no_delay(port: object) -> bool:
    """
    Set ``TCP_NODELAY`` on the listening ``port``'s socket, so that the
    connections it accepts start with Nagle's algorithm off; return whether
    they do (a TCP port, on Linux).
    """
    listening = getattr(port, "socket", None) if isinstance(port, tcp.Port) else None
    if not _INHERITS_NO_DELAY or not isinstance(listening, socket.socket):
        return False
    if listening.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    _NO_DELAY_PORTS.add(port)  # type: ignore[arg-type]
    return True


def route_accept_log(port: object, observer: ILogObserver) -> bool:
    """
    Send ``port``'s log events to ``observer``; return whether it could.

    ``tcp.Port`` logs through ``self._logger``, a class attribute that an
    instance attribute overrides; its accept failures go to that logger's
    namespace and observer. Other ports (a test's fake) are left alone.
    """
    if not isinstance(port, tcp.Port):
        return False
    original = getattr(type(port), "_logger", None)
    if not isinstance(original, Logger):
        return False
    port.__dict__["_logger"] = Logger(namespace=original.namespace, source=port, observer=observer)
    return True


def tune_malloc() -> bool:
    """
    Keep glibc from mapping and trimming memory for every large chunk.

    Reads of 256 KiB make ``bytes`` objects above glibc's dynamic mmap
    threshold; each allocation then costs page faults. Raising the mmap
    threshold to 4 MiB and the trim threshold to 64 MiB removes that churn.
    Returns whether it applied (glibc only).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 4 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


#: What the reactor's descriptor calls return: ``None``, or why it is lost.
Outcome = Any


def fileno(transport: Any) -> int:
    """
    The socket descriptor of a plain TCP connection (:func:`plain_tcp`).
    """
    fd: int = transport.socket.fileno()
    return fd


def take_reads(transport: Any, read: Callable[[], Outcome]) -> None:
    """
    Have the reactor call ``read()`` instead of reading ``transport``'s
    socket itself whenever it is readable (and being read:
    ``startReading``); what it returns is acted on as ``doRead``'s would be.
    """
    transport.doRead = read


def take_writes(transport: Any, write: Callable[[], Outcome]) -> Callable[[], Outcome]:
    """
    Have the reactor call ``write()`` whenever ``transport``'s socket is
    writable (and watched: ``startWriting``); return Twisted's own
    ``doWrite``, which ``write`` calls once it has nothing of its own left.
    """
    own: Callable[[], Outcome] = type(transport).doWrite.__get__(transport)
    transport.doWrite = write
    return own


def give_back(transport: Any, *functions: Callable[[], Outcome]) -> None:
    """
    Remove the ``doRead``/``doWrite`` of ours among ``functions`` from
    ``transport``; those ``abortConnection`` put there stay.
    """
    for name in ("doRead", "doWrite"):
        if transport.__dict__.get(name) in functions:
            del transport.__dict__[name]


def watch_reads(transport: Any, on: bool) -> None:
    """
    Start or stop the reactor watching ``transport``'s socket for reads.
    """
    if transport.connected and not transport.disconnecting:
        if on:
            transport.startReading()
        else:
            transport.stopReading()


def watch_writes(transport: Any) -> None:
    """
    Have the reactor watch ``transport``'s socket for writability, until its
    ``doWrite`` finds nothing left to send (Twisted's own ``doWrite`` then
    stops watching).
    """
    if transport.connected:
        transport.startWriting()


def hand_over(transport: Any, protocol: Any) -> bool:
    """
    Make ``protocol`` the one the plain TCP connection ``transport`` calls
    (``dataReceived``, ``readConnectionLost``, ``connectionLost``) from now
    on, replacing the one it was made with and any endpoint wrapper around
    that; ``False`` (nothing changed) on any other kind of transport.

    ``tcp.Connection.protocol`` is the attribute it calls them on.
    """
    if not plain_tcp(transport):
        return False
    transport.protocol = protocol
    return True


def systemd_descriptors() -> list[int]:
    """
    The descriptors systemd passed this process, as Twisted's ``systemd:``
    endpoints number them (``index=N``).
    """
    from twisted.internet import endpoints

    daemon = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if daemon is None:
        return []
    return list(daemon.inheritedDescriptors())
