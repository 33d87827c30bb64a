"""The quickstart: its student (the teacher with half of its layers) and the whole pipeline in CI."""

from __future__ import annotations

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
