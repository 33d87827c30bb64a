"""Where KD's teacher distribution comes from, behind one small interface.

A teacher answers ``scores(inputs, mask, example_index, index=None)`` for a batch: the teacher's side
of the loss at the batch's target positions (``rendering.target_mask``; ``index``: the same positions
as ``rendering.target_index`` gives them, on the training device), as ``kd_losses.DenseTeacher``
(hidden states + output embedding; logits are made a chunk at a time) or
``kd_losses.SparseTeacher`` (top-k log-probs + the tail's mass).

- :class:`OnlineTeacher`: a local model of the student's tokenizer, frozen, one no-grad forward per step.
- :class:`CachedTeacher`: the rows a ``distill logits`` run stored (``store``), checked to be for
  exactly the tokens this training renders.

:func:`teacher_top_k` is the local teacher's forward as ``distill logits`` caches it.
"""

from __future__ import annotations

from typing import Protocol

from distill.errors import DistillError
from distill.distributed import output_rows, shard_frozen, shard_frozen_zero3, whole
from distill.rendering import target_mask


def final_hidden_states(model, decoder, inputs: dict):
    """The decoder's final (normed) hidden states, taken on the way through a forward of the whole
    ``model`` (so the hooks of its wrappers run: DDP, FSDP, DeepSpeed), with the logits of one position
    only. Not ``output_hidden_states``: transformers collects every layer's with hooks inside each
    layer and keeps them in a list (an H200 packed step: 1.4% faster and 2.8 GiB less at peak without;
    torch.compile also breaks its graph at those hooks). Under FSDP2 they do come as an output:
    FSDP2 gathers the root's weights (final norm, embeddings) for the backward pass from hooks on
    the outputs of the root's forward, and a hidden state taken on the way has none."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
    captured = {}
    hook = decoder.register_forward_hook(lambda module, args, out: captured.update(hidden=out.last_hidden_state))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured["hidden"]


class Teacher(Protocol):
    """May also have ``submit(inputs, mask)``: start on a batch before the student's forward pass and
    return a future (or None: nothing started) that ``scores(..., scored=future)`` then waits on."""

    def scores(self, inputs: dict, mask, example_index, index=None):
        """The teacher at the batch's target positions (rows in batch order). With ``index`` a teacher
        picks and counts the rows without a host sync (a boolean mask's count is data on the device)."""


def local_teacher_path(name: str) -> str:
    """Model path of a teacher KD can run locally (a preset, path or id); clear refusals otherwise."""
    from distill.models import load_preset

    preset = load_preset("teachers", name)
    where_ = preset.get("preset_file", name)
    if preset.get("logprobs") is False:
        raise DistillError(
            f"teacher '{name}' ({where_}) cannot give log-probs (logprobs: false), so it cannot be used for "
            f"logit distillation; train on its traces with --method sft instead"
        )
    if preset.get("kind", "local") != "local" or preset.get("base_url"):
        raise DistillError(
            f"teacher '{name}' ({where_}) is an API model: online KD and 'distill logits --teacher' need a local "
            f"model; capture its top_logprobs with 'distill generate --top-logprobs K' and run 'distill logits "
            f"--traces THOSE.jsonl --student STUDENT --out DIR' without --teacher (the teacher's tokens must be the "
            f"student's), then train with --teacher-logits DIR"
        )
    if not preset.get("model"):
        raise DistillError(f"{where_}: teacher preset has no 'model'")
    return str(preset["model"])


def check_same_tokenizer(student_tok, student_name: str, teacher_tok, teacher_name: str) -> None:
    """KD compares distributions token by token: the two vocabularies must be the same."""
    from distill.store import tokenizer_sha

    if tokenizer_sha(student_tok) != tokenizer_sha(teacher_tok):
        raise DistillError(
            f"student '{student_name}' ({type(student_tok).__name__}, {len(student_tok)} tokens) and teacher "
            f"'{teacher_name}' ({type(teacher_tok).__name__}, {len(teacher_tok)} tokens) use different tokenizers; "
            f"logit distillation needs the same tokenizer family (use --method sft across families)"
        )


def vocab_rows(model_path: str) -> int:
    """The output rows (vocabulary size) a model's config declares."""
    from transformers import AutoConfig

    from distill.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model_path)).get_text_config().vocab_size


