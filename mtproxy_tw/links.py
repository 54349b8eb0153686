"""
The links handed to users: the host and port they name, one set per secret
and per fake-TLS domain, and a QR code of a link for a terminal.

Used by the running proxy (:mod:`mtproxy_tw.tap` logs the links) and by
``mtproxy-tw links`` (:mod:`mtproxy_tw.cli`), so both print the same links.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from mtproxy_tw.wire.dcs import parse_address
from mtproxy_tw.wire.secrets import Mode, Secret, links

__all__ = [
    "endpoint_address",
    "guess_host",
    "is_specific",
    "secret_forms",
    "split_public_host",
    "targets",
    "terminal_qr",
    "user_links",
]

#: Where a listener is, as far as is known: a host (``None``: any address)
#: and a port (``None``: not known).
Found = tuple[str | None, int | None]


def split_public_host(text: str) -> tuple[str, int | None]:
    """
    ``--public-host``: ``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``, or an IPv6
    address bare or in brackets. The port, when given, is the one the apps
    connect to (it may differ from the listening port behind a NAT or a
    load balancer).

    :raises ValueError: saying why.
    """
    text = text.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.IPv6Address(bare)), None
    except ValueError:
        pass
    address = parse_address(text, default_port=0)
    return address.host, address.port or None


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    """
    A Twisted endpoint description's arguments, ``\\`` escapes undone.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    key: str | None = None
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == "=" and key is None:
            key, current = "".join(current), []
        elif char == ":":
            if key is None:
                args.append("".join(current))
            else:
                kwargs[key] = "".join(current)
            key, current = None, []
        else:
            current.append(char)
    if key is None:
        args.append("".join(current))
    else:
        kwargs[key] = "".join(current)
    return args, kwargs


def endpoint_address(description: str) -> Found:
    """
    The interface and port of a ``tcp:``, ``tcp6:`` or ``ssl:`` listen
    description, also inside ``haproxy:``; ``(None, None)`` for the others
    (``systemd:``, ``unix:``), whose address is not in the description.
    """
    args, kwargs = _split(description)
    if args and args[0] == "haproxy":
        args = args[1:]
    if not args or args[0] not in ("tcp", "tcp6", "ssl"):
        return None, None
    text = args[1] if len(args) > 1 else kwargs.get("port", "")
    port = int(text) if text.isdigit() else None
    interface = kwargs.get("interface") or None
    return interface, port


def is_specific(host: str | None) -> bool:
    """
    Whether ``host`` names one address (not ``0.0.0.0`` or ``::``).
    """
    if not host:
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return True


def guess_host() -> str:
    """
    This host's address by its name; a guess, said to be one where used.
    """
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def targets(
    public_host: str | None, found: Sequence[Found], guess: str | None = None
) -> list[tuple[str, int]]:
    """
    The hosts and ports the links name.

    With ``--public-host``, that host, with its port or else the first
    listener's. Without, each listener's own address, or ``guess`` (by
    default :func:`guess_host`) for one listening on every address.
    """
    ports = [port for _, port in found if port]
    if public_host is not None:
        public, public_port = split_public_host(public_host)
        return [(public, public_port or (ports[0] if ports else 443))]
    result: list[tuple[str, int]] = []
    for host, port in found or [(None, None)]:
        if host is None or not is_specific(host):
            host = guess if guess is not None else guess_host()
        target = (host, port or 443)
        if target not in result:
            result.append(target)
    return result


def secret_forms(secret: Secret, tls_domains: Iterable[str] = ()) -> list[Secret]:
    """
    The secret as handed out: an ``ee`` secret once with its own domain and
    once more, re-encoded, with each other ``--tls-domain``.
    """
    if secret.kind is not Mode.TLS:
        return [secret]
    result = [secret]
    for domain in tls_domains:
        if all(domain != s.domain for s in result):
            result.append(dataclasses.replace(secret, domain=domain))
    return result


def user_links(secret: Secret, host: str, port: int, tls_domains: Iterable[str] = ()) -> list[str]:
    """
    Every link of one secret: per domain, ``tg://`` and ``https://t.me``,
    hex and (``ee``) base64url.
    """
    return [link for form in secret_forms(secret, tls_domains) for link in links(form, host, port)]


_UPPER_HALF = "\u2580"
#: Explicit colours, never the terminal's own: black and bright white, the
#: same on a dark or a light theme (segno's own terminal output draws one
#: of the two in the theme's colour, and so comes out inverted on one kind).
_FG = {True: "30", False: "97"}
_BG = {True: "40", False: "107"}


def terminal_qr(text: str, border: int = 4) -> str:
    """
    A QR code of ``text`` for a terminal: two modules a character (upper
    half block, foreground the top module, background the bottom one), in
    explicit black and white, with a quiet zone of ``border`` modules.
    """
    import segno

    code = segno.make_qr(text)
    rows = [[bool(bit) for bit in row] for row in code.matrix_iter(scale=1, border=border)]
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))
    lines = []
    for top, bottom in zip(rows[::2], rows[1::2], strict=True):
        cells: list[str] = []
        last: tuple[bool, bool] | None = None
        for pair in zip(top, bottom, strict=True):
            if pair != last:
                cells.append(f"\033[{_FG[pair[0]]};{_BG[pair[1]]}m")
                last = pair
            cells.append(_UPPER_HALF)
        lines.append("".join(cells) + "\033[0m")
    return "\n".join(lines)
