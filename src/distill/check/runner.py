"""Every check a run's settings allow, from plain parameters (the CLI maps its options onto them).

Models are resolved as training resolves them (a preset name, a preset file, a directory, a hub
id), read without loading weights: the tokenizer, the config's shape and the generation config's
stop tokens. What is not at hand (a hub model on an offline machine, an API teacher's tokenizer)
turns the checks that need it into ``skipped`` lines that say why.
"""

from __future__ import annotations

import functools
import json
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from distill.check.base_student import check_base_student
from distill.check.memory import Plan, Shape, check_memory, find_shape, parse_gpus, present_gpus
from distill.check.served import check_served
from distill.check.templates import check_rendering
from distill.check.tokenizers import check_tokenizers
from distill.check.verdicts import Verdict, error, ok, skipped
from distill.errors import DistillError

#: Traces rendered by default: enough for the shares over the length limit, quick on any file.
TRACE_SAMPLE = 5000


@dataclass
class Model:
    """A student or teacher as the checks need it; ``missing`` says why the tokenizer is not at hand."""

    name: str
    preset: dict
    path: str | None = None
    tokenizer: object = None
    shape: Shape | None = None
    shape_source: str = ""
    stop_ids: list[int] | None = None
    missing: str = ""
    api: bool = False                 # served by an API: no local weights, no tokenizer


def _stop_ids(path: str) -> list[int] | None:
    """The EOS ids generation stops on, from a local model's generation config (else its config)."""
    for name in ("generation_config.json", "config.json"):
        file = Path(path, name)
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [eos]
    return None


def resolve(kind: str, name: str, stand_ins: dict[str, str] | None = None) -> Model:
    """``kind``: "students" or "teachers". A preset that builds its model from another (``init_from``)
    and has not built it yet is read from the source, with the layers it will keep; a stand-in (by the
    preset's name or its model's) is read in place of the model."""
    from distill.models import load_preset, resolve_model

    preset = load_preset(kind, name, build=False)
    model = Model(name, preset)
    if preset.get("kind", "local") != "local" or not preset.get("model"):
        model.missing = model.shape_source = f"'{name}' is an API model ({preset.get('base_url', 'no local weights')})"
        model.api = True
        return model
    source, keep = str(preset["model"]), None
    if preset.get("init_from") and not Path(source, "config.json").is_file():
        source, keep = str(preset["init_from"]), preset.get("keep_layers", "every_other")
    stand_in = (stand_ins or {}).get(name) or (stand_ins or {}).get(source)
    try:
        model.path = resolve_model(stand_in or _at_hand(source))
        model.tokenizer = _tokenizer(model.path)
    except DistillError as e:
        model.missing = str(e)
    local = model.path if model.path and Path(model.path, "config.json").is_file() else None
    model.shape, model.shape_source = find_shape(local or source)
    if model.shape is not None and keep is not None and not stand_in:
        kept = len(range(0, model.shape.layers, 2)) if keep == "every_other" else len(keep)
        model.shape = replace(model.shape, layers=kept)
    if local:
        model.stop_ids = _stop_ids(local)
    return model


@functools.lru_cache(maxsize=16)
def _tokenizer(path: str):
    """A model's tokenizer, read once per process (a recipe's steps share their models)."""
    from distill.models import load_tokenizer

    return load_tokenizer(path, require_chat_template=False)


