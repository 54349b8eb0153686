"""
The option reference in README.md and docs/usage.rst, generated from
:data:`~mtproxy_tw.config.schema.OPTIONS` so the docs, ``--help`` and the
config file can never disagree.

``python -m mtproxy_tw.config.reference README.md docs/usage.rst`` rewrites
the text between the markers in each file; a test checks they are current.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from mtproxy_tw.config.schema import OPTIONS, Kind, Option

__all__ = ["markdown", "restructured", "update"]

SECTIONS = {
    "proxy": "Listening, secrets and Telegram's data centres",
    "limits": "Limits and timeouts",
    "fronting": "Fake TLS and fronting",
    "middle": "Middle-proxy mode (ad tag)",
    "operators": "Metrics",
}

_MD = ("<!-- options: generated from mtproxy_tw/config/schema.py -->", "<!-- options: end -->")
_RST = (".. options: generated from mtproxy_tw/config/schema.py", ".. options: end")


def _usage(spec: Option) -> str:
    if spec.kind is Kind.FLAG:
        return f"--{spec.name}"
    return f"--{spec.name} {spec.metavar or 'VALUE'}"


def _key(spec: Option) -> str:
    if spec.kind is Kind.FLAG:
        return f"{spec.key} = true"
    if spec.kind is Kind.LIST:
        return f"{spec.key} = [...]"
    return spec.key


def _meaning(spec: Option) -> str:
    text = spec.help
    if spec.kind is Kind.LIST:
        text += " Repeatable."
    if spec.live:
        text += " Applied on SIGHUP."
    shown = spec.shown_default()
    if shown:
        text += f" Default: {shown}."
    return text


def markdown() -> str:
    lines: list[str] = []
    for section, title in SECTIONS.items():
        lines += [f"#### {title}", "", "| option | config key | meaning |", "| --- | --- | --- |"]
        for spec in OPTIONS:
            if spec.section == section:
                meaning = _meaning(spec).replace("|", "\\|")
                key = "" if spec.name == "config" else f"`{_key(spec)}`"
                lines.append(f"| `{_usage(spec)}` | {key} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def restructured() -> str:
    lines: list[str] = []
    for section, title in SECTIONS.items():
        lines += [title, "~" * len(title), ""]
        for spec in OPTIONS:
            if spec.section != section:
                continue
            key = "" if spec.name == "config" else f" (``{_key(spec)}``)"
            lines.append(f"``{_usage(spec)}``{key}")
            wrapped = textwrap.wrap(_meaning(spec), 72)
            lines += ["    " + re.sub(r"(--[a-z0-9-]+)", r"``\1``", w) for w in wrapped]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _between(text: str, begin: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {begin!r} .. {end!r} not found")
    return pattern.sub(lambda m: f"{begin}\n\n{body}\n{end}", text)


def render(path: Path) -> str:
    """
    ``path``'s text with its generated part brought up to date.
    """
    text = path.read_text("utf-8")
    if path.suffix == ".md":
        return _between(text, *_MD, markdown())
    return _between(text, *_RST, restructured())


def update(paths: list[Path]) -> None:
    for path in paths:
        path.write_text(render(path), "utf-8")


if __name__ == "__main__":  # pragma: no cover
    update([Path(p) for p in sys.argv[1:]])
