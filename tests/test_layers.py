"""The layering of docs/design.md holds: every import (function-local ones too) goes to the same
layer or one below, no two modules import each other, and a job imports only the kernel, the
job contract and libraries."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Bottom to top, as docs/design.md draws them.
LAYERS = (
    ("kernel", ("tasks.kernel",)),
    ("jobs", ("tasks.jobs",)),
    ("storage", ("tasks.storage",)),
    ("engine", ("tasks.engine",)),
    ("reporting", ("tasks.reporting", "tasks.tracking")),
    ("orchestration", ("tasks.orchestration",)),
    ("entry points", ("flows", "deployments")),
)


def layer(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def modules() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, anywhere in its body."""
    out = {}
    for folder in ("tasks", "flows", "deployments"):
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            out[name] = {m for m in found if layer(m) is not None}
    return out


def test_imports_go_down_the_layers_and_never_in_a_cycle() -> None:
    graph = modules()
    known = set(graph)
    edges = {a: {b for b in deps if b in known and b != a} for a, deps in graph.items()}
    upward = [f"{a} -> {b}" for a, deps in edges.items() for b in deps if layer(b) > layer(a)]
    assert not upward, f"imports of a layer above: {upward}"
    cycles = sorted({tuple(sorted((a, b))) for a, deps in edges.items() for b in deps if a in edges.get(b, ())})
    assert not cycles, f"modules that import each other: {cycles}"


def test_a_job_imports_only_the_kernel_its_contract_and_libraries() -> None:
    graph = modules()
    for name, deps in graph.items():
        if name.startswith("tasks.jobs."):
            outside = {d for d in deps if not (d.startswith(("tasks.jobs", "tasks.kernel")))}
            assert not outside, f"{name} imports {outside}"
