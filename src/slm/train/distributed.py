"""Several processes, one model: PyTorch's own distributed engine, started by ``torchrun``.

    torchrun --nproc_per_node 4 -m slm train --config configs/gpt_124m.yaml    # or: slm train --gpus 4

Every process (rank) builds the same model, reads its own slice of each global batch, and averages
gradients with the others (DDP), or holds only a shard of the weights (FSDP2, ``training.parallelism: fsdp``).
Rank 0 alone logs, evaluates and writes checkpoints; checkpoints hold full, unsharded tensors, so they
resume on any number of processes, or on one.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from slm.device import resolve_device


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistributedContext:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); otherwise a 1-process context."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistributedContext(device=resolve_device(device_name))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank, world, local, device)


def wrap_model(model: nn.Module, forward: nn.Module, ctx: DistributedContext, parallelism: str) -> nn.Module:
    """The module the training step calls: ``forward`` (the model or its compiled form) wrapped in DDP or FSDP2."""
    if not ctx.enabled:
        return forward
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return forward
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(forward, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation window."""
    if hasattr(module, "require_backward_grad_sync"):  # DDP
        module.require_backward_grad_sync = sync
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)


def mean_across_ranks(value: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def shutdown(ctx: DistributedContext) -> None:
    """End the process group once the trainer holding it is gone.

    A DDP model's reducer holds the group too. Freed after the group was destroyed, the reducer is the last
    owner, and the group's destructor (joining gloo's threads) then runs with the GIL held: a gloo thread
    waiting for the GIL deadlocks it (a CPU run hung so at exit, py-spy showed). So the caller drops the
    trainer first, and gc.collect() frees whatever reference cycles kept it; the group then goes last, through
    destroy_process_group, which releases the GIL."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
