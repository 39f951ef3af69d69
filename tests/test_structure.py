"""The package's shape: imports point down the layers, never in a circle; the APEX geometry needs no
torch; the APEX callback stays hook dispatch. docs/architecture.md describes the layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_apex"

# Lowest first: a unit may import the units before it, never one after it. A unit is a subpackage
# (megatron_apex/training/...) or a top-level module (megatron_apex/config.py).
LAYERS = ["compat", "config", "data", "distributed", "model", "training", "expansion", "convert", "analysis",
          "run", "cli", "train"]


def _modules() -> dict:
    """Module name -> its source file, for every module of the package."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, module: str) -> set:
    """The package modules ``module`` imports, at any depth (function-level imports count too)."""
    names = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n == "megatron_apex" or n.startswith("megatron_apex.")}


def _graph() -> dict:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # "from megatron_apex.expansion import geometry" names a module; "from x import f" a module's name
        graph[name] = {n if n in modules else n.rsplit(".", 1)[0] for n in _imports(path, name)} - {name}
        graph[name] = {n for n in graph[name] if n in modules and n != "megatron_apex"}
    return graph


def _unit(module: str) -> str:
    return module.split(".")[1]


def test_imports_point_down_the_layers():
    assert sorted(LAYERS) == sorted({_unit(m) for m in _modules() if m != "megatron_apex"}), \
        "a new subpackage or top-level module: give it a place in LAYERS (and in docs/architecture.md)"
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                    if LAYERS.index(_unit(b)) > LAYERS.index(_unit(a)))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other (directly or around a circle): {circles}"


def test_geometry_and_config_need_no_torch():
    """The dry run's arithmetic (config, APEX geometry) imports neither torch nor megatron-core."""
    code = ("import sys; import megatron_apex.config, megatron_apex.expansion.geometry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_config_imports_nothing_of_the_package():
    assert _graph()["megatron_apex.config"] == set()


def test_apex_callback_is_hook_dispatch():
    """ApexCallback dispatches to votes, boundary and resume; its jobs live there (at most 250 lines)."""
    tree = ast.parse((PACKAGE / "expansion" / "engine.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ApexCallback"]
    assert cls.end_lineno - cls.lineno + 1 <= 250
