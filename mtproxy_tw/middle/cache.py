"""
The copies of Telegram's middle-proxy lists and proxy secret saved in the
state directory, so that a proxy whose network cannot reach
core.telegram.org still starts with what it had.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger

__all__ = ["CONFIG_FILE", "CONFIG_V6_FILE", "SECRET_FILE", "ConfigCache"]

#: Cached copies in the state directory.
CONFIG_FILE = "proxy-config.txt"
CONFIG_V6_FILE = "proxy-config-v6.txt"
SECRET_FILE = "proxy-secret.bin"

_FILES = {"config": CONFIG_FILE, "config_v6": CONFIG_V6_FILE, "secret": SECRET_FILE}


class ConfigCache:
    """
    One file per kind (``config``, ``config_v6``, ``secret``) in
    ``state_dir``; without a state directory nothing is read or saved.
    """

    log = Logger()

    def __init__(self, state_dir: Path | None) -> None:
        self.state_dir = state_dir

    def path(self, kind: str) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / _FILES[kind]

    def read(self, kind: str) -> bytes | None:
        """
        The saved copy of ``kind``; None when there is none or it cannot be
        read (logged).
        """
        path = self.path(kind)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.log.warn("cannot read {path}: {error}", path=str(path), error=e.strerror)
            return None

    def save(self, kind: str, data: bytes) -> None:
        """
        Replace the saved copy of ``kind`` (written aside, then renamed; mode
        0600); a failure is logged.
        """
        path = self.path(kind)
        if path is None:
            return
        temporary = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except OSError as e:
            self.log.warn("cannot save {path}: {error}", path=str(path), error=e.strerror)
