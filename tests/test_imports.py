"""rgemma's import graph, read from the source: no cycle, and the light entry points
(`import rgemma`, the `rgemma` command) load no heavy optional dependency."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "rgemma"


def find_modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file of every module under `package` (a package's name
    is its `__init__.py`)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = find_modules(PACKAGE)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """Every Import / ImportFrom under `node` (function bodies included), except
    those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _imports_of(stmt)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def import_edges(name: str, modules: dict[str, Path] = MODULES) -> dict[str, int]:
    """The rgemma modules that module `name` imports -> the first line doing so.

    `import a.b` and `from a.b import f` import `a.b` (a package: its __init__);
    `from a import b` where `a.b` is a module imports `a.b`. Relative imports are
    resolved against the module's package. An `importlib.import_module` call (a
    lazy import) is not an edge.
    """
    path = modules[name]
    is_package = path.name == "__init__.py"
    edges: dict[str, int] = {}
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            if target in modules and target != name:
                edges.setdefault(target, node.lineno)
    return edges


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    files = {
        "__init__.py": "import importlib\nimportlib.import_module('.b', __name__)\n"
        "from . import a\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
        "def f():\n    from .sub import c\n",
        "b.py": "import json\nimport rgemma.sub as s\n",
        "sub/__init__.py": "from . import c\nfrom .c import C\n",
        "sub/c.py": "class C:\n    def m(self):\n        from ..b import x\n",
    }
    for rel, text in files.items():
        (tmp_path / "rgemma" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "rgemma" / rel).write_text(text)
    modules = find_modules(tmp_path / "rgemma")
    graph = {name: set(import_edges(name, modules)) for name in modules}
    assert graph == {
        "rgemma": {"rgemma.a"},  # `from . import a` in a package; a lazy import is no edge
        "rgemma.a": {"rgemma.sub.c"},  # inside a function; not under TYPE_CHECKING
        "rgemma.b": {"rgemma.sub"},  # a package: its __init__
        "rgemma.sub": {"rgemma.sub.c"},
        "rgemma.sub.c": {"rgemma.b"},  # relative, two levels up, in a method
    }
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["rgemma.b", "rgemma.sub", "rgemma.sub.c"]
    del graph["rgemma.sub.c"]
    assert find_cycle(graph) is None


def test_no_import_cycle():
    graph = {name: import_edges(name) for name in MODULES}
    assert "rgemma.cli.options" in graph["rgemma.cli.generate"]
    cycle = find_cycle(graph)
    if cycle:
        steps = [
            f"{a} (line {graph[a][b]} of {MODULES[a].relative_to(SRC)}) imports {b}"
            for a, b in itertools.pairwise(cycle)
        ]
        pytest.fail("import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(steps))


HEAVY = ("matplotlib", "transformers", "recurrentgemma", "fastapi", "uvicorn", "jax", "psutil")


def test_light_entry_points_load_no_heavy_dependency():
    code = """
import json, sys
import rgemma.cli, rgemma
from rgemma.cli import COMMANDS, build_parser, main

try:
    main(["--help"])
except SystemExit:
    pass
listed_only = sorted(m for m in sys.modules if m.startswith("rgemma.cli."))
build_parser(["generate"]).parse_args(["generate", "hello", "--max-new-tokens", "4"])
build_parser(["bench"]).parse_args(["bench", "--batch-sizes", "1,2"])
print(json.dumps({"modules": sorted(sys.modules), "after_help": listed_only}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.splitlines()[-1])
    loaded = {m.split(".")[0] for m in result["modules"]}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    # `rgemma --help` lists every command without importing any command module.
    assert result["after_help"] == ["rgemma.cli.options"]
    assert "rgemma.cli.generate" in result["modules"]
