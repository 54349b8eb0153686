"""
How ``twist mtproxy`` is laid out over processes and hosts: one process
(the default), a parent with ``--workers`` children, and the shared state
of a fleet (``--shared-state``).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mtproxy_tw.config.users import Limits
from mtproxy_tw.config.values import RedisURL
from mtproxy_tw.proxy.socks import Upstreams
from mtproxy_tw.proxy.users import Registry
from mtproxy_tw.services.replaystore import REPLAY_FILE, ReplayStore
from mtproxy_tw.services.usage import UsageService, read_usage
from mtproxy_tw.services.workers import WorkerPool, worker_command
from mtproxy_tw.settings import Settings
from mtproxy_tw.shared.base import SharedState
from mtproxy_tw.shared.local import LocalState
from mtproxy_tw.wire.replay import ReplayCache

__all__ = ["SharedStateService", "build_parent", "fleet_state", "host_id"]

log = Logger()


def host_id(state_dir: Path) -> str:
    """
    This host's name in a fleet: the host name and an id kept in the state
    directory, so a restarted proxy takes back its own place (and two
    proxies with state directories of their own on one machine are two).
    """
    path = state_dir / "host-id"
    try:
        kept = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        kept = ""
    if not kept.isalnum():
        kept = secrets.token_hex(4)
        try:
            path.write_text(kept + "\n", "ascii")
        except OSError as e:
            log.warn("cannot keep the fleet host id in {path}: {e}", path=str(path), e=e)
    return f"{socket.gethostname()}-{kept}"


class SharedStateService(Service):
    """
    Connects a fleet's shared state at start and lets go of it at stop.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    def startService(self) -> None:
        super().startService()
        self.state.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        stopped: Deferred[None] | None = self.state.stop()
        return stopped


def fleet_state(
    reactor: Any, url: RedisURL, local: LocalState, state_dir: Path
) -> tuple[SharedState, IService]:
    """
    The shared state of a fleet on Redis at ``url``, falling back on
    ``local`` while Redis is away, and the service that connects it.
    """
    from mtproxy_tw.shared.redis import RedisState

    host = host_id(state_dir)
    state = RedisState(reactor, url, host, local)
    log.info("shared state: {url} (this host: {host})", url=str(url), host=host)
    return state, SharedStateService(state)


def build_parent(
    options: Any,
    settings: Settings,
    state_path: Path,
    reactor: Any,
    add_metrics: Callable[[MultiService, Any], None],
) -> IService:
    """
    The parent of ``--workers N``: the listeners, the workers, the state
    they share, Telegram's config downloaded once for all of them, and the
    metrics of all of them.

    :param add_metrics: adds the metrics service for the pool, if asked for.
    """
    top = MultiService()
    replay = ReplayCache(reactor, settings.replay_capacity, settings.replay_window)
    local = LocalState(replay, usage=read_usage(state_path))
    shared: SharedState = local
    if options["shared-state"] is not None:
        shared, connector = fleet_state(reactor, options["shared-state"], local, state_path)
        connector.setServiceParent(top)
    ReplayStore(lambda: replay, state_path / REPLAY_FILE, reactor).setServiceParent(top)
    pool = WorkerPool(
        reactor,
        options["workers"],
        options["listen"],
        options.get("listen-named-by") or [f"--listen {d}" for d in options["listen"]],
        worker_command(options.argv),
        shared,
        settings.drain_timeout,
    )
    pool.setServiceParent(top)
    if settings.tls_enabled:
        # The fronted sites are measured once, here, for every worker.
        from mtproxy_tw.fronting.prober import ProfileService
        from mtproxy_tw.proxy.core import ProxyCore

        profiles = ProfileService(ProxyCore(settings, reactor), state_dir=state_path)
        profiles.saved.append(pool.profiles_changed)
        profiles.setServiceParent(top)
        reactor.callWhenRunning(profiles.start_loop)
    middle = options.get("middle")
    if middle is not None:
        from mtproxy_tw.middle_options import telegram_config

        upstreams = (
            Upstreams(reactor, settings.upstream_proxies, settings.connect_timeout)
            if settings.upstream_proxies
            else None
        )
        config, _ = telegram_config(upstreams, middle, state_path, reactor)
        config.downloads.append(pool.hand_down)
        config.setServiceParent(top)
    if options["users"] or options["limits"] is not None:
        # The workers' usage adds up here; the parent keeps the file.
        registry = Registry(options["users"], options["limits"] or Limits())
        usage = UsageService(registry, lambda: (), state_path, reactor, shared=shared)
        usage.setServiceParent(top)
        pool.after_stop.append(usage.final_save)
    add_metrics(top, pool)
    log.info(
        "{count} worker processes (--workers); the parent pid is {pid}",
        count=options["workers"],
        pid=os.getpid(),
    )
    return top
