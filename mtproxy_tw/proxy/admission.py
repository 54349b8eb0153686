"""
One connection's standing with the users' registry
(:class:`mtproxy_tw.proxy.users.Registry`): checked when it connects and
when its handshake proves a secret, counted while it lives, and what a
refusal is recorded as.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

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
        "address",
        "conn",
        "core",
        "refused",
    )

    def __init__(self, core: Any, conn: object, address: str) -> None:
        self.core = core
        self.conn = conn
        self.address = address
        users = core.users
        #: The limit that refuses this connection whatever it sends.
        self.refused: str | None = None
        if users is not None:
            self.refused = users.check_address(address)
            users.attach_address(conn, address)

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
