"""
The users' registry: who may connect, and the live counts that decide it.

Pure: no Twisted, no clock (the time is passed in), no I/O but reading the
access-list files of :class:`~mtproxy_tw.config.users.Limits`. A connection
is any hashable object; the client protocol does::

    reason = registry.check_address(ip)          # at connection start
    registry.attach_address(conn, ip)
    ...
    user = registry.user_of(secret.name)         # handshake accepted
    reason = reason or (user and registry.check_user(user, ip, now))
    registry.attach_user(conn, user)             # when it is let through
    ...
    registry.detach(conn, bytes_in + bytes_out)  # at close

and :meth:`Registry.sweep` runs every second or so with each connection's
byte total, which is how usage is counted live without a call per chunk.
Every count is exact whatever the order of calls: a connection attached
twice is moved, detached twice is detached once, and counts that reach
zero are dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable
from typing import Any

from mtproxy_tw.config.users import Limits, Network, UserSpec

__all__ = ["Registry", "counted_address"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Networks:
    """
    Networks looked up by prefix length: one set probe per distinct length,
    so a list of thousands of CIDRs costs what a few do.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        #: version -> prefix length -> the networks' first addresses
        self._starts: dict[int, dict[int, set[int]]] = {}
        for network in networks:
            lengths = self._starts.setdefault(network.version, {})
            lengths.setdefault(network.prefixlen, set()).add(int(network.network_address))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __contains__(self, address: _Address) -> bool:
        value = int(address)
        bits = address.max_prefixlen
        for length, starts in self._starts.get(address.version, {}).items():
            if (value >> (bits - length)) << (bits - length) in starts:
                return True
        return False


def _address(ip: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def counted_address(ip: str) -> str:
    """
    The form an address is counted under (``::ffff:1.2.3.4`` is 1.2.3.4).
    """
    address = _address(ip)
    return ip if address is None else str(address)


_key = counted_address


class _Entry:
    __slots__ = ("cut", "ip", "seen", "user")

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.user: str | None = None
        #: The connection's byte total when last counted.
        self.seen = 0
        #: Already handed out by :meth:`Registry.sweep`.
        self.cut = False


def _bump(counts: dict[str, int], key: str, by: int) -> None:
    value = counts.get(key, 0) + by
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)


