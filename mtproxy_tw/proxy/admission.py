"""
One connection's standing with the users' registry
(:class:`mtproxy_tw.proxy.users.Registry`) and the shared state
(:mod:`mtproxy_tw.shared`): checked when it connects and when its handshake
proves a secret, counted while it lives, and what a refusal is recorded as.

The registry decides what this process knows alone (access lists,
disabled, expired, over quota, and the live counts of its own
connections). Where the shared state is distributed (workers, a fleet),
the counted limits are also claimed there, so that they hold across every
process: the connections from one address, the proxy's connection cap, and
each user's connections and addresses.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mtproxy_tw.proxy.users import counted_address
from mtproxy_tw.shared.base import Claim, SharedState
from mtproxy_tw.wire.secrets import Secret

__all__ = ["Admission"]


class Admission:
    """
    :param core: the proxy core, whose ``users`` may be ``None`` (no named
        users: everything is let in, nothing is counted).
    :param conn: the connection, as the registry counts it.
    """

    log = Logger()

    __slots__ = (
        "_asking",
        "address",
        "claimed",
        "conn",
        "core",
        "holder",
        "refused",
    )

    def __init__(self, core: Any, conn: object, address: str) -> None:
        self.core = core
        self.conn = conn
        self.address = address
        self.holder = core.holder()
        #: Whether the shared state holds claims of this connection.
        self.claimed = False
        #: Claims asked for and not answered yet.
        self._asking = 0
        users = core.users
        #: The limit that refuses this connection whatever it sends.
        self.refused: str | None = None
        if users is not None:
            self.refused = users.check_address(address)
            users.attach_address(conn, address)

    def start(self) -> str | Deferred[str | None] | None:
        """
        The limit that refuses the connection whatever it sends: at once
        where the shared state is this process's own, else once it has
        counted the connection.
        """
        shared = self.core.shared
        if self.refused is not None or not shared.distributed:
            return self.refused
        claims = []
        users = self.core.users
        per_ip = users.per_ip_limit if users is not None else None
        if per_ip is not None:
            claims.append(Claim("per_ip", "ip:" + counted_address(self.address), per_ip))
        cap = self.core.settings.max_connections
        if cap is not None:
            claims.append(Claim("max-connections", "global", cap, fleet=False))
        if not claims:
            return None
        return self._claim(claims)

    def _claim(self, claims: list[Claim]) -> Deferred[str | None]:
        self.claimed = True
        shared: SharedState = self.core.shared
        self._asking += 1
        answer = shared.acquire(self.holder, claims)

        def answered(result: object) -> object:
            self._asking -= 1
            if not self.claimed and not self._asking:  # closed meanwhile
                shared.release(self.holder)
            return result

        return answer.addBoth(answered)  # type: ignore[return-value]

    def admit(self, secret: Secret) -> str | None:
        """
        For the handshake machine: the limit that refuses a client proven to
        hold ``secret``, or ``None``.
        """
        users = self.core.users
        user = users.user_of(secret.name) if users is not None else None
        if users is None or user is None:
            return None
        result: str | None = users.check_user(user, self.address, self.core.reactor.seconds())
        return result

    def consult(self, key: bytes, secret: Secret) -> str | Deferred[str | None] | None:
        """
        The shared state's verdict on a valid hello or init: ``"replay"``,
        a limit of the user's (its claims taken), or ``None``; at once
        where the shared state is this process's own.
        """
        shared: SharedState = self.core.shared
        if not shared.distributed:
            return "replay" if shared.seen_now(key) else None
        seen = shared.seen(key)
        claims = self._user_claims(secret)

        def checked(replayed: bool) -> str | Deferred[str | None] | None:
            if replayed:
                return "replay"
            if claims:
                return self._claim(claims)
            return None

        return seen.addCallback(checked)

    def _user_claims(self, secret: Secret) -> list[Claim]:
        users = self.core.users
        user = users.user_of(secret.name) if users is not None else None
        spec = users.spec(user) if users is not None and user is not None else None
        if spec is None:
            return []
        claims = []
        if spec.max_connections is not None:
            claims.append(Claim("connections", "user:" + spec.name, spec.max_connections))
        if spec.max_ips is not None:
            member = counted_address(self.address)
            claims.append(Claim("ips", "ips:" + spec.name, spec.max_ips, member=member))
        return claims

    def accepted(self, secret: Secret) -> str:
        """
        The handshake succeeded: the name the connection counts under.
        """
        users = self.core.users
        user = users.user_of(secret.name) if users is not None else None
        if users is not None and user is not None:
            users.attach_user(self.conn, user)
        return user or secret.name

    def ad_tag(self, user: str | None) -> bytes | None:
        """
        The user's own ad tag for middle-proxy mode, if it has one.
        """
        users = self.core.users
        spec = users.spec(user) if users is not None and user is not None else None
        return spec.ad_tag if spec is not None else None

    def refusal(self, reason: str, secret_name: str | None) -> None:
        """
        Record a refused handshake: a limit, or a valid key in a framing its
        secret does not admit. Info level: a user over a limit or an app
        that misbehaves, not a scanner.
        """
        users = self.core.users
        user = None
        if secret_name is not None:
            user = (users.user_of(secret_name) if users is not None else None) or secret_name
        if reason.startswith("limit-"):
            self.core.stats.limited[reason[6:]] += 1
        self.log.info(
            "refused {user} from {peer}: {reason}", user=user, peer=self.address, reason=reason
        )

    def cut(self, user: str | None, reason: str) -> None:
        # A removed user counts as disabled: the limit labels are fixed.
        self.core.stats.limited["disabled" if reason == "removed" else reason] += 1
        self.log.info("cutting a connection of {user}: {reason}", user=user, reason=reason)

    def closed(self, bytes_total: int) -> None:
        users = self.core.users
        if users is not None:
            users.detach(self.conn, bytes_total)
        if self.claimed:
            self.claimed = False
            if not self._asking:  # else once the last answer is in
                self.core.shared.release(self.holder)
