"""
The state directory: what must survive a restart.
"""

from __future__ import annotations

import os
from pathlib import Path

from mtproxy_tw.wire.secrets import Mode, Secret, SecretError, generate, parse_secret

__all__ = ["StateDir", "StateError", "default_state_dir"]


class StateError(Exception):
    """
    The state directory cannot be used; the message says why.
    """


def default_state_dir() -> Path:
    """
    ``$XDG_DATA_HOME/mtproxy-tw``, else ``~/.local/share/mtproxy-tw``.
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "mtproxy-tw"


class StateDir:
    SECRET_FILE = "secret"

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Whether :meth:`default_secret` made a new secret (the first start).
        self.generated = False

    def prepare(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StateError(f"{self.path} is not writable")

    def kept_secret(self) -> Secret | None:
        """
        The secret generated at an earlier start; ``None`` before the first.
        """
        path = self.path / self.SECRET_FILE
        try:
            text = path.read_text("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read {path}: {e}") from None
        try:
            return parse_secret(text, "default")
        except SecretError as e:
            raise StateError(f"{path} holds no valid secret: {e}") from None

    def default_secret(self) -> Secret:
        """
        The secret used when none is configured: generated once, then kept.
        """
        secret = self.kept_secret()
        if secret is not None:
            return secret
        secret = generate(Mode.SECURE, name="default")
        fd = os.open(self.path / self.SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
        self.generated = True
        return secret
