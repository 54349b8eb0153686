"""
``mtproxy-tw probe``: the battery against a deployment, from the command
line.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from mtproxy_tw.wire.dcs import Address, parse_address
from mtproxy_tw.wire.secrets import Mode, Secret, SecretError, parse_secret

__all__ = ["add_arguments", "command"]

HELP = "probe the proxy and the site it fronts alike; report what tells them apart"


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _secret(text: str) -> Secret:
    try:
        secret = parse_secret(text, "probe")
    except SecretError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if secret.kind is not Mode.TLS:
        raise argparse.ArgumentTypeError("an ee secret (fake TLS) is needed")
    return secret


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    The probe command's options, on its subparser.
    """
    parser.set_defaults(probe_parser=parser)
    parser.add_argument(
        "--proxy", required=True, type=_address, metavar="HOST:PORT", help="the proxy"
    )
    parser.add_argument(
        "--site", required=True, type=_address, metavar="HOST:PORT", help="the fronted site"
    )
    parser.add_argument(
        "--secret",
        type=_secret,
        help="an ee secret of the proxy, for the probes that need a valid hello (replayed, stale)",
    )
    parser.add_argument(
        "--sni",
        metavar="DOMAIN",
        help="the domain the probes name (default: the secret's, else the site's host)",
    )
    parser.add_argument(
        "--wait",
        type=_seconds,
        default=15.0,
        metavar="S",
        help="seconds each probe waits for the close (default 15)",
    )
    parser.add_argument(
        "--tolerance",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="seconds two closes may differ by and still count as the same (default 1)",
    )


def _sni(args: argparse.Namespace) -> str:
    if args.sni:
        return str(args.sni)
    if args.secret is not None and args.secret.domain:
        return str(args.secret.domain)
    host = str(args.site.host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    parser: argparse.ArgumentParser = args.probe_parser
    parser.error("--sni: the site is given as an address; name the domain it serves")


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _run(reactor: Any, args: argparse.Namespace, sni: str) -> None:
    from mtproxy_tw.probe.run import run_battery

    _write(
        f"# probing proxy {args.proxy} and site {args.site} as {sni}, "
        f"up to {args.wait:g} s per probe"
    )
    report = await run_battery(
        reactor,
        args.proxy,
        args.site,
        sni,
        secret=args.secret,
        wait=args.wait,
        tolerance=args.tolerance,
        progress=_write,
    )
    _write(f"# {report.summary()}")
    raise SystemExit(1 if report.different else 0)


def command(args: argparse.Namespace) -> int:
    """
    Run the battery on a reactor of its own; the exit status is 1 when any
    probe told the proxy from the site.
    """
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    sni = _sni(args)
    try:
        react(lambda reactor: ensureDeferred(_run(reactor, args, sni)))
    except SystemExit as e:
        return int(e.code or 0)
    return 0
