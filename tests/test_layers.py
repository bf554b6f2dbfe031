"""The package's layers (docs DESIGN "Layout"), read from the source and checked at run time.

Data flows one way: cli -> workflows -> passes -> core. The import graph is read with ``ast`` from
every ``.py`` file of ``onnx_lowrank/`` and ``passes/`` (installed as ``onnx_lowrank.passes``):
module-level imports and the ones inside functions alike, except under ``if TYPE_CHECKING:``.
``from pkg import name`` is an import of the submodule ``pkg.name`` when there is one, else of
``pkg`` itself (its ``__init__``). The implicit import of a parent package that Python does before
a submodule is not an edge: the runtime checks in subprocesses cover what the parents execute.

The runtime half also checks the lazy package ``__init__`` (PEP 562) and the mapping of
``onnx_lowrank.passes`` to the top-level ``passes/`` folder, installed and from a source checkout.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "onnx_lowrank"
PASSES = "onnx_lowrank.passes"
CORE = "onnx_lowrank.core"

#: Largest module allowed, in lines: past this a module holds more than one concept.
MAX_MODULE_LINES = 900

#: What the graph pass must not import: the runtime, and the layers that sit above it.
PASSES_FORBIDDEN_THIRD_PARTY = ("onnxruntime",)
PASSES_FORBIDDEN_MODULES = (
    "onnx_lowrank.measure",
    "onnx_lowrank.search",
    "onnx_lowrank.api",
    "onnx_lowrank.cli",
    "onnx_lowrank.distributed",
    "onnx_lowrank.analyze",
    "onnx_lowrank.ir_pass",
)
#: The numerical core is numpy only: the standard library, numpy, and of the package only
#: itself and the configuration (which imports the standard library only).
CORE_ALLOWED_THIRD_PARTY = frozenset({"numpy"})
CORE_ALLOWED_MODULES = ("onnx_lowrank.config",)
#: Named in the runtime checks: what "numpy only" rules out in practice.
HEAVY = ("onnx", "onnxruntime", "onnx_graphsurgeon", "onnx_ir", "scipy", "sklearn", "torch")


# --------------------------------------------------------------------------------------------
# The import graph, from the source
# --------------------------------------------------------------------------------------------


@dataclass
class ImportGraph:
    """Modules of the package, their imports of each other and of third-party roots."""

    files: dict[str, Path]  # module name -> source file
    edges: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # src -> dst -> ["file:line"]
    external: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # src -> root -> ["file:line"]

    def where(self, src: str, dst: str) -> str:
        """Source locations of the import edge src -> dst (a module or a third-party root)."""
        locations = self.edges.get(src, {}).get(dst) or self.external.get(src, {}).get(dst) or []
        return ", ".join(locations)

    def chain(self, path: list[str], last: str | None = None) -> str:
        """``a -> b (file:line) -> c (file:line)``, optionally ending at a third-party root."""
        steps = [path[0]]
        for src, dst in zip(path, path[1:]):
            steps.append(f"{dst} ({self.where(src, dst)})")
        if last is not None:
            steps.append(f"{last} ({self.where(path[-1], last)})")
        return " -> ".join(steps)


def _module_name(path: Path) -> str:
    """``onnx_lowrank/a/b.py`` -> ``onnx_lowrank.a.b``; ``passes/x.py`` -> ``onnx_lowrank.passes.x``."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":
        parts = [PACKAGE, "passes", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_files() -> dict[str, Path]:
    files = {}
    for top in ("onnx_lowrank", "passes"):
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[_module_name(path)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Every import of one module: (target module name, imported names or None, line)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, list[str] | None, int, int]] = []  # (module, names, level, line)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the else branch runs
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, 0, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node.module or "", [a.name for a in node.names], node.level, node.lineno))

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("a.b") / __import__("a.b") with a literal name: an import too.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self.found.append((node.args[0].value, None, 0, node.lineno))
        self.generic_visit(node)


