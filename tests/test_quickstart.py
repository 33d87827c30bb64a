"""The quickstart: its student (the teacher with half of its layers) and the whole pipeline in CI."""

from __future__ import annotations

import json

import pytest
import torch

from distill.errors import DistillError
from distill.models import load_model, load_preset, shrink_layers

from conftest import build_tiny


@pytest.fixture(scope="module")
def four_layers(smollm2_dir, tmp_path_factory):
    return build_tiny("llama", smollm2_dir, tmp_path_factory.mktemp("four") / "m", seed=1, layers=4)


def _logits(path, ids):
    with torch.no_grad():
        return load_model(str(path), device="cpu").eval()(ids).logits


def test_shrink_layers_keeps_the_chosen_layers(four_layers, tmp_path):
    ids = torch.tensor([[1, 450, 3000, 77, 12]])
    same = shrink_layers(four_layers, tmp_path / "all", keep=[0, 1, 2, 3])
    assert torch.allclose(_logits(same, ids), _logits(four_layers, ids), atol=1e-5)

    half = shrink_layers(four_layers, tmp_path / "half")
    src, small = load_model(str(four_layers), device="cpu"), load_model(str(half), device="cpu")
    assert small.config.num_hidden_layers == 2
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, src.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(small.lm_head.weight, src.lm_head.weight)
    assert (half / "tokenizer.json").is_file()

    with pytest.raises(DistillError, match=r"keep_layers \[0, 4\]: need distinct layer indices in 0..3"):
        shrink_layers(four_layers, tmp_path / "bad", keep=[0, 4])


def test_student_preset_with_init_from_is_built_once(four_layers, tmp_path):
    out = tmp_path / "student"
    preset = tmp_path / "half.yaml"
    preset.write_text(f"model: {out}\ninit_from: {four_layers}\nkeep_layers: [0, 3]\n")
    loaded = load_preset("students", str(preset))
    assert loaded["model"] == str(out) and load_model(str(out), device="cpu").config.num_hidden_layers == 2
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    load_preset("students", str(preset))
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


# The CI run of configs/quickstart.yaml: the same steps, fewer questions, tokens and steps.
CI_LIMITS = {
    "generate": {"limit": 4, "max_tokens": 48, "batch_size": 4},
    "verify": {"drop_truncated": False},  # at 48 tokens nearly every trace is cut off
    "train": {"max_steps": 2, "batch_size": 2, "max_length": 256},
    "eval": {"limit": 3, "n": 1, "max_tokens": 32, "batch_size": 3, "fidelity_max_tokens": 16},
}
CI_ROLLOUTS = {"max_tokens": 16}  # the on-policy step's rollouts


@pytest.mark.slow
def test_quickstart_pipeline_end_to_end(repo, smollm2_gguf, tmp_path):
    """``distill run configs/quickstart.yaml`` with CI limits, as a user runs it (a process of its own),
    prints the compare table and a quiet console: no library bars or raw dicts, a line per log."""
    import os
    import subprocess
    import sys

    import yaml

    recipe = yaml.safe_load((repo / "configs" / "quickstart.yaml").read_text())
    runs = tmp_path / "runs"
    text = yaml.safe_dump(recipe).replace("runs/quickstart", str(runs))
    recipe = yaml.safe_load(text)
    for step in recipe["pipeline"]:
        (command, options), = step.items()
        options.update(CI_LIMITS.get(command, {}))
        if options.get("method") == "on-policy":
            options.update(CI_ROLLOUTS)
    ci = tmp_path / "quickstart-ci.yaml"
    ci.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # piped, compare prints the whole table
    env["PYTHONPATH"] = str(repo / "src")
    done = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(ci)], cwd=repo, env=env,  # data/ is the repo's
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    out, console = done.stdout, done.stdout + done.stderr
    for noise in ("Loading weights", "Writing model shards", "Converting and de-quantizing", "{'loss'", "it/s]"):
        assert noise not in console, noise
    assert "train: step 2/2 | loss " in out  # the Trainer's log, one readable line
    table = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert header[0] == "model" and "distill_gsm8k pass@1" in header
    assert {"NLL/token", "KL to teacher", "top-1 agree", "own NLL", "own rKL", "degenerate", "train time", "CPU-hours",
            "teacher tokens"} <= set(header)
    rows = [dict(zip(header, (cell.strip() for cell in row.split("|")[1:-1]))) for row in table[2:]]
    assert [row["model"] for row in rows] == [
        "teacher SmolLM2-135M", "half-depth student, untrained", "half-depth student, SFT", "half-depth student, KD",
        "half-depth student, KD then on-policy"]
    assert [row["method"] for row in rows] == ["—", "base", "sft", "kd", "on-policy"]
    assert all(float(row["own NLL"]) > 0 for row in rows)  # the teacher scored what each model wrote itself
    assert rows[0]["KL to teacher"] == "0.000" and rows[0]["top-1 agree"] == "100.0"  # the teacher is itself
    assert all(float(row["KL to teacher"]) > 0 for row in rows[1:])
    assert (runs / "compare" / "compare.csv").is_file() and (runs / "compare" / "compare.png").is_file()
    held_out = json.loads((runs / "student-sft" / "run.json").read_text())["held_out"]["prompt_ids"]
    assert held_out == json.loads((runs / "student-kd" / "run.json").read_text())["held_out"]["prompt_ids"]
    fidelity = json.loads((runs / "eval" / "student-kd" / "results.json").read_text())["fidelity"]
    assert fidelity["held_out_from"].endswith("student-kd/run.json") and fidelity["prompts"] == len(held_out)
