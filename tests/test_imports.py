"""The house's imports go one way: no circle among the imp_cli and convert modules.

Every import statement counts, also those inside functions (a lazy import is still a circle: it
only moves the failure to the first call). Imports are read with `ast`, not executed. A module's
implicit import of its parent package (Python runs `convert/families/__init__.py` before
`convert/families/phi2.py`) is not an edge: only what a module's own statements name is.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("imp_cli", "convert")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The house's modules that `name`'s import statements name (`from . import x` names the
    module x when x is one, else the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                named.add(sub if sub in known else module)
    return {m for m in named if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    """The reader sees the edges we know of (else an empty graph would pass)."""
    g = graph()
    assert len(g) > 40
    assert "imp_cli.engine" in g["imp_cli.session"]
    assert "imp_cli.session" in g["imp_cli.opening"]
    assert "imp_cli.store" in g["imp_cli.pull"]  # `from . import store`
    assert "convert.pipeline" in g["imp_cli.pull"]  # a function-level import counts
    assert "convert.families.registry" in g["convert.families.phi2"]


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    found = circles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_convert_never_imports_imp_cli():
    g = graph()
    assert not [(m, d) for m, ds in g.items() if m.startswith("convert") for d in ds if d.startswith("imp_cli")]
