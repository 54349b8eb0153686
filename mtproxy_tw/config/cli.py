"""
The command line generated from the option table, and the merge of the
command line, the config file and the defaults (in that order of
precedence).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.python import usage

from mtproxy_tw.config import tomlfile
from mtproxy_tw.config.schema import OPTIONS, Kind, Option

__all__ = ["GeneratedOptions", "resolve"]


def _param_help(spec: Option) -> str:
    shown = spec.shown_default()
    if spec.kind is Kind.PARAM and spec.default is None and shown:
        return f"{spec.help} [default: {shown}]"
    return spec.help


def _appender(spec: Option) -> Callable[[Any, str], None]:
    def opt(self: Any, value: str) -> None:
        self.given_lists.setdefault(spec.name, []).append(value)

    opt.__doc__ = f"{spec.help} (repeatable)"
    opt.__name__ = "opt_" + spec.name.replace("-", "_")
    return opt


class _Generated(type):
    """
    Fills in ``optFlags``, ``optParameters`` and an ``opt_*`` method per
    repeatable option from :data:`OPTIONS`.
    """

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> Any:
        namespace.setdefault(
            "optFlags", [[o.name, o.short, o.help] for o in OPTIONS if o.kind is Kind.FLAG]
        )
        namespace.setdefault(
            "optParameters",
            [
                # The default is applied after the config file is read, so that
                # "not given" can be told from "given as the default".
                [o.name, o.short, None, _param_help(o)]
                for o in OPTIONS
                if o.kind is Kind.PARAM
            ],
        )
        for spec in OPTIONS:
            if spec.kind is Kind.LIST:
                method = _appender(spec)
                namespace.setdefault(method.__name__, method)
        return super().__new__(mcs, name, bases, namespace)


class GeneratedOptions(usage.Options, metaclass=_Generated):  # type: ignore[misc]
    """
    ``usage.Options`` with every option of the table; :meth:`postOptions`
    leaves each one typed under its name, repeatables as lists (or, for
    ``dc``, a dict).
    """

    def __init__(self) -> None:
        super().__init__()
        self.given_lists: dict[str, list[str]] = {}
        #: Options set by the config file, by name (typed).
        self.from_file: dict[str, Any] = {}
        #: Options given on the command line, by name.
        self.given: set[str] = set()

    def postOptions(self) -> None:
        resolve(self)


def resolve(options: Any) -> None:
    """
    Command line over config file over defaults, each value checked.

    :raises usage.UsageError: one line naming the option (``--name: why``) or
        the file and key (``FILE: key: why``).
    """
    if options.get("config"):
        try:
            options.from_file = tomlfile.load(Path(options["config"]))
        except tomlfile.ConfigError as e:
            raise usage.UsageError(f"--config: {e}") from None
    from_file = options.from_file
    for spec in OPTIONS:
        if spec.name == "config":
            continue
        if spec.kind is Kind.FLAG:
            if options[spec.name]:
                options.given.add(spec.name)
            options[spec.name] = bool(options[spec.name]) or bool(from_file.get(spec.name))
            continue
        given = (
            options.given_lists.get(spec.name)
            if spec.kind is Kind.LIST
            else options.get(spec.name)
        )
        if given is not None:
            options.given.add(spec.name)
            try:
                options[spec.name] = spec.parse(given)
            except ValueError as e:
                raise usage.UsageError(f"--{spec.name}: {e}") from None
        elif spec.name in from_file:
            options[spec.name] = from_file[spec.name]
        elif spec.kind is Kind.LIST:
            options[spec.name] = spec.parse([])
        else:
            options[spec.name] = spec.default
