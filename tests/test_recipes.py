"""Every shipped recipe's steps are valid options of their commands (a typo fails here, not mid-run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.cli import COMMANDS, _config_class
from distill.config import build, load_yaml

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_steps_build_their_configs(recipe):
    data = load_yaml(recipe)
    steps = data.get("pipeline") or [{name: section} for name, section in data.items() if name in COMMANDS]
    assert steps, f"{recipe.name}: no pipeline and no command section"
    for i, step in enumerate(steps, 1):
        (command, options), = step.items()
        assert command in COMMANDS, f"{recipe.name} step {i}: unknown command {command}"
        options = {k: v for k, v in (options or {}).items() if k != "step"}
        build(_config_class(command), (f"{recipe.name} step {i}", options))
