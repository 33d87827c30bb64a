"""The trainers: transformers' ``Trainer`` with distill's chunked loss, for SFT and for KD.

Importing this module imports transformers; commands import it inside functions so that
``distill --help`` stays instant.

Both trainers make the loss from the student's final hidden states a chunk of tokens at a time
(``kd_losses.chunked_kd_loss``): the tokens x vocabulary logits are never held (16k tokens of
Qwen2.5's vocabulary are 5 GB in bf16, 10 GB upcast), the LM head runs at the mixed precision
(bf16), and on CUDA the per-chunk maths is compiled. (Liger's fused linear cross-entropy, under
transformers' bf16 autocast over fp32 weights, accumulated the LM head's gradient in fp32
matmuls: 60 ms of a 500 ms step on an H100.) FSDP and DeepSpeed shard the output embedding, so
there SFT lets the model compute its own loss, and KD refuses.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from distill.errors import DistillError
from distill.train.kd_losses import KDSettings, chunked_kd_loss
from distill.train.rendering import target_mask

#: Tokens per loss chunk for SFT: 4096 x 151,936 bf16 logits are 1.2 GB, and fewer chunks mean
#: fewer passes accumulating the output embedding's fp32 gradient.
SFT_CHUNK_SIZE = 4096


class SFTTrainer(Trainer):
    """Next-token cross-entropy on the target tokens, from final hidden states, a chunk at a time."""

    def __init__(self, *args, loss_settings: KDSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_settings = loss_settings or KDSettings(alpha=0.0, chunk_size=SFT_CHUNK_SIZE)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("example_index", None)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, _, _ = self.chunked_loss(model, inputs, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def chunked_loss(self, model, inputs: dict, num_items_in_batch, teacher_scores=None):
        """(loss, per-term sums, target tokens) of one micro-batch.

        ``teacher_scores(mask)`` gives the teacher at the target positions (None: cross-entropy only).
        The loss is normalised by the whole accumulated batch's token count when the Trainer gives it.
        """
        labels = inputs.pop("labels")
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        mask = target_mask(labels)
        hidden = out.hidden_states[-1][:, :-1][mask]
        if self.args.bf16 or self.args.fp16:
            # accelerate hands the outputs back in fp32 and the loss runs outside its autocast:
            # without this the LM head would be fp32 matmuls (325 ms of an 830 ms step, H100)
            hidden = hidden.to(torch.bfloat16 if self.args.bf16 else torch.float16)
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        teacher = teacher_scores(mask) if teacher_scores else None
        total, terms = chunked_kd_loss(hidden, weight, labels[:, 1:][mask], teacher, self.loss_settings)
        n_tokens = int(mask.sum())
        if num_items_in_batch is not None:  # the token count of the whole accumulated batch
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / max(n_tokens, 1)
        return loss, terms, n_tokens

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class KDTrainer(SFTTrainer):
    """``alpha * T^2 * KD(teacher || student) + (1 - alpha) * CE`` on the target tokens.

    ``teacher`` is any ``teachers.Teacher`` (online model, logits cache). The KD and CE terms are
    logged beside the mixed loss (token means since the last log).
    """

    def __init__(self, *args, kd: KDSettings, teacher, **kwargs):
        super().__init__(*args, loss_settings=kd, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise DistillError("--method kd does not run under FSDP / DeepSpeed yet (the loss needs the whole "
                               "output embedding); use one GPU per process (DDP), or --lora")
        self.teacher = teacher
        self._sums = {"train": torch.zeros(3), "eval": torch.zeros(3)}  # kd, ce, tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        example_index = inputs.pop("example_index", None)
        features = {k: v for k, v in inputs.items() if k != "labels"}
        loss, terms, n_tokens = self.chunked_loss(
            model, inputs, num_items_in_batch,
            teacher_scores=lambda mask: self.teacher.scores(features, mask, example_index))
        mode = "train" if model.training else "eval"
        self._sums[mode] += torch.cat([terms.detach().float().cpu(), torch.tensor([float(n_tokens)])])
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        mode, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
        kd, ce, tokens = self._sums[mode].tolist()
        if tokens:
            logs[f"{prefix}kd_loss"] = round(kd / tokens, 6)
            logs[f"{prefix}ce_loss"] = round(ce / tokens, 6)
            self._sums[mode].zero_()
        super().log(logs, *args, **kwargs)
