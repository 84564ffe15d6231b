"""Several processes through torchrun: join its process group, find this rank's device, combine results.

`torchrun --nproc-per-node N` starts N copies of the command with RANK, WORLD_SIZE and LOCAL_RANK set.
Without them (a plain run, or WORLD_SIZE 1) every function here is a no-op: rank 0 of a world of 1.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from tta_cli.errors import TTAError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def requested_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and return this rank's device:
    cuda:LOCAL_RANK on CUDA, whatever `device` said otherwise. A single process returns `device` unchanged."""
    world = requested_world_size()
    if world <= 1:
        return device
    if dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise TTAError(f"WORLD_SIZE is {world} but {', '.join(missing)} are not set; start the processes with torchrun --nproc-per-node N")
    if device.type == "cuda":
        local_rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= count:
            raise TTAError(f"torchrun started local rank {local_rank}, but this machine has only {count} GPUs (--nproc-per-node {count})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the joined group; 1 when no group was joined."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 prints and writes files. Before `init` this reads torchrun's RANK, so other ranks stay quiet from the start."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (safe to call twice, and without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks (a new tensor, on `values`' device)."""
    if world_size() == 1:
        return values.clone()
    total = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def min_over_ranks(value: int) -> int:
    """The smallest `value` any rank holds, so that all ranks agree on it (e.g. a memory-sized chunk)."""
    if world_size() == 1:
        return value
    smallest = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest)


def gather_in_order(values: torch.Tensor, indices: torch.Tensor, total: int, fill: float = 0) -> torch.Tensor:
    """Each rank holds rows `values` (n_r, ...) for sample positions `indices` (n_r,), n_r differing by rank.
    Returns, on every rank, the (total, ...) tensor with every row at its position (`fill` where no rank
    had one), on `values`' device: the per-rank shards put back in the original sample order."""
    gathered = torch.full((total, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    if world_size() == 1:
        gathered[indices] = values
        return gathered
    device = _collective_device()
    count = torch.tensor([indices.shape[0]], dtype=torch.long, device=device)
    counts = [torch.empty_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    padded_values = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=device)
    padded_values[: indices.shape[0]] = values
    padded_indices = torch.zeros(longest, dtype=torch.long, device=device)
    padded_indices[: indices.shape[0]] = indices
    all_values = [torch.empty_like(padded_values) for _ in counts]
    all_indices = [torch.empty_like(padded_indices) for _ in counts]
    dist.all_gather(all_values, padded_values)
    dist.all_gather(all_indices, padded_indices)
    for rank_count, rank_values, rank_indices in zip(counts, all_values, all_indices, strict=True):
        gathered[rank_indices[:rank_count].to(values.device)] = rank_values[:rank_count].to(values.device)
    return gathered
