"""The package's layers import only downward (docs/architecture.md). The allowed direction, top to bottom:

    commands (cli, commands/) -> eval (eval/, lm_eval) -> api -> selection -> adapters (patches) -> methods -> kernels

so ``eval/`` never imports ``commands/``, and nothing imports a layer above its own. Checks: every import statement in
the package's files, including those inside functions (where a cycle hides), points to the same layer or one below;
no module imports itself back through others (no import circle, within a layer too); the api modules never import
the package face (``hf_sparse_attn/__init__.py``, which re-exports them); and importing each layer in a fresh
interpreter loads nothing above it.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path


PACKAGE = "hf_sparse_attn"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# bottom first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("hf_sparse_attn.kernels",)),
    ("methods", ("hf_sparse_attn.methods",)),
    ("adapters", ("hf_sparse_attn.patches",)),
    ("selection", ("hf_sparse_attn.selection", "hf_sparse_attn.row_sparsity", "hf_sparse_attn.retrieval")),
    ("api", ("hf_sparse_attn", "hf_sparse_attn.patching", "hf_sparse_attn.plan", "hf_sparse_attn.plan_file",
             "hf_sparse_attn.validation", "hf_sparse_attn.loading", "hf_sparse_attn.recommend")),
    ("eval", ("hf_sparse_attn.eval", "hf_sparse_attn.lm_eval")),
    ("commands", ("hf_sparse_attn.cli", "hf_sparse_attn.commands")),
]
LAYER_NAMES = [name for name, _ in LAYERS]

def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = prefix != PACKAGE and module.startswith(prefix + ".")  # the package itself: its __init__ only
            if (module == prefix or below) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise KeyError(module)
    return best


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of this package, line) for every import statement in the file, wherever it stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from . import exact` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


@functools.lru_cache(maxsize=1)
def upward_imports() -> list[tuple[str, str, int]]:
    modules = package_modules()
    bad = []
    for module, path in modules.items():
        for target, line in imports_of(module, path, set(modules)):
            if layer_of(target) > layer_of(module):
                bad.append((module, target, line))
    return bad


def test_every_module_has_a_layer():
    for module in package_modules():
        layer_of(module)  # KeyError names a module no layer claims: add it to LAYERS and docs/architecture.md


def test_no_import_points_upward():
    bad = upward_imports()
    assert not bad, "imports against the layer order (module, imported, line): " + "; ".join(
        f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {t} ({LAYER_NAMES[layer_of(t)]}) at line {line}" for m, t, line in bad)


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, list[str]]:
    """module -> the modules of this package it imports (every import statement, wherever it stands)."""
    modules = package_modules()
    return {module: sorted({target for target, _ in imports_of(module, path, set(modules)) if target in modules})
            for module, path in modules.items()}


def import_circles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (strongly connected components of
    more than one module, Tarjan's algorithm), and the modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in graph[module]:
                circles.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert not circles, "modules that import each other (put what both need in a module below them): " + "; ".join(
        " <-> ".join(group) for group in circles)


def test_import_circles_are_found():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": ["e"]}
    assert import_circles(graph) == [["a", "b", "c"], ["e"]]


def test_eval_never_imports_commands():
    eval_layer, commands_layer = LAYER_NAMES.index("eval"), LAYER_NAMES.index("commands")
    bad = [(m, t) for m, targets in import_graph().items() for t in targets
           if layer_of(m) == eval_layer and layer_of(t) == commands_layer]
    assert not bad, f"eval/ imports the command line: {bad}"


def test_api_modules_never_import_the_package_face():
    """``plan.py``, ``patching.py``, ... are what ``__init__.py`` exports: importing the face from them would be a
    circle through the lazy exports (``plan.py`` reads the version from the installed distribution instead)."""
    api = LAYER_NAMES.index("api")
    bad = [m for m, targets in import_graph().items() if m != PACKAGE and layer_of(m) <= api and PACKAGE in targets]
    assert not bad, f"modules of the api layer or below import the package face {PACKAGE}/__init__.py: {bad}"


_FRESH_IMPORTS = r"""
import importlib, importlib.util, json, sys
root, layers = sys.argv[1], json.loads(sys.argv[2])
# the package object without running its __init__ (the api layer), so that each lower layer imports on its own
spec = importlib.util.spec_from_file_location("hf_sparse_attn", root + "/__init__.py", submodule_search_locations=[root])
package = importlib.util.module_from_spec(spec)
sys.modules["hf_sparse_attn"] = package
loaded = []
for name, modules in layers:
    for module in modules:
        if module == "hf_sparse_attn":
            spec.loader.exec_module(package)
        else:
            importlib.import_module(module)
    loaded.append([name, sorted(m for m in sys.modules if m.startswith("hf_sparse_attn."))])
print(json.dumps(loaded))
"""


def test_importing_each_layer_loads_nothing_above_it():
    below_top = [(name, list(prefixes)) for name, prefixes in LAYERS[:-1]]
    done = subprocess.run([sys.executable, "-c", _FRESH_IMPORTS, str(ROOT), json.dumps(below_top)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for index, (name, loaded) in enumerate(json.loads(done.stdout.strip().splitlines()[-1])):
        above = [m for m in loaded if layer_of(m) > index]
        assert not above, f"importing the {name} layer loaded {above}"
    assert index == len(LAYERS) - 2
