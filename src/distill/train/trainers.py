"""The trainers: transformers' ``Trainer`` with distill's chunked loss, for SFT and for KD.

Importing this module imports transformers; commands import it inside functions so that
``distill --help`` stays instant.

Both trainers make the loss from the student's final hidden states a chunk of tokens at a time
(``kd_losses.chunked_kd_loss``): the tokens x vocabulary logits are never held (16k tokens of
Qwen2.5's vocabulary are 5 GB in bf16, 10 GB upcast), the LM head runs at the mixed precision
(bf16), and on CUDA the per-chunk maths is compiled. (Liger's fused linear cross-entropy, under
transformers' bf16 autocast over fp32 weights, accumulated the LM head's gradient in fp32
matmuls: 60 ms of a 500 ms step on an H100.)

Several processes: under DDP every process holds the whole model. Under FSDP2 (accelerate's
``fully_shard``, configs/accelerate/fsdp.yaml) and DeepSpeed ZeRO-3 (configs/accelerate/zero3.yaml)
the output embedding is sharded: the loss runs as the LM head's forward pass with the weight
gathered (``distributed.as_output_layer``) and its gradient goes back sharded, so SFT and KD use
the same chunked loss there (tests/test_kd_fsdp.py checks two processes against one). Under FSDP1
(transformers' ``--fsdp`` string) SFT lets the model compute its own loss and KD refuses: its flat
parameters are not gathered here.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from distill.errors import DistillError
from distill.distributed import as_output_layer, sharded_run
from distill.degeneracy import Degeneracy, pooled
from distill.kd_losses import Advantages, KDSettings, TeacherParts, chunked_kd_loss
from distill.train.onpolicy.schedule import OnPolicy
from distill.train.kernels.optim import MasterWeightAdamW, trains_bf16_weights
from distill.rendering import target_index, target_mask
from distill.train.kernels.shared_input import share_inputs
from distill.teachers.sources import final_hidden_states

#: Tokens per loss chunk for SFT: 4096 x 151,936 bf16 logits are 1.2 GB, and fewer chunks mean
#: fewer passes accumulating the output embedding's fp32 gradient.
SFT_CHUNK_SIZE = 4096


class SFTTrainer(Trainer):
    """Next-token cross-entropy on the target tokens, from final hidden states, a chunk at a time."""

    def __init__(self, *args, loss_settings: KDSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_settings = loss_settings or KDSettings(alpha=0.0, chunk_size=SFT_CHUNK_SIZE)
        if sharded_run() is None:  # FSDP2/ZeRO-3 gather each module's weights for that module's own call
            share_inputs(self.model)  # q/k/v and gate/up sum their input gradients in the GEMMs
        if torch.cuda.is_available():
            # SDPA picked flash attention in a checkpointed layer's forward pass and cuDNN's in its
            # recomputation (an H100, torch 2.11, online KD with the teacher on its own stream), and
            # checkpointing refuses outputs that differ in shape: flash (or efficient) for both
            torch.backends.cuda.enable_cudnn_sdp(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("example_index", None)
        if not self.gathers_lm_head:
            inputs.pop("target_index", None)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, _, _ = self.chunked_loss(model, inputs, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    @property
    def gathers_lm_head(self) -> bool:
        """Whether the chunked loss can have the whole output embedding: one process, DDP, FSDP2 or
        DeepSpeed (``distributed.as_output_layer``), not FSDP1."""
        return not (self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False))

    def _track_num_input_tokens(self, inputs):
        """Packed rows on one process hold no padding: count their tokens by the shape, not with
        transformers' count on the GPU, which syncs with the host every step."""
        if (self.args.include_num_input_tokens_seen == "all" and self.accelerator.num_processes == 1
                and "attention_mask" not in inputs):
            self.state.num_input_tokens_seen += inputs["input_ids"].numel()
        else:
            super()._track_num_input_tokens(inputs)

    def create_optimizer(self, model=None):
        """The configured AdamW, over fp32 master copies when the trained weights are bf16 (DeepSpeed
        keeps its own masters: its bf16 weights take the plain AdamW, which it wraps)."""
        if self.optimizer is None and trains_bf16_weights(self.model) and not self.is_deepspeed_enabled:
            _, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer_cls_and_kwargs = (MasterWeightAdamW, kwargs)
        return super().create_optimizer(model)

    def _clip_grad_norm(self, model):
        """Over fp32 masters of whole gradients (not FSDP's shards), clipping's scale goes into the
        optimizer's step (no pass of its own over the gradients); otherwise transformers' clipping."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        if isinstance(optimizer, MasterWeightAdamW) and not self.is_fsdp_enabled:
            return optimizer.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def chunked_loss(self, model, inputs: dict, num_items_in_batch, teacher_scores=None, settings=None,
                     extra_terms=None, row_weights=None):
        """(loss, per-term sums, target tokens) of one micro-batch.

        ``teacher_scores(mask, index)`` gives the teacher at the target positions (None: cross-entropy only);
        ``settings`` replace the trainer's loss settings for this batch; ``extra_terms(mask, index)`` gives
        :class:`ExtraTerm` s added to the loss on the same rows (each left with its sums);
        ``row_weights(hidden, weight, targets)`` a constant factor per target row of every term's
        divergence (``--rollout-overlap``'s importance weights). The loss is normalised by the whole
        accumulated batch's token count when the Trainer gives it, else by this batch's.
        """
        labels = inputs.pop("labels")
        index = inputs.pop("target_index", None)
        unwrapped = self.accelerator.unwrap_model(model)
        hidden = final_hidden_states(model, unwrapped.get_decoder(), inputs)
        if index is None:  # a batch from another collator: finding the targets syncs with the host
            index = target_index(labels)
        hidden = hidden.flatten(0, 1)[index]
        if self.args.bf16 or self.args.fp16:
            # the hidden states can come in fp32 (accelerate hands outputs back in fp32) and the loss
            # runs outside autocast: without this the LM head would be fp32 matmuls (325 ms of an
            # 830 ms step, H100)
            hidden = hidden.to(torch.bfloat16 if self.args.bf16 else torch.float16)
        teacher = teacher_scores(target_mask(labels), index) if teacher_scores else None
        extra = extra_terms(target_mask(labels), index) if extra_terms else []
        settings = settings or self.loss_settings

        def loss_fn(h, weight, targets):
            weights = row_weights(h, weight, targets) if row_weights else None
            total, terms = chunked_kd_loss(h, weight, targets, teacher, settings, weights)
            for term in extra:
                term_total, term.sums = chunked_kd_loss(h, weight, targets, term.teacher, term.settings, weights)
                total = total + term.weight * term_total
            return total, terms

        total, terms = as_output_layer(unwrapped, loss_fn, hidden, labels.flatten()[index + 1])
        n_tokens = index.numel()
        if num_items_in_batch is not None:  # the token count of the whole accumulated batch
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / max(n_tokens, 1)
        return loss, terms, n_tokens

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=self.args.seed)
        return sampler

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


@dataclass
class ExtraTerm:
    """A loss term beside the teacher's divergence, on the same target rows: the anchor's reverse KL to
    the starting student, the reward's advantages (``kd_losses.Advantages``). ``sums``: its (term sum,
    CE sum), detached, once the loss has run."""

    name: str
    teacher: Any
    settings: KDSettings
    weight: float = 1.0
    sums: Any = None


class KDTrainer(SFTTrainer):
    """``alpha * T^2 * KD(teacher || student) + (1 - alpha) * CE`` on the target tokens.

    ``teacher`` is any ``teachers.Teacher`` (online model, logits cache, served model, several routed
    ones, the student shown privileged context). The KD and CE terms are logged beside the mixed loss
    (token means since the last log); with several teachers also each one's share of the tokens and
    its divergence (``teacher_NAME_share``, ``teacher_NAME_kd``).

    On-policy (GKD's lambda, ``on_policy`` > 0): each micro-batch is, with that probability, replaced
    by the student's own rollouts for the batch's prompts (``rollouts``); the teacher scores the
    sampled tokens and the loss is the divergence alone on them (``alpha`` = 1: cross-entropy on
    the student's own samples would only reinforce them), plus, where asked, the anchor (``anchor_weight``
    times the reverse KL to the starting student) and the reward's advantage term. Which micro-batches
    are on-policy, and the sampling seeds, follow from (seed, step, micro-step), so a resumed run keeps
    the schedule. Every rollout batch is measured for degeneracy (``onpolicy.collapse``); with
    ``--stop-on-collapse`` the first degenerate one ends training after its step, unsaved. With
    ``--rollout-overlap`` (``onpolicy.overlap``) the next on-policy micro-batch is sampled in the
    background during this one (the data is read one micro-batch ahead for its prompts) and each
    of its tokens weighted by its truncated importance ratio.
    """

    def __init__(self, *args, kd: KDSettings, teacher, on_policy: OnPolicy | None = None, **kwargs):
        super().__init__(*args, loss_settings=kd, **kwargs)
        if not self.gathers_lm_head:
            raise DistillError("--method kd runs under FSDP2 (accelerate launch --config_file configs/accelerate/fsdp.yaml) "
                               "or DeepSpeed (configs/accelerate/zero3.yaml), not FSDP1 (--fsdp): the loss needs the "
                               "whole output embedding, not gathered from FSDP1's flat parameters")
        self.teacher = teacher
        self.on_policy = on_policy
        # (kd, ce) summed on the device, target tokens counted on the host: read at log time, not per
        # step (a read per step waited for the forward pass before the backward pass could be queued)
        self._sums = {"train": [0, 0], "eval": [0, 0]}
        self._rollout_stats = RolloutStats(on_policy.watch.teacher_text if on_policy is not None else None,
                                           overlap=on_policy is not None and on_policy.overlap is not None)
        self._teachers: dict[str, list] = {}        # several teachers: name -> [KD sum, tokens] since the last log
        self.teacher_totals: dict[str, list] = {}   # ... over the run
        self._micro = (-1, 0)  # (global step, micro-steps taken in it)
        if on_policy is not None and on_policy.watch.stop:
            self.add_callback(StopOnCollapse(on_policy.watch))
        self.overlap = on_policy.overlap if on_policy is not None else None
        self._step_batches: list = []            # --rollout-overlap: this step's micro-batches ...
        self._ahead: Lookahead | None = None     # ... and the epoch's data, read one ahead

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.overlap is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._ahead is None or self._ahead.iterator is not epoch_iterator:
            self._ahead = Lookahead(epoch_iterator)
        batches, num_items = super().get_batch_samples(self._ahead, num_batches, device)
        self._step_batches = batches
        return batches, num_items

    def _seconds(self, started: float, model) -> float:
        return _elapsed(started, model, stream_only=self.overlap is not None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        if self.on_policy is None or not self.on_policy.applies(self.args.seed, step, micro):
            return super().training_step(model, inputs, num_items_in_batch)
        started = time.perf_counter()
        unwrapped = self.accelerator.unwrap_model(model)
        prefetched = self.overlap.take((step, micro)) if self.overlap is not None else None
        if prefetched is None:
            batch = self.on_policy.rollout_batch(unwrapped, inputs["example_index"],
                                                 seed=self.on_policy.seed(self.args.seed, step, micro), step=step,
                                                 log=micro == 0 and self.is_world_process_zero())
            sampled = self._seconds(started, model)
        else:
            (batch, sampled), waited = prefetched, self._seconds(started, model)
            self._rollout_stats.add_time("rollout_wait", waited)
        if self.overlap is not None:
            self._prefetch_next(unwrapped, step, micro)
        rollouts = batch.pop("rollouts")
        measure = self.on_policy.watch.check(step, self._degeneracy(rollouts), speak=self.is_world_process_zero())
        self._rollout_stats.add_rollouts(rollouts, sampled, measure, batch.pop("graded", None))
        started = time.perf_counter()
        # the rollout batch has its own token count: normalise it by itself (the Trainer then divides by
        # the accumulation steps), not by the count of the teacher-written batch it replaced
        loss = super().training_step(model, batch, num_items_in_batch=None)
        self._rollout_stats.add_time("update", self._seconds(started, model))
        return loss

    def _prefetch_next(self, model, step: int, micro: int) -> None:
        """``--rollout-overlap``: the next micro-batch, if it is on-policy, starts sampling from the weights
        as they are now (this micro-step's update has not run yet)."""
        if micro + 1 < len(self._step_batches):
            key, upcoming = (step, micro + 1), self._step_batches[micro + 1]
        else:
            key, upcoming = (step + 1, 0), self._ahead.peek() if self._ahead is not None else None
        if upcoming is None or not self.on_policy.applies(self.args.seed, *key):
            return
        self.on_policy.prefetch(model, key, upcoming["example_index"], seed=self.on_policy.seed(self.args.seed, *key),
                                log=key[1] == 0 and self.is_world_process_zero())

    def _degeneracy(self, rollouts) -> Degeneracy:
        """The rollouts' degeneracy, pooled over every process (each must stop at the same step)."""
        measure = pooled(r.completion for r in rollouts)
        if self.accelerator.num_processes > 1:
            counts = torch.tensor([measure.repeated, measure.ngrams, measure.length, measure.samples],
                                  device=self.args.device)
            measure = Degeneracy(*(int(c) for c in self.accelerator.reduce(counts, "sum").tolist()))
        return measure

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        example_index = inputs.pop("example_index", None)
        on_policy = inputs.pop("on_policy", False)
        advantages = inputs.pop("advantages", None)
        sampler_logprobs = inputs.pop("sampler_logprobs", None)
        features = {k: v for k, v in inputs.items() if k not in ("labels", "target_index")}
        labels = inputs["labels"]
        used = {}
        # a served teacher (or an online one on a GPU) starts scoring now, while the student runs its forward pass
        pending = self.teacher.submit(features, target_mask(labels), example_index) if hasattr(self.teacher, "submit") \
            else None

        def teacher_scores(mask, index):
            started = time.perf_counter()
            used["teacher"] = (self.teacher.scores(features, mask, example_index, index=index, scored=pending)
                               if pending else self.teacher.scores(features, mask, example_index, index=index))
            if on_policy:
                self._rollout_stats.add_time("teacher", self._seconds(started, model), subtract_from="update")
            return used["teacher"]

        def extra_terms(mask, index):
            """On-policy: the anchor to the starting student and the reward's advantages, where asked."""
            out = []
            anchor = self.on_policy.anchor if self.on_policy is not None else None
            if anchor is not None:
                started = time.perf_counter()
                out.append(ExtraTerm("anchor", anchor.scores(features, mask, index=index),
                                     KDSettings(loss="rkl", alpha=1.0, chunk_size=self.loss_settings.chunk_size),
                                     self.on_policy.anchor_weight))
                self._rollout_stats.add_time("teacher", self._seconds(started, model), subtract_from="update")
            if advantages is not None:
                out.append(ExtraTerm("reward", Advantages(advantages), self.loss_settings))
            used["terms"] = out
            return out

        def importance(hidden, weight, targets):
            """--rollout-overlap: each target row's truncated importance weight (its ratio counted)."""
            weights, ratios = self.overlap.weights(hidden, weight, targets, sampler_logprobs)
            self._rollout_stats.add_ratios(*self.overlap.count(ratios, ratios.numel()), ratios.numel())
            return weights

        settings = replace(self.loss_settings, alpha=1.0) if on_policy else self.loss_settings
        loss, terms, n_tokens = self.chunked_loss(model, inputs, num_items_in_batch, teacher_scores, settings,
                                                  extra_terms if on_policy else None,
                                                  importance if sampler_logprobs is not None else None)
        if on_policy and self.overlap is not None and sampler_logprobs is None:  # sampled from the live student
            self._rollout_stats.add_ratios(*self.overlap.count(None, n_tokens), n_tokens)
        mode = "train" if model.training else "eval"
        sums = self._sums[mode]
        sums[0], sums[1] = sums[0] + terms.detach().float(), sums[1] + n_tokens
        if isinstance(used.get("teacher"), TeacherParts) and mode == "train":
            self._add_teacher_parts(used["teacher"], n_tokens)
        if on_policy:
            targets = labels[:, 1:][target_mask(labels)]
            self._rollout_stats.add_scores(float(terms[0]), teacher_nll(used["teacher"], targets), n_tokens)
            self._rollout_stats.add_terms(used["terms"])
        return (loss, {"loss": loss}) if return_outputs else loss

    def _add_teacher_parts(self, parts: TeacherParts, n_tokens: int) -> None:
        """Each routed teacher's tokens and KD sum, since the last log and over the run."""
        for name, rows, _ in parts.parts:
            tokens = n_tokens if rows is None else rows.numel()
            kd = float(parts.sums[name][0])
            for table in (self._teachers, self.teacher_totals):
                entry = table.setdefault(name, [0.0, 0])
                entry[0], entry[1] = entry[0] + kd, entry[1] + tokens

    def routed_record(self) -> dict:
        """The run's share of tokens and mean divergence per routed teacher (empty with one teacher)."""
        tokens = sum(n for _, n in self.teacher_totals.values())
        return {name: {"tokens": n, "share": round(n / tokens, 4), "kd": round(kd / max(n, 1), 6)}
                for name, (kd, n) in sorted(self.teacher_totals.items())}

    def log(self, logs, *args, **kwargs):
        mode, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
        terms, tokens = self._sums[mode]
        if tokens:
            kd, ce = terms.tolist()
            logs[f"{prefix}kd_loss"] = round(kd / tokens, 6)
            logs[f"{prefix}ce_loss"] = round(ce / tokens, 6)
            self._sums[mode] = [0, 0]
        if mode == "train":
            logs.update(self._rollout_stats.flush())
            tokens = sum(n for _, n in self._teachers.values())
            for name, (kd, n) in sorted(self._teachers.items()):
                logs[f"teacher_{name}_share"] = round(n / max(tokens, 1), 4)
                logs[f"teacher_{name}_kd"] = round(kd / max(n, 1), 6)
            self._teachers = {}
        super().log(logs, *args, **kwargs)


class Lookahead:
    """An epoch's batch iterator that can show its next batch before it is taken (``peek``; None at the end)."""

    def __init__(self, iterator):
        self.iterator, self._next = iterator, []

    def __iter__(self):
        return self

    def __next__(self):
        return self._next.pop() if self._next else next(self.iterator)

    def peek(self):
        if not self._next:
            try:
                self._next.append(next(self.iterator))
            except StopIteration:
                return None
        return self._next[0]


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from (seed, epoch) instead of the global RNG.

    The global RNG of a resumed run is the one saved at the checkpoint, mid-epoch, so the epoch's
    order was drawn again from another state: a run resumed after its first epoch trained on other
    batches than the run it continues. The Trainer calls ``set_epoch`` before each epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def _elapsed(started: float, model, stream_only: bool = False) -> float:
    """Seconds since ``started``, after the device's queued work (CUDA runs asynchronously); ``stream_only``:
    the current stream's only (``--rollout-overlap``: not the rollouts sampling on their own stream)."""
    if next(model.parameters()).is_cuda:
        torch.cuda.current_stream().synchronize() if stream_only else torch.cuda.synchronize()
    return time.perf_counter() - started


def teacher_nll(teacher, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood the teacher gives ``targets`` (the student's sampled tokens).

    Dense teacher: its cross-entropy, a chunk at a time. Sparse teacher (top-k + tail): the token's
    log-prob where it is in the top-k, else the whole tail's (a lower bound on its NLL). A teacher
    known only by the sampled tokens' log-probs: those. A teacher of another tokenizer: its NLL of the
    same text in its own tokens.
    """
    with torch.no_grad():
        if isinstance(teacher, TeacherParts):
            return sum(teacher_nll(part, targets if rows is None else targets[rows.to(targets.device)])
                       for _, rows, part in teacher.parts)
        if getattr(teacher, "sampled", False):
            return float(-teacher.logprobs.float().sum())
        if getattr(teacher, "aligned", False):
            return float(teacher.nll)
        if not teacher.sparse:
            weight = teacher.weight[:teacher.vocab_size]
            _, (_, ce) = chunked_kd_loss(teacher.hidden, weight, targets.to(teacher.hidden.device), None,
                                         KDSettings(alpha=0.0, chunk_size=SFT_CHUNK_SIZE))
            return float(ce)
        ids, logprobs, log_tail = teacher.chunk(slice(None), targets.device)
        hit = ids == targets[:, None]
        token = torch.where(hit.any(-1), (logprobs.float() * hit).sum(-1), log_tail.float())
        return float(-token.sum())


class RolloutStats:
    """What a person watches in on-policy training, summed between two logging steps: what the student
    writes (length, ended, degeneracy beside the teacher's text's), how the teacher scores it, the
    anchor's and the reward's terms, and where the time went."""

    def __init__(self, teacher_text: Degeneracy | None = None, overlap: bool = False):
        self.teacher_text, self.overlap = teacher_text, overlap
        self._reset()

    def _reset(self):
        self.n, self.ended, self.tokens, self.kd, self.nll, self.scored = 0, 0, 0, 0.0, 0.0, 0
        self.seconds = {"rollout": 0.0, "teacher": 0.0, "update": 0.0}
        if self.overlap:  # rollout: the sampler's own time; rollout_wait: what the trainer waited for it
            self.seconds["rollout_wait"] = 0.0
            self.ratios = {"sum": 0.0, "clipped": 0, "tokens": 0}
        self.degeneracy = Degeneracy()
        self.rewards = {"graded": 0, "correct": 0, "sum": 0.0}
        self.terms: dict[str, float] = {}

    def add_rollouts(self, rollouts, seconds: float, degeneracy: Degeneracy | None = None, graded=None) -> None:
        self.n += len(rollouts)
        self.ended += sum(r.ended for r in rollouts)
        self.tokens += sum(len(r.completion) for r in rollouts)
        self.seconds["rollout"] += seconds
        if degeneracy is not None:
            self.degeneracy += degeneracy
        if graded is not None:
            self.rewards["graded"] += graded.graded
            self.rewards["correct"] += graded.correct
            self.rewards["sum"] += sum(r for r in graded.rewards if r is not None)

    def add_terms(self, terms: list) -> None:
        """The sums of the extra terms (:class:`ExtraTerm`) of a rollout batch."""
        for term in terms:
            self.terms[term.name] = self.terms.get(term.name, 0.0) + float(term.sums[0])

    def add_time(self, part: str, seconds: float, subtract_from: str | None = None) -> None:
        self.seconds[part] += seconds
        if subtract_from:  # the teacher's forward runs inside the update's timed span
            self.seconds[subtract_from] -= seconds

    def add_ratios(self, ratio_sum: float, clipped: int, tokens: int) -> None:
        """--rollout-overlap: a batch's importance ratios (their sum, how many over the cap, how many)."""
        self.ratios["sum"] += ratio_sum
        self.ratios["clipped"] += clipped
        self.ratios["tokens"] += tokens

    def add_scores(self, kd_sum: float, nll_sum: float, n_tokens: int) -> None:
        self.kd, self.nll, self.scored = self.kd + kd_sum, self.nll + nll_sum, self.scored + n_tokens

    def flush(self) -> dict:
        if not self.n:
            return {}
        out = {"rollout_kd": round(self.kd / max(self.scored, 1), 6),
               "rollout_teacher_nll": round(self.nll / max(self.scored, 1), 6),
               "rollout_length": round(self.tokens / self.n, 1),
               "rollout_ended": round(self.ended / self.n, 4),
               "rollout_tokens_per_s": round(self.tokens / max(self.seconds["rollout"], 1e-9), 1),
               "rollout_repeated_ngram_share": round(self.degeneracy.repeated_ngram_share, 4),
               **{f"time_{part}_s": round(t, 3) for part, t in self.seconds.items()}}
        if self.teacher_text is not None:
            out["rollout_teacher_length"] = round(self.teacher_text.mean_length, 1)
        if self.overlap and self.ratios["tokens"]:
            out["rollout_is_ratio_mean"] = round(self.ratios["sum"] / self.ratios["tokens"], 6)
            out["rollout_is_clipped"] = round(self.ratios["clipped"] / self.ratios["tokens"], 6)
        if "anchor" in self.terms:
            out["anchor_kl"] = round(self.terms["anchor"] / max(self.scored, 1), 6)
        if "reward" in self.terms:
            graded = self.rewards["graded"]
            out.update(reward_mean=round(self.rewards["sum"] / graded, 4) if graded else None,
                       reward_correct=round(self.rewards["correct"] / self.n, 4),
                       reward_graded=round(graded / self.n, 4),
                       reward_pg=round(self.terms["reward"] / max(self.scored, 1), 6))
        self._reset()
        return out


class StopOnCollapse(TrainerCallback):
    """``--stop-on-collapse``: the step whose rollouts degenerated ends training, unsaved (``fit`` then
    keeps the last checkpoint before it as the model)."""

    def __init__(self, watch):
        self.watch = watch

    def on_step_end(self, args, state, control, **kwargs):
        if self.watch.stopping:
            control.should_training_stop = True
            control.should_save = False


class SaveAndStopOnSignal(TrainerCallback):
    """SIGTERM (what cluster schedulers send before they kill) or Ctrl-C: finish the current step,
    save a checkpoint, stop; ``--resume`` continues from it. A second signal acts at once (its
    previous handler is back after the first). Used as a context manager around ``train()``."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous[signum])

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


def readable_logs(trainer: Trainer) -> None:
    """One readable line per log instead of the Trainer's raw dicts and tqdm bar, and a log at the
    last step (so the final loss is the last step's, also after a resume)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LogLine())


class LogLine(TrainerCallback):
    """``step 6/8 | loss 2.3141 | kd 2.31 | ce 3.02 | lr 1.0e-04 | 812 tok/s | ETA 14 s``."""

    SHOWN = (("loss", "loss", ".4f"), ("kd_loss", "kd", ".4f"), ("ce_loss", "ce", ".4f"),
             ("eval_loss", "eval loss", ".4f"), ("eval_kd_loss", "eval kd", ".4f"), ("learning_rate", "lr", ".1e"),
             ("rollout_kd", "rollout kd", ".3f"), ("rollout_teacher_nll", "teacher nll", ".3f"),
             ("rollout_length", "length", ".0f"), ("rollout_teacher_length", "teacher's", ".0f"),
             ("rollout_repeated_ngram_share", "repeated 4-grams", ".0%"), ("rollout_ended", "ended", ".0%"),
             ("anchor_kl", "anchor kl", ".3f"), ("reward_mean", "reward", ".2f"), ("reward_correct", "correct", ".0%"),
             ("rollout_is_ratio_mean", "IS ratio", ".3f"), ("rollout_is_clipped", "clipped", ".1%"),
             ("rollout_tokens_per_s", "sampled tok/s", ",.0f"))

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step, self.tokens = time.monotonic(), state.global_step, state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{label} {logs[key]:{spec}}" for key, label, spec in self.SHOWN
                  if isinstance(logs.get(key), (int, float))]
        parts += [f"{key[8:-6]} {logs[key]:.0%} kd {logs[key[:-6] + '_kd']:.3f}" for key in sorted(logs)
                  if key.startswith("teacher_") and key.endswith("_share")]
        if "eval_loss" not in logs:
            parts.append(f"{(state.num_input_tokens_seen - self.tokens) / elapsed:,.0f} tok/s")
            done = state.global_step - self.first_step
            if done and state.max_steps > state.global_step:
                parts.append(f"ETA {_short(elapsed / done * (state.max_steps - state.global_step))}")
        print("train: " + " | ".join(parts), flush=True)


def _short(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
