"""
SIGHUP: apply a new set of secrets without dropping other connections,
from ``--secrets-file`` and from the ``--config`` file.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from mtproxy_tw.config import tomlfile
from mtproxy_tw.config.schema import OPTIONS
from mtproxy_tw.config.users import Limits, user_secrets
from mtproxy_tw.services.proxy import ProxyService
from mtproxy_tw.wire.secrets import Secret, SecretError, parse_secrets_text

__all__ = ["ConfigFile", "SecretsReloader", "read_secrets_file"]

#: What SIGHUP applies from the config file; every other key needs a restart.
_LIVE = {o.name for o in OPTIONS if o.live} | {"users", "limits"}


def read_secrets_file(path: Path) -> list[Secret]:
    """
    :raises SecretError: naming the line, or why the file cannot be read.
    """
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cannot read {path}: {e}") from None
    return parse_secrets_text(text)


@dataclasses.dataclass
class ConfigFile:
    """
    The ``--config`` file as the proxy started with it.

    :ivar given: options given on the command line, which the file does not
        override.
    :ivar loaded: the options the file set when last applied.
    """

    path: Path
    given: set[str]
    loaded: dict[str, Any]
    cli_secrets: tuple[Secret, ...] = ()
    cli_secrets_file: Path | None = None

    def reread(self) -> tuple[tuple[Secret, ...] | None, Path | None, list[str]]:
        """
        The file's secrets (``None`` when it sets none), its secrets file, and
        the keys that changed but need a restart.

        :raises tomlfile.ConfigError: the file cannot be used; nothing changes.
        """
        new = tomlfile.load(self.path)
        keys = set(new) | set(self.loaded)
        stale = sorted(
            name
            for name in keys
            if name not in _LIVE
            and name not in self.given
            and new.get(name) != self.loaded.get(name)
        )
        self.loaded = new
        if "secret" in self.given:
            secrets: tuple[Secret, ...] | None = self.cli_secrets
        else:
            secrets = tuple(new["secret"]) if "secret" in new else None
        users = tuple(new.get("users", ()))
        if users:
            secrets = (secrets or ()) + user_secrets(users)
        path = self.cli_secrets_file
        if "secrets-file" not in self.given and "secrets-file" in new:
            path = Path(new["secrets-file"])
        elif "secrets-file" not in self.given:
            path = None
        return secrets, path, stale


class SecretsReloader(Service):
    """
    Re-reads the secrets file on SIGHUP (or :meth:`reload`) and hands the
    proxy its new secret set.

    Connections of secrets that are gone are closed; every other connection
    carries on untouched. A file that does not parse changes nothing.
    """

    log = Logger()

    def __init__(
        self,
        proxy: ProxyService,
        reactor: Any,
        fixed: Sequence[Secret],
        path: Path | None,
        announce: Callable[[Sequence[Secret]], None],
        config: ConfigFile | None = None,
    ) -> None:
        self.config = config
        self.proxy = proxy
        self.reactor = reactor
        self.fixed = tuple(fixed)
        self.path = path
        self.announce = announce
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: object) -> None:
        # Nothing but scheduling happens inside a signal handler.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Apply the secrets file (and the config file) now; return whether
        anything was applied.
        """
        if self.config is not None and not self._reread_config():
            return False
        if self.path is None and self.config is None:
            self.log.info("SIGHUP: no --secrets-file or --config, nothing to reload")
            return False
        loaded: list[Secret] = []
        if self.path is not None:
            try:
                loaded = read_secrets_file(self.path)
            except SecretError as e:
                self.log.error("--secrets-file not reloaded: {error}", error=str(e))
                return False
        names = {s.name for s in self.fixed}
        clash = next((s.name for s in loaded if s.name in names), None)
        if clash is not None:
            self.log.error("--secrets-file not reloaded: {name!r} is also a --secret", name=clash)
            return False
        secrets = self.fixed + tuple(loaded)
        if not secrets:
            self.log.error(
                "--secrets-file not reloaded: {path} lists no secrets and there is no "
                "--secret, so nobody could connect; the {count} secrets in use stay "
                "(stop the proxy to shut everyone out)",
                path=str(self.path),
                count=len(self.proxy.settings.secrets),
            )
            return False
        old = self.proxy.settings
        before = {s.name: s for s in old.secrets}
        after = {s.name: s for s in secrets}
        gone = {name for name, s in before.items() if after.get(name) != s}
        added = [s for s in secrets if before.get(s.name) != s]
        self.proxy.reload(dataclasses.replace(old, secrets=secrets), gone)
        self.log.info(
            "secrets reloaded: {count} in use, {added} new, {gone} removed or changed",
            count=len(secrets),
            added=len(added),
            gone=len(gone),
        )
        file_users = set(before) - {s.name for s in self.fixed}
        if not loaded and file_users:
            self.log.warn(
                "--secrets-file: {path} lists no secrets: all {removed} of its users were "
                "removed; only the {count} --secret ones can connect",
                path=str(self.path),
                removed=len(file_users),
                count=len(self.fixed),
            )
        self.announce(added)
        return True

    def _reread_config(self) -> bool:
        assert self.config is not None
        try:
            secrets, path, stale = self.config.reread()
        except tomlfile.ConfigError as e:
            self.log.error("--config not reloaded: {error}", error=str(e))
            return False
        if stale:
            self.log.warn(
                "--config: {keys} changed in {path}; restart the proxy to apply "
                "(only secret and secrets_file apply on SIGHUP)",
                keys=", ".join(k.replace("-", "_") for k in stale),
                path=str(self.config.path),
            )
        if secrets is not None:
            self.fixed = secrets
        self.path = path
        self._reload_users()
        return True

    def _reload_users(self) -> None:
        """
        New users and limits apply to new connections; the connections of
        users removed or disabled are cut.
        """
        assert self.config is not None
        registry = self.proxy.core.users
        if registry is None:
            return
        loaded = self.config.loaded
        gone = set(
            registry.update(tuple(loaded.get("users", ())), loaded.get("limits") or Limits())
        )
        for client in list(self.proxy.core.clients):
            if client.user in gone:
                client.cut("disabled")
        self.log.info("users reloaded: {count} in the config", count=len(loaded.get("users", ())))
