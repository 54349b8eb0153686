"""
The client handshake as a pure machine: fed bytes and the time, it answers
what to do with the connection.

It owns every decision a handshake needs (PROTOCOL.md sections 3-6): which
client modes are admitted, the fake-TLS digest, SNI and timestamp window,
the replay check, the HTTP sniff, and whether a failure is fronted to the
mask host or closed. It does no I/O: the bytes it wants written (the fake
ServerHello flight) come back in the decision, and the caller owns the
transport, the timer and the connection to the mask host.

States::

    FIRST ──valid hello──▶ TLS_INIT ──valid init──▶ DONE
      │                       └──bad record/init, replay, timeout──▶ DONE (reject)
      ├──valid init──▶ DONE (accept)
      └──anything else──▶ DONE (front or reject)
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from mtproxy_tw.fronting.profile import TLSProfile, fallback_size
from mtproxy_tw.wire import faketls, obfuscated2
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED, AcceptedInit
from mtproxy_tw.wire.secrets import Mode, Secret

__all__ = [
    "Accept",
    "Decision",
    "Front",
    "Handshake",
    "HandshakePolicy",
    "NeedMore",
    "Reject",
    "ReplayStore",
]

_TAGS_BY_MODE = {
    Mode.CLASSIC: frozenset({TAG_ABRIDGED, TAG_INTERMEDIATE}),
    Mode.SECURE: frozenset({TAG_PADDED}),
    Mode.TLS: frozenset({TAG_PADDED}),
}

#: First words of HTTP requests; a conforming client's init never starts so.
_HTTP_VERBS = frozenset({b"GET ", b"POST", b"HEAD", b"OPTI", b"PUT ", b"DELE", b"CONN", b"PATC"})


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


Decision = NeedMore | Accept | Front | Reject


class _State(enum.Enum):
    FIRST = "first bytes"
    TLS_INIT = "init inside TLS records"
    DONE = "decided"


class Handshake:
    """
    One client's handshake.

    :param profile: the measured answer of a fronted domain, if known.
    :param size: a size for the ServerHello's encrypted record when the
        domain has no profile.
    """

    __slots__ = (
        "_admit",
        "_buffer",
        "_profile",
        "_records",
        "_refused",
        "_replay",
        "_size",
        "_sni",
        "_state",
        "_tls_secret",
        "policy",
    )

    def __init__(
        self,
        policy: HandshakePolicy,
        replay: ReplayStore,
        profile: Callable[[str], TLSProfile | None] = lambda domain: None,
        size: Callable[[], int] = fallback_size,
        admit: Callable[[Secret], str | None] = lambda secret: None,
        refused: str | None = None,
    ) -> None:
        """
        :param admit: asked once a client has proven it holds ``secret``:
            ``None`` lets it in, else the limit that refuses it (it is then
            treated as any failed handshake, fronted where fronting is on).
        :param refused: the limit that refuses this connection whatever it
            sends (an address that is denied, say).
        """
        self.policy = policy
        self._admit = admit
        self._refused = refused
        self._replay = replay
        self._profile = profile
        self._size = size
        self._state = _State.FIRST
        self._buffer = bytearray()
        self._sni: str | None = None
        self._tls_secret: Secret | None = None
        self._records: faketls.TLSRecordReader | None = None

    @property
    def buffered(self) -> int:
        """
        Bytes held while undecided.
        """
        return len(self._buffer)

    @property
    def state(self) -> str:
        return self._state.value

    def feed(self, data: bytes, now: float) -> Decision:
        """
        More bytes from the client, arrived at ``now`` (POSIX seconds).
        """
        if self._state is _State.FIRST:
            return self._first(data, now)
        if self._state is _State.TLS_INIT:
            return self._tls_init(data)
        raise RuntimeError("the handshake is already decided")

    @property
    def pending(self) -> bytes:
        """
        Every byte read while undecided (what a fronted site would be sent).
        """
        return bytes(self._buffer) if self._state is _State.FIRST else b""

    def front_target(self) -> Address | None:
        """
        Where a failure would be fronted if the handshake failed now, or
        ``None`` when it would be closed (or can no longer be fronted: a
        fake-TLS answer was already sent).
        """
        if self._state is not _State.FIRST:
            return None
        policy = self.policy
        if self._looks_tls() or policy.masking or not self._plain_modes():
            return policy.mask_target(self._sni)
        return None

    def abandon(self) -> Decision:
        """
        The fronted site has answered (or closed on) the bytes so far: a
        client it would talk to is not one of ours, so it gets the site.
        """
        if self._state is _State.TLS_INIT:
            return self._reject("site-answered")
        return self._fail("incomplete", tls=self._looks_tls())

    def _looks_tls(self) -> bool:
        return self.policy.tls_enabled and self._buffer[:1] == b"\x16"

    def timed_out(self) -> Decision:
        """
        The client took too long: what to do with what it sent.
        """
        if self._state is _State.TLS_INIT:
            return self._reject("handshake-timeout")
        return self._fail("handshake-timeout", tls=self.policy.tls_enabled)

    # -- states

    def _first(self, data: bytes, now: float) -> Decision:
        buf = self._buffer
        buf += data
        if self._refused is not None:
            return self._fail(f"limit-{self._refused}", tls=self._looks_tls())
        policy = self.policy
        tls_looking = False
        if policy.tls_enabled and buf[:1] == b"\x16":
            try:
                hello = faketls.read_client_hello(bytes(buf))
            except faketls.TLSError:
                return self._fail("tls-malformed", tls=True)
            if isinstance(hello, faketls.NeedMore):
                return NeedMore()
            if hello is not None:
                return self._hello(hello, now)
            # A TLS record too short for a fake-TLS hello (openssl s_client's,
            # say): a TLS failure, fronted whatever --mask says, unless the
            # bytes turn out to be a valid init.
            tls_looking = bytes(buf[:3]) == b"\x16\x03\x01"
        if bytes(buf[:4]) in _HTTP_VERBS:
            return self._fail("http")
        if not self._plain_modes():
            # No configured secret admits a plain init: these bytes cannot
            # be a client, and a TLS server would not wait for more either.
            if tls_looking:
                return self._fail("tls-short-hello", tls=True)
            if policy.modes - {Mode.TLS}:
                return self._fail("bad-init")  # fronted unless --no-mask
            return self._fail("not-tls", tls=True)
        if len(buf) < obfuscated2.INIT_LENGTH:
            return NeedMore()
        init = bytes(buf[: obfuscated2.INIT_LENGTH])
        rest = bytes(buf[obfuscated2.INIT_LENGTH :])
        plain = (Mode.CLASSIC, Mode.SECURE)
        if tls_looking and self._match(init, plain, policy.secrets)[0] is None:
            return self._fail("tls-short-hello", tls=True)
        return self._init(init, rest, plain, policy.secrets, b"")

    def _plain_modes(self) -> frozenset[Mode]:
        """
        The non-TLS modes some configured secret admits: with none, non-TLS
        first bytes cannot be a client and are fronted at once.
        """
        policy = self.policy
        admitted = frozenset().union(*(s.admits() for s in policy.secrets))
        return (admitted & policy.modes) - {Mode.TLS}

    def _hello(self, hello: faketls.HelloRecord, now: float) -> Decision:
        policy = self.policy
        candidates = [(s, s.key) for s in policy.secrets if s.kind is Mode.TLS]
        try:
            match = faketls.verify_client_hello(hello.record, candidates)
        except faketls.TLSError:
            match = None
        if match is None:
            return self._fail("tls-bad-digest", tls=True)
        self._sni = match.server_name
        if match.server_name is None or match.server_name.lower() not in policy.tls_domains:
            return self._fail("tls-unknown-sni", tls=True)
        if not faketls.timestamp_ok(match.timestamp, now, skew=policy.tls_time_skew):
            return self._fail("tls-stale", tls=True)
        limit = self._admit(match.name)
        if limit is not None:
            return self._fail(f"limit-{limit}", tls=True, user=match.name.name)
        if self._replay.check_and_add(b"tls:" + match.client_random):
            return self._fail("tls-replay", tls=True)
        measured = self._profile(match.server_name.lower())
        # The site's answer to a hello of this shape (X25519MLKEM768 offered
        # or not), with its group only if the client offered that.
        profile = measured.answer(match.key_share_groups) if measured else None
        size = profile.pick_size() if profile else self._size()
        # The site's own choice when the client offers it, as the site would.
        cipher = match.cipher_suite
        if profile is not None and profile.cipher_suite in match.cipher_suites:
            cipher = profile.cipher_suite
        flight = faketls.build_server_hello(
            match.secret,
            match.client_random,
            match.session_id,
            cipher_suite=cipher,
            app_data_len=size,
            key_share_first=profile.key_share_first if profile else True,
            group=profile.group if profile else faketls.X25519,
        )
        self._tls_secret = match.name
        self._records = faketls.TLSRecordReader()
        rest = bytes(self._buffer[hello.consumed :])
        self._buffer = bytearray()
        self._state = _State.TLS_INIT
        decision = self._tls_init(rest, flight) if rest else NeedMore(flight)
        return decision

    def _tls_init(self, data: bytes, reply: bytes = b"") -> Decision:
        assert self._records is not None and self._tls_secret is not None
        try:
            plain = self._records.feed(data)
        except faketls.TLSError:
            return self._reject("tls-bad-record", reply)
        buf = self._buffer
        buf += plain
        if len(buf) < obfuscated2.INIT_LENGTH:
            return NeedMore(reply)
        init = bytes(buf[: obfuscated2.INIT_LENGTH])
        rest = bytes(buf[obfuscated2.INIT_LENGTH :])
        return self._init(init, rest, (Mode.TLS,), (self._tls_secret,), reply)

    def _init(
        self,
        init: bytes,
        rest: bytes,
        modes: tuple[Mode, ...],
        secrets: Iterable[Secret],
        reply: bytes,
    ) -> Decision:
        tls = Mode.TLS in modes
        matched, misfit = self._match(init, modes, secrets)
        if matched is None:
            if misfit is not None:
                # The right key, a framing its secret does not admit (an app
                # sending abridged with a dd link, say): not a scanner.
                if tls:
                    return self._reject("transport-not-allowed", reply, misfit.name)
                return self._fail("transport-not-allowed", user=misfit.name)
            return self._reject("tls-bad-init", reply) if tls else self._fail("bad-init")
        secret, accepted = matched
        if not tls:
            limit = self._admit(secret)
            if limit is not None:
                return self._fail(f"limit-{limit}", user=secret.name)
        if self._replay.check_and_add(init[8:56]):
            return self._reject("replay", reply) if tls else self._fail("replay")
        self._buffer = bytearray()
        self._state = _State.DONE
        return Accept(secret, accepted, rest, self._records, reply)

    def _match(
        self, init: bytes, modes: tuple[Mode, ...], secrets: Iterable[Secret]
    ) -> tuple[tuple[Secret, AcceptedInit] | None, Secret | None]:
        """
        The secret the init is for, and how it was accepted; or, failing
        that, a secret whose key the init was made with but in a framing
        the secret (or --modes) does not admit.
        """
        enabled = self.policy.modes
        misfit = None
        for secret in secrets:
            allowed = secret.admits() & enabled
            tags = frozenset().union(*(_TAGS_BY_MODE[m] for m in modes if m in allowed))
            accepted = obfuscated2.accept_init(init, secret.key)
            if accepted is None:
                continue
            if accepted.tag in tags:
                return (secret, accepted), None
            misfit = misfit or secret
        return None, misfit

    # -- outcomes

    def _fail(self, reason: str, tls: bool = False, user: str | None = None) -> Front | Reject:
        """
        Fake-TLS failures are always fronted; others only when masking is on.
        """
        policy = self.policy
        target = policy.mask_target(self._sni) if (tls or policy.masking) else None
        if target is None:
            return self._reject(reason, user=user)
        buffered = bytes(self._buffer)
        self._buffer = bytearray()
        self._state = _State.DONE
        return Front(reason, buffered, target, user)

    def _reject(self, reason: str, reply: bytes = b"", user: str | None = None) -> Reject:
        self._buffer = bytearray()
        self._state = _State.DONE
        return Reject(reason, reply, user)
