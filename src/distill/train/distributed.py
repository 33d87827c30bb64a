"""How a training run is spread over processes, and the whole output embedding when it is sharded.

The chunked loss (``kd_losses.chunked_kd_loss``) needs the student's and the online teacher's whole
output embedding (vocabulary x hidden; 0.8-1.6 GB for a 7B-32B model in bf16), never the
tokens x vocabulary logits. Under sharding that weight is not whole on any process:

- FSDP2 (accelerate's ``fully_shard``): between forward passes a parameter is a ``DTensor`` holding
  this process's rows. :func:`whole` gathers it with ``full_tensor``, once per micro-batch; its
  gradient placement is ``Partial("avg")``, so backward reduce-scatters the gradient and averages
  it over the processes, as FSDP does for every other parameter. accelerate keeps the LM head
  (and the tied input embedding) unsharded after the forward pass (``reshard_after_forward=False``
  for that group): then the weight is already whole, and FSDP reduce-scatters its gradient itself.

Anything else (one process, DDP, a LoRA student) is returned as it is. DeepSpeed ZeRO-3 is not
handled: gathering its partitioned LM head with ``deepspeed.zero.GatheredParameters`` for the loss
was tried on CPUs (DeepSpeed 0.19.8, gloo) and is wrong. With tied embeddings two processes matched
one for two SGD steps, then drifted (third step: loss 7e-4, gradient norm 3.6% off); untied, the
backward pass failed (the gradient arrives when the parameter is partitioned again). So under
DeepSpeed SFT lets the model compute its own loss and KD refuses (``trainers``).
"""

from __future__ import annotations


def whole(weight):
    """``weight`` in full on this process (see the module doc); differentiable."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(weight, DTensor):
        return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    return weight


def sharded_run() -> str | None:
    """"FSDP2" or "DeepSpeed" when this run (as accelerate launched it) shards the student, else None."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP2"
    if state.distributed_type == DistributedType.DEEPSPEED:
        return "DeepSpeed"
    return None


def sharded_over_processes(model) -> bool:
    """Whether ``model``'s forward passes are collective (FSDP2 over several processes): then every
    process must run as many of them, e.g. ``generate(synced_gpus=True)``."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_frozen(model, mesh=None):
    """Shard a frozen model (the online teacher) with torch's ``fully_shard``: each decoder layer is
    one unit, the rest (embeddings, final norm, LM head) the root's. ``mesh``: the student's (None:
    all processes, FSDP2's default). Its shards move to the mesh's device; the Trainer never sees it."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def describe(trainer, teacher: str | None) -> dict:
    """The run record's ``distributed`` entry: how the student was spread, where the teacher lived."""
    accelerator = trainer.accelerator
    world = accelerator.num_processes
    if trainer.is_fsdp_enabled:
        kind, sharded = "FSDP2" if getattr(accelerator, "is_fsdp2", False) else "FSDP", \
            "student parameters, gradients and optimizer state"
    elif trainer.is_deepspeed_enabled:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        kind = f"ZeRO-{stage}"
        sharded = {1: "optimizer state", 2: "optimizer state and gradients",
                   3: "student parameters, gradients and optimizer state"}.get(stage, "nothing")
    elif world > 1:
        kind, sharded = "DDP", "nothing (each process holds the whole student)"
    else:
        kind, sharded = "one process", "nothing"
    return {"kind": kind, "world_size": world, "sharded": sharded, "teacher": teacher}
