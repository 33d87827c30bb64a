"""Loading models and tokenizers the same way in every stage.

A model is a Hugging Face id, a local directory, or a ``.gguf`` file. A GGUF file is
dequantised once by transformers and saved beside it as a normal model directory
(``NAME.gguf`` -> ``NAME.hf/``), which then reloads in under a second.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from distill.config import load_yaml
from distill.errors import DistillError
from distill.paths import asset_dir

#: the linear layers of a decoder layer that read one input, by parent module, in the order
#: transformers' Llama/Qwen2-style layers (and Liger's SwiGLU MLP) call them: attention's
#: projections, then the MLP's gate and up (training sums their input gradients, the on-policy
#: sampler merges their weights)
ONE_INPUT_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def ensure_hf_dir(gguf_path: str | Path) -> Path:
    """Convert a GGUF checkpoint to a safetensors model directory once; return its path."""
    gguf_path = Path(gguf_path)
    out = gguf_path.with_suffix(".hf")
    if (out / "config.json").is_file():
        return out
    if not gguf_path.is_file():
        raise DistillError(f"{gguf_path}: GGUF file not found")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kw)
    # GGUF-loaded models refuse save_pretrained: copy the weights into a plain instance.
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict())
    _drop_gguf_marker(model.config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _drop_gguf_marker(config) -> None:
    """A GGUF-loaded config says ``quant_method: gguf``; saved dequantised weights are plain, and
    loaders that pass ``gguf_file=None`` (lm-eval) refuse a directory that keeps the marker."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def resolve_model(name_or_path: str) -> str:
    """Model id/dir as transformers wants it (GGUF files become their converted directory)."""
    if str(name_or_path).endswith(".gguf"):
        return str(ensure_hf_dir(name_or_path))
    return str(name_or_path)


def shrink_layers(src: str | Path, out: str | Path, keep: str | list[int] = "every_other") -> Path:
    """A smaller student made from a bigger model of its family: the same embeddings, norms and
    head, but only some of its decoder layers (``every_other``: 0, 2, 4, ...; or a list of
    indices). Written once to ``out`` as a normal model directory; later calls just return it.
    Same tokenizer as the source, so the source can teach it by logit distillation.
    """
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    src_path = resolve_model(str(src))
    model = load_model(src_path, device="cpu", dtype=torch.float32)
    n = model.config.num_hidden_layers
    layers = list(range(0, n, 2)) if keep == "every_other" else [int(i) for i in keep]
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise DistillError(f"keep_layers {keep!r}: need distinct layer indices in 0..{n - 1}")
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in model.state_dict().items():
        m = re.search(r"\blayers\.(\d+)\.", key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[key[:m.start(1)] + str(new_index[int(m.group(1))]) + key[m.end(1):]] = value
    config = model.config
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    _drop_gguf_marker(config)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.load_state_dict(state)
    student.generation_config = model.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    load_tokenizer(src_path, require_chat_template=False).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_preset(kind: str, name_or_path: str) -> Path | None:
    """Find a preset by name (``teachers/deepseek-reasoner.yaml`` by ``deepseek-reasoner``) or path.

    Returns None when it is neither, so callers can treat the string as a model id/path.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise DistillError(f"{p}: {kind} preset file not found")
        return p
    candidate = asset_dir(kind) / f"{name_or_path}.yaml"
    return candidate if candidate.is_file() else None


def list_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in asset_dir(kind).glob("*.yaml"))


def load_preset(kind: str, name_or_path: str, build: bool = True) -> dict:
    """A teacher/student preset as a dict; a bare model path/id becomes ``{'model': it}``.

    A preset with ``init_from`` (and optional ``keep_layers``) describes a model made from another
    by :func:`shrink_layers`; it is built into ``model`` the first time the preset is loaded (with
    ``build``; ``distill check`` reads it without building anything).
    """
    preset = resolve_preset(kind, name_or_path)
    if preset is None:
        if "/" not in str(name_or_path) and not Path(name_or_path).exists():
            raise DistillError(f"{kind.rstrip('s')} '{name_or_path}' is not a preset (known: "
                               f"{', '.join(list_presets(kind))}); a model directory, a .gguf file or a hub id "
                               f"(org/name) also works")
        return {"model": name_or_path}
    data = load_yaml(preset)
    data.setdefault("name", preset.stem)
    data["preset_file"] = str(preset)
    if preset.resolve().parent == asset_dir(kind).resolve():  # a shipped preset: its ./paths are the repo's
        for key in ("model", "init_from"):
            if isinstance(data.get(key), str) and data[key].startswith("."):
                data[key] = str(asset_dir(kind).parent / data[key])
    if data.get("init_from") and build:
        if not data.get("model"):
            raise DistillError(f"{preset}: 'init_from' needs 'model', the directory to build the model in")
        data["model"] = str(shrink_layers(data["init_from"], data["model"], data.get("keep_layers", "every_other")))
    return data


def model_preset(kind: str, name_or_path: str) -> dict:
    """A preset whose ``model`` is what transformers loads: GGUF converted, a directory made absolute."""
    preset = dict(load_preset(kind, name_or_path))
    if not preset.get("model"):
        raise DistillError(f"{preset.get('preset_file', name_or_path)}: {kind.rstrip('s')} preset has no 'model'")
    path = resolve_model(preset["model"])
    preset["model"] = str(Path(path).resolve()) if Path(path).is_dir() else path
    return preset


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    """bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str, require_chat_template: bool = True):
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise DistillError(f"{name_or_path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if require_chat_template and not tok.chat_template:
        raise DistillError(
            f"{name_or_path}: tokenizer has no chat template; use an -Instruct model or add one "
            f"(set tokenizer.chat_template and save_pretrained, or copy tokenizer_config.json from the instruct model)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, device: str | None = None, dtype=None, **kwargs):
    """A causal LM on ``device`` in ``dtype`` (defaults: GPU+bf16 when there, else CPU+fp32)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        raise DistillError(f"{name_or_path}: cannot load model ({str(e).splitlines()[0]})") from None
    return model.to(device)
