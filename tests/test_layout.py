"""The layout DESIGN.md promises: features import no framework and no framework-specific
backend module; no module imports one that imports it back, counting the imports made
inside functions; the ground (errors, policy, records, files, data) imports nothing
above it; no module is longer than 1,000 lines."""

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


GROUND = ("bnkit.errors", "bnkit.policy", "bnkit.records", "bnkit.files", "bnkit.data",
          "bnkit._imports", "bnkit._launch")  # fmt: skip
"""What everything stands on: it imports only itself."""
MAX_LINES = 1000


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    """Each bnkit module -> the bnkit modules it imports (a name imported from a module
    counts as that module)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in modules:
                return ".".join(parts[:k])
        return None

    graph = {}
    for m, p in modules.items():
        found = {owner(i) for i in _imports(p, top_level_only)} - {None, m}
        graph[m] = {o for o in found if o is not None}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle, as a path of module names, or None."""
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*trail, m, n]
            if n not in state:
                found = visit(n, [*trail, m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def test_no_import_cycle_at_load_time():
    assert _cycle(_graph(top_level_only=True)) is None


def test_no_import_cycle_at_all_counting_imports_inside_functions():
    cycle = _cycle(_graph(top_level_only=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_ground_imports_nothing_above_it():
    graph = _graph(top_level_only=False)
    for module in GROUND:
        above = sorted(graph[module] - set(GROUND))
        assert not above, f"{module} imports {above}: pass it in, or move the function up"


def test_a_cycle_is_found():
    """The check itself: a made-up circle of three modules is reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_is_over_a_thousand_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
