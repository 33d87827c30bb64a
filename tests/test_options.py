"""One language of options across commands (distill.options, distill.config).

Every former flag and recipe key still works and says once what replaced it; a source that sets one
option under two names fails naming both; every range is checked before anything loads; every
command's --help is grouped; every function that takes an option group reads it; README's
"Options" table lists every flag and former name.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import typing
from pathlib import Path

import pytest

from distill import config, options
from distill.cli import COMMANDS, build_parser, main
from distill.config import Range, build, leaves
from distill.errors import DistillError

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {name for name, obj in vars(options).items() if dataclasses.is_dataclass(obj)}


def config_class(command: str):
    module, cls, _, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), cls)


def sample(leaf) -> object:
    """A valid value of the option's type (inside its range)."""
    tp = leaf.type
    if tp is bool:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)[-1]
    if typing.get_origin(tp) is list:
        return "a,b"
    if tp in (int, float):
        check: Range | None = leaf.meta["check"]
        low = check.low if check and check.low is not None else 0
        return tp(low + 1 if tp is int or check is None or check.high is None else (low + check.high) / 2)
    return "x"


#: what makes a command's every option apply (train: on-policy with a verifier's reward takes every group)
APPLYING = {"TrainConfig": {"method": "on-policy", "teacher": "t", "traces": "t.jsonl", "reward": "verify", "n": 2}}


def required(cls) -> dict:
    """Values for the options a command cannot be built without, and those that make every option apply."""
    return {**{leaf.key: sample(leaf) for leaf in leaves(cls) if leaf.required}, **APPLYING.get(cls.__name__, {})}


def former_names():
    for command in COMMANDS:
        cls = config_class(command)
        for leaf in leaves(cls):
            for old in leaf.meta["aliases"]:
                yield pytest.param(command, old, leaf, id=f"{command}:{old}")


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(config, "_NOTED", set())


@pytest.mark.parametrize("command,old,leaf", list(former_names()))
def test_every_former_name_still_works_and_says_so_once(command, old, leaf, capsys):
    cls = config_class(command)
    value = sample(leaf)
    for source in ("flags", "recipe.yaml [step]"):
        cfg = build(cls, ("base", required(cls)), (source, {old: value}))
        group, name = leaf.path if len(leaf.path) == 2 else (None, leaf.path[0])
        got = getattr(getattr(cfg, group), name) if group else getattr(cfg, name)
        assert got == config.coerce(value, leaf.type, old, source)
    build(cls, ("base", required(cls)), ("flags", {old: value}))  # a second time in the process: no second note
    notes = capsys.readouterr().err.splitlines()
    shown_old, shown_new = "--" + old.replace("_", "-"), leaf.flag
    assert notes.count(f"distill: '{shown_old}' is now '{shown_new}' (the old name still works)") == 1
    assert notes.count(f"distill: '{old}' is now '{leaf.key}' (the old name still works)") == 1


def test_a_recipe_with_the_old_and_the_new_name_of_one_option_fails_naming_both(tmp_path):
    cls = config_class("train")
    with pytest.raises(DistillError, match=r"recipe.yaml \[train\]: 'temperature' and 'rollout_temperature' are the "
                                           r"same option \('temperature'\): keep one"):
        build(cls, ("recipe.yaml [train]", {"temperature": 1.0, "rollout_temperature": 0.7}))


def test_the_former_on_policy_share_becomes_the_on_policy_method(capsys):
    cfg = build(config_class("train"), ("flags", {"method": "kd", "on_policy": "0.5", "student": "s", "out": "o",
                                                  "teacher": "t", "traces": "t.jsonl"}))
    assert (cfg.method, cfg.on_policy.on_policy_fraction) == ("on-policy", 0.5)
    assert "'--on-policy' is now '--method on-policy --on-policy-fraction 0.5'" in capsys.readouterr().err


def ranged():
    for command in COMMANDS:
        for leaf in leaves(config_class(command)):
            if leaf.meta["check"] is not None:
                yield pytest.param(command, leaf, id=f"{command}:{leaf.key}")


@pytest.mark.parametrize("command,leaf", list(ranged()))
def test_every_range_is_checked_when_the_config_is_built(command, leaf):
    check: Range = leaf.meta["check"]
    bad = (check.low - 1 if not check.open_low else check.low) if check.low is not None else check.high + 1
    with pytest.raises(DistillError, match=f"flags: {leaf.flag} must be {check}, got"):
        cls = config_class(command)
        build(cls, ("base", required(cls)), ("flags", {leaf.key: leaf.type(bad)}))


def test_a_nested_group_section_sets_the_same_options_as_flat_keys():
    cls = config_class("generate")
    flat = build(cls, ("r", {"teacher": "t", "teacher_url": "http://h/v1", "temperature": 0.3, "out": "o",
                             "prompts": "p.jsonl"}))
    nested = build(cls, ("r", {"teacher": {"name": "t", "url": ["http://h/v1"]}, "sampling": {"temperature": 0.3},
                               "output": {"out": "o"}, "prompts": {"path": "p.jsonl"}}))
    assert dataclasses.asdict(flat) == dataclasses.asdict(nested)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_has_a_section_per_option_group(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    sections = {leaf.section for leaf in leaves(config_class(command)) if leaf.section is not None}
    for section in sections:
        assert f"\n{section.__doc__.split(':')[0]}:\n" in text


def group_parameters_not_read() -> list[str]:
    """Functions with a parameter annotated as an option group that neither read an attribute of it
    nor hand it whole to a call."""
    wrong = []
    for path in (ROOT / "src" / "distill").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for arg in node.args.args + node.args.kwonlyargs:
                tp = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if tp.split(" | ")[0] not in GROUPS:
                    continue
                used = any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == arg.arg
                           for n in ast.walk(node))
                passed = any(isinstance(n, ast.Call) and any(
                    isinstance(a, ast.Name) and a.id == arg.arg for a in [*n.args, *(k.value for k in n.keywords)])
                    for n in ast.walk(node))
                if not (used or passed):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg}: {tp})")
    return wrong


def test_every_function_given_an_option_group_reads_it():
    assert group_parameters_not_read() == []


def test_readme_options_table_lists_every_flag_and_former_name():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Options\n"):]
    section = section[:section.index("\n## ", 1)]
    missing = []
    for command in COMMANDS:
        for leaf in leaves(config_class(command)):
            names = [leaf.flag] + ["--" + old.replace("_", "-") for old in leaf.meta["aliases"]]
            missing += [f"{command}: {name}" for name in names if f"`{name}`" not in section]
        missing += [f"{command}: --{old.replace('_', '-')}" for old in getattr(config_class(command), "RESHAPED", {})
                    if f"`--{old.replace('_', '-')}`" not in section]
    assert missing == []


def test_an_option_foreign_to_the_method_fails_from_flags_and_is_noted_from_a_recipe(tmp_path, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    argv = ["train", "--method", "sft", "--student", "s", "--traces", str(traces), "--out", str(tmp_path / "o")]
    assert main(argv + ["--loss", "rkl", "--kd-weight", "0.3", "--temperature", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distill train: error: --loss, --kd-weight, --temperature: they apply to --method kd or "
                   "on-policy; leave them out"]
    assert not (tmp_path / "o").exists()
