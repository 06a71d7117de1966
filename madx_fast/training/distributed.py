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

    def on_main(self, fn):
        """``fn()`` on process 0 (writing files), the others waiting for it as at a barrier. When it fails,
        every process raises: process 0 its own exception, the others an exception with its message (an
        OSError for an OSError, so that the command's status is the same), so that none is left waiting in a
        collective for a process that has stopped. Returns ``fn()``'s result on process 0, None elsewhere."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, here and on every other process
                error = exc
        failure = self.share(None if error is None else (isinstance(error, OSError), str(error)))
        if error is not None:
            raise error
        if failure is not None:
            is_os_error, message = failure
            raise (OSError if is_os_error else RuntimeError)(f"process 0 stopped: {message}")
        return result


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
