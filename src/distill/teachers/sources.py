"""Where KD's teacher distribution comes from, behind one small interface.

A teacher answers ``scores(inputs, mask, example_index, index=None)`` for a batch: the teacher's side
of the loss at the batch's target positions (``rendering.target_mask``; ``index``: the same positions
as ``rendering.target_index`` gives them, on the training device), as ``kd_losses.DenseTeacher``
(hidden states + output embedding; logits are made a chunk at a time) or
``kd_losses.SparseTeacher`` (top-k log-probs + the tail's mass).

- :class:`OnlineTeacher`: a local model of the student's tokenizer, frozen, one no-grad forward per step.
- :class:`CachedTeacher`: the rows a ``distill logits`` run stored (``store``), checked to be for
  exactly the tokens this training renders.
- :class:`AlignedOnlineTeacher`, :class:`AlignedCachedTeacher`: the same for a teacher of another
  tokenizer, its rows projected onto the student's positions (``teachers.align``,
  ``kd_losses.AlignedTeacher``); ``counts``: the student tokens taught, by kind of alignment (for the
  log and the run record). :func:`same_tokenizer` decides (by vocabulary, not by name), and with one
  tokenizer the two classes above run as before, bit for bit.

:func:`teacher_top_k` is the local teacher's forward as ``distill logits`` caches it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from distill.errors import DistillError
from distill.distributed import output_rows, shard_frozen, shard_frozen_zero3, whole
from distill.rendering import target_mask
from distill.teachers.align import TeacherRows, TeacherSide, TokenText, align, project, top_k_rows, vocabulary_map


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
    """May also have ``submit(inputs, mask, example_index)``: start on a batch before the student's forward
    pass and return a future (or None: nothing started) that ``scores(..., scored=future)`` then waits on."""

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
            f"--traces THOSE.jsonl --out DIR' without --teacher (a cache in the teacher's own tokens, for a student "
            f"of any tokenizer), then train with --teacher DIR"
        )
    if not preset.get("model"):
        raise DistillError(f"{where_}: teacher preset has no 'model'")
    return str(preset["model"])


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give every id the same token (``store.tokenizer_sha``: their vocabularies);
    then the same-tokenizer KD runs, else the aligned one."""
    from distill.store import tokenizer_sha

    return a is b or tokenizer_sha(a) == tokenizer_sha(b)


def teacher_tokenizer(name: str):
    """The tokenizer of the local teacher ``name`` (a preset, path or id)."""
    from distill.models import load_tokenizer

    return load_tokenizer(local_teacher_path(name), require_chat_template=False)


def served_tokenizer(spec, named: str | None):
    """The tokenizer of a served teacher (``spec``: an endpoint): ``named`` (``--teacher-tokenizer``), else
    the served model's or ``--teacher``'s where it loads without the server (a directory, a .gguf file, the
    Hugging Face cache); None where neither does (the student's is taken for it)."""
    from distill.models import load_tokenizer

    if named:
        return load_tokenizer(named, require_chat_template=False)
    for name in dict.fromkeys(filter(None, (spec.model, spec.name))):
        if _loads_locally(name):
            return load_tokenizer(name, require_chat_template=False)
    return None


