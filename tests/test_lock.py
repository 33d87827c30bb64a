"""constraints.txt (the versions the set-up installs) agrees with pyproject.toml (the ranges a
``pip install distill`` accepts): every dependency, test extras included, is pinned once, at a version
its range allows; the lock pins nothing twice. And this environment runs on the locked versions."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
#: chosen by scripts/setup.sh, not by the lock (CPU 2.13.0, or a CUDA build where a GPU is)
UNLOCKED = {"torch"}


def lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt:{n}: not an exact pin: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"constraints.txt:{n}: {name} pinned twice"
        pins[key] = version
    return pins


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def disagreements(pins: dict[str, str], reqs: list[Requirement]) -> list[str]:
    out = []
    for req in reqs:
        key = canonicalize_name(req.name)
        if key in UNLOCKED:
            continue
        if key not in pins:
            out.append(f"{req.name}: in pyproject.toml, not in constraints.txt")
        elif not req.specifier.contains(pins[key], prereleases=True):
            out.append(f"{req.name}: constraints.txt pins {pins[key]}, pyproject.toml asks {req.specifier}")
    return out


def test_the_lock_pins_every_dependency_within_its_range():
    assert disagreements(lock(), requirements()) == []


def test_a_pin_outside_its_range_or_missing_is_found():
    reqs = [Requirement("accelerate>=1.0"), Requirement("peft>=0.15"), Requirement("torch>=2.4")]
    assert disagreements({"accelerate": "0.34.2"}, reqs) == [
        "accelerate: constraints.txt pins 0.34.2, pyproject.toml asks >=1.0",
        "peft: in pyproject.toml, not in constraints.txt"]


def test_this_environment_has_the_locked_versions_of_the_dependencies():
    """What the suite runs on is what the lock says it passed on (a venv made before a lock change
    is brought up to it by the set-up: constraints.txt newer than its stamp)."""
    pins = lock()
    installed = {}
    for req in requirements():
        key = canonicalize_name(req.name)
        if key not in UNLOCKED:
            installed[key] = importlib.metadata.version(req.name)
    assert {k: v for k, v in installed.items() if pins.get(k) != v} == {}