class OnlineTeacher:
    """A frozen local model; its final hidden states at the target positions, per batch.

    Under FSDP2 or ZeRO-3 it is sharded like the student (``distributed.shard_frozen`` or
    ``shard_frozen_zero3``, never seen by the Trainer) unless ``--teacher-device`` places it whole on
    a device of its own (FSDP2 only); ``placement`` says which, for the run record.

    On a GPU, whole and on the batch's device, its forward pass runs on a CUDA stream and a host
    thread of its own (``submit``): the student's forward pass is launch-bound at small batches (the
    GPU waits for the host between its short kernels), and the teacher's long ones fill those waits.
    """

    def __init__(self, model, student_rows: int, placement: str | None = None, sharded: bool = False):
        self.model = model
        self.vocab_size = min(student_rows, output_rows(model))
        self.placement = placement or str(model.get_output_embeddings().weight.device)
        self.sharded = sharded
        self._stream = self._worker = None

    @classmethod
    def load(cls, name: str, tokenizer, student_name: str, device: str, student_rows: int,
             shard: str | None = None, attn: str | None = None) -> "OnlineTeacher":
        """The teacher ``name`` on ``device`` (bf16 on a GPU), checked to share the student's tokenizer;
        ``shard`` ("FSDP2" or "ZeRO-3"): sharded over all processes like the student instead; ``attn``:
        the student's attention implementation (packed rows need varlen attention on both sides)."""
        import torch

        from distill.models import load_model, load_tokenizer

        path = local_teacher_path(name)
        check_same_tokenizer(tokenizer, student_name, load_tokenizer(path, require_chat_template=False), name)
        on_gpu = device.startswith("cuda") or (shard and torch.cuda.is_available())
        # FSDP2 shards it from the CPU; under ZeRO-3 transformers loads it partitioned already, on ``device``
        model = load_model(path, device="cpu" if shard == "FSDP2" else device,
                           dtype=torch.bfloat16 if on_gpu else None,
                           **({"attn_implementation": attn} if attn else {})).eval()
        model.requires_grad_(False)
        if not shard:
            return cls(model, student_rows)
        world = torch.distributed.get_world_size()
        model = shard_frozen(model) if shard == "FSDP2" else shard_frozen_zero3(model, bf16=on_gpu)
        return cls(model, student_rows, placement=f"sharded with the student over {world} processes ({shard})",
                   sharded=True)

    def _hidden(self, inputs: dict):
        import torch

        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad():  # sharded: the whole model's forward gathers its root's weights in it
            return final_hidden_states(self.model, self.model.get_decoder(),
                                       {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})

    def submit(self, inputs: dict, mask):
        """Start the forward pass of a batch on the teacher's own stream and thread; a future of its
        hidden states and the event that marks them done. None where it runs in line (not on a GPU,
        sharded: the gathers are collectives in the processes' common order, or on another device)."""
        import torch

        device = self.model.get_input_embeddings().weight.device
        if self.sharded or device.type != "cuda" or inputs["input_ids"].device != device:
            return None
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._stream = torch.cuda.Stream(device)
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="teacher")
        inputs_ready = torch.cuda.current_stream(device).record_event()  # their copies to the GPU

        def forward():
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(inputs_ready)
                return self._hidden(inputs), self._stream.record_event()

        return self._worker.submit(forward)

    def scores(self, inputs: dict, mask, example_index, index=None, scored=None):
        import torch

        from distill.kd_losses import DenseTeacher

        if scored is not None:
            hidden, done = scored.result()
            stream = torch.cuda.current_stream(hidden.device)
            stream.wait_event(done)
            hidden.record_stream(stream)  # made on the teacher's stream, read and freed on this one
        else:
            hidden = self._hidden(inputs)
        with torch.no_grad():
            weight = whole(self.model.get_output_embeddings().weight)  # gathered whole, once per micro-batch
        device = hidden.device
        rows = hidden.flatten(0, 1)[index.to(device)] if index is not None else hidden[:, :-1][mask.to(device)]
        return DenseTeacher(rows, weight, vocab_size=self.vocab_size)