class Registry:
    """
    The users, the address limits, and the live counters.

    :param usage: bytes used so far by user name (from the state dir).
    :raises ValueError: an access-list file cannot be used (the message
        names the file and the line).
    """

    def __init__(
        self,
        users: tuple[UserSpec, ...] = (),
        limits: Limits | None = None,
        usage: dict[str, int] | None = None,
    ) -> None:
        self._users: dict[str, UserSpec] = {}
        self._owner: dict[str, str] = {}
        self._allow = _Networks(())
        self._deny = _Networks(())
        self._per_ip_max: int | None = None
        self._usage: dict[str, int] = {}
        #: Bytes counted here since :meth:`take_unsent` (for a shared total).
        self._unsent: dict[str, int] = {}
        self._conns: dict[Hashable, _Entry] = {}
        self._per_ip: dict[str, int] = {}
        self._user_conns: dict[str, int] = {}
        self._user_ips: dict[str, dict[str, int]] = {}
        self.update(users, limits or Limits())
        self.restore(usage or {})

    # -- configuration

    def update(self, users: tuple[UserSpec, ...], limits: Limits) -> list[str]:
        """
        Take a new configuration (SIGHUP); every counter is kept.

        Lowered limits apply to new connections.

        :return: the users that were enabled and are now removed or
            disabled, whose connections must be cut (sorted).
        :raises ValueError: an access-list file cannot be used; nothing
            changes.
        """
        allow, deny = limits.networks()
        before = {name for name, spec in self._users.items() if spec.enabled}
        self._allow = _Networks(allow)
        self._deny = _Networks(deny)
        self._per_ip_max = limits.max_connections_per_ip
        self._users = {spec.name: spec for spec in users}
        self._owner = {secret.name: spec.name for spec in users for secret in spec.secrets}
        after = {name for name, spec in self._users.items() if spec.enabled}
        return sorted(before - after)

    @property
    def per_ip_limit(self) -> int | None:
        """
        ``max_connections_per_ip`` of the limits.
        """
        return self._per_ip_max

    def user_of(self, secret_name: str) -> str | None:
        """
        The user a secret belongs to; ``None`` for a secret of no user (one
        given with ``--secret``).
        """
        return self._owner.get(secret_name)

    def spec(self, user: str) -> UserSpec | None:
        return self._users.get(user)

    def names(self) -> list[str]:
        """
        The configured users, in the file's order.
        """
        return list(self._users)

    # -- decisions

    def check_address(self, ip: str, conn: Hashable | None = None) -> str | None:
        """
        ``"denied"`` (in ``deny``, or ``allow`` is set and it is not in it),
        ``"per_ip"`` (the address has ``max_connections_per_ip``
        connections already), or ``None``: it may connect.

        :param conn: a connection already attached at ``ip``, left out of
            the count (for a check made after :meth:`attach_address`).
        """
        address = _address(ip)
        if address is not None and address in self._deny:
            return "denied"
        if self._allow and (address is None or address not in self._allow):
            return "denied"
        if self._per_ip_max is not None:
            held = self._per_ip.get(_key(ip), 0)
            entry = self._conns.get(conn) if conn is not None else None
            if entry is not None and entry.ip == _key(ip):
                held -= 1
            if held >= self._per_ip_max:
                return "per_ip"
        return None

    def check_user(self, user: str, ip: str, now: float) -> str | None:
        """
        Whether a new connection of ``user`` from ``ip`` may start at
        ``now``: ``"disabled"`` (also for a user not configured),
        ``"expired"``, ``"quota"``, ``"connections"``, ``"ips"``, or
        ``None``.
        """
        reason = self._cut_reason(user, now)
        if reason is not None:
            return "disabled" if reason == "removed" else reason
        spec = self._users[user]
        if spec.max_connections is not None and self.connections(user) >= spec.max_connections:
            return "connections"
        if spec.max_ips is not None:
            held = self._user_ips.get(user, {})
            if _key(ip) not in held and len(held) >= spec.max_ips:
                return "ips"
        return None

    def _cut_reason(self, user: str, now: float) -> str | None:
        spec = self._users.get(user)
        if spec is None:
            return "removed"
        if not spec.enabled:
            return "disabled"
        if spec.expires is not None and now >= spec.expires:
            return "expired"
        if spec.quota is not None and self.used(user) >= spec.quota:
            return "quota"
        return None

    # -- connections

    def attach_address(self, conn: Hashable, ip: str) -> None:
        """
        Count ``conn`` at ``ip`` (at connection start). A connection
        attached before is detached first.
        """
        if conn in self._conns:
            self.detach(conn)
        entry = _Entry(_key(ip))
        self._conns[conn] = entry
        _bump(self._per_ip, entry.ip, 1)

    def attach_user(self, conn: Hashable, user: str) -> None:
        """
        Count ``conn`` as ``user``'s (its handshake was let through); a
        connection of another user is moved.

        :raises ValueError: ``conn`` was not attached by
            :meth:`attach_address`.
        """
        entry = self._conns.get(conn)
        if entry is None:
            raise ValueError("attach_user before attach_address")
        if entry.user is not None:
            self._drop_user(entry)
        entry.user = user
        entry.cut = False
        _bump(self._user_conns, user, 1)
        _bump(self._user_ips.setdefault(user, {}), entry.ip, 1)

    def detach(self, conn: Hashable, bytes_total: int | None = None) -> None:
        """
        Undo both attachments (at close); a connection not attached is
        ignored.

        :param bytes_total: the connection's final byte total, so that what
            it moved since the last :meth:`sweep` is counted too.
        """
        entry = self._conns.pop(conn, None)
        if entry is None:
            return
        if bytes_total is not None:
            self._count(entry, bytes_total)
        if entry.user is not None:
            self._drop_user(entry)
        _bump(self._per_ip, entry.ip, -1)

    def _drop_user(self, entry: _Entry) -> None:
        user = entry.user
        assert user is not None
        _bump(self._user_conns, user, -1)
        ips = self._user_ips.get(user, {})
        _bump(ips, entry.ip, -1)
        if not ips:
            self._user_ips.pop(user, None)
        entry.user = None

    def connections_of(self, user: str) -> list[Hashable]:
        """
        ``user``'s live connections (to cut after :meth:`update`).
        """
        return [conn for conn, entry in self._conns.items() if entry.user == user]

    # -- usage

    def _count(self, entry: _Entry, total: int) -> None:
        if entry.user is not None and total > entry.seen:
            self.add_bytes(entry.user, total - entry.seen)
        entry.seen = max(entry.seen, total)

    def add_bytes(self, user: str, n: int) -> None:
        if n > 0:
            self._usage[user] = self._usage.get(user, 0) + n
            self._unsent[user] = self._unsent.get(user, 0) + n

    def take_unsent(self) -> dict[str, int]:
        """
        Bytes counted by this registry since the last call, by user (what
        to add to a total shared with other processes).
        """
        unsent, self._unsent = self._unsent, {}
        return unsent

    def put_back(self, unsent: dict[str, int]) -> None:
        """
        What :meth:`take_unsent` answered could not be added: send it later.
        """
        for user, n in unsent.items():
            self._unsent[user] = self._unsent.get(user, 0) + n

    def used(self, user: str) -> int:
        return self._usage.get(user, 0)

    def remaining(self, user: str) -> int | None:
        """
        Bytes left of ``user``'s quota; ``None`` without a quota.
        """
        spec = self._users.get(user)
        if spec is None or spec.quota is None:
            return None
        return max(0, spec.quota - self.used(user))

    def sweep(
        self, now: float, live: Iterable[tuple[Hashable, str | None, int]]
    ) -> list[tuple[Hashable, str]]:
        """
        Count what each live connection moved since it was last seen, then
        name those to cut now: ``"quota"``, ``"expired"``, ``"disabled"``,
        ``"removed"``. Each connection is named once.

        :param live: ``(conn, user, bytes_total)`` for each connection; the
            user the registry attached ``conn`` to is the one charged, and
            connections it does not know are skipped.
        """
        entries: list[tuple[Hashable, _Entry]] = []
        for conn, _user, total in live:
            entry = self._conns.get(conn)
            if entry is None or entry.user is None:
                continue
            self._count(entry, total)
            entries.append((conn, entry))
        cuts: list[tuple[Hashable, str]] = []
        for conn, entry in entries:
            if entry.cut or entry.user is None:
                continue
            reason = self._cut_reason(entry.user, now)
            if reason is not None:
                entry.cut = True
                cuts.append((conn, reason))
        return cuts

    def usage_snapshot(self) -> dict[str, int]:
        """
        Bytes used by user, for the state dir (users no longer configured
        included, so a user taken out and put back keeps its count).
        """
        return dict(self._usage)

    def restore(self, usage: dict[str, Any]) -> None:
        """
        Take saved usage; a user's count never goes down.
        """
        for user, n in usage.items():
            if isinstance(n, int) and not isinstance(n, bool) and n > self.used(user):
                self._usage[user] = n

    # -- counters for metrics

    def connections(self, user: str) -> int:
        return self._user_conns.get(user, 0)

    def addresses(self, user: str) -> int:
        return len(self._user_ips.get(user, {}))

    def address_connections(self, ip: str) -> int:
        """
        Connections attached at ``ip``, whatever their user.
        """
        return self._per_ip.get(_key(ip), 0)

    def counts(self) -> dict[str, Any]:
        """
        Every counter, for tests and debugging: ``per_ip``, ``users``
        (connections), ``ips`` (by user), ``attached``.
        """
        return {
            "per_ip": dict(self._per_ip),
            "users": dict(self._user_conns),
            "ips": {user: dict(ips) for user, ips in self._user_ips.items()},
            "attached": len(self._conns),
        }
