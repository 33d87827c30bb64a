"""The package's import graph: no loops anywhere, and the whole package in one-way layers.

Every ``import`` counts, also those inside functions (a loop through a deferred import is still a
loop a reader has to untangle). The layers, bottom up (README, "Where the code is"):

- storage: errors, records, run records, the logits store, the config machinery and the
  option groups, the outputs' locks and guard, the console, the results schema, the published eval
  protocols, how processes share a run: the shared types and constants every stage reads;
- rendering: prompts, chat rendering, models and tokenizers, grading, the KD maths, batching;
- teachers: generation (API, local) and KD scoring (online, cached, served, API log-probs);
- stages: one module or package per command (generate, import, verify, logits, train, eval,
  compare, export, check); a stage imports the layers below and its own package, never another
  stage;
- cli on top, which reaches the stages by name.

Inside ``train/``: the kernels and the on-policy package at the bottom, then the trainers, the
student set-up, the fitting, and the command on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: the layer of every top-level module or package of ``distill``
LAYERS = {
    "storage": {"errors", "paths", "records", "runinfo", "config", "options", "outputs", "console", "store",
                "costs", "parallel", "distributed", "results", "protocols"},
    "rendering": {"prompts", "rendering", "models", "grading", "decontaminate", "kd_losses", "batching",
                  "degeneracy", "origins", "sampling"},
    "teachers": {"teachers"},
    "stages": {"generate", "importer", "verify", "export", "logits", "report", "train", "eval", "check"},
    "cli": {"cli"},
}
ORDER = list(LAYERS)
TRAIN_LAYERS = {"kernels": 0, "onpolicy": 0, "trainers": 1, "student": 2, "fit": 3, "command": 4}


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


def top(module: str) -> str:
    """``distill.train.kernels.optim`` -> ``train``."""
    return module.split(".")[1] if module.count(".") else ""


def layer(module: str) -> int:
    name = top(module)
    return next(i for i, members in enumerate(LAYERS.values()) if name in members)


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer, or sideways from one stage to another."""
    stages = ORDER.index("stages")
    out = []
    for module, targets in graph.items():
        if module == "distill":
            continue
        for target in targets:
            same_package = top(target) == top(module)
            if layer(target) > layer(module) or (layer(target) == layer(module) == stages and not same_package):
                out.append(f"{module} -> {target}")
    return sorted(out)


def test_no_import_cycles_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    unplaced = sorted({top(m) for m in import_graph() if m != "distill"} - set().union(*LAYERS.values()))
    assert unplaced == [], "a new module or package needs its layer in LAYERS"


def test_imports_go_down_the_layers_and_no_stage_imports_another():
    assert wrong_way(import_graph()) == []


def test_the_layer_check_finds_an_upward_and_a_sideways_import():
    graph = {"distill.records": {"distill.models"}, "distill.eval.fidelity": {"distill.train.command"},
             "distill.train.command": {"distill.teachers.sources", "distill.train.student"}}
    assert wrong_way(graph) == ["distill.eval.fidelity -> distill.train.command",
                                "distill.records -> distill.models"]


def test_train_modules_import_only_lower_layers():
    graph = import_graph()
    part = {m: m.split(".")[2] for m in graph if m.startswith("distill.train.")}
    assert set(part.values()) == set(TRAIN_LAYERS), "a new train/ module needs its layer in TRAIN_LAYERS"
    upward = [f"{a} -> {b}" for a in part for b in graph[a]
              if b in part and part[b] != part[a] and TRAIN_LAYERS[part[b]] >= TRAIN_LAYERS[part[a]]]
    assert upward == []
