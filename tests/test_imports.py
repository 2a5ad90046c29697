"""The import graph of the repository, read with ``ast`` (nothing is imported).

Rules (the layering the code relies on):

* no import circle that involves a module of ``training/``;
* the contract shared by training and the service (``service.contract``, ``service.codec``: schema,
  manifest, codec, Redis key layout) imports no other module of the repository - not the Redis
  client, settings, item cache or feature fetcher, and nothing from ``training/``;
* ``training.materialize`` reaches nothing of ``service/`` but the contract;
* ``service/`` never imports torch or ``training`` - except ``service.cli``, whose training
  commands (``mtrank train``, ``features load``, ``demo``) import ``training`` inside the command
  functions; its module level does not.

An edge goes to the most specific repository module an import names (``from a.b import c`` is an
edge to ``a.b.c`` when that is a module, else to ``a.b``), as import-linter counts them: a
package's ``__init__`` re-exporting its own submodules is not a circle. Imports inside functions
count like any other (a "late import, no cycle" is still a circle of the design).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {"service.contract", "service.codec"}


@dataclass(frozen=True)
class Import:
    target: str  # a repository module, or the top-level name of a third-party one
    internal: bool
    lazy: bool  # inside a function (not run at import time)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def repo_modules(root: Path) -> dict[str, Path]:
    skip = {"__pycache__", "node_modules"}
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))
            if not any(part.startswith(".") or part in skip for part in p.relative_to(root).parts)}


def _resolve(name: str, modules: dict[str, Path]) -> Import | None:
    """The most specific repository module that ``name`` or a prefix of it names, else third-party."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return Import(".".join(parts[:i]), True, False)
    return Import(parts[0], False, False)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for n in names:
                imp = _resolve(n, modules)
                out.append(Import(imp.target, imp.internal, lazy))
            visit(child, inner)

    visit(tree, False)
    return out


def import_graph(root: Path) -> dict[str, list[Import]]:
    modules = repo_modules(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def edges(graph: dict[str, list[Import]], skip=lambda src, imp: False) -> dict[str, set[str]]:
    return {m: {i.target for i in imps if i.internal and i.target != m and not skip(m, i)}
            for m, imps in graph.items()}


def cycles(adj: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:  # recursive: the repository's graph is small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            connect(v)
    return found


def reachable(adj: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(adj.get(m, ()))
    return seen


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


GRAPH = import_graph(ROOT)
ADJ = edges(GRAPH)


# -- the rules ---------------------------------------------------------------------------------

def test_the_graph_sees_the_repository():
    assert {"service.contract", "service.codec", "service.features", "training.train", "training.materialize",
            "training.models.mutual"} <= set(GRAPH)
    assert {"service.contract", "service.codec"} <= ADJ["training.materialize"]
    assert "torch" in {i.target for i in GRAPH["training.train"] if not i.internal}


def test_no_import_circle_in_training():
    bad = [c for c in cycles(ADJ) if any(in_package(m, "training") for m in c)]
    assert not bad, f"import circles through training/: {bad}"


def test_the_contract_imports_nothing_else_of_the_repository():
    for module in sorted(CONTRACT):
        assert reachable(ADJ, module) <= CONTRACT, (module, sorted(reachable(ADJ, module) - CONTRACT))


def test_materialize_depends_on_the_contract_only():
    service_side = {m for m in reachable(ADJ, "training.materialize") if in_package(m, "service")}
    assert service_side == CONTRACT


def test_the_service_never_imports_torch_or_training():
    # service.cli's training commands import training inside the command functions (module level: never)
    adj = edges(GRAPH, skip=lambda src, imp: src == "service.cli" and imp.lazy)
    for module in sorted(m for m in GRAPH if in_package(m, "service")):
        closure = reachable(adj, module)
        assert not {m for m in closure if in_package(m, "training")}, module
        torch_users = sorted(m for m in closure for i in GRAPH[m] if not i.internal and i.target == "torch"
                             and not (m == "service.cli" and i.lazy))
        assert not torch_users, (module, torch_users)
    cli_lazy = {i.target for i in GRAPH["service.cli"] if i.lazy and i.internal}
    assert all(not in_package(m, "training") for m in ADJ["service.cli"] - cli_lazy)


# -- the reader itself -------------------------------------------------------------------------

def test_the_reader_finds_late_imports_relative_imports_and_circles(tmp_path):
    files = {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "import numpy as np\nA = 1\ndef f():\n    from pkg.b import g  # late\n    return g\n",
        "pkg/b.py": "from . import a\nfrom .sub import c\ng = 2\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import A\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert Import("pkg.b", True, True) in graph["pkg.a"] and Import("numpy", False, False) in graph["pkg.a"]
    adj = edges(graph)
    assert adj["pkg.b"] == {"pkg.a", "pkg.sub.c"} and adj["pkg.sub.c"] == {"pkg.a"}
    assert cycles(adj) == [["pkg.a", "pkg.b", "pkg.sub.c"]]  # pkg -> pkg.a is not one: no edge back
    assert cycles(edges(graph, skip=lambda src, imp: imp.lazy)) == []
