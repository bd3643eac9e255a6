"""The house rules on imports, checked from the source: every arrow points down, no circles.

app -> models, index; models and index never import app or each other; only the CLI imports
models.training (serving never loads training code).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "models", "index")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports() -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its body (lazy imports included)."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def test_layers_point_one_way() -> None:
    wrong = [
        (source, target)
        for source, targets in _imports().items()
        for target in targets
        if _top(source) != "app" and _top(target) != _top(source)
    ]
    assert wrong == []


def test_only_the_cli_imports_training() -> None:
    wrong = [
        (source, target)
        for source, targets in _imports().items()
        for target in targets
        if target.startswith("models.training")
        and not source.startswith("models.training")
        and source != "app.cli"
    ]
    assert wrong == []


def test_no_import_circles() -> None:
    edges = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert circles == []
