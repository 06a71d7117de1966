"""Data-parallel processes (``torchrun --nproc_per_node N``): which one this is, and joining the group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def share(self, value):
        """Process 0's ``value`` (picklable) on every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK); one process otherwise.
    NCCL when the run uses CUDA, gloo when it runs on the CPU (``device="cpu"`` or no GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group. After a command that finished on every process (``wait_for_peers``), the
    processes first meet in a barrier: one leaving while another still talks to it can abort the other."""
    try:
        if dist.is_available() and dist.is_initialized():
            if wait_for_peers:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
