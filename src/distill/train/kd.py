"""``distill train --method kd``: logit distillation on top of the SFT pipeline.

Same data, collator, schedule, LoRA, checkpoints and run record as SFT (``distill.train.sft``);
only the loss differs: ``alpha * T^2 * KD(teacher || student) + (1 - alpha) * CE`` over the
assistant tokens (see ``kd_losses``). The teacher is either

- online (``--teacher``): a local model of the same tokenizer, frozen, in bf16 on GPU, on the
  student's device or ``--teacher-device``; one no-grad forward per step, or
- offline (``--teacher-logits DIR``): top-k log-probs cached by ``distill logits``, from a local
  teacher or from the traces' API top_logprobs mapped onto the student's vocabulary
  (``api_logits``); no teacher in memory. Every trace must render to exactly the tokens the cache
  was made from.

Neither side ever holds tokens x vocabulary logits: both models return final hidden states and
the loss makes logits a chunk at a time.
"""

from __future__ import annotations

from distill.errors import DistillError


def kd_settings(cfg):
    from distill.train.kd_losses import KDSettings

    try:
        return KDSettings(loss=cfg.loss, beta=cfg.beta, temperature=cfg.kd_temperature, alpha=cfg.alpha,
                          chunk_size=cfg.kd_chunk_size)
    except ValueError as e:
        raise DistillError(f"KD settings: {e}") from None


def _make_trainer_cls():
    """KDTrainer is defined lazily so importing this module does not import transformers."""
    import torch

    from distill.train.kd_losses import DenseTeacher
    from distill.train.sft import trainer_class

    class KDTrainer(trainer_class()):
        """The SFT trainer's chunked loss with a teacher: KD + CE, logged as two terms."""

        def __init__(self, *args, kd, teacher_model=None, teacher_logits=None, **kwargs):
            super().__init__(*args, loss_settings=kd, **kwargs)
            if (teacher_model is None) == (teacher_logits is None):
                raise ValueError("KDTrainer needs exactly one of teacher_model, teacher_logits")
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise DistillError("--method kd does not run under FSDP / DeepSpeed yet (the loss needs the whole "
                                   "output embedding); use one GPU per process (DDP), or --lora")
            self.teacher_model, self.teacher_logits = teacher_model, teacher_logits
            self._sums = {"train": torch.zeros(3), "eval": torch.zeros(3)}  # kd, ce, tokens

        def teacher_for(self, inputs, mask, example_index):
            if self.teacher_logits is not None:
                return self.teacher_logits.batch(example_index, int(mask.sum()), mask.device)
            teacher = self.teacher_model
            device = teacher.get_output_embeddings().weight.device
            with torch.no_grad():
                hidden = teacher.get_decoder()(**{k: v.to(device) for k, v in inputs.items()},
                                               use_cache=False).last_hidden_state
            return DenseTeacher(hidden[:, :-1][mask.to(device)], teacher.get_output_embeddings().weight,
                                vocab_size=self._shared_vocab)

        @property
        def _shared_vocab(self) -> int:
            rows = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
            return min(rows, self.teacher_model.get_output_embeddings().weight.shape[0])

        def record_terms(self, model, terms, n_tokens: int) -> None:
            mode = "train" if model.training else "eval"
            self._sums[mode] += torch.cat([terms.detach().float().cpu(), torch.tensor([float(n_tokens)])])

        def log(self, logs, *args, **kwargs):
            """Add the KD and CE terms (token means since the last log) next to the mixed loss."""
            mode, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
            kd, ce, tokens = self._sums[mode].tolist()
            if tokens:
                logs[f"{prefix}kd_loss"] = round(kd / tokens, 6)
                logs[f"{prefix}ce_loss"] = round(ce / tokens, 6)
                self._sums[mode].zero_()
            super().log(logs, *args, **kwargs)

    return KDTrainer


class CachedTeacher:
    """Offline teacher for a batch: the cached rows of its examples, concatenated in batch order."""

    def __init__(self, cache, trace_ids: dict[int, str]):
        self.cache, self.trace_ids = cache, trace_ids

    def batch(self, example_index, n_tokens: int, device):
        import torch

        from distill.train.kd_losses import SparseTeacher

        if example_index is None:
            raise DistillError("offline KD needs 'example_index' in each batch (the collator keeps it)")
        parts = [self.cache.get(self.trace_ids[int(i)]) for i in example_index.tolist()]
        ids, lps, tail = (torch.cat(p).to(device) for p in zip(*parts))
        if ids.shape[0] != n_tokens:
            raise DistillError(f"cached teacher rows ({ids.shape[0]}) do not match the batch's assistant tokens "
                               f"({n_tokens}); the cache was made from differently rendered traces")
        return SparseTeacher(ids, lps, tail)


