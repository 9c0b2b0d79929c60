"""The import structure of the packages: no circles, and the hooks the model imports from outside
`dsv32_jax` (`sharding.mesh`, `sharding.expert_parallel`, the kernels) sit below it.

Read from the source with `ast`, every import counts, also one inside a function: a circle that a late
import hides is still a circle. Importing `a.b.c` from outside package `a` also runs `a/__init__.py` and
`a/b/__init__.py`, so those are edges too (`dsv32_jax/__init__.py` imports the engine)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dsv32_jax", "sharding", "pallas_kernels", "convert")


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the packages (a package's name: its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours that importing it runs."""
    mods = _modules()

    def targets(name: str, node) -> set[str]:
        assert getattr(node, "level", 0) == 0, f"{mods[name]}:{node.lineno}: a relative import"
        if isinstance(node, ast.Import):
            named = [a.name for a in node.names]
        else:
            named = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        out = set()
        for full in named:
            parts = full.split(".")
            for i in range(1, len(parts) + 1):  # the packages above it run first, unless already running
                prefix = ".".join(parts[:i])
                if prefix in mods and not (name == prefix or name.startswith(prefix + ".")):
                    out.add(prefix)
        return out

    return {name: {t for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for t in targets(name, node)}
            for name, path in mods.items()}


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a path of modules (first == last), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_no_import_circle():
    circle = _circle(_graph())
    assert not circle, "import circle: " + " -> ".join(circle)


def test_what_the_model_imports_from_outside_sits_below_it():
    """The model may use the logical-axis hooks (sharding.mesh, sharding.rules, expert parallelism) and the
    kernels; none of them, nor anything they import, is a module of dsv32_jax."""
    graph = _graph()
    hooks = {t for m in graph if m.startswith("dsv32_jax.model") for t in graph[m]
             if not t.startswith("dsv32_jax")}
    assert {"sharding.mesh", "sharding.expert_parallel"} <= hooks
    above = {h: sorted(m for m in _reach(graph, h) if m.startswith("dsv32_jax")) for h in sorted(hooks)}
    assert not {h: ms for h, ms in above.items() if ms}, "these import dsv32_jax"


def test_the_hooks_load_without_the_model():
    """What the source says, as Python runs it: the hooks load in a fresh process without any of dsv32_jax."""
    code = ("import sys, sharding.mesh, sharding.expert_parallel, sharding.distributed; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dsv32_jax'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)
