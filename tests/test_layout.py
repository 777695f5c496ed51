"""The layout DESIGN.md promises: features import no framework and no framework-specific
backend module, and no module imports (at load time) one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import bnkit

PACKAGE = Path(bnkit.__file__).parent
FEATURES = ("check", "compare", "deploy", "stats", "watch", "report", "freeze", "policy",
            "records", "files", "data", "plots", "tta", "finetune")  # fmt: skip
FRAMEWORKS = ("keras", "torch", "tensorflow", "jax", "lightning", "timm", "torchvision")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_features_import_no_framework_and_no_framework_backend():
    for name in FEATURES:
        imported = _imports(PACKAGE / f"{name}.py", top_level_only=False)
        bad = {
            m
            for m in imported
            if m.split(".")[0] in FRAMEWORKS
            or m.startswith(("bnkit.backends.keras", "bnkit.backends.torch"))
        }
        assert not bad, f"bnkit/{name}.py imports {sorted(bad)}"


def test_no_import_cycle_at_load_time():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        m: {i for i in _imports(p, top_level_only=True) if i in modules and i != m}
        for m, p in modules.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*trail, m, n])
            if n not in state:
                visit(n, [*trail, m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])
    assert "bnkit.report" not in graph["bnkit.records"]
    assert not any(m.startswith("bnkit.backends") for m in graph["bnkit.records"])
