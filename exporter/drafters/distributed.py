"""The process group of a run started by ``torchrun`` or ``accelerate launch`` (both set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); a plain
``python`` / ``vispec-export`` run is a world of one and starts no group.

    with world_group() as world:      # gloo on CPU, nccl when CUDA is there
        world.rank, world.size, world.device
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from vispec.runtime.errors import VispecError

BARRIER_TIMEOUT = timedelta(hours=4)  # ranks wait for the slowest at stage ends


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64 on the run's device)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def env_world() -> World:
    """The world the launcher describes in the environment (one process without one): each
    rank on the GPU of its local rank where CUDA is there, else on the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local >= gpus:
        raise VispecError(f"local rank {local} but {gpus} GPU(s) here. Expected: one process "
                          f"per GPU. Hint: --nproc_per_node {gpus}, or CUDA_VISIBLE_DEVICES= "
                          f"to run every process on the CPU")
    device = torch.device(f"cuda:{local}") if gpus else torch.device("cpu")
    return World(int(os.environ.get("RANK", "0")), size, local, device)


@contextmanager
def world_group() -> Iterator[World]:
    """Join the launcher's process group for the duration (nothing to join for one process)."""
    world = env_world()
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo",
                            timeout=BARRIER_TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()