class CachedTeacher:
    """Offline teacher: the cached rows of a batch's examples, concatenated in batch order."""

    def __init__(self, cache, trace_ids: dict[int, str]):
        self.cache, self.trace_ids = cache, trace_ids

    @classmethod
    def open(cls, directory: str, tokenizer, examples: list[dict], *, student: str, traces: str,
             kd_temperature: float, student_rows: int) -> "CachedTeacher":
        """Open a cache and check it fits this student and these exact tokens."""
        from distill.store import LogitsCache, token_sha, tokenizer_sha

        cache = LogitsCache(directory)
        header = cache.header
        if header["tokenizer_sha"] != tokenizer_sha(tokenizer):
            raise DistillError(
                f"{directory}: cache was made with teacher '{header['teacher']}' whose tokenizer differs from "
                f"student '{student}' ({type(tokenizer).__name__}, {len(tokenizer)} tokens); KD needs the same "
                f"tokenizer")
        if abs(header["temperature"] - kd_temperature) > 1e-9:
            raise DistillError(f"{directory}: cached at temperature {header['temperature']}, but "
                               f"--kd-temperature is {kd_temperature}; use the same (or re-run distill logits)")
        if header["vocab_size"] > student_rows:
            raise DistillError(f"{directory}: teacher vocabulary ({header['vocab_size']}) is larger than the "
                               f"student's output rows ({student_rows})")
        for ex in examples:
            if ex["id"] not in cache:
                raise DistillError(f"{traces}:{ex['example_index'] + 1}: trace '{ex['id']}' is not in the logits "
                                   f"cache {directory}; run 'distill logits' on these traces (it resumes)")
            if cache.token_sha(ex["id"]) != token_sha(ex["input_ids"]):
                raise DistillError(
                    f"{traces}:{ex['example_index'] + 1}: trace '{ex['id']}' renders to other tokens than the cache "
                    f"was made from (cache: think_style={header['think_style']}, max_length={header['max_length']}, "
                    f"overlong={header['overlong']}, rendered with the tokenizer of '{header['rendered_for']}'); "
                    f"run 'distill logits --student {student}' with the same settings as this training")
        return cls(cache, {ex["example_index"]: ex["id"] for ex in examples})

    def scores(self, inputs: dict, mask, example_index, index=None):
        from distill.kd_losses import SparseTeacher

        if example_index is None:
            raise DistillError("offline KD needs 'example_index' in each batch (the collator keeps it)")
        ids, lps, tail = self.cache.get_many([self.trace_ids[int(i)] for i in example_index.tolist()], mask.device)
        wanted = index.numel() if index is not None else int(mask.sum())
        if ids.shape[0] != wanted:
            raise DistillError(f"cached teacher rows ({ids.shape[0]}) do not match the batch's target tokens "
                               f"({wanted}); the cache was made from differently rendered traces")
        return SparseTeacher(ids, lps, tail)


def teacher_top_k(model, examples: list[dict], top_k: int, temperature: float, vocab_size: int,
                  chunk_size: int) -> list[tuple]:
    """Per example: (ids, logprobs, log_tail) at its target positions, from one padded forward."""
    import torch

    device = model.get_output_embeddings().weight.device
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    weight = model.get_output_embeddings().weight[:vocab_size]
    k = min(top_k, vocab_size)
    out = []
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for i, e in enumerate(examples):
            labels = torch.as_tensor(e["labels"], device=device)
            h = hidden[i, : len(labels) - 1][target_mask(labels)]
            parts = []
            for chunk in h.split(chunk_size):  # an empty h still yields one empty chunk
                logp = torch.log_softmax((chunk @ weight.T).float() / temperature, dim=-1)
                top = logp.topk(k, dim=-1)
                rest = torch.logsumexp(logp.scatter(1, top.indices, -torch.inf), dim=-1)
                parts.append((top.indices.int().cpu(), top.values.half().cpu(), rest.cpu()))
            out.append(tuple(torch.cat(p) for p in zip(*parts)))
    return out