@cache
def import_graph() -> ImportGraph:
    files = _source_files()
    graph = ImportGraph(files=files)
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _ImportCollector()
        collector.visit(tree)
        is_package = path.name == "__init__.py"
        where_prefix = str(path.relative_to(REPO))
        for target, names, level, line in collector.found:
            if level:
                # Relative: the current package, minus (level - 1) components.
                package = mod if is_package else mod.rpartition(".")[0]
                base_parts = package.split(".")[: len(package.split(".")) - (level - 1)]
                target = ".".join(base_parts + ([target] if target else []))
            where = f"{where_prefix}:{line}"
            if target.split(".")[0] != PACKAGE:
                locations = graph.external.setdefault(mod, {}).setdefault(target.split(".")[0], [])
                if where not in locations:
                    locations.append(where)
                continue
            dsts = []
            if names is None:
                dsts.append(target)
            else:
                for name in names:
                    sub = f"{target}.{name}"
                    dsts.append(sub if sub in files else target)
            for dst in dict.fromkeys(dsts):  # ``from m import a, b``: one edge, one location
                # An unknown name (a module being written, or a typo) is kept: it shows in the
                # messages instead of vanishing from the graph.
                if dst != mod:
                    graph.edges.setdefault(mod, {}).setdefault(dst, []).append(where)
    return graph


def _stdlib() -> frozenset[str]:
    return frozenset(sys.stdlib_module_names) | {"__future__"}


