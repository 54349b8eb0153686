"""
Every option of ``twist mtproxy``, once: its name, kind, default, help text
and check.

The command line (:mod:`mtproxy_tw.tap`) is generated from this table, the
config file (:mod:`.tomlfile`) accepts the same names with ``_`` for ``-``,
the runtime settings take their defaults from it, and the option reference
in README.md and docs/usage.rst is generated from it
(:mod:`.reference`). It imports no Twisted.
"""

from __future__ import annotations

from typing import Any

from mtproxy_tw.config import values
from mtproxy_tw.config.option import Kind, Option
from mtproxy_tw.wire.secrets import Mode

__all__ = ["OPTIONS", "Kind", "Option", "default", "option"]


_NUMBER = (int, float)
_WHOLE = (int,)

OPTIONS: tuple[Option, ...] = (
    # -- where it listens, and what it is
    Option(
        "config",
        "A TOML file of options (the keys are the long options with _ for -); "
        "options given on the command line win. Re-read on SIGHUP.",
        metavar="FILE",
        section="proxy",
    ),
    Option(
        "port",
        "TCP port to listen on, all IPv4 interfaces.",
        parse=values.port,
        toml=_WHOLE,
        metavar="N",
        shown="443",
        short="p",
    ),
    Option(
        "listen",
        "A Twisted endpoint to listen on instead of --port, e.g. tcp6:443, "
        "tcp:8443:interface=127.0.0.1, systemd:domain=INET:index=0, haproxy:tcp:443.",
        kind=Kind.LIST,
        parse=values.listen,
        metavar="ENDPOINT",
    ),
    Option(
        "secret",
        "[NAME=]SECRET: 32 hex (classic), dd+32 hex (secure) or ee+32 hex+hex(domain) (fake TLS).",
        kind=Kind.LIST,
        parse=values.secrets,
        metavar="SECRET",
        live=True,
    ),
    Option(
        "secrets-file",
        "File of [NAME=]SECRET lines (# comments), re-read on SIGHUP; an empty one "
        "refuses the start.",
        metavar="FILE",
        live=True,
    ),
    Option(
        "state-dir",
        "Directory for state kept across restarts (a generated secret, Telegram's config).",
        metavar="DIR",
        shown="~/.local/share/mtproxy-tw",
    ),
    Option(
        "public-host",
        "Host name or address put in the links, with the port the apps connect to when "
        "that is not the listening port (HOST:PORT, [IPv6]:PORT).",
        parse=values.public_host,
        metavar="HOST[:PORT]",
    ),
    Option(
        "modes",
        "Client modes accepted: classic, secure, tls (comma separated).",
        default=frozenset(Mode),
        shown="classic,secure,tls",
        parse=values.modes,
        toml=(str, list),
        metavar="LIST",
    ),
    # -- Telegram's data centres
    Option(
        "dc",
        "ID=HOST:PORT overrides one DC's address, e.g. -2=[::1]:443 for a media DC.",
        kind=Kind.LIST,
        parse=values.dc_overrides,
        metavar="ID=HOST:PORT",
    ),
    Option("prefer-ipv6", "Connect to Telegram over IPv6.", kind=Kind.FLAG, toml=(bool,)),
    Option(
        "no-fast-mode",
        "Re-encrypt the download direction instead of letting the DC encrypt for the client.",
        kind=Kind.FLAG,
        toml=(bool,),
    ),
    Option(
        "no-splice",
        "Copy downloads through the process instead of splicing them socket to socket "
        "(direct mode, fast mode, classic and dd clients on plain TCP listeners, Linux).",
        kind=Kind.FLAG,
        toml=(bool,),
    ),
    Option(
        "workers",
        "Worker processes accepting on the same listeners, children of this one; "
        "the replay cache, limits, usage and metrics hold across them. auto: one per "
        "usable core.",
        default=1,
        parse=values.workers,
        toml=(int, str),
        metavar="N",
    ),
    Option(
        "shared-state",
        "redis://[:PASSWORD@]HOST:PORT/DB shared by a fleet of proxies: the replay cache "
        "and the users' connections, addresses and quotas. Without it the state is this "
        "host's own; with Redis down, the proxy keeps serving on it and catches up later.",
        parse=values.shared_state,
        metavar="URL",
    ),
    Option(
        "upstream-proxy",
        "socks5://[USER:PASS@]HOST:PORT every connection toward Telegram goes through "
        "(DCs, middle proxies, the IP look-up); several are used in turn, a failed one "
        "skipped with backoff. The mask host is always reached directly.",
        kind=Kind.LIST,
        parse=values.upstream_proxies,
        metavar="URL",
    ),
    Option(
        "upstream-proxy-for-config",
        "Download Telegram's middle-proxy config and secret through --upstream-proxy too.",
        kind=Kind.FLAG,
        toml=(bool,),
    ),
    # -- limits and timeouts
    Option(
        "handshake-timeout",
        "Seconds a client has to complete its handshake.",
        default=10.0,
        parse=values.number(0, above=True),
        toml=_NUMBER,
        metavar="S",
        section="limits",
    ),
    Option(
        "idle-timeout",
        "Seconds without traffic either way before a connection is closed.",
        default=300.0,
        parse=values.number(0, above=True),
        toml=_NUMBER,
        metavar="S",
        section="limits",
    ),
    Option(
        "connect-timeout",
        "Seconds to connect to Telegram.",
        default=10.0,
        parse=values.number(0, above=True),
        toml=_NUMBER,
        metavar="S",
        section="limits",
    ),
    Option(
        "max-connections",
        "Most client connections at once; when full, the oldest connection still in "
        "its handshake makes room. auto: as many as the open-file limit holds (two "
        "descriptors per direct client, one per middle-proxy client, some reserved).",
        parse=values.auto_or(values.whole(1)),
        toml=(int, str),
        metavar="N",
        shown="from the open-file limit",
        section="limits",
    ),
    Option(
        "max-handshakes",
        "Most connections in their handshake at once; a new one replaces the oldest.",
        parse=values.whole(1),
        toml=_WHOLE,
        metavar="N",
        shown="max-connections / 4, at least 16",
        section="limits",
    ),
    Option(
        "replay-capacity",
        "Handshakes remembered against replays.",
        default=65536,
        parse=values.whole(1),
        toml=_WHOLE,
        metavar="N",
        section="limits",
    ),
    Option(
        "replay-window",
        "Seconds a handshake is remembered (at least twice --tls-time-skew).",
        default=600.0,
        parse=values.number(0, above=True),
        toml=_NUMBER,
        metavar="S",
        section="limits",
    ),
    Option(
        "drain-timeout",
        "On SIGTERM, seconds busy connections get to finish before they are cut.",
        default=5.0,
        parse=values.number(0),
        toml=_NUMBER,
        metavar="S",
        section="limits",
    ),
    Option(
        "stats-interval",
        "Seconds between one-line counter summaries in the log (0: none).",
        default=600.0,
        parse=values.number(0),
        toml=_NUMBER,
        metavar="S",
        section="limits",
    ),
    # -- fake TLS and fronting
    Option(
        "tls-domain",
        "Another fake-TLS domain for the ee secrets (the one inside each ee secret is "
        "always served).",
        kind=Kind.LIST,
        parse=values.domains,
        metavar="DOMAIN",
        section="fronting",
    ),
    Option(
        "tls-time-skew",
        "Seconds a fake-TLS client's clock may be off.",
        default=300.0,
        parse=values.number(0, above=True),
        toml=_NUMBER,
        metavar="S",
        section="fronting",
    ),
    Option(
        "mask-host",
        "HOST[:PORT] failed handshakes are fronted to.",
        parse=values.host_port,
        metavar="HOST[:PORT]",
        shown="the SNI's domain on 443",
        section="fronting",
    ),
    Option(
        "mask",
        "Front bad classic/dd handshakes and plain HTTP too (the default when an ee "
        "secret is set); fake-TLS failures are always fronted.",
        kind=Kind.FLAG,
        toml=(bool,),
        section="fronting",
    ),
    Option(
        "no-mask",
        "Close bad classic/dd handshakes instead of fronting them.",
        kind=Kind.FLAG,
        toml=(bool,),
        section="fronting",
    ),
    Option(
        "mask-proxy-protocol",
        "Send a PROXY protocol v1 header to the mask host.",
        kind=Kind.FLAG,
        toml=(bool,),
        section="fronting",
    ),
    Option(
        "mss-clamp",
        "Announce a TCP MSS of BYTES (88 to 32767) on the listeners, so clients' kernels "
        "split the ClientHello over several segments and a DPI that reads only the first "
        "misses it. Costs throughput: every segment of a client's connection, both ways, "
        "carries at most BYTES. Off by default.",
        parse=values.whole(88, 32767),
        toml=_WHOLE,
        metavar="BYTES",
        section="fronting",
    ),
    Option(
        "split-server-hello",
        "Send the fake-TLS ServerHello and its ChangeCipherSpec and ApplicationData in "
        "separate TCP segments. Costs a packet per handshake, and the fronted site sends "
        "its flight in one write, so segments then differ from the site's.",
        kind=Kind.FLAG,
        toml=(bool,),
        section="fronting",
    ),
    # -- middle-proxy mode
    Option(
        "ad-tag",
        "Ad tag from @MTProxybot (32 hex digits); turns middle-proxy mode on.",
        parse=values.ad_tag,
        metavar="HEX",
        section="middle",
    ),
    Option(
        "upstream",
        "middle, direct, or mtproxy://HOST:PORT?secret=SECRET: how clients reach Telegram.",
        parse=values.upstream,
        metavar="KIND",
        shown="middle with --ad-tag, else direct",
        section="middle",
    ),
    Option(
        "nat-ip",
        "The proxy's public IPv4 or IPv6 address as the middle proxies see it (one of "
        "each at most).",
        kind=Kind.LIST,
        parse=values.nat_ips,
        metavar="ADDRESS",
        shown="",
        section="middle",
    ),
    Option(
        "ip-lookup-url",
        "URL answering the proxy's public address, when it is behind NAT and no "
        "--nat-ip is given.",
        default="https://icanhazip.com/",
        parse=values.url,
        metavar="URL",
        section="middle",
    ),
    Option(
        "proxy-config-url",
        "Where to fetch the IPv4 middle proxies.",
        default="https://core.telegram.org/getProxyConfig",
        parse=values.url,
        metavar="URL",
        section="middle",
    ),
    Option(
        "proxy-config-v6-url",
        "Where to fetch the IPv6 middle proxies.",
        default="https://core.telegram.org/getProxyConfigV6",
        parse=values.url,
        metavar="URL",
        section="middle",
    ),
    Option(
        "proxy-secret-url",
        "Where to fetch the middle-proxy secret.",
        default="https://core.telegram.org/getProxySecret",
        parse=values.url,
        metavar="URL",
        section="middle",
    ),
    Option(
        "config-refresh",
        "Seconds between downloads of the middle-proxy config and secret.",
        default=3600.0,
        parse=values.number(1),
        toml=_NUMBER,
        metavar="S",
        section="middle",
    ),
    Option(
        "direct-fallback",
        "When every middle proxy of a DC is unreachable, carry its clients to the DC "
        "directly (without the ad tag); always on without --ad-tag.",
        kind=Kind.FLAG,
        toml=(bool,),
        section="middle",
    ),
    Option(
        "middle-pool-min",
        "Connections kept to the middle proxies of each DC in use.",
        default=2,
        parse=values.whole(1, 1000),
        toml=_WHOLE,
        metavar="N",
        section="middle",
    ),
    Option(
        "middle-pool-max",
        "Most connections to the middle proxies of one DC.",
        default=8,
        parse=values.whole(1, 1000),
        toml=_WHOLE,
        metavar="N",
        section="middle",
    ),
    Option(
        "middle-clients-per-connection",
        "Clients per middle-proxy connection before the pool opens another.",
        default=300,
        parse=values.whole(1, 1 << 20),
        toml=_WHOLE,
        metavar="N",
        section="middle",
    ),
    Option(
        "client-buffer-cap",
        "Bytes queued toward one slow client in middle-proxy mode before it alone is "
        "closed (suffixes K, M, G; at least 64K).",
        default=8 << 20,
        parse=values.size_at_least(64 << 10),
        toml=(int, str),
        metavar="SIZE",
        shown="8M",
        section="middle",
    ),
    # -- what operators watch
    Option(
        "metrics",
        "An endpoint serving Prometheus metrics at /metrics, e.g. tcp:9100:interface=127.0.0.1.",
        metavar="ENDPOINT",
        section="operators",
    ),
    Option(
        "metrics-allow",
        "CIDR allowed to scrape --metrics; others get 403.",
        kind=Kind.LIST,
        parse=values.networks,
        metavar="CIDR",
        shown="127.0.0.0/8 and ::1",
        section="operators",
    ),
)

_BY_NAME = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    return _BY_NAME[name]


def default(name: str) -> Any:
    """
    The default of an option, for the runtime settings' fields.
    """
    return _BY_NAME[name].default
