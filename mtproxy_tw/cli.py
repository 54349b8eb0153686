"""
``mtproxy-tw``: secrets and links without starting the proxy.

    mtproxy-tw secret [--kind classic|dd|ee] [--domain DOMAIN] [--host H --port P]
    mtproxy-tw links --host HOST --port PORT SECRET [SECRET ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mtproxy_tw.wire.secrets import Mode, Secret, SecretError, generate, links, parse_secret

__all__ = ["main"]

_KINDS = {"classic": Mode.CLASSIC, "dd": Mode.SECURE, "ee": Mode.TLS}


def _describe(secret: Secret, host: str | None, port: int) -> list[str]:
    lines = [f"secret: {secret.hex()}"]
    if secret.kind is Mode.TLS:
        lines.append(f"secret (base64url): {secret.base64url()}")
    if host:
        lines.extend(links(secret, host, port))
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtproxy-tw", description=__doc__.split("\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("secret", help="generate a new secret")
    gen.add_argument("--kind", choices=sorted(_KINDS), default="dd")
    gen.add_argument("--domain", help="the fake-TLS domain of an ee secret")
    gen.add_argument("--host", help="the proxy's public host, to print links")
    gen.add_argument("--port", type=int, default=443)
    show = commands.add_parser("links", help="print the links of existing secrets")
    show.add_argument("--host", required=True)
    show.add_argument("--port", type=int, default=443)
    show.add_argument("secrets", nargs="+", metavar="SECRET")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "secret":
            kind = _KINDS[args.kind]
            if kind is Mode.TLS and not args.domain:
                parser.error("--domain: an ee secret needs a domain")
            secrets = [generate(kind, domain=args.domain)]
        else:
            secrets = [parse_secret(text, f"secret{i}") for i, text in enumerate(args.secrets, 1)]
    except SecretError as e:
        parser.error(f"secret: {e}")
    out = []
    for secret in secrets:
        out.extend(_describe(secret, args.host, args.port))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
