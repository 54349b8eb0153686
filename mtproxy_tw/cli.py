"""
``mtproxy-tw``: secrets and links without starting the proxy.

    mtproxy-tw secret [--kind classic|dd|ee] [--domain DOMAIN] [--host H --port P]
    mtproxy-tw links [--qr] [--config FILE] [the proxy's options] [SECRET ...]
    mtproxy-tw probe --proxy HOST:PORT --site HOST:PORT [--secret ee...] [--sni DOMAIN]
    mtproxy-tw doctor [--config FILE] [the proxy's options]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from twisted.python import usage

from mtproxy_tw import doctor
from mtproxy_tw.links import endpoint_address, secret_forms, targets, terminal_qr
from mtproxy_tw.probe import command as probe
from mtproxy_tw.services.state import StateDir, StateError
from mtproxy_tw.tap import Options
from mtproxy_tw.wire.secrets import Mode, Secret, SecretError, generate, links

__all__ = ["LinksOptions", "main"]

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
    # Parsed by LinksOptions (the proxy's own options); listed here for --help.
    commands.add_parser(
        "links",
        help="print the links of the proxy's secrets (mtproxy-tw links --help)",
        add_help=False,
    )
    probe.add_arguments(commands.add_parser("probe", help=probe.HELP))
    # Parsed by mtproxy_tw.doctor (the proxy's own options); listed here for --help.
    commands.add_parser(
        "doctor",
        help="check this host and the configuration (mtproxy-tw doctor --help)",
        add_help=False,
    )
    return parser


class LinksOptions(Options):
    """
    ``mtproxy-tw links``: the proxy's own options (so ``--config`` reads
    the same file), ``--qr``, and secrets given as arguments.
    """

    synopsis = "Usage: mtproxy-tw links [--qr] [--config FILE] [the proxy's options] [SECRET ...]"
    longdesc = (
        "Prints the tg:// and https://t.me links of every secret the proxy started "
        "with these options would serve: one set per fake-TLS domain (--tls-domain), "
        "to --public-host or else the listening address. With no secret configured, "
        "the one the proxy generated in --state-dir. A SECRET argument is one more "
        "--secret; --host is --public-host."
    )
    optFlags = [["qr", None, "Also print a QR code of each https://t.me link."]]
    optParameters = [["host", None, None, "The same as --public-host."]]

    def parseArgs(self, *secrets: str) -> None:
        if secrets:
            self.given_lists.setdefault("secret", []).extend(secrets)

    def postOptions(self) -> None:
        if self["host"] is not None:
            if self["public-host"] is not None:
                raise usage.UsageError("--host: give either --host or --public-host")
            self["public-host"] = self["host"]
        super().postOptions()


def _links(argv: Sequence[str]) -> int:
    options = LinksOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"mtproxy-tw links: {e}\n")
        return 2
    secrets = list(options["secrets"])
    if not secrets:
        state = StateDir(options["state-dir"])
        try:
            kept = state.kept_secret()
        except StateError as e:
            sys.stderr.write(f"mtproxy-tw links: --state-dir: {e}\n")
            return 1
        if kept is None:
            sys.stderr.write(
                f"mtproxy-tw links: no --secret given, and no secret kept in {state.path} "
                "yet: the proxy generates one there at its first start\n"
            )
            return 1
        secrets = [kept]
    found = [endpoint_address(description) for description in options["listen"]]
    where = targets(options["public-host"], found)
    notes = []
    if options["public-host"] is None:
        hosts = ", ".join(host for host, _ in where)
        notes.append(f"no --public-host given: the links use {hosts}, which may not be reachable")
    if not any(port for _, port in found) and ":" not in (options["public-host"] or ""):
        notes.append(
            f"the port of {options['listen'][0]} is not known here: the links say 443 "
            "(give --public-host HOST:PORT)"
        )
    out = []
    for host, port in where:
        for secret in secrets:
            for form in secret_forms(secret, options["tls-domains"]):
                domain = f", {form.domain}" if form.domain else ""
                out.append(f"{secret.name} ({form.kind.value}{domain}):")
                for link in links(form, host, port):
                    out.append(link)
                    if options["qr"] and link.startswith("https://"):
                        out.append(terminal_qr(link))
                out.append("")
    for note in notes:
        sys.stderr.write(f"mtproxy-tw links: {note}\n")
    sys.stdout.write("\n".join(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["links"]:
        return _links(given[1:])
    if given[:1] == ["doctor"]:
        return doctor.main(given[1:])
    parser = _parser()
    args = parser.parse_args(given)
    if args.command == "probe":
        return probe.command(args)
    try:
        kind = _KINDS[args.kind]
        if kind is Mode.TLS and not args.domain:
            parser.error("--domain: an ee secret needs a domain")
        secrets = [generate(kind, domain=args.domain)]
    except SecretError as e:
        parser.error(f"secret: {e}")
    out = []
    for secret in secrets:
        out.extend(_describe(secret, args.host, args.port))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
