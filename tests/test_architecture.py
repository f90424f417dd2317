"""The rooms keep their shape: no import circle, arrows one way (ui/cli -> studio -> engine -> models; media,
saliency and messages are leaves), gradio only in the page, and no module too long to read. Read from the source
with ``ast`` (imports inside functions count too), so nothing is imported here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loopui"
MAX_LINES = 500
# A room may import the rooms of a lower rank only (leaves: 0). loopui.testing is for tests, benches and scripts.
RANK = {"messages": 0, "media": 0, "saliency": 1, "models": 2, "engine": 3, "studio": 4, "cli": 5, "ui": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The loopui modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            found.update(subs or ([target] if target in modules else []))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_import_circle(graph):
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])


def test_arrows_point_one_way(graph):
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if _room(a) in RANK and _room(b) in RANK and _room(a) != _room(b)
                    and RANK[_room(a)] <= RANK[_room(b)] and {_room(a), _room(b)} != {"cli", "ui"})
    assert not upward
    library = [(a, b) for a, targets in graph.items() for b in targets if _room(b) == "testing"
               and _room(a) != "testing"]
    assert not library, "the library never imports its test tools"


def test_gradio_only_in_the_page():
    importers = sorted(str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
                       if any(isinstance(node, (ast.Import, ast.ImportFrom))
                              and any((getattr(node, "module", None) or alias.name).split(".")[0] == "gradio"
                                      for alias in node.names)
                              for node in ast.walk(ast.parse(path.read_text()))))
    assert importers and all(name.startswith("loopui/ui/") for name in importers), importers


def test_no_module_is_too_long_to_read():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long
