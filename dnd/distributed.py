"""Process-group helpers so the training loops run unchanged on 1 or N processes (torchrun).

`torchrun --nproc_per_node N -m dnd train_generator ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
`init()` then joins the group (NCCL on CUDA, gloo on the CPU). With one process every
helper is a no-op. Only rank 0 writes checkpoints, metrics and MLflow runs.

Two ways to spread a model: DistributedDataParallel (every process holds all weights,
gradients and optimizer state) or FSDP (`fully_shard`, PyTorch's FSDP2: each process
holds 1/N of them and gathers a block's weights only while it runs), for generators too
large to replicate (XXL and larger).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_initialized():
        dist.broadcast(t, src=src)
    return t


def fully_shard_blocks(model: torch.nn.Module, block_type: type) -> None:
    """Shard `model` in place over all processes: every `block_type` module is its own FSDP unit
    (its weights are gathered just for its forward and backward), the rest belongs to the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (world_size(),))
    for module in model.modules():
        if isinstance(module, block_type):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard(batch):
    """This rank's contiguous slice of a global batch (array or tensor, first axis)."""
    n = world_size()
    if n == 1:
        return batch
    if len(batch) % n:
        raise ValueError(f"global batch size {len(batch)} is not divisible by the {n} processes")
    per = len(batch) // n
    return batch[rank() * per:(rank() + 1) * per]
