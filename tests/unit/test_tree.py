"""The package's shape. Its imports run one way: drawn with each subpackage as one node (data/, models/,
generate/, train/, evaluation/) and each top-level module as another, the imports (at module level or inside
functions) form no loop, and within a subpackage no two modules import each other in a loop either. No file is
over 400 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "plad_ray"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found.pop("plad_ray")  # the package's face: it imports nothing
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The plad_ray modules `path` imports, wherever in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plad_ray"):
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n for n in names if n in known and n != "plad_ray"}
    return out


def node(module: str) -> str:
    """plad_ray.train.worker -> plad_ray.train; plad_ray.config -> plad_ray.config."""
    parts = module.split(".")
    return ".".join(parts[:2]) if (PACKAGE / parts[1]).is_dir() else module


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's cycles, as strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_between_modules_or_between_the_packages_parts():
    mods = modules()
    edges = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    assert not loops(edges)
    parts = {node(m) for m in mods}
    collapsed = {p: set() for p in parts}
    for m, targets in edges.items():
        collapsed[node(m)] |= {node(t) for t in targets} - {node(m)}
    assert not loops(collapsed), loops(collapsed)


def test_the_check_finds_a_loop():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []


def test_no_file_of_the_package_is_over_400_lines():
    """Small files, each one part of the data flow (line length and layout: ruff, run by make test's lint)."""
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
