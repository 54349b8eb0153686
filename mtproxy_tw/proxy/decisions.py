"""
What the handshake machine (:mod:`mtproxy_tw.proxy.handshake`) reads of
the settings, and the decisions it answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mtproxy_tw.wire import faketls
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import TAG_PADDED, AcceptedInit
from mtproxy_tw.wire.secrets import Mode, Secret

__all__ = [
    "Accept",
    "Consult",
    "Decision",
    "Front",
    "HandshakePolicy",
    "NeedMore",
    "Reject",
    "ReplayStore",
]


class ReplayStore(Protocol):
    """
    Remembers handshakes; see :class:`mtproxy_tw.wire.replay.ReplayCache`.
    """

    def check_and_add(self, key: bytes) -> bool: ...


class HandshakePolicy(Protocol):
    """
    What the machine reads of the settings (:class:`mtproxy_tw.settings.Settings`).
    """

    @property
    def secrets(self) -> tuple[Secret, ...]: ...
    @property
    def modes(self) -> frozenset[Mode]: ...
    @property
    def tls_enabled(self) -> bool: ...
    @property
    def tls_domains(self) -> frozenset[str]: ...
    @property
    def masking(self) -> bool: ...
    @property
    def tls_time_skew(self) -> float: ...
    def mask_target(self, sni: str | None) -> Address | None: ...


@dataclass(frozen=True, slots=True)
class NeedMore:
    """
    Keep reading; write ``reply`` first if there is one.
    """

    reply: bytes = b""


@dataclass(frozen=True, slots=True)
class Accept:
    """
    A valid init: relay for ``secret``.

    :ivar rest: plain bytes after the init (already out of TLS records).
    :ivar records: the fake-TLS record reader to keep using, or ``None``.
    :ivar reply: bytes to write before anything else.
    """

    secret: Secret
    init: AcceptedInit
    rest: bytes
    records: faketls.TLSRecordReader | None
    reply: bytes = b""

    @property
    def mode(self) -> Mode:
        """
        The client mode it was accepted in.
        """
        if self.records is not None:
            return Mode.TLS
        return Mode.SECURE if self.init.tag == TAG_PADDED else Mode.CLASSIC


@dataclass(frozen=True, slots=True)
class Front:
    """
    A failed handshake to hand to the mask host at ``target``, with every
    byte read so far.
    """

    reason: str
    buffered: bytes
    target: Address
    #: The secret's name, when the client held a valid key (a limit, or a
    #: transport its secret does not admit).
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """
    Close the connection, answering nothing more (``reply`` first, if any).
    """

    reason: str
    reply: bytes = b""
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Consult:
    """
    A valid hello or init: ask the shared state whether ``key`` was seen
    before and whether ``secret``'s user may have one more connection, then
    bring the verdict to :meth:`Handshake.resume`.
    """

    key: bytes
    secret: Secret


Decision = NeedMore | Accept | Front | Reject | Consult
