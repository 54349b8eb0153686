"""
The fronted sites' last measured answers, kept in the state directory, so
that a proxy restarted while a site is down still answers as that site did
rather than with generic sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from twisted.logger import Logger

from mtproxy_tw.fronting.profile import TLSProfile

__all__ = ["PROFILE_FILE", "ProfileStore"]

#: The file's name in the state directory.
PROFILE_FILE = "tls-profiles.json"
_VERSION = 1
#: A larger file is not one this proxy wrote.
_MAX_BYTES = 1 << 20


class ProfileStore:
    """
    One JSON file of :class:`TLSProfile`, by domain.

    A missing file is no profile; one that cannot be read or does not hold
    profiles is no profile and one warning. Saving writes a file aside and
    renames it over the old one; a failed save is one warning until a save
    works again.
    """

    log = Logger()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    def load(self) -> dict[str, TLSProfile]:
        path = self.path
        try:
            with path.open("rb") as f:
                raw = f.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self.log.warn("cannot read {path}: {error}", path=str(path), error=e.strerror)
            return {}
        try:
            if len(raw) > _MAX_BYTES:
                raise ValueError("too large")
            return _decode(json.loads(raw.decode("utf-8")))
        except (ValueError, RecursionError) as e:
            # json's and UTF-8's errors are ValueErrors too.
            self.log.warn(
                "ignoring {path}: not a file of TLS profiles ({error})",
                path=str(path),
                error=str(e) or type(e).__name__,
            )
            return {}

    def save(self, profiles: Mapping[str, TLSProfile]) -> None:
        data = {
            "version": _VERSION,
            "profiles": {domain: profiles[domain].to_json() for domain in sorted(profiles)},
        }
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(temporary, self.path)
        except OSError as e:
            if not self._failing:
                self.log.warn("cannot save {path}: {error}", path=str(self.path), error=e.strerror)
            self._failing = True
            return
        self._failing = False


def _decode(data: object) -> dict[str, TLSProfile]:
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise ValueError("unknown version")
    profiles = data.get("profiles")
    if not isinstance(profiles, dict):
        raise ValueError("no profiles")
    decoded = {}
    for domain, profile in profiles.items():
        try:
            decoded[domain] = TLSProfile.from_json(profile)
        except ValueError as e:
            raise ValueError(f"{domain[:64]!r}: {e}") from None
    return decoded