def _loads_locally(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if Path(name).is_dir() or (name.endswith(".gguf") and Path(name).is_file()):
        return True
    try:
        return isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    except ValueError:  # not a hub id either (huggingface_hub's HFValidationError)
        return False


def check_same_tokenizer(student_tok, student_name: str, teacher_tok, teacher_name: str) -> None:
    """For what compares the two distributions token by token (fidelity): one vocabulary on both sides.
    Training aligns a teacher of another tokenizer instead (``teachers.align``)."""
    if not same_tokenizer(student_tok, teacher_tok):
        raise DistillError(
            f"student '{student_name}' ({type(student_tok).__name__}, {len(student_tok)} tokens) and teacher "
            f"'{teacher_name}' ({type(teacher_tok).__name__}, {len(teacher_tok)} tokens) use different tokenizers; "
            f"comparing their distributions token by token needs one tokenizer ('distill train --method kd' "
            f"aligns a teacher of another tokenizer by itself)"
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
        from distill.models import load_tokenizer

        path = local_teacher_path(name)
        check_same_tokenizer(tokenizer, student_name, load_tokenizer(path, require_chat_template=False), name)
        return cls.from_path(path, device, student_rows, shard, attn)

    @classmethod
    def from_path(cls, path: str, device: str, student_rows: int, shard: str | None = None,
                  attn: str | None = None) -> "OnlineTeacher":
        """The model at ``path``, frozen, placed as :meth:`load` says (no tokenizer check)."""
        import torch

        from distill.models import load_model

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

    def submit(self, inputs: dict, mask, example_index=None):
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

        hidden = self.collect(scored) if scored is not None else self._hidden(inputs)
        with torch.no_grad():
            weight = whole(self.model.get_output_embeddings().weight)  # gathered whole, once per micro-batch
        device = hidden.device
        rows = hidden.flatten(0, 1)[index.to(device)] if index is not None else hidden[:, :-1][mask.to(device)]
        return DenseTeacher(rows, weight, vocab_size=self.vocab_size)

    @staticmethod
    def collect(scored):
        """The hidden states a :meth:`submit` future made, once the current stream may read them."""
        import torch

        hidden, done = scored.result()
        stream = torch.cuda.current_stream(hidden.device)
        stream.wait_event(done)
        hidden.record_stream(stream)  # made on the teacher's stream, read and freed on this one
        return hidden


class CachedTeacher:
    """Offline teacher: the cached rows of a batch's examples, concatenated in batch order."""

    def __init__(self, cache, trace_ids: dict[int, str]):
        self.cache, self.trace_ids = cache, trace_ids

    @classmethod
    def open(cls, directory: str, tokenizer, examples: list[dict], *, student: str, traces: str,
             kd_temperature: float, student_rows: int) -> "CachedTeacher | AlignedCachedTeacher":
        """Open a cache and check it fits this student and these exact tokens. A cache of the teacher's own
        tokens (header ``tokens: teacher``) serves any student: as it is where they are this student's
        tokens, else aligned (:class:`AlignedCachedTeacher`)."""
        from distill.store import LogitsCache, token_sha, tokenizer_sha

        cache = LogitsCache(directory)
        header = cache.header
        if abs(header["temperature"] - kd_temperature) > 1e-9:
            raise DistillError(f"{directory}: cached at temperature {header['temperature']}, but "
                               f"--kd-temperature is {kd_temperature}; use the same (or re-run distill logits)")
        same = header["tokenizer_sha"] == tokenizer_sha(tokenizer)
        if header.get("tokens") == "teacher" and not (same and all(
                ex["id"] in cache and cache.token_sha(ex["id"]) == token_sha(ex["input_ids"]) for ex in examples)):
            return AlignedCachedTeacher.open(cache, tokenizer, examples, student=student, traces=traces,
                                             student_rows=student_rows)
        if not same:
            raise DistillError(
                f"{directory}: cache was made with teacher '{header['teacher']}' whose tokenizer differs from "
                f"student '{student}' ({type(tokenizer).__name__}, {len(tokenizer)} tokens), and it holds rows in the "
                f"student's ids; re-run 'distill logits' with this --student (a student of another tokenizer than the "
                f"teacher's gets a cache of the teacher's own tokens, which serves any student)")
        if header["vocab_size"] > student_rows:
            raise DistillError(f"{directory}: teacher vocabulary ({header['vocab_size']}) is larger than the "
                               f"student's output rows ({student_rows})")
        for ex in examples:
            _in_cache(cache, ex, traces)
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
                  chunk_size: int, realized: bool = False) -> list[tuple]:
    """Per example: (ids, logprobs, log_tail) at its target positions, from one padded forward.

    ``realized``: each row's own next token is always among the k (in place of the k-th where it is not),
    and a fourth tensor holds those tokens: a cache of the teacher's own tokens, which students of other
    tokenizers align to at load time (``teachers.align``: the chain rule needs the realised tokens)."""
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
            mask = target_mask(labels)
            h = hidden[i, : len(labels) - 1][mask]
            targets = ids[i, 1:len(labels)].to(device)[mask]
            parts = []
            for chunk, chunk_targets in zip(h.split(chunk_size), targets.split(chunk_size)):  # empty h: one empty chunk
                logp = torch.log_softmax((chunk @ weight.T).float() / temperature, dim=-1)
                if realized:
                    top_ids, values, rest = top_k_rows(logp, k, chunk_targets)
                else:
                    top = logp.topk(k, dim=-1)
                    top_ids, values = top.indices, top.values
                    rest = torch.logsumexp(logp.scatter(1, top_ids, -torch.inf), dim=-1)
                parts.append((top_ids.int().cpu(), values.half().cpu(), rest.cpu())
                             + ((chunk_targets.int().cpu(),) if realized else ()))
            out.append(tuple(torch.cat(p) for p in zip(*parts)))
    return out


class AlignedOnlineTeacher:
    """A frozen local teacher of another tokenizer: per batch, its forward pass over its own tokens
    for the same text (``align.TeacherSide``: its chat template, the alignment made once per example;
    a student's rollout decoded to text and aligned as it comes), the top-k of its rows with each
    row's realised token, and those rows projected onto the student's target positions
    (``align.project``; ``kd_losses.AlignedTeacher``). The teacher's logits are made ``chunk_size``
    rows at a time, so memory stays flat in the sequence length as on the same-tokenizer path.
    """

    def __init__(self, online: OnlineTeacher, side: TeacherSide, student_rows: int, top_k: int = 128,
                 temperature: float = 1.0, chunk_size: int = 1024):
        import torch

        from distill.distributed import output_rows

        self.online, self.side, self.student_rows = online, side, student_rows
        self.top_k, self.temperature, self.chunk_size = top_k, temperature, chunk_size
        self.placement = online.placement
        self.vocab_map = torch.from_numpy(vocabulary_map(side.teacher, side.student, output_rows(online.model)))

    @property
    def counts(self):
        """The student tokens taught so far by kind (``align.describe`` says it in a line)."""
        return self.side.counts

    @classmethod
    def load(cls, name: str, student_tokenizer, student_name: str, examples: list[dict], device: str,
             student_rows: int, top_k: int = 128, temperature: float = 1.0, shard: str | None = None,
             chunk_size: int = 1024) -> "AlignedOnlineTeacher":
        """The teacher ``name`` as :meth:`OnlineTeacher.from_path` places it; ``examples`` carry the
        teacher's tokens (``rendering.load_examples(..., teacher_tokenizer=...)``)."""
        path = local_teacher_path(name)
        side = TeacherSide(examples, student_tokenizer, teacher_tokenizer(name), student_name, name)
        return cls(OnlineTeacher.from_path(path, device, student_rows, shard), side, student_rows, top_k,
                   temperature, chunk_size)

    def submit(self, inputs: dict, mask, example_index=None):
        """The teacher's sequences for this batch (a rollout aligned once, here), its tokens on its device,
        and its forward pass over them started on its own stream where :meth:`OnlineTeacher.submit` would
        (else None: it runs in :meth:`scores`)."""
        sequences = self.side.sequences(inputs, mask, example_index)
        batch = self._batch(sequences)
        return sequences, batch, self.online.submit(batch, None)

    def scores(self, inputs: dict, mask, example_index, index=None, scored=None):
        sequences, batch, future = scored or self.submit(inputs, mask, example_index)
        plan = TeacherSide.plan(sequences, one_hot=example_index is not None, index=index)
        hidden = OnlineTeacher.collect(future) if future else self.online._hidden(batch)
        rows = self.rows(sequences, hidden)
        return project(rows, plan, self.vocab_map.to(rows.ids.device), self.student_rows, self.temperature)

    def _batch(self, sequences) -> dict:
        """The teacher's tokens of the sequences, right-padded, on its device."""
        import torch

        width = max(len(s.ids) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for b, s in enumerate(sequences):
            ids[b, :len(s.ids)] = torch.from_numpy(s.ids)
            attention[b, :len(s.ids)] = 1
        device = self.online.model.get_input_embeddings().weight.device
        return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}

    def rows(self, sequences, hidden) -> TeacherRows:
        """The teacher's top-k rows (with the realised tokens) at the sequences' positions, in order, from
        its final hidden states over :meth:`_batch`."""
        import torch

        width = hidden.shape[1]
        at = torch.from_numpy(np.concatenate([b * width + s.positions.astype(np.int64)
                                              for b, s in enumerate(sequences)]))
        realized = torch.from_numpy(np.concatenate([s.realized for s in sequences]).astype(np.int64))
        device = hidden.device
        hidden, realized = hidden.flatten(0, 1)[at.to(device)], realized.to(device)
        with torch.no_grad():
            weight = whole(self.online.model.get_output_embeddings().weight)
            parts = []
            for h, r in zip(hidden.split(self.chunk_size), realized.split(self.chunk_size)):
                logp = torch.log_softmax((h @ weight.to(h.dtype).T).float() / self.temperature, dim=-1)
                parts.append((*top_k_rows(logp, min(self.top_k, logp.shape[1]), r), r))
        return TeacherRows(*(torch.cat(p) for p in zip(*parts)))


class AlignedCachedTeacher:
    """Offline teacher of another tokenizer: a cache of the teacher's own tokens (``store``: header
    ``tokens: teacher``, the realised token of every row, the teacher's vocabulary beside it), aligned
    to each example's student tokens once, when the cache is opened, and projected per batch."""

    def __init__(self, cache, trace_ids: dict[int, str], alignments: dict[int, object], targets: dict[int, list],
                 vocab_map, student_rows: int, counts):
        self.cache, self.trace_ids, self.alignments, self.targets = cache, trace_ids, alignments, targets
        self.vocab_map, self.student_rows, self.counts = vocab_map, student_rows, counts

    @classmethod
    def open(cls, cache, tokenizer, examples: list[dict], *, student: str, traces: str,
             student_rows: int) -> "AlignedCachedTeacher":
        """Align every example to the cached teacher tokens of its trace; refuse a trace whose texts differ."""
        from collections import Counter

        import torch

        from distill.rendering import target_tokens
        from distill.store import teacher_vocabulary

        header = cache.header
        vocabulary = teacher_vocabulary(cache.dir)
        teacher = (TokenText.of_strings(vocabulary, header["teacher"]) if header.get("teacher_vocab") == "strings"
                   else TokenText.of(vocabulary, header["teacher"]))
        side_student = TokenText.of(tokenizer, student)
        counts, alignments, targets, trace_ids = Counter(), {}, {}, {}
        for ex in examples:
            _in_cache(cache, ex, traces)
            realized = cache.targets(ex["id"]).tolist()
            alignment = align(target_tokens(ex), realized, side_student, teacher)
            if 2 * alignment.matched < alignment.total:
                raise DistillError(
                    f"{traces}:{ex['example_index'] + 1}: trace '{ex['id']}': only {alignment.matched} of its "
                    f"{alignment.total} assistant bytes are in the text the cache {cache.dir} holds for it; the cache "
                    f"was made from other traces (re-run 'distill logits' on these)")
            counts += alignment.counts()
            i = ex["example_index"]
            alignments[i], targets[i], trace_ids[i] = alignment, target_tokens(ex), ex["id"]
        vocab_map = torch.from_numpy(vocabulary_map(teacher, side_student, header["vocab_size"]))
        return cls(cache, trace_ids, alignments, targets, vocab_map, student_rows, counts)

    def scores(self, inputs: dict, mask, example_index, index=None):
        import torch

        from distill.teachers.align import Plan

        if example_index is None:
            raise DistillError("offline KD needs 'example_index' in each batch (the collator keeps it)")
        order = [int(i) for i in example_index.tolist()]
        names = [self.trace_ids[i] for i in order]
        ids, lps, tail = self.cache.get_many(names, mask.device)
        realized = torch.cat([self.cache.targets(name) for name in names]).long().to(mask.device)
        plan = Plan.join([(self.alignments[i], self.targets[i], len(self.cache.targets(self.trace_ids[i])))
                          for i in order], index=index)
        return project(TeacherRows(ids, lps, tail, realized), plan, self.vocab_map.to(mask.device), self.student_rows,
                       self.cache.header["temperature"])


def _in_cache(cache, ex: dict, traces: str) -> None:
    if ex["id"] not in cache:
        raise DistillError(f"{traces}:{ex['example_index'] + 1}: trace '{ex['id']}' is not in the logits "
                           f"cache {cache.dir}; run 'distill logits' on these traces (it resumes)")
