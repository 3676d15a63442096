"""Distributed helpers: the same code runs alone or under `torchrun` (DDP).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; we then join a process group (gloo on the CPU,
NCCL on CUDA). Only rank 0 saves and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(prefer_cuda: bool = True) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = prefer_cuda and torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=info.device if info.device.startswith("cuda") else "cpu")
    tdist.all_reduce(t)
    return t.tolist()


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """Rank 0's decision, seen by every rank (stop early, abort)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device="cpu" if info.device == "cpu" else info.device)
    tdist.broadcast(t, src=0)
    return bool(t.item())


def teardown(info: DistInfo) -> None:
    if info.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
