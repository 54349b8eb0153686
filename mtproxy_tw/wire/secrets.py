"""
Proxy secrets: parsing, the three client-facing forms, and links.

A secret is 16 bytes (``S``); the prefix a client is given decides how it
connects (PROTOCOL.md section 1):

- 32 hex digits: *classic* obfuscated2;
- ``dd`` + 32 hex digits: *secure*, padded intermediate;
- ``ee`` + 32 hex digits + hex(domain): *tls*, fake TLS with that SNI.

The kind is decided by length and prefix together, so 32 hex digits are
always a classic secret even when they start with ``dd`` or ``ee``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlencode

__all__ = [
    "Mode",
    "Secret",
    "SecretError",
    "generate",
    "link_server",
    "links",
    "parse_secret",
    "parse_secrets_text",
]

SECRET_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9.-]{1,182}$")


class SecretError(ValueError):
    """
    A secret could not be parsed; the message says why (never the secret).
    """


class Mode(str, Enum):
    """
    What a client may do on the wire (PROTOCOL.md sections 3.7 and 3.8).
    """

    #: Abridged or intermediate framing inside plain obfuscated2.
    CLASSIC = "classic"
    #: Padded intermediate inside plain obfuscated2.
    SECURE = "secure"
    #: Padded intermediate inside obfuscated2 inside fake TLS.
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class Secret:
    """
    One configured secret.

    :ivar name: the user's name, shown in logs instead of the secret.
    :ivar key: the 16 bytes that enter every key derivation.
    :ivar kind: the form the operator configured.
    :ivar domain: the fake-TLS domain of a ``tls`` secret.
    """

    name: str
    key: bytes
    kind: Mode
    domain: str | None = None

    def __repr__(self) -> str:
        # Never let a secret reach a log through repr().
        return f"<Secret {self.name} {self.kind.value}>"

    def admits(self) -> frozenset[Mode]:
        """
        The modes a client holding this secret may use.

        A classic secret also admits ``secure``: a client given the same 16
        bytes with a ``dd`` prefix sends padded intermediate. A ``dd`` secret
        admits only padded intermediate and an ``ee`` secret only fake TLS,
        so an operator who hands out only those forms is not fingerprintable
        by the plainer framings.
        """
        if self.kind is Mode.CLASSIC:
            return frozenset({Mode.CLASSIC, Mode.SECURE})
        return frozenset({self.kind})

    def client_form(self) -> bytes:
        """
        The binary secret as a client is given it.
        """
        if self.kind is Mode.SECURE:
            return b"\xdd" + self.key
        if self.kind is Mode.TLS:
            assert self.domain is not None
            return b"\xee" + self.key + self.domain.encode("ascii")
        return self.key

    def hex(self) -> str:
        return self.client_form().hex()

    def base64url(self) -> str:
        return base64.urlsafe_b64encode(self.client_form()).rstrip(b"=").decode("ascii")


def _unhex(text: str) -> bytes | None:
    if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", text):
        return None
    return binascii.unhexlify(text)


def _unbase64url(text: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text) or len(text) % 4 == 1:
        return None
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _from_binary(name: str, raw: bytes) -> Secret:
    if len(raw) == SECRET_LENGTH:
        return Secret(name, raw, Mode.CLASSIC)
    if len(raw) == SECRET_LENGTH + 1 and raw[0] == 0xDD:
        return Secret(name, raw[1:], Mode.SECURE)
    if len(raw) > SECRET_LENGTH + 1 and raw[0] == 0xEE:
        try:
            domain = raw[SECRET_LENGTH + 1 :].decode("ascii")
        except UnicodeDecodeError:
            raise SecretError("the domain of an ee secret must be ASCII") from None
        if not _DOMAIN.match(domain) or domain.startswith(".") or ".." in domain:
            raise SecretError("the domain of an ee secret is not a valid host name")
        return Secret(name, raw[1 : SECRET_LENGTH + 1], Mode.TLS, domain.lower())
    if len(raw) == SECRET_LENGTH + 1:
        raise SecretError("a 17-byte secret must start with dd")
    raise SecretError(
        "expected 32 hex digits, dd + 32 hex digits, or ee + 32 hex digits + hex(domain)"
    )


def parse_secret(text: str, default_name: str) -> Secret:
    """
    Parse ``[NAME=]SECRET`` where SECRET is hex or base64url.

    :raises SecretError: with a message that never repeats the secret.
    """
    name, sep, value = text.partition("=")
    if not sep:
        name, value = default_name, text
    elif not _NAME.match(name):
        raise SecretError("a secret's name may hold letters, digits and _ . @ - only")
    value = value.strip()
    # Hex first, then base64url, the order Telegram's own client uses.
    raw = _unhex(value)
    if raw is None:
        raw = _unbase64url(value)
    if raw is None:
        raise SecretError("not hex and not base64url")
    return _from_binary(name, raw)


def generate(kind: Mode, name: str = "default", domain: str | None = None) -> Secret:
    """
    A new secret from the operating system's CSPRNG.
    """
    if kind is Mode.TLS:
        if not domain:
            raise SecretError("an ee secret needs a domain")
        return _from_binary(name, b"\xee" + os.urandom(SECRET_LENGTH) + domain.encode("ascii"))
    return Secret(name, os.urandom(SECRET_LENGTH), kind)


def link_server(host: str) -> str:
    """
    ``host`` as the ``server=`` of a link: an IPv6 address bare, without
    brackets or a zone, in its short form.

    Telegram for Android hands ``server`` to ``inet_pton``, then to a name
    lookup, so ``[2001:db8::1]`` fails there; TDLib takes either form.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.IPv6Address(bare.partition("%")[0]))
    except ValueError:
        return host


def links(secret: Secret, host: str, port: int) -> list[str]:
    """
    The ``tg://`` and ``https://t.me`` links for a secret.

    An ``ee`` secret gets both its hex and its base64url form (older iOS
    builds mishandled base64 links; current apps prefer it).
    """
    forms = [secret.hex()]
    if secret.kind is Mode.TLS:
        forms.append(secret.base64url())
    server = link_server(host)
    result = []
    for form in forms:
        query = urlencode({"server": server, "port": str(port), "secret": form}, safe=":")
        result.append(f"tg://proxy?{query}")
        result.append(f"https://t.me/proxy?{query}")
    return result


def parse_secrets_text(text: str, origin: str = "file") -> list[Secret]:
    """
    Parse a secrets file: one ``[NAME=]SECRET`` a line, ``#`` comments.

    Unnamed secrets are called ``file1``, ``file2`` ... by line order.

    :raises SecretError: naming the line.
    """
    secrets: list[Secret] = []
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            secret = parse_secret(line, f"{origin}{len(secrets) + 1}")
        except SecretError as e:
            raise SecretError(f"line {number}: {e}") from None
        if secret.name in names:
            raise SecretError(f"line {number}: the name {secret.name!r} is used twice")
        names.add(secret.name)
        secrets.append(secret)
    return secrets
