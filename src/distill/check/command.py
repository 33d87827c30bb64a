"""``distill check``'s options, and a recipe step as the CLI hands it over (light: ``--help`` loads
nothing; the checks are in ``check.recipe``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.config import group, option
from distill.options import Checks


@dataclass
class CheckConfig:
    recipe: list[str] | None = option(None, help="recipes to check: their 'pipeline:' steps, or their command sections",
                                      positional=True, required=True, metavar="RECIPE.yaml")
    checks: Checks = group(Checks)


@dataclass(frozen=True)
class Step:
    """A recipe step as ``distill run`` plans it: its number, command, label and built config."""

    number: int
    command: str
    label: str
    config: Any
