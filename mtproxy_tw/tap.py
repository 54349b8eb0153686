"""
``twist mtproxy``: command-line options and the service they build.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from mtproxy_tw import __version__
from mtproxy_tw.config.cli import GeneratedOptions, resolve
from mtproxy_tw.config.users import Limits
from mtproxy_tw.links import endpoint_address, is_specific, targets, user_links
from mtproxy_tw.middle_options import build_middle, middle_settings_from_options
from mtproxy_tw.processes import build_parent, fleet_state
from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.services.descriptors import MIDDLE_POOL_DCS
from mtproxy_tw.services.metrics import MetricsService
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.services.reload import ConfigFile, SecretsReloader, read_secrets_file
from mtproxy_tw.services.state import StateDir, StateError, default_state_dir
from mtproxy_tw.services.usage import UsageService
from mtproxy_tw.services.worker import WorkerChannel, WorkerSpec, worker_endpoints
from mtproxy_tw.settings import Settings
from mtproxy_tw.shared.amp import RemoteState
from mtproxy_tw.shared.local import LocalState
from mtproxy_tw.wire.chain import BackProxy
from mtproxy_tw.wire.dcs import Address, DCTable
from mtproxy_tw.wire.secrets import Secret, SecretError

__all__ = ["Options", "makeService"]

log = Logger()


class Options(GeneratedOptions):
    """
    Parsing and validation only; :func:`makeService` builds from the result.

    The options themselves come from :data:`mtproxy_tw.config.schema.OPTIONS`;
    what is checked here is how they fit together.
    """

    synopsis = "[options]"
    longdesc = (
        "A Telegram MTProto proxy. Clients connect with a secret (classic, dd or ee) and "
        "are carried to Telegram's data centres. Every option can also be set in a TOML "
        "file given with --config."
    )

    #: The options as given, for starting workers with the same ones.
    argv: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        import sys

        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        import sys

        sys.stdout.write(f"mtproxy-tw {__version__}\n")
        raise SystemExit(0)

    def postOptions(self) -> None:
        resolve(self)
        listen_given = bool(self["listen"])
        if self["port"] is not None and listen_given:
            raise usage.UsageError("--port: give either --port or --listen, not both")
        port = self["port"] if self["port"] is not None else 443
        # How the operator asked for each listener, for the errors about it.
        self["listen-named-by"] = [f"--listen {d}" for d in self["listen"]]
        if not listen_given:
            self["listen"] = [f"tcp:{port}"]
            default = " (the default)" if self["port"] is None else ""
            self["listen-named-by"] = [f"--port {port}{default}"]
        for description in self["listen"]:
            if description.startswith("systemd:"):
                continue  # its sockets exist only when systemd starts us
            try:
                serverFromString(None, description)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise usage.UsageError(
                    f"--listen: {description!r} is not an endpoint Twisted knows ({e})"
                ) from None
        if self["mask"] and self["no-mask"]:
            raise usage.UsageError("--mask: give either --mask or --no-mask")
        self["tls-domains"] = self["tls-domain"]
        self["secrets"] = list(self["secret"])
        # Named users of the config file: their secrets are named after them.
        self["users"] = tuple(self.from_file.get("users", ()))
        self["limits"] = self.from_file.get("limits")
        names = {s.name for s in self["secrets"]}
        for user in self["users"]:
            for secret in user.secrets:
                if secret.name in names:
                    raise usage.UsageError(
                        f"--config: users.{user.name}: the name is also a --secret"
                    )
                self["secrets"].append(secret)
        self["fixed-secrets"] = list(self["secrets"])
        if self["secrets-file"] is not None:
            self["secrets-file"] = Path(self["secrets-file"])
            self["secrets"].extend(self._file_secrets(self["secrets-file"]))
        modes = self["modes"]
        for secret in self["secrets"]:
            if not secret.admits() & modes:
                raise usage.UsageError(
                    f"--secret: {secret.name} is a {secret.kind.value} secret, "
                    "which --modes does not accept"
                )
        self["state-dir"] = Path(self["state-dir"]) if self["state-dir"] else default_state_dir()
        self["middle"] = middle_settings_from_options(self)

    def _file_secrets(self, path: Path) -> list[Secret]:
        try:
            loaded = read_secrets_file(path)
        except SecretError as e:
            raise usage.UsageError(f"--secrets-file: {e}") from None
        if not loaded and not self["secrets"]:
            # An emptied file means everyone was revoked, not "generate one".
            raise usage.UsageError(
                f"--secrets-file: {path} lists no secrets and no --secret "
                "is given; refusing to start with a generated default secret instead "
                "(add a line to the file, or give --secret)"
            )
        names = {s.name for s in self["secrets"]}
        for secret in loaded:
            if secret.name in names:
                raise usage.UsageError(
                    f"--secrets-file: the name {secret.name!r} is also a --secret"
                )
        return loaded


class _LinkAnnouncer(Service):
    """
    Logs every secret's links once the proxy is listening, and those of
    secrets added later; ``mtproxy-tw links`` prints the same ones.
    """

    def __init__(
        self, proxy: ProxyService, public_host: str | None, tls_domains: Sequence[str] = ()
    ) -> None:
        self.proxy = proxy
        self.public_host = public_host
        self.tls_domains = tuple(tls_domains)
        self.targets: list[tuple[str, int]] = []

    def startService(self) -> None:
        super().startService()
        self.proxy.listening().addCallback(self._listening).addErrback(
            lambda f: log.failure("listening failed", f)
        )

    def _listening(self, ports: list[Any]) -> None:
        found: list[tuple[str | None, int | None]] = []
        for description, port in zip(self.proxy.listen, ports, strict=False):
            host, number = endpoint_address(description)
            bound = port.getHost() if hasattr(port, "getHost") else None
            if isinstance(bound, IPv4Address | IPv6Address):
                number = bound.port
                host = bound.host if is_specific(bound.host) else host
            found.append((host, number))
        self.targets = targets(self.public_host, found)
        if self.public_host is None:
            log.warn(
                "no --public-host given: the links use {host}, which may not be reachable "
                "from the internet",
                host=", ".join(host for host, _ in self.targets),
            )
        self.announce(self.proxy.settings.secrets)

    def announce(self, secrets: Sequence[Secret]) -> None:
        for host, port in self.targets:
            for secret in secrets:
                for link in user_links(secret, host, port, self.tls_domains):
                    log.info("{user}: {link}", user=secret.name, link=link)


def settings_from_options(options: Options, secrets: tuple[Secret, ...]) -> Settings:
    overrides: dict[int, Address] = dict(options["dc"])
    return Settings(
        secrets=secrets,
        modes=options["modes"],
        dcs=DCTable(overrides, prefer_ipv6=bool(options["prefer-ipv6"])),
        fast_mode=not options["no-fast-mode"],
        splice=not options["no-splice"],
        upstream=back if isinstance(back := options["upstream"], BackProxy) else None,
        handshake_timeout=options["handshake-timeout"],
        idle_timeout=options["idle-timeout"],
        connect_timeout=options["connect-timeout"],
        max_connections=options["max-connections"],
        max_handshakes=options["max-handshakes"],
        replay_capacity=options["replay-capacity"],
        drain_timeout=options["drain-timeout"],
        state_dir=options["state-dir"],
        extra_tls_domains=frozenset(options["tls-domains"]),
        mask=True if options["mask"] else False if options["no-mask"] else None,
        mask_host=options["mask-host"],
        mask_proxy_protocol=bool(options["mask-proxy-protocol"]),
        mss_clamp=options["mss-clamp"],
        split_server_hello=bool(options["split-server-hello"]),
        tls_time_skew=options["tls-time-skew"],
        stats_interval=options["stats-interval"],
        upstream_proxies=tuple(options.get("upstream-proxy") or ()),
        # A replayed hello must be caught for as long as its timestamp is accepted.
        replay_window=max(options["replay-window"], 2 * options["tls-time-skew"]),
    )


def _log_users(users: Sequence[Any]) -> None:
    for user in users:
        limits = [
            f"{key}={value}"
            for key, value in (
                ("max_connections", user.max_connections),
                ("max_ips", user.max_ips),
                ("quota", user.quota),
                ("expires", user.expires),
            )
            if value is not None
        ]
        log.info(
            "user {user}: {count} secret(s), {state}, {limits}",
            user=user.name,
            count=len(user.secrets),
            state="enabled" if user.enabled else "disabled",
            limits=", ".join(limits) or "no limits",
        )


def _worker_metrics(proxy: ProxyService, reactor: Any) -> Any:
    """
    A worker's metrics as Prometheus text, for its parent to add up.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    from mtproxy_tw.services.collector import ProxyCollector

    registry = CollectorRegistry()
    registry.register(ProxyCollector(proxy, reactor))
    ProcessCollector(namespace="mtproxy", registry=registry)
    return lambda: generate_latest(registry)


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the proxy from parsed options.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    state = StateDir(options["state-dir"])
    secrets = tuple(options["secrets"])
    try:
        state.prepare()
        if not secrets:
            secrets = (state.default_secret(),)
    except StateError as e:
        # Raised after option parsing: one line on stderr, not a traceback.
        raise SystemExit(f"--state-dir: {e}") from None
    if not any(secret.admits() & options["modes"] for secret in secrets):
        raise SystemExit(
            "--modes: none of the secrets can be used in these modes "
            "(tls needs an ee secret: --secret ee...)"
        )
    log.info("state directory: {path}", path=str(state.path))
    if not options["secrets"]:
        kept = str(state.path / state.SECRET_FILE)
        if state.generated:
            log.warn(
                "no --secret given: generated a new secret and kept it in {path}, so its "
                "links stay the same at every start; `mtproxy-tw links` with these "
                "options prints them again",
                path=kept,
            )
        else:
            log.info("no --secret given: using the secret kept in {path}", path=kept)
    settings = settings_from_options(options, secrets)
    if settings.upstream_proxies:
        log.info(
            "Telegram is reached through the upstream proxy {proxies}",
            proxies=", ".join(p.label for p in settings.upstream_proxies),
        )
    try:
        spec = WorkerSpec.from_environment()
    except ValueError as e:
        raise SystemExit(f"--workers: this worker was started wrongly ({e})") from None
    if spec is None and options["workers"] > 1:

        def add_metrics(top: MultiService, pool: Any) -> None:
            if options["metrics"]:
                MetricsService(
                    None, options["metrics"], options["metrics-allow"], reactor, gather=pool.gather
                ).setServiceParent(top)

        return build_parent(options, settings, state.path, reactor, add_metrics)
    top = MultiService()
    proxy = ProxyService(
        settings,
        reactor,
        options["listen"],
        options.get("listen-named-by"),
        endpoints=worker_endpoints(reactor, spec, options["listen"]) if spec else None,
        keep_replay=spec is None,
        measure_sites=spec is None,
    )
    remote: RemoteState | None = None
    if spec is not None:
        proxy.label = f"worker {spec.index}: "
        # Before the proxy: the channel is up when the first client comes.
        remote = RemoteState()
        remote.on_profiles = proxy.profiles.reload
        proxy.core.shared = remote
        WorkerChannel(reactor, remote, spec.index).setServiceParent(top)
    elif options["shared-state"] is not None:
        state_of_fleet, connector = fleet_state(
            reactor, options["shared-state"], cast(LocalState, proxy.core.shared), state.path
        )
        proxy.core.shared = state_of_fleet
        connector.setServiceParent(top)
    proxy.setServiceParent(top)
    if options.get("middle") is not None:
        middle, upstream = build_middle(
            proxy.core, options["middle"], state.path, reactor, fetching=remote is None
        )
        if remote is not None:
            remote.middle_config = cast(Any, upstream).config.take
        proxy.core.middle = upstream
        proxy.pool_descriptors = MIDDLE_POOL_DCS * options["middle"].pool_max
        middle.setServiceParent(top)
    if options["users"] or options["limits"] is not None:
        registry = Registry(options["users"], options["limits"] or Limits())
        proxy.core.users = registry
        if spec is None or spec.index == 1:
            _log_users(options["users"])

        def live() -> Any:
            return (
                (c, c.user, c.bytes_in + c.bytes_out)
                for c in list(proxy.core.clients)
                if c.user is not None
            )

        UsageService(
            registry,
            live,
            state.path,
            reactor,
            shared=proxy.core.shared if proxy.core.shared.distributed else None,
            saving=spec is None,
        ).setServiceParent(top)
    announcer = _LinkAnnouncer(proxy, options["public-host"], options["tls-domains"])
    if spec is None or spec.index == 1:  # once, not once per worker
        announcer.setServiceParent(top)
    if remote is not None:
        remote.metrics_text = _worker_metrics(proxy, reactor)
    elif options["metrics"]:
        metrics = MetricsService(proxy, options["metrics"], options["metrics-allow"], reactor)
        metrics.setServiceParent(top)
    fixed = options["fixed-secrets"] or ([] if options["secrets-file"] else list(secrets))
    config = None
    if options.get("config"):
        config = ConfigFile(
            Path(options["config"]),
            set(options.given),
            dict(options.from_file),
            tuple(options["secret"]) if "secret" in options.given else (),
            options["secrets-file"] if "secrets-file" in options.given else None,
        )
    SecretsReloader(
        proxy, reactor, fixed, options["secrets-file"], announcer.announce, config
    ).setServiceParent(top)
    return top
