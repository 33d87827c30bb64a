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

- DeepSpeed ZeRO-3: a parameter is whole only inside its own module's forward pass (a hook gathers
  it there), and its gradient is reduce-scattered by hooks that module's forward attached to its
  inputs and outputs. So :func:`as_output_layer` runs the loss *as the LM head's forward pass*: ZeRO-3
  gathers the weight for it, gathers it again when backward reaches the loss and reduces its
  gradient as it does for any layer. (Gathering it with ``deepspeed.zero.GatheredParameters`` outside
  a forward pass was tried first and gave wrong gradients: the gradient arrives when the parameter
  is partitioned again.) ZeRO-1/2 keep whole parameters; nothing to do.

Anything else (one process, DDP, a LoRA student) is returned as it is.
"""

from __future__ import annotations


def partitioned_by_zero3(tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages ``tensor``: it marks the parameters it partitions with ``ds_id``."""
    return hasattr(tensor, "ds_id")


def output_rows(model) -> int:
    """Rows of the model's output embedding as the whole model has them: a ZeRO-3 partition's own
    shape is empty (an FSDP2 ``DTensor`` reports the global one)."""
    weight = model.get_output_embeddings().weight
    return weight.ds_shape[0] if partitioned_by_zero3(weight) else weight.shape[0]


def whole(weight):
    """``weight`` in full on this process (see the module doc); differentiable, except a frozen
    ZeRO-3 partition (the online teacher's), which is copied whole, once per micro-batch."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(weight, DTensor):
        return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    if partitioned_by_zero3(weight) and not weight.requires_grad and weight.ds_status.name == "NOT_AVAILABLE":
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


def as_output_layer(model, loss_fn, hidden, *tensors):
    """``loss_fn(hidden, weight, *tensors)`` with ``weight`` the model's whole output embedding; under
    ZeRO-3 run as the output layer's own forward pass, the only place it is whole (see the module doc).
    Tensor arguments only: ZeRO-3's hooks look for the tensors among a module's inputs and outputs."""
    head = model.get_output_embeddings()
    if not partitioned_by_zero3(head.weight):  # not ZeRO-3 (under FSDP2 a second call of the head crashed backward)
        return loss_fn(hidden, whole(head.weight), *tensors)
    head.forward = lambda *args: loss_fn(args[0], head.weight, *args[1:])
    try:
        return head(hidden, *tensors)
    finally:
        del head.forward  # the class's forward again


def sharded_run() -> str | None:
    """"FSDP2" or "ZeRO-3" when this run (as accelerate launched it) shards the student's
    parameters, else None (ZeRO-1/2 shard only optimizer state and gradients)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    from transformers.integrations import is_deepspeed_zero3_enabled

    state = PartialState()
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP2"
    if state.distributed_type == DistributedType.DEEPSPEED and is_deepspeed_zero3_enabled():
        return "ZeRO-3"
    return None


def sharded_over_processes(model) -> bool:
    """Whether ``model``'s forward passes are collective (FSDP2 or ZeRO-3 over several processes): then
    every process must run as many of them, e.g. ``generate(synced_gpus=True)``."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(map(partitioned_by_zero3, model.parameters()))


def shard_frozen(model, mesh=None):
    """Shard a frozen model (the online teacher) with torch's ``fully_shard``: each decoder layer is
    one unit, the rest (embeddings, final norm, LM head) the root's. ``mesh``: the student's (None:
    all processes, FSDP2's default). Its shards move to the mesh's device; the Trainer never sees it."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_frozen_zero3(model, bf16: bool):
    """A frozen model (the online teacher) as a ZeRO-3 inference engine's module: its parameters stay
    partitioned over the processes (transformers loaded it so under the student's ZeRO-3 config) and
    DeepSpeed's hooks gather each layer's for its forward pass. Every process must then run as many
    teacher forward passes, which the Trainer's lockstep micro-batches do."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    # the engine removes its hooks when collected, so the model keeps it: as a plain attribute, since
    # a submodule that holds the model would make the module tree a cycle (eval(), to() would recurse)
    object.__setattr__(engine.module, "distill_engine", engine)
    return engine.module


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
