"""The lm-eval models distill evaluates with: in-process HF (LoRA adapters included), an
OpenAI-compatible server, in-process vLLM. Each is lm-eval's own model class with two additions:

- the token budget is clamped to the model's context (lm-eval asserts instead), and the budget
  actually used is kept per task for the results;
- per sample, how many tokens were generated and whether it was cut off (``finish``), which
  lm-eval's models return only as text.

Server: lm-eval sends one fixed ``seed`` with every request, so a server that honours seeds
(vLLM, SGLang) would return the same sample k times. Here the i-th request for a given prompt
carries ``seed + i``: k different, reproducible samples.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from distill.errors import DistillError
from distill.options import Endpoint

# Chat-template tokens around a message, at most; the server budget keeps this much spare.
_TEMPLATE_SLACK = 64


@dataclass
class Backend:
    lm: object  # an lm_eval LM
    kind: str  # hf | server | vllm
    tokenizer: object | None  # counts generated tokens where the backend does not report them
    name: str  # the model's path/id, or its name on the server


class _ClampedBudget:
    """Mixin for lm-eval's local models: ``max_gen_toks`` <= context - longest prompt of the task."""

    def generate_until(self, requests, disable_tqdm: bool = False):
        longest: dict[str, int] = defaultdict(int)
        lengths: dict[str, int] = {}
        for req in requests:
            ctx = req.args[0]
            if ctx not in lengths:
                lengths[ctx] = len(self.tok_encode(ctx))
            longest[req.task_name] = max(longest[req.task_name], lengths[ctx])
        self.budgets = getattr(self, "budgets", {})
        new_kwargs: dict[str, dict] = {}
        for task, prompt_len in longest.items():
            kwargs = next(r.args[1] for r in requests if r.task_name == task)
            budget = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - prompt_len)
            if budget < 1:
                raise DistillError(f"{task}: a prompt of {prompt_len} tokens does not fit the model's "
                                   f"context of {self.max_length} tokens")
            self.budgets[task] = budget
            new_kwargs[task] = {**kwargs, "max_gen_toks": budget}
        self.finishes = getattr(self, "finishes", {})
        results = []
        for task, kwargs in new_kwargs.items():  # one task at a time: one budget at a time
            self._budget_now = kwargs["max_gen_toks"]
            mine = [i for i, r in enumerate(requests) if r.task_name == task]
            outs = super().generate_until([SimpleNamespace(args=(requests[i].args[0], kwargs)) for i in mine],
                                          disable_tqdm)
            results.extend(zip(mine, outs))
        return [out for _, out in sorted(results, key=lambda pair: pair[0])]


def _adapter_base(path: str) -> str | None:
    cfg = Path(path) / "adapter_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("base_model_name_or_path")
    return None


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def model_parts(model: str) -> tuple[str, str | None, str]:
    """(the model as transformers loads it, its base model when it is a LoRA adapter, where its
    tokenizer is: the adapter's own, else the base's)."""
    from distill.models import resolve_model

    model = resolve_model(model)
    base = _adapter_base(model)
    return model, base, model if (base is None or _has_tokenizer(model)) else base


