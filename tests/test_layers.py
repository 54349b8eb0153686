"""
The package's shape: no import cycles, the codecs under ``wire/`` never
import Twisted, and every package is shipped.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import mtproxy_tw

ROOT = Path(mtproxy_tw.__file__).parent
#: Modules allowed past the size guideline, each with the reason.
LONG_MODULES: dict[str, str] = {
    "mtproxy_tw.proxy.client": (
        "the client's lifecycle machine: every state's handler and every "
        "transition in one place, so that a state change can be read whole"
    ),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """
    Modules ``path`` imports when it runs (``TYPE_CHECKING`` blocks and
    imports inside functions excluded).
    """
    tree = ast.parse(path.read_text())
    package = (
        _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    )
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - sub.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in sub.names)
    return found


def _path_of(module: str) -> Path:
    base = ROOT.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {
        name: {m for m in _runtime_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


class LayerTests(SynchronousTestCase):
    def test_no_import_cycles(self) -> None:
        graph = _graph()
        done: set[str] = set()

        def visit(name: str, stack: list[str]) -> None:
            if name in stack:
                cycle = [*stack[stack.index(name) :], name]
                self.fail("import cycle: " + " -> ".join(cycle))
            if name in done:
                return
            for child in sorted(graph[name]):
                # A package's __init__ importing its own modules is no cycle.
                visit(child, [*stack, name])
            done.add(name)

        for name in sorted(graph):
            visit(name, [])

    def test_wire_never_imports_twisted(self) -> None:
        graph = _graph()
        for path in (ROOT / "wire").rglob("*.py"):
            name = _module_name(path)
            seen: set[str] = set()
            todo = [name]
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.add(current)
                direct = _runtime_imports(_path_of(current))
                twisted = sorted(
                    m for m in direct if m.split(".")[0] in ("twisted", "zope", "treq")
                )
                self.assertEqual(twisted, [], f"{current} (reached from {name})")
                todo.extend(graph.get(current, ()))

    def test_modules_stay_small(self) -> None:
        for path in ROOT.rglob("*.py"):
            name = _module_name(path)
            lines = len(path.read_text().splitlines())
            if name not in LONG_MODULES:
                self.assertLessEqual(lines, 450, f"{name} has {lines} lines")

    def test_every_package_is_shipped(self) -> None:
        config = configparser.ConfigParser()
        config.read(ROOT.parent / "setup.cfg")
        listed = set(config["options"]["packages"].split())
        packages = {_module_name(p) for p in ROOT.rglob("__init__.py")}
        self.assertEqual(packages - listed, set())