def open_cached_teacher(cfg, tokenizer, examples: list[dict], student_vocab: int) -> CachedTeacher:
    """Open ``--teacher-logits`` and check it fits this student and these exact tokens."""
    from distill.train.logits_cache import LogitsCache, token_sha, tokenizer_sha

    cache = LogitsCache(cfg.teacher_logits)
    header = cache.header
    if header["tokenizer_sha"] != tokenizer_sha(tokenizer):
        raise DistillError(
            f"{cfg.teacher_logits}: cache was made with teacher '{header['teacher']}' whose tokenizer differs from "
            f"student '{cfg.student}' ({type(tokenizer).__name__}, {len(tokenizer)} tokens); KD needs the same tokenizer")
    if abs(header["temperature"] - cfg.kd_temperature) > 1e-9:
        raise DistillError(f"{cfg.teacher_logits}: cached at temperature {header['temperature']}, but "
                           f"--kd-temperature is {cfg.kd_temperature}; use the same (or re-run distill logits)")
    if header["vocab_size"] > student_vocab:
        raise DistillError(f"{cfg.teacher_logits}: teacher vocabulary ({header['vocab_size']}) is larger than the "
                           f"student's output rows ({student_vocab})")
    for ex in examples:
        if ex["id"] not in cache:
            raise DistillError(f"{cfg.traces}:{ex['example_index'] + 1}: trace '{ex['id']}' is not in the logits "
                               f"cache {cfg.teacher_logits}; run 'distill logits' on these traces (it resumes)")
        if cache.token_sha(ex["id"]) != token_sha(ex["input_ids"]):
            raise DistillError(
                f"{cfg.traces}:{ex['example_index'] + 1}: trace '{ex['id']}' renders to other tokens than the cache "
                f"was made from (cache: think_style={header['think_style']}, max_length={header['max_length']}, "
                f"overlong={header['overlong']}, rendered with the tokenizer of '{header['rendered_for']}'); run "
                f"'distill logits --student {cfg.student}' with the same settings as this training")
    return CachedTeacher(cache, {ex["example_index"]: ex["id"] for ex in examples})


def load_online_teacher(cfg, path: str, tokenizer, student_device):
    """The frozen teacher model, checked to share the student's tokenizer."""
    import torch

    from distill.models import load_model, load_tokenizer
    from distill.train.logits_cache import check_same_tokenizer

    check_same_tokenizer(tokenizer, cfg.student, load_tokenizer(path, require_chat_template=False), cfg.teacher)
    device = cfg.teacher_device or str(student_device)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    teacher = load_model(path, device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def run_kd(cfg) -> int:
    from distill.train import sft
    from distill.train.logits_cache import local_teacher

    if bool(cfg.teacher) == bool(cfg.teacher_logits):
        raise DistillError("--method kd needs exactly one of --teacher (online) or --teacher-logits (offline cache)")
    kd = kd_settings(cfg)
    teacher_path = local_teacher(cfg.teacher)[0] if cfg.teacher else None
    setup = sft.prepare(cfg)
    student_out = setup.model.get_output_embeddings().weight
    extra = {"kd": {"loss": kd.loss, "beta": kd.beta, "temperature": kd.temperature, "alpha": kd.alpha,
                    "chunk_size": kd.chunk_size}}
    if cfg.teacher:
        teacher = load_online_teacher(cfg, teacher_path, setup.tokenizer, student_out.device)
        extra["kd"].update(mode="online", teacher=cfg.teacher)
        kwargs = {"teacher_model": teacher}
    else:
        cached = open_cached_teacher(cfg, setup.tokenizer, setup.examples, student_out.shape[0])
        extra["kd"].update(mode="offline", teacher=cached.cache.header["teacher"], cache=str(cfg.teacher_logits),
                           cache_header=cached.cache.header)
        kwargs = {"teacher_logits": cached}
    return sft.run_training(cfg, trainer_cls=_make_trainer_cls(), setup=setup, extra_record=extra, kd=kd, **kwargs)