def build_hf(model: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    from distill.models import default_device, load_tokenizer

    class DistillHFLM(_ClampedBudget, HFLM):
        advance = None  # the progress bar of the generation in flight

        def generate_until(self, requests, disable_tqdm: bool = False):
            """lm-eval's generation, with distill's one bar (rate, ETA) instead of lm-eval's own."""
            from distill.console import progress

            with progress("generating", total=len(requests), unit="answers") as self.advance:
                return super().generate_until(requests, disable_tqdm=True)

        def tok_decode(self, tokens, skip_special_tokens: bool = True):
            """lm-eval decodes each generated row here (padding included), in generation order:
            count its tokens up to the first EOS and note whether it hit the budget."""
            text = super().tok_decode(tokens, skip_special_tokens)
            if isinstance(tokens, list) and self.advance is not None:
                self.advance()
            if isinstance(tokens, list):
                eos = self._eos_ids()
                end = next((i for i, t in enumerate(tokens) if t in eos), None)
                if end is None:
                    stats = ("length" if len(tokens) >= self._budget_now else "stop", len(tokens))
                else:
                    stats = ("stop", end + 1)
                self.finishes.setdefault(text, deque()).append(stats)
            return text

        def _eos_ids(self) -> set:
            ids = self.model.generation_config.eos_token_id
            ids = set(ids if isinstance(ids, list) else [ids])
            return ids | {self.tokenizer.eos_token_id} - {None}

    model, base, tok_path = model_parts(model)
    tokenizer = load_tokenizer(tok_path, require_chat_template=True)
    device = default_device()
    kwargs = {"pretrained": base or model, "tokenizer": tokenizer, "device": device,
              "dtype": "bfloat16" if device == "cuda" else "float32", "batch_size": batch_size}
    if base:
        kwargs["peft"] = model
    try:
        lm = DistillHFLM(**kwargs)
    except OSError as e:
        raise DistillError(f"{model}: cannot load model ({str(e).splitlines()[0]})") from None
    return Backend(lm, "hf", tokenizer, model)


def build_vllm(model: str, batch_size: int, seed: int):
    try:
        import vllm  # noqa: F401
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError:
        raise DistillError("backend 'vllm' needs vLLM: pip install vllm (or serve the model and use "
                           "--model-url)") from None
    from distill.models import load_tokenizer

    class DistillVLLM(_ClampedBudget, VLLM):
        pass

    model, base, tok_path = model_parts(model)
    tokenizer = load_tokenizer(tok_path)
    kwargs = {"pretrained": base or model, "seed": seed, "batch_size": "auto", "max_batch_size": max(batch_size, 256)}
    if base:
        kwargs["lora_local_path"] = model
    # vLLM samples each request from its engine RNG (no per-request seed): k distinct samples.
    return Backend(DistillVLLM(**kwargs), "vllm", tokenizer, model)


def server_info(base_url: str, api_key: str | None) -> dict:
    """GET /models: checks the server is up; gives the default model name and its context."""
    import requests

    url = models_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = requests.get(url, headers=headers, timeout=10)
        resp.raise_for_status()
        data = resp.json().get("data") or []
    except (requests.RequestException, ValueError) as e:
        raise DistillError(f"cannot reach the server at {base_url} ({type(e).__name__}: {e})") from None
    return {m.get("id"): m for m in data if isinstance(m, dict)}


def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    for suffix in ("/chat/completions", "/models"):
        if root.endswith(suffix):
            root = root[: -len(suffix)]
    return root


def models_url(base_url: str) -> str:
    return api_root(base_url) + "/models"


def build_server(base_url: str, model_name: str | None, endpoint: Endpoint, seed: int):
    from lm_eval.models.openai_completions import LocalChatCompletion

    api_key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if endpoint.api_key_env and not api_key:
        raise DistillError(f"--api-key-env {endpoint.api_key_env}: that environment variable is not set")
    models = server_info(base_url, api_key)
    if model_name is None:
        if not models:
            raise DistillError(f"{base_url}: the server lists no models; pass --model NAME")
        model_name = next(iter(models))
    elif models and model_name not in models:
        raise DistillError(f"{base_url}: no model '{model_name}' on the server (it has: {', '.join(models)})")
    context = (models.get(model_name) or {}).get("max_model_len")

    class DistillServerChat(LocalChatCompletion):
        """Chat completions with a per-sample seed, the budget clamped to the server's context,
        and each choice's finish reason and token count kept."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.sent: dict[str, int] = defaultdict(int)
            self.finishes: dict[str, deque] = defaultdict(deque)
            self.budgets: dict[str, int] = {}

        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kw):
            key = json.dumps(messages, ensure_ascii=False)
            repeat = self.sent[key]
            self.sent[key] += 1
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs,
                                              seed=seed + repeat, eos=eos, **kw)
            if not payload.get("top_k"):  # 0: all tokens, as the server does unasked (OpenAI has no top_k)
                payload.pop("top_k", None)
            if context:
                room = int(context) - len(key.encode()) - _TEMPLATE_SLACK
                payload["max_tokens"] = max(1, min(payload["max_tokens"], room))
            return payload

        def parse_generations(self, outputs, **kw):
            texts = super().parse_generations(outputs, **kw)
            outs = outputs if isinstance(outputs, list) else [outputs]
            choices = [(c, o.get("usage") or {}) for o in outs for c in sorted(o.get("choices", []), key=lambda c: c["index"])]
            for text, (choice, usage) in zip(texts, choices):
                tokens = usage.get("completion_tokens") if len(choices) == 1 else None
                self.finishes[text or ""].append((choice.get("finish_reason"), tokens))
            return texts

    lm = DistillServerChat(
        base_url=api_root(base_url) + "/chat/completions", model=model_name, seed=seed,
        num_concurrent=endpoint.concurrency, max_retries=endpoint.max_retries, timeout=endpoint.request_timeout,
        tokenizer_backend=None,
        tokenized_requests=False, header={"Authorization": f"Bearer {api_key or 'EMPTY'}"},
    )
    return Backend(lm, "server", None, model_name)
