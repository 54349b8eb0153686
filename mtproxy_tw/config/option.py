"""
What one option is: :class:`Option` and its :class:`Kind`; the options
themselves are in :mod:`.schema`. It imports no Twisted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtproxy_tw.config import values

__all__ = ["Kind", "Option"]


class Kind(enum.Enum):
    PARAM = "parameter"
    FLAG = "flag"
    LIST = "repeatable"


@dataclass(frozen=True)
class Option:
    """
    One option.

    :ivar parse: turns the value as given into its typed form, raising
        ``ValueError`` with the reason; for a ``LIST`` it takes the list.
    :ivar toml: the TOML value types the file may give (a repeatable
        option's items; a string also stands for a one-item list).
    :ivar shown: how the default reads in the docs, when it is not simply
        the value (``None`` defaults read as nothing).
    :ivar live: applied on SIGHUP; every other key needs a restart.
    """

    name: str
    help: str
    kind: Kind = Kind.PARAM
    default: Any = None
    parse: Callable[[Any], Any] = values.text
    toml: tuple[type, ...] = (str,)
    metavar: str = ""
    shown: str | None = None
    section: str = "proxy"
    live: bool = False
    short: str | None = None

    @property
    def key(self) -> str:
        """
        The config-file key.
        """
        return self.name.replace("-", "_")

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.kind is not Kind.PARAM or self.default is None:
            return ""
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)
