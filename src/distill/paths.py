"""Where the shipped presets, recipes and eval tasks live, in a checkout or an installed wheel."""

from pathlib import Path

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parents[1]


def asset_dir(name: str) -> Path:
    """`teachers`, `students`, `configs` or `evals`: the repo's folder, else the wheel's copy."""
    for candidate in (_REPO / name, _PKG / "_assets" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"distill asset folder '{name}' not found")