def _cycles(graph: ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    nodes = sorted(set(graph.files) | {d for dsts in graph.edges.values() for d in dsts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.edges.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.edges.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself runs on 3.10
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _run(code: str, *, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------------
# The graph reader itself (so that an empty graph cannot pass the layer tests)
# --------------------------------------------------------------------------------------------


def test_import_graph_sees_the_package():
    graph = import_graph()
    assert {PACKAGE, PASSES, f"{CORE}.linalg", f"{CORE}.linalg.factorization", "onnx_lowrank.config"} <= set(
        graph.files
    )
    assert graph.files[PASSES] == REPO / "passes" / "__init__.py"
    # whitening imports linalg (``from onnx_lowrank.core import linalg``: the submodule) and numpy.
    assert f"{CORE}.linalg" in graph.edges[f"{CORE}.whitening"]
    assert "numpy" in graph.external[f"{CORE}.whitening"]
    # The lazy __getattr__ imports of the package are edges; its TYPE_CHECKING block is not read
    # (it names the same modules, so check on a line number: the lazy ones come after it).
    init_lines = [int(w.rsplit(":", 1)[1]) for w in graph.edges[PACKAGE]["onnx_lowrank.api"]]
    source = graph.files[PACKAGE].read_text().splitlines()
    assert all(source[n - 1].startswith("        from") for n in init_lines), init_lines


# --------------------------------------------------------------------------------------------
# Layers, from the source
# --------------------------------------------------------------------------------------------


def test_no_import_cycles():
    graph = import_graph()
    problems = []
    for component in _cycles(graph):
        members = set(component)
        edges = [
            f"    {src} -> {dst} ({graph.where(src, dst)})"
            for src in component
            for dst in sorted(graph.edges.get(src, {}))
            if dst in members
        ]
        problems.append(f"  cycle among {', '.join(component)}:\n" + "\n".join(edges))
    assert not problems, "import cycles in the package:\n" + "\n".join(problems)


def _offences(graph: ImportGraph, starts: list[str], bad_module, bad_root) -> list[str]:
    """Shortest import chains from ``starts`` to each offending module or third-party root.

    Breadth-first from all starts at once; an offending module is reported, not entered (what
    it imports is its own layer's business), so each offence shows once, by its shortest chain.
    """
    paths = {s: [s] for s in starts}
    queue = deque(starts)
    found: dict[str, str] = {}
    while queue:
        mod = queue.popleft()
        if bad_module(mod):
            found.setdefault(mod, graph.chain(paths[mod]))
            continue
        for root in sorted(graph.external.get(mod, {})):
            if bad_root(root):
                found.setdefault(f"{mod} -> {root}", graph.chain(paths[mod], root))
        for dst in sorted(graph.edges.get(mod, {})):
            if dst not in paths:
                paths[dst] = paths[mod] + [dst]
                queue.append(dst)
    return [f"  {found[key]}" for key in sorted(found)]


def _within(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_passes_import_no_onnxruntime_and_no_upper_layer():
    graph = import_graph()
    starts = sorted(m for m in graph.files if _within(m, (PASSES,)))
    problems = _offences(
        graph,
        starts,
        lambda mod: _within(mod, PASSES_FORBIDDEN_MODULES),
        lambda root: root in PASSES_FORBIDDEN_THIRD_PARTY,
    )
    assert not problems, (
        "onnx_lowrank.passes must import (transitively) no onnxruntime and none of "
        f"{', '.join(PASSES_FORBIDDEN_MODULES)}:\n" + "\n".join(problems)
    )


def test_core_is_numpy_only():
    graph = import_graph()
    stdlib = _stdlib()
    starts = sorted(m for m in graph.files if _within(m, (CORE,)))
    assert f"{CORE}.linalg" in starts
    problems = _offences(
        graph,
        starts,
        lambda mod: not (_within(mod, (CORE,)) or mod in CORE_ALLOWED_MODULES),
        lambda root: root not in stdlib and root not in CORE_ALLOWED_THIRD_PARTY,
    )
    assert not problems, (
        "onnx_lowrank.core must import (transitively) only the standard library, numpy, core/ "
        "itself and onnx_lowrank.config:\n" + "\n".join(problems)
    )


def test_config_imports_only_the_standard_library():
    # core/ may import the configuration only because it is a leaf: keep it one.
    graph = import_graph()
    stdlib = _stdlib()
    mod = "onnx_lowrank.config"
    bad = {root: graph.where(mod, root) for root in graph.external.get(mod, {}) if root not in stdlib}
    bad |= {dst: graph.where(mod, dst) for dst in graph.edges.get(mod, {})}
    assert not bad, f"onnx_lowrank.config must import the standard library only: {bad}"


def test_no_module_over_the_line_limit():
    graph = import_graph()
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in graph.files.values()}
    big = sorted((n, str(p.relative_to(REPO))) for p, n in sizes.items() if n > MAX_MODULE_LINES)
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by concept): " + ", ".join(
        f"{p} ({n})" for n, p in reversed(big)
    )


def test_rewrite_module_edits_the_graph_with_onnx_graphsurgeon():
    graph = import_graph()
    mod = f"{PASSES}.rewrite"
    assert mod in graph.files, "passes/rewrite.py (the one graph edit, on onnx-graphsurgeon) is missing"
    assert "onnx_graphsurgeon" in graph.external.get(mod, {}), (
        f"passes/rewrite.py does not import onnx_graphsurgeon; it imports: "
        f"{sorted(graph.external.get(mod, {}))} and {sorted(graph.edges.get(mod, {}))}"
    )


def test_every_package_folder_is_listed_in_pyproject():
    # pyproject.toml lists its packages explicitly: a new subpackage missing there is silently
    # left out of the wheel (an editable install still works, so nothing else would notice).
    config = _pyproject()
    listed = set(config["tool"]["setuptools"]["packages"])
    graph = import_graph()
    packages = {m for m, p in graph.files.items() if p.name == "__init__.py"}
    missing = sorted(packages - listed)
    assert not missing, f"packages missing from [tool.setuptools] packages in pyproject.toml: {missing}"


# --------------------------------------------------------------------------------------------
# Layers, at run time
# --------------------------------------------------------------------------------------------


def test_importing_the_passes_loads_no_onnxruntime():
    result = _run(
        "import sys, json\n"
        "import onnx_lowrank.passes\n"
        "print(json.dumps(sorted(m for m in ('onnxruntime',) if m in sys.modules)))\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [], "import onnx_lowrank.passes loaded onnxruntime"


def test_importing_the_core_loads_no_onnx_and_no_rest_of_the_package():
    core_modules = sorted(m for m in import_graph().files if m.startswith(CORE + "."))
    result = _run(
        "import importlib, json, sys\n"
        f"for name in {core_modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "ours = sorted(m for m in sys.modules if m.startswith('onnx_lowrank.')\n"
        f"              and not m.startswith({CORE + '.'!r}) and m not in ({CORE!r}, 'onnx_lowrank.config', 'onnx_lowrank.version'))\n"
        "print(json.dumps([heavy, ours]))\n"
    )
    assert result.returncode == 0, result.stderr
    heavy, ours = json.loads(result.stdout.splitlines()[-1])
    assert heavy == [], f"importing {core_modules} loaded {heavy}"
    assert ours == [], f"importing {core_modules} loaded modules outside core/: {ours}"


# --------------------------------------------------------------------------------------------
# The lazy package __init__
# --------------------------------------------------------------------------------------------

LAZY_TARGETS = {
    "optimize": "onnx_lowrank.api",
    "LowRankConfig": "onnx_lowrank.config",
    "ModelError": "onnx_lowrank.model_io",
    "load_model": "onnx_lowrank.model_io",
    "save_model": "onnx_lowrank.model_io",
    "LayerResult": "onnx_lowrank.report",
    "Report": "onnx_lowrank.report",
    "LowRankPass": "onnx_lowrank.ir_pass",
    "optimize_graph": "onnx_lowrank.gs_api",
}


def test_importing_the_package_imports_nothing_else():
    result = _run(
        "import json, sys\n"
        "import onnx_lowrank\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "ours = sorted(m for m in sys.modules if m.startswith('onnx_lowrank.') and m != 'onnx_lowrank.version')\n"
        "print(json.dumps([heavy, ours, onnx_lowrank.__version__]))\n"
    )
    assert result.returncode == 0, result.stderr
    heavy, ours, version = json.loads(result.stdout.splitlines()[-1])
    assert heavy == [] and ours == [], f"import onnx_lowrank loaded {heavy + ours}"
    config = _pyproject()
    assert version == config["project"]["version"]


@pytest.mark.parametrize("name", sorted(LAZY_TARGETS))
def test_public_names_resolve_lazily_to_their_modules(name):
    import importlib

    import onnx_lowrank

    if name == "LowRankPass":
        pytest.importorskip("onnx_ir")
    value = getattr(onnx_lowrank, name)
    assert value is getattr(importlib.import_module(LAZY_TARGETS[name]), name)
    assert name in dir(onnx_lowrank)
    assert onnx_lowrank.__dict__[name] is value  # cached: the next look-up is a plain read


def test_all_and_dir_and_unknown_names():
    import onnx_lowrank

    assert sorted(onnx_lowrank.__all__) == [
        "LayerResult", "LowRankConfig", "ModelError", "Report", "__version__", "load_model", "optimize",
        "save_model",
    ]
    assert set(onnx_lowrank.__all__) | set(LAZY_TARGETS) <= set(dir(onnx_lowrank))
    assert set(onnx_lowrank._LAZY_NAMES) == set(LAZY_TARGETS)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        onnx_lowrank.no_such_name  # noqa: B018


def test_star_import_works_without_onnx_ir():
    # sys.modules[name] = None makes every import of it raise ImportError: onnx-ir "not installed".
    result = _run(
        "import json, sys\n"
        "sys.modules['onnx_ir'] = None\n"
        "ns = {}\n"
        "exec('from onnx_lowrank import *', ns)\n"
        "import onnx_lowrank\n"
        "try:\n"
        "    onnx_lowrank.LowRankPass\n"
        "    optional = 'imported'\n"
        "except ImportError:\n"
        "    optional = 'ImportError'\n"
        "print(json.dumps([sorted(k for k in ns if k != '__builtins__'), optional]))\n"
    )
    assert result.returncode == 0, result.stderr
    names, optional = json.loads(result.stdout.splitlines()[-1])
    assert names == sorted(
        ["LayerResult", "LowRankConfig", "ModelError", "Report", "__version__", "load_model", "optimize", "save_model"]
    )
    assert optional == "ImportError"  # asked for explicitly, the missing optional package says so


# --------------------------------------------------------------------------------------------
# onnx_lowrank.passes -> passes/, installed and from a source checkout
# --------------------------------------------------------------------------------------------

# Drops setuptools' editable finder (and its path hook entries): Python then sees what a fresh
# clone run from its root sees, ``onnx_lowrank`` as a folder on sys.path and no mapping.
_SOURCE_CHECKOUT = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
    "sys.path[:] = [p for p in sys.path if 'editable' not in p.lower()]\n"
    "sys.path_importer_cache.clear()\n"
    f"sys.path.insert(0, {str(REPO)!r})\n"
)

_WHERE = (
    "import json, sys\n"
    "import onnx_lowrank, onnx_lowrank.passes, onnx_lowrank.passes.matmul\n"
    "answers = [getattr(f, '__name__', type(f).__name__) for f in sys.meta_path\n"
    "           if hasattr(f, 'find_spec') and f.find_spec('onnx_lowrank.passes', onnx_lowrank.__path__)]\n"
    "print(json.dumps({'package': onnx_lowrank.__file__, 'passes': onnx_lowrank.passes.__file__,\n"
    "                  'matmul': onnx_lowrank.passes.matmul.__file__, 'finders': answers,\n"
    "                  'onnxruntime': 'onnxruntime' in sys.modules}))\n"
)


def _where(prefix: str = "") -> dict:
    result = _run(prefix + _WHERE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_installed_passes_come_from_the_installed_finder():
    found = _where()
    package = Path(found["package"])
    passes = Path(found["passes"])
    if package == REPO / "onnx_lowrank" / "__init__.py" and passes == REPO / "passes" / "__init__.py":
        # Run from the checkout: an editable install's finder answers first when there is one; a
        # regular install (CI) leaves the package to the checkout and the fallback finder.
        assert found["finders"], found
    else:  # a regular install: the wheel's own onnx_lowrank.passes, next to its package
        assert passes == package.parent / "passes" / "__init__.py", found
        assert found["finders"][:1] != ["_SourceCheckoutPasses"], found["finders"]
    assert Path(found["matmul"]) == passes.parent / "matmul.py"
    assert found["onnxruntime"] is False


def test_source_checkout_maps_passes_to_the_top_level_folder():
    found = _where(_SOURCE_CHECKOUT)
    assert Path(found["package"]) == REPO / "onnx_lowrank" / "__init__.py"
    assert Path(found["passes"]) == REPO / "passes" / "__init__.py"
    assert Path(found["matmul"]) == REPO / "passes" / "matmul.py"
    assert found["finders"] == ["_SourceCheckoutPasses"], found["finders"]
    assert found["onnxruntime"] is False


def test_source_checkout_finder_answers_for_one_name_only():
    import onnx_lowrank

    finder = onnx_lowrank._SourceCheckoutPasses(REPO / "passes")
    spec = finder.find_spec(PASSES)
    assert spec is not None and Path(spec.origin) == REPO / "passes" / "__init__.py"
    assert list(spec.submodule_search_locations) == [str(REPO / "passes")]
    for other in ("passes", "onnx_lowrank", "onnx_lowrank.passes.matmul", "onnx_lowrank.core", "onnx_lowrank.passesx"):
        assert finder.find_spec(other) is None, other


def test_one_source_checkout_finder_however_often_the_package_is_reloaded():
    result = _run(
        "import importlib, sys\n"
        "import onnx_lowrank\n"
        "importlib.reload(onnx_lowrank); importlib.reload(onnx_lowrank)\n"
        "print(sum(type(f).__name__ == '_SourceCheckoutPasses' for f in sys.meta_path))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1"]


def test_source_checkout_runs_the_command():
    # ``python -m onnx_lowrank`` from the repository root, without an install.
    result = _run(
        _SOURCE_CHECKOUT
        + "import runpy\n"
        "sys.argv = ['onnx-lowrank', '--version']\n"
        "runpy.run_module('onnx_lowrank', run_name='__main__', alter_sys=True)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "0.1.0" in result.stdout
