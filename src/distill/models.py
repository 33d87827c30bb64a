"""Loading models and tokenizers the same way in every stage.

A model is a Hugging Face id, a local directory, or a ``.gguf`` file. A GGUF file is
dequantised once by transformers and saved beside it as a normal model directory
(``NAME.gguf`` -> ``NAME.hf/``), which then reloads in under a second.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distill.config import load_yaml, resolve_preset
from distill.errors import DistillError


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
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_model(name_or_path: str) -> str:
    """Model id/dir as transformers wants it (GGUF files become their converted directory)."""
    if str(name_or_path).endswith(".gguf"):
        return str(ensure_hf_dir(name_or_path))
    return str(name_or_path)


def load_preset(kind: str, name_or_path: str) -> dict:
    """A teacher/student preset as a dict; a bare model path/id becomes ``{'model': it}``."""
    preset = resolve_preset(kind, name_or_path)
    if preset is None:
        return {"model": name_or_path}
    data = load_yaml(preset)
    data.setdefault("name", preset.stem)
    data["preset_file"] = str(preset)
    return data


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
