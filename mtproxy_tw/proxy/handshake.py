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

Without a replay store of its own the machine asks instead: a valid hello
or init answers :class:`Consult`, the state is ``CONSULT`` until the caller
brings the shared state's verdict to :meth:`Handshake.resume`, and the
bytes that arrive meanwhile are held for whichever way it goes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

from mtproxy_tw.fronting.profile import TLSProfile, fallback_size
from mtproxy_tw.proxy.decisions import (
    Accept,
    Consult,
    Decision,
    Front,
    HandshakePolicy,
    NeedMore,
    Reject,
    ReplayStore,
)
from mtproxy_tw.wire import faketls, obfuscated2
from mtproxy_tw.wire.dcs import Address
from mtproxy_tw.wire.obfuscated2 import TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED, AcceptedInit
from mtproxy_tw.wire.secrets import Mode, Secret

__all__ = [
    "Accept",
    "Consult",
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


class _State(enum.Enum):
    FIRST = "first bytes"
    TLS_INIT = "init inside TLS records"
    CONSULT = "waiting for the shared state"
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
        "_held",
        "_profile",
        "_records",
        "_refused",
        "_replay",
        "_resume",
        "_size",
        "_sni",
        "_state",
        "_tls_secret",
        "policy",
    )

    def __init__(
        self,
        policy: HandshakePolicy,
        replay: ReplayStore | None,
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
        :param replay: checked at once; ``None``: each valid hello and init
            answers :class:`Consult` instead.
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
        #: Bytes that arrived while consulting, and how to go on.
        self._held = b""
        self._resume: Callable[[str | None], Decision] | None = None

    @property
    def buffered(self) -> int:
        """
        Bytes held while undecided.
        """
        return len(self._buffer) + len(self._held)

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
        if self._state is _State.CONSULT:
            self._held += data
            return NeedMore()
        raise RuntimeError("the handshake is already decided")

    @property
    def consulting(self) -> bool:
        return self._state is _State.CONSULT

    @property
    def holding(self) -> bool:
        """
        Whether bytes arrived while consulting (held for :meth:`resume`).
        """
        return self._state is _State.CONSULT and bool(self._held)

    def resume(self, verdict: str | None) -> Decision:
        """
        The shared state's answer to :class:`Consult`: ``None`` (go on),
        ``"replay"``, or the limit that refuses the user.
        """
        if self._resume is None:
            raise RuntimeError("the handshake is not consulting")
        go_on, self._resume = self._resume, None
        return go_on(verdict)

    def _consult(
        self, key: bytes, secret: Secret, go_on: Callable[[str | None], Decision]
    ) -> Consult:
        self._state = _State.CONSULT
        self._resume = go_on
        return Consult(key, secret)

    def _take_held(self) -> bytes:
        held, self._held = self._held, b""
        return held

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
        if self._state is _State.TLS_INIT or self._records is not None:
            return self._reject("site-answered")
        self._buffer += self._take_held()
        return self._fail("incomplete", tls=self._looks_tls())

    def _looks_tls(self) -> bool:
        return self.policy.tls_enabled and self._buffer[:1] == b"\x16"

    def timed_out(self) -> Decision:
        """
        The client took too long: what to do with what it sent.
        """
        if self._state is _State.TLS_INIT or self._records is not None:
            return self._reject("handshake-timeout")
        self._buffer += self._take_held()
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
        key = b"tls:" + match.client_random
        if self._replay is None:
            return self._consult(key, match.name, lambda v: self._hello_checked(v, hello, match))
        return self._hello_checked(
            "replay" if self._replay.check_and_add(key) else None, hello, match
        )

    def _hello_checked(
        self, verdict: str | None, hello: faketls.HelloRecord, match: faketls.HelloMatch[Secret]
    ) -> Decision:
        self._buffer += self._take_held()
        if verdict == "replay":
            return self._fail("tls-replay", tls=True)
        if verdict is not None:
            return self._fail(f"limit-{verdict}", tls=True, user=match.name.name)
        assert match.server_name is not None
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
        key = init[8:56]
        if self._replay is None:
            return self._consult(
                key, secret, lambda v: self._init_checked(v, secret, accepted, rest, reply)
            )
        seen = "replay" if self._replay.check_and_add(key) else None
        return self._init_checked(seen, secret, accepted, rest, reply)

    def _init_checked(
        self,
        verdict: str | None,
        secret: Secret,
        accepted: AcceptedInit,
        rest: bytes,
        reply: bytes,
    ) -> Decision:
        tls = self._records is not None
        held = self._take_held()
        if verdict is not None:
            if tls:
                return self._reject(verdict if verdict == "replay" else f"limit-{verdict}", reply)
            self._buffer += held
            if verdict == "replay":
                return self._fail("replay")
            return self._fail(f"limit-{verdict}", user=secret.name)
        if held and self._records is not None:
            try:
                held = self._records.feed(held)
            except faketls.TLSError:
                return self._reject("tls-bad-record", reply)
        self._buffer = bytearray()
        self._state = _State.DONE
        return Accept(secret, accepted, rest + held, self._records, reply)

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
