"""Devices: the one a process runs on, and the peak memory a run used there (for run.json and reports)."""
from __future__ import annotations

import resource
import sys

import torch


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The device of this process: ``requested`` (a bare ``cuda``: this process's GPU, ``cuda:<local_rank>``),
    else this process's GPU when CUDA is available, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} asked for, but CUDA is not available here")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class PeakMemory:
    """Peak memory of a run: CUDA allocator peak on a GPU, the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2 ** 20,
                    "peak_memory_kind": "cuda max_memory_allocated"}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mb = rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024
        return {"peak_memory_mb": rss_mb, "peak_memory_kind": "process peak RSS (CPU)"}
