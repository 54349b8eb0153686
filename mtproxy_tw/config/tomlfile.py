"""
The config file: TOML whose keys are the long options with ``_`` for ``-``.

::

    port = 443
    secret = ["alice=dd0123...", "bob=ee4567..."]
    listen = ["tcp6:443"]
    dc = ["2=127.0.0.1:443"]
    handshake_timeout = 10
    mask = true

The ``[users.NAME]`` and ``[limits]`` tables are described in
:mod:`mtproxy_tw.config.users`.

An unknown key, a value of the wrong type or a bad value is refused with
one line naming the file, the key and why.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtproxy_tw.config import ConfigError
from mtproxy_tw.config.schema import OPTIONS, Kind, Option
from mtproxy_tw.config.users import parse_limits, parse_users

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "load", "parse_text"]

_KEYS = {o.key: o for o in OPTIONS if o.name != "config"}

#: The tables that are not options, each parsed whole (:mod:`.users`):
#: ``users`` gives a tuple of :class:`~.users.UserSpec`, ``limits`` a
#: :class:`~.users.Limits`.
_TABLES: dict[str, Callable[[Any, str], Any]] = {"users": parse_users, "limits": parse_limits}


def load(path: Path) -> dict[str, Any]:
    """
    The options the file at ``path`` sets, by option name, already checked
    and typed.
    """
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    return parse_text(text, str(path))


def raw(text: str, where: str) -> dict[str, Any]:
    """
    The file's keys as TOML values, by option name, checked for names and
    types only.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    found: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TABLES:
            found[key] = _TABLES[key](value, where)
            continue
        spec = _KEYS.get(key)
        if spec is None:
            hint = f" (did you mean {key.replace('-', '_')}?)" if "-" in key else ""
            raise ConfigError(f"{where}: {key}: not an option{hint}")
        found[spec.name] = _typed(spec, value, where)
    return found


def parse_text(text: str, where: str = "<config>") -> dict[str, Any]:
    """
    Like :func:`load`, for the file's text.
    """
    found = raw(text, where)
    return {
        name: value if name in _TABLES else check(name, value, where)
        for name, value in found.items()
    }


def check(name: str, value: Any, where: str) -> Any:
    """
    ``value`` of option ``name``, checked and typed.
    """
    spec = _option(name)
    if spec.kind is Kind.FLAG:
        return value
    try:
        return spec.parse(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {spec.key}: {e}") from None


def _option(name: str) -> Option:
    for spec in OPTIONS:
        if spec.name == name:
            return spec
    raise KeyError(name)


def _typed(spec: Option, value: Any, where: str) -> Any:
    def kinds(types: tuple[type, ...]) -> str:
        names = {bool: "true or false", int: "a whole number", float: "a number"}
        names.update({str: "a string", list: "an array"})
        return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))

    def fits(item: Any, types: tuple[type, ...]) -> bool:
        # TOML's booleans are not numbers, whatever Python thinks.
        if isinstance(item, bool):
            return bool in types
        return isinstance(item, types)

    if spec.kind is Kind.LIST:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(fits(i, spec.toml) for i in items):
            plural = {str: "strings", int: "whole numbers", float: "numbers", list: "arrays"}
            what = " or ".join(plural.get(t, t.__name__) for t in spec.toml)
            raise ConfigError(f"{where}: {spec.key}: must be an array of {what}")
        return items
    if not fits(value, spec.toml):
        raise ConfigError(f"{where}: {spec.key}: must be {kinds(spec.toml)}")
    return value