def _at_hand(model: str) -> str:
    """A local model as it is; a hub id as transformers would fetch it (tokenizer and config only), or
    from the hub cache when the hub cannot be reached (transformers would retry for a minute first)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(model).exists() or model.count("/") != 1 or _hub_reachable():
        return model
    cached = try_to_load_from_cache(model, "tokenizer_config.json")
    if not isinstance(cached, str):
        raise DistillError(f"'{model}' is a hub model that is not in the local cache, and the hub cannot be reached "
                           f"from here (download it, or check with --stand-in {model}=DIR)")
    return str(Path(cached).parent)


@functools.cache
def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a connection within 3 s (and is not switched off)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def run_checks(*, student: str, teacher: str | None = None, teacher_url: str | list[str] | None = None,
               teacher_model: str | None = None, teacher_top_k: int = 20, traces: str | None = None,
               method: str = "sft", on_policy: float = 0.0, sft_before: bool = False, kd_temperature: float = 1.0,
               max_length: int = 16384, overlong: str = "drop", think_style: str | None = None,
               trace_sample: int | None = TRACE_SAMPLE, weights_dtype: str = "fp32", lora: bool = False,
               qlora: bool = False, lora_r: int = 16, sharding: str = "none", batch_size: int = 1,
               grad_accum: int = 1, gradient_checkpointing: bool = True, liger: bool = False,
               kd_chunk_size: int = 1024, prompt_tokens: int = 512, rollout_max_tokens: int = 1024,
               rollouts_per_prompt: int = 1, rollout_cache: str = "auto", gpus: str | None = None,
               stand_ins: dict[str, str] | None = None) -> list[Verdict]:
    """All checks these settings allow, in the order a run meets them.

    The training parameters mean what ``distill train``'s options of the same names mean;
    ``sharding``: "none" (one process or DDP), "fsdp2" or "zero3"; ``gpus``: cards to check the
    memory against ("8xH100", "1x24GiB"; default: this machine's); ``sft_before``: the recipe trains
    the student on traces before its on-policy step; ``stand_ins``: local directories checked in place
    of the hub models (or presets) they are named by.
    """
    verdicts: list[Verdict] = []
    s = resolve("students", student, stand_ins)
    t = resolve("teachers", teacher, stand_ins) if teacher else None
    logit_kd = method == "kd"
    if logit_kd and teacher and not teacher_url:
        from distill.teachers.sources import local_teacher_path

        try:
            local_teacher_path(teacher)
        except DistillError as e:
            verdicts.append(error("teacher", str(e)))
    if s.tokenizer is None:
        verdicts.append(skipped("student", f"tokenizer, template and Base-student checks not run: {s.missing}"))
    elif t is not None:
        if t.tokenizer is not None:
            verdicts += check_tokenizers(s.tokenizer, t.tokenizer, student=student, teacher=teacher,
                                         student_rows=s.shape and s.shape.vocab, teacher_rows=t.shape and t.shape.vocab,
                                         logit_kd=logit_kd)
        elif t.api and not logit_kd:
            verdicts.append(ok("tokenizers", f"{t.missing}: SFT on its traces needs no shared tokenizer"))
        elif not t.api:  # an API teacher under KD: refused above
            verdicts.append(skipped("tokenizers", f"teacher tokenizer not compared: {t.missing}"))
    if s.tokenizer is not None:
        if traces and not Path(traces).is_file():
            verdicts.append(skipped("traces", f"{traces} is not written yet (an earlier step or recipe writes it): "
                                              f"template, think and length checks not run"))
        elif traces:
            style = think_style or s.preset.get("think_style") or "think"
            verdicts += check_rendering(s.tokenizer, traces, think_style=style, max_length=max_length,
                                        overlong=overlong, sample=trace_sample)
        verdicts += check_base_student(s.tokenizer, student=student, stop_ids=s.stop_ids, on_policy=on_policy,
                                       sft_before=sft_before, teacher_tokenizer=t and t.tokenizer)
    verdicts += _served(teacher_url, teacher_model, s, teacher_top_k, kd_temperature)
    if s.shape is None:
        verdicts.append(skipped("memory", f"not estimated: {s.shape_source}"))
    else:
        online = t if logit_kd and t is not None and not t.api and not teacher_url else None
        if online is not None and online.shape is None:
            verdicts.append(skipped("memory", f"not estimated: the teacher's {online.shape_source}"))
        else:
            try:
                cards = parse_gpus(gpus) if gpus else present_gpus()
            except DistillError as e:
                return [*verdicts, error("memory", str(e))]
            plan = Plan(s.shape, teacher=online and online.shape, method="kd" if logit_kd else "sft",
                        weights_dtype=weights_dtype, lora=lora, qlora=qlora, lora_r=lora_r, sharding=sharding,
                        gpus=cards[0] if cards and sharding != "none" else 1, batch_size=batch_size,
                        seq_len=max_length, gradient_checkpointing=gradient_checkpointing, liger=liger,
                        grad_accum=grad_accum, kd_chunk=kd_chunk_size, on_policy=on_policy,
                        prompt_tokens=prompt_tokens, rollout_tokens=rollout_max_tokens,
                        rollouts_per_prompt=rollouts_per_prompt, rollout_cache=rollout_cache)
            verdicts += check_memory(plan, cards)
    return verdicts


def _served(urls, model: str | None, s: Model, top_k: int, kd_temperature: float) -> list[Verdict]:
    if not urls:
        return []
    if not model:
        return [error("served", "a served teacher needs its model name on the server", "--teacher-model NAME")]
    if s.tokenizer is None:
        return [skipped("served", f"not checked without the student's tokenizer: {s.missing}")]
    rows = s.shape.vocab if s.shape else len(s.tokenizer)
    out = []
    for url in ([u.strip() for u in urls.split(",")] if isinstance(urls, str) else urls):
        out += check_served(url, model, s.tokenizer, student=s.name, vocab_size=rows, top_k=top_k,
                            kd_temperature=kd_temperature)
    return out
