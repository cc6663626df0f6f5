"""No import cycles among the project's packages (adapters, app, trainer).

Edges are read from the source with `ast`, not by importing: every `import X` and `from X import Y`
between project modules counts, at module level or inside a function (an import on use still ties
the two modules together), including `from . import y` and `from .. import y`.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "app", "trainer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to: itself, or its nearest enclosing package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import sub` names the submodule)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != module:
                    edges[module].add(resolved)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_edge_reader_sees_every_form_of_import() -> None:
    modules = project_modules()
    edges = import_edges(modules)
    assert "trainer.cli" in edges["trainer.__main__"]  # from .cli import main
    assert "trainer.sweep" in edges["trainer.cli"]  # inside a function
    assert "adapters" in edges["trainer.loop"] or "adapters" in edges["trainer.run"]  # from adapters import ...


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_project_modules() -> None:
    cycle = find_cycle(import_edges(project_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_modules_never_import_the_command_line() -> None:
    edges = import_edges(project_modules())
    cli = {"trainer.cli", "trainer.__main__"}
    importers = sorted(m for m, targets in edges.items() if targets & cli and m != "trainer.__main__")
    assert importers == [], importers


def test_every_import_is_visible_to_the_reader() -> None:
    # importlib.import_module("trainer.x") hides an edge from the reader above (and from people).
    hidden = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("import_module", "__import__"):
                    hidden.append(f"{module}:{node.lineno}")
    assert hidden == [], hidden



def crossings(edges: dict[str, set[str]]) -> list[str]:
    """Imports against the arrows app -> adapters <- trainer: app <-> trainer, or adapters -> either."""
    top = lambda name: name.split(".")[0]
    return sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets
                  if {top(m), top(t)} == {"app", "trainer"} or (top(m) == "adapters" != top(t)))


def test_app_and_trainer_never_import_each_other() -> None:
    # docs/architecture.md promises it: what a trainer writes is read only through adapters.
    assert crossings(import_edges(project_modules())) == []


def test_the_guard_sees_a_crossing() -> None:
    edges = {"app.x": {"trainer.y", "adapters"}, "trainer.y": {"app"}, "adapters.z": {"app.x"}, "adapters": set()}
    assert crossings(edges) == ["adapters.z -> app.x", "app.x -> trainer.y", "trainer.y -> app"]


def test_architecture_names_every_module() -> None:
    # The map stays true: every module file is named in its package's section of docs/architecture.md.
    text = (REPO / "docs" / "architecture.md").read_text()
    sections = {pkg: text.split(f"### {pkg}/")[1].split("\n## ")[0].split("\n### ")[0] for pkg in PACKAGES}
    missing = sorted(str(p.relative_to(REPO)) for p in project_modules().values()
                     if p.name != "__init__.py" and f"`{p.name}`" not in sections[p.relative_to(REPO).parts[0]])
    assert missing == [], missing
