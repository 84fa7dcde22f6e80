"""The layers are visible in the folders and hold: nothing imports upwards, no cycles.

  vmediad (abi, shm, errors, protocol, logs, _native)   the foundation: imports nothing of ours
  hostd, codec_backend, guestlib                        sit on the foundation, not on each other
  vmediad.tools (cli, fakevm, soak, bench)              the top floor: may import anything
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vmediad", "hostd", "codec_backend", "guestlib")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module.startswith("vmediad.tools") or module == "vmediad.__main__":
        return "tools"
    top = module.split(".")[0]
    return "foundation" if top == "vmediad" else top


ALLOWED = {
    "foundation": {"foundation"},
    "hostd": {"foundation", "hostd"},
    "codec_backend": {"foundation", "codec_backend"},
    "guestlib": {"foundation", "guestlib"},
    "tools": {"foundation", "hostd", "codec_backend", "guestlib", "tools"},
}


def _imports(tree: ast.AST, *, top_level_only: bool) -> list[str]:
    out: list[str] = []
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.append(n.module)
            out += [f"{n.module}.{a.name}" for a in n.names]
        elif isinstance(n, ast.Import):
            out += [a.name for a in n.names]
    return [m for m in out if m.split(".")[0] in PACKAGES]


def _sources() -> dict[str, ast.AST]:
    return {_module(p): ast.parse(p.read_text(), str(p))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_no_layer_imports_a_layer_above_it() -> None:
    wrong = []
    for module, tree in _sources().items():
        for target in _imports(tree, top_level_only=False):  # function-level imports count too
            if _layer(target) not in ALLOWED[_layer(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_modules() -> None:
    sources = _sources()
    graph: dict[str, set[str]] = {}
    for module, tree in sources.items():
        deps = set()
        for target in _imports(tree, top_level_only=True):  # what runs at import time
            while target and target not in sources:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                deps.add(target)
        graph[module] = deps
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d] if d in stack else [m, d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
