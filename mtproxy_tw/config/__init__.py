"""
The configuration model: every option once, with its default, help text
and check (:mod:`.schema`); the TOML file that holds the same keys
(:mod:`.tomlfile`) with its users and limits tables (:mod:`.users`); and the
option reference the docs are generated from (:mod:`.reference`).
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """
    The file cannot be used; the message is one line naming file and key.
    """
