"""KD steps through ``KDTrainer``'s loss with the student and the online teacher sharded by FSDP2 or ZeRO-3.

Run by tests/test_kd_fsdp.py, once in one process (``one``: plain models, the whole batch) and
once under ``torchrun --nproc_per_node 2`` on the CPU (gloo, ``ACCELERATE_USE_CPU``: accelerate's
multi-CPU state, as ``accelerate launch --cpu`` sets it), each process taking every other example of
the same batches. accelerate applies FSDP only on GPUs (on a CPU ``accelerate launch``
with an FSDP config trains with DDP), so the student is sharded here by accelerate's own
``fsdp2_prepare_model`` (mode ``accelerate``: the LM head stays unsharded after the forward pass,
as under ``accelerate launch --config_file configs/accelerate/fsdp.yaml``) or by ``fully_shard``
on every unit with resharding after the forward pass (mode ``resharded``: the LM head is a
``DTensor`` when the loss reads it), or by DeepSpeed ZeRO-3 (mode ``zero3``: ``deepspeed.initialize``
as accelerate calls it, on DeepSpeed's CPU accelerator; the online teacher partitioned by
``distributed.shard_frozen_zero3``). The optimizer is SGD with momentum: its steps are linear in the gradients, so
the trained weights of two runs differ only as much as their gradients (Adam's normalised steps
turn round-off in near-zero gradients into whole steps). The Trainer's own loop
cannot run here: on a CPU accelerate does not set up FSDP.

Writes OUT/curve.json ([loss, gradient norm] per step, both over the whole batch) and the trained
model (the full state dict, gathered as accelerate's FULL_STATE_DICT does) with save_pretrained.

CHECKPOINT (FSDP2 modes): a directory. Empty, the run stops after step ``STOP_AT`` and saves the
sharded model and optimizer state there as accelerate's FSDP2 checkpoints do (torch distributed
checkpoint); holding one, the run loads it and takes the remaining steps (OUT/curve.json: those).

    python tests/kd_fsdp_worker.py MODE STUDENT TEACHER TRACES OUT [CHECKPOINT]

MODE: one, accelerate or resharded (FSDP2), zero3;
TEACHER: a model directory (online, sharded with the student) or a ``distill logits`` cache.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from distill.parallel import leave

STEPS, BATCH, LR, MOMENTUM, STOP_AT = 3, 4, 0.5, 0.5, 2


def shard_student(model, mode: str):
    from torch.distributed.fsdp import fully_shard

    if mode == "resharded":
        for layer in model.get_decoder().layers:
            fully_shard(layer)
        return fully_shard(model, reshard_after_forward=True)
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    import yaml

    # the plugin configs/accelerate/fsdp.yaml describes, but for its rank-0-only loading (every process
    # here builds the student itself) and bf16 (on the CPU the run is fp32)
    fsdp = yaml.safe_load(Path(__file__).parents[1].joinpath("configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"], cpu_ram_efficient_loading=False)
    # The launch's own Accelerator (gloo, CPU). accelerate attaches an FSDP plugin to its state only on
    # GPUs (on a CPU an FSDP config trains with DDP), so the plugin is put where it would have put it
    # while the model is sharded; everything else fsdp2_prepare_model reads (device, mixed precision,
    # rank, mesh) is the real one. Then the state is as the launch made it, for the Trainer built next.
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = plugin
    try:
        return fsdp2_prepare_model(accelerator, model)
    finally:
        del accelerator.state.fsdp_plugin


def zero3_engine(model):
    """The student as accelerate hands it to the Trainer under ZeRO-3: a DeepSpeed engine with SGD."""
    import deepspeed
    import torch

    config = {"train_micro_batch_size_per_gpu": BATCH // 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    return engine


def save_checkpoint(model, optimizer, directory: str, step: int) -> None:
    """The sharded model and optimizer state (momentum), as accelerate's FSDP2 checkpoint holds them."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    if dist.get_rank() == 0:
        with open(f"{directory}/step.json", "w") as f:
            json.dump(step, f)


def load_checkpoint(model, optimizer, directory: str) -> int:
    """Load :func:`save_checkpoint`'s state into the freshly sharded model and optimizer; the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(f"{directory}/step.json") as f:
        return json.load(f)


def main(mode: str, student: str, teacher: str, traces: str, out: str, checkpoint: str | None = None) -> None:
    import torch
    import torch.distributed as dist

    from distill.config import make
    from distill.train.command import TrainConfig
    from distill.train.fit import kd_settings
    from distill.distributed import output_rows
    from distill.rendering import n_targets
    from distill.train.student import prepare
    from distill.teachers.sources import CachedTeacher, OnlineTeacher
    from distill.train.trainers import KDTrainer

    torch.manual_seed(0)
    cache = teacher if os.path.isfile(os.path.join(teacher, "index.json")) else None
    cfg = make(TrainConfig, method="kd", student=student, traces=traces, out=out, max_length=160, overlong="truncate",
               eval_fraction=0.0, bf16=False, report_to="none", kd_weight=0.5, chunk_size=16, seed=0, teacher=teacher)
    setup = prepare(cfg)
    setup.args.device  # as run_kd places the teacher: under torchrun this starts accelerate's gloo process group
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    setup.args.average_tokens_across_devices = True
    if mode == "zero3":
        model, optimizer = zero3_engine(setup.model), None  # the engine steps its own
    else:
        model = setup.model if mode == "one" else shard_student(setup.model, mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    rows = output_rows(getattr(model, "module", model))  # as run_kd reads them, from the sharded student
    if cache:
        kd_teacher = CachedTeacher.open(cache, setup.tokenizer, setup.examples, student=student, traces=traces,
                                        kd_temperature=1.0, student_rows=rows)
    else:
        kd_teacher = OnlineTeacher.load(teacher, setup.tokenizer, student, "cpu", rows,
                                        shard={"one": None, "zero3": "ZeRO-3"}.get(mode, "FSDP2"))
    trainer = KDTrainer(model=getattr(model, "module", model), args=setup.args, train_dataset=setup.train_dataset,
                        data_collator=setup.collator, processing_class=setup.tokenizer,
                        kd=kd_settings(cfg), teacher=kd_teacher)
    examples = setup.train_dataset.examples
    curve = []
    resuming = checkpoint is not None and os.path.isfile(f"{checkpoint}/step.json")
    first = load_checkpoint(model, optimizer, checkpoint) if resuming else 0
    for step in range(first, STEPS):
        batch = examples[step * BATCH:(step + 1) * BATCH]
        loss = trainer.compute_loss(model, setup.collator(batch[rank::world]),
                                    num_items_in_batch=sum(n_targets(e) for e in batch))
        if mode == "zero3":
            model.backward(loss)
            model.step()
            norm = model.get_global_grad_norm()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            optimizer.step()
            optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)  # each process's loss is its share x world size: the mean is the batch's
            loss /= world
        curve.append([float(loss), float(norm)])
        if checkpoint is not None and not resuming and step + 1 == STOP_AT:
            save_checkpoint(model, optimizer, checkpoint, step + 1)
            break
    if mode == "zero3":
        state = model._zero3_consolidated_16bit_state_dict()  # what accelerate saves (zero3_save_16bit_model)
    elif world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        setup.model.save_pretrained(out, state_dict=state)
        with open(f"{out}/curve.json", "w") as f:
            json.dump(curve, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave(0)  # as the CLI ends a rank: see distill.parallel.leave
