"""The package's import graph: no loops anywhere, and ``train/`` in one-way layers.

Every ``import`` counts, also those inside functions (a loop through a deferred import is still
a loop a reader has to untangle). The layers of ``train/``: the logits store, the loss maths, the
AdamW kernel, the attention kernel and the shared-input linear layers at the bottom, then the
optimizer and rendering; batching, the API mapping and rollouts; the teachers (local, cached,
served) and the on-policy schedule; the trainers; the student set-up; and the two commands on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

TRAIN_LAYERS = {
    "store": 0, "kd_losses": 0, "distributed": 0, "fused_adamw": 0, "attention": 0, "shared_input": 0,
    "optim": 1, "rendering": 1,
    "batching": 2, "api_mapping": 2, "rollouts": 2,
    "teachers": 3, "on_policy": 3, "served": 3,
    "trainers": 4,
    "student": 5,
    "command": 6, "logits": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (SRC / "distill").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name and t != "distill"}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_train_modules_import_only_lower_layers():
    graph = import_graph()
    train = {m.rsplit(".", 1)[1]: m for m in graph if m.startswith("distill.train.")}
    assert set(train) == set(TRAIN_LAYERS), "a new train/ module needs its layer in TRAIN_LAYERS"
    upward = [f"{a} -> {b}" for a, full in train.items() for target in graph[full]
              if (b := target.rsplit(".", 1)[1]) in TRAIN_LAYERS and target.startswith("distill.train.")
              and TRAIN_LAYERS[b] >= TRAIN_LAYERS[a]]
    assert upward == []
