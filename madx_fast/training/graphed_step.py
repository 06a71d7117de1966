"""Optimizer steps replayed from CUDA graphs (``--cuda-graphs`` of ``train-lang`` / ``train-task``): the forward
and backward of every micro-batch of a step, the gradient clipping and the AdamW update, launched as one graph.

Why: a MAD-X step trains a few million adapter weights on a frozen backbone, so its GPU work is short (an NER
step of XLM-R base at batch 32 x 128 is a few ms) while Python, the dispatcher and ~700 kernel launches take
longer: the step is host-bound. A graph replays all of its kernels with one launch.

What capture needs, and how a step provides it:

- **Static shapes.** The global batch is padded on the host to a length among ``graph_lengths(max_length)``
  (attention mask 0, labels ignored, the pad token elsewhere), and an LM objective's decoder rows (its
  ``row_keys``: flat positions and targets, already a multiple of 64 long) to the longest of the step's
  micro-batches (padded rows: position 0, target ignored). Padding adds no loss term and changes no gradient.
  One graph is captured per shape signature; all share one memory pool (they are replayed one at a time and
  what a step returns is copied out of the pool at once).
- **Static inputs.** The host batch is copied into device buffers that the graph reads (through pinned memory,
  without waiting); so are the loss scale (processes / loss terms of the global batch) and the learning rate:
  while capturing, the optimizer's learning rate is a device tensor, and before each replay the scheduler's
  value for the step is written into it (the scheduler and the checkpoints keep plain floats).
- **Gradients.** The step sets them to None first, so that backward writes each parameter's gradient fresh
  (no zeroing, no accumulation kernel) into storage of the graph's pool, the same on every replay; the
  captured clipping and update read them there.
- **No host sync inside.** The non-finite check is fused AdamW's ``found_inf``, computed on the device; the
  attention mask takes a form whose handling reads nothing back (``encoder_attention_mask``): the padded
  form, valid for any mask, unless the host batch has no padding and transformers >= 5 (then no mask, so
  attention may take its flash kernel); whether it has padding is part of the shape signature.
- **Random numbers.** Dropout draws from the CUDA generator's Philox offsets, which every replay advances.
- **Warm-up.** A shape runs eagerly ``warmup`` times before it is captured (Triton compiles its kernels for
  it, AdamW creates its state). Those are real training steps of the run: the same code path as a replay.

Not with several processes (DistributedDataParallel's gradient hooks), a float16 backbone (its dynamic loss
scaling) or ``--compile``; the trainer refuses those combinations. On a CPU the same static-shape step runs
without capture, so tests check its arithmetic against the plain loop there.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

from ..graphs import copy_in, padded_length
from ..model.inputs import IGNORE_INDEX, TRANSFORMERS_MAJOR, encoder_attention_mask
from .batches import pad_to, slice_batch

log = logging.getLogger("madx_fast.training")

# pad values of the batch's [..., L] tensors that are not token ids
_SEQUENCE_PADS = {"attention_mask": 0, "labels": IGNORE_INDEX, "token_type_ids": 0}


class GraphCaptureError(RuntimeError):
    """The step could not be captured in a CUDA graph (the message says why and what to do)."""


def pad_sequences(batch: dict, length: int, pad_id: int) -> dict:
    """``batch`` with every ``[..., L]`` tensor (``L`` the length of its ``input_ids``) right-padded to
    ``length``: attention masks with 0, labels with the ignore index, token ids with ``pad_id``."""
    current = batch["input_ids"].shape[-1]
    if length < current:
        raise ValueError(f"cannot pad a batch of {current} tokens to {length}")
    return {k: pad_to(v, _SEQUENCE_PADS.get(k, pad_id), length) if v.dim() >= 2 and v.shape[-1] == current else v
            for k, v in batch.items()}


def pad_rows_to(micros: list[dict], row_keys: tuple[str, str] | None) -> list[dict]:
    """The micro-batches with their decoder rows (``row_keys`` = positions, targets) padded to the longest:
    position 0 with an ignored target, which adds nothing to the loss sum."""
    if not row_keys:
        return micros
    pos_key, tgt_key = row_keys
    size = max(m[pos_key].shape[0] for m in micros)
    out = []
    for m in micros:
        extra = size - m[pos_key].shape[0]
        m = dict(m)
        m[pos_key] = torch.cat([m[pos_key], m[pos_key].new_zeros(extra)])
        m[tgt_key] = torch.cat([m[tgt_key], m[tgt_key].new_full((extra,), IGNORE_INDEX)])
        out.append(m)
    return out


def check_graphed_training(procs, model) -> None:
    """``--cuda-graphs`` combines with neither several processes nor a float16 backbone (ValueError)."""
    if procs.enabled:
        raise ValueError(f"--cuda-graphs trains in one process; this run has {procs.world}: launch without "
                         "torchrun, or train without --cuda-graphs")
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise ValueError("--cuda-graphs does not train a float16 backbone (its dynamic loss scaling adjusts the "
                         "scale between steps): use --backbone-dtype bfloat16 or float32")


class _Entry:
    """One shape signature: its device buffers, its graph once captured, its static outputs."""

    def __init__(self, micros: list[dict], padded: bool, device: torch.device):
        self.padded = padded
        self.micros = [{k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in m.items()} for m in micros]
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        self.eager_runs = 0
        self.graph = None
        self.loss = self.bad = None


class GraphedSteps:
    """``step(batch, scale) -> (loss sum, non-finite flag)``, both fresh device scalars, for this process's
    slice of a global batch (host tensors from the objective's ``make_batch``). ``run_micro(micro, scale)``
    is the trainer's forward + backward of a device micro-batch (returning its float64 loss sum) and
    ``optimizer_step(loss_sum)`` its clipping and update (returning the device flag)."""

    def __init__(self, model, objective, optimizer: torch.optim.Optimizer, device: torch.device, *,
                 grad_accum: int, max_length: int | None, run_micro: Callable, optimizer_step: Callable,
                 warmup: int = 2, max_graphs: int = 8):
        self.model, self.objective, self.optimizer, self.device = model, objective, optimizer, device
        self.grad_accum, self.max_length, self.warmup, self.max_graphs = grad_accum, max_length, warmup, max_graphs
        self.run_micro, self.optimizer_step = run_micro, optimizer_step
        self.capture = device.type == "cuda"
        self.pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self.lr = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self._entries: OrderedDict = OrderedDict()
        self._pool = None
        self.captures = 0  # graphs captured so far (for tests and logs)
        self.replays = 0

    # ---------------------------------------------------------------------------------------------------
    def step(self, batch: dict, scale: float):
        micros = self.static_micros(batch)
        mask = batch.get("attention_mask")
        padded = TRANSFORMERS_MAJOR < 5 or mask is None or not bool(mask.all()) or \
            micros[0]["input_ids"].shape[-1] != batch["input_ids"].shape[-1]
        key = (padded,) + tuple((k, tuple(v.shape), v.dtype) for m in micros for k, v in sorted(m.items()))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(micros, padded, self.device)
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        for static, host in zip(entry.micros, micros):
            for k, v in host.items():
                copy_in(static[k], v)
        entry.scale.fill_(scale)
        if entry.graph is not None:
            for lr, group in zip(self.lr, self.optimizer.param_groups):
                lr.fill_(group["lr"])
            entry.graph.replay()
            self.replays += 1
            return entry.loss.clone(), entry.bad.clone()
        loss, bad = self._body(entry)
        entry.eager_runs += 1
        if self.capture and entry.eager_runs >= self.warmup:
            self._capture(entry)
        return loss, bad

    def static_micros(self, batch: dict) -> list[dict]:
        """This process's micro-batches, padded to the step's static shapes and prepared (host tensors)."""
        length = padded_length(batch["input_ids"].shape[-1], self.max_length)
        batch = pad_sequences(batch, length, self.pad_id)
        rows = batch["input_ids"].shape[0] // self.grad_accum
        micros = [self.objective.prepare(slice_batch(batch, a * rows, (a + 1) * rows)) for a in range(self.grad_accum)]
        return pad_rows_to(micros, getattr(self.objective, "row_keys", None))

    # ---------------------------------------------------------------------------------------------------
    def _body(self, entry: _Entry):
        """The whole step on the entry's buffers: what the graph records and what an eager run executes."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in entry.micros:
            inputs = dict(micro)
            if "attention_mask" in inputs:  # a form that reads nothing back (module docstring)
                inputs["attention_mask"] = encoder_attention_mask(self.model, micro["attention_mask"],
                                                                  padded=entry.padded)
            loss_sum += self.run_micro(inputs, entry.scale)
        return loss_sum, self.optimizer_step(loss_sum)

    def _capture(self, entry: _Entry) -> None:
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            for g, lr in zip(groups, self.lr):
                g["lr"] = lr
            # thread_local: a reporter's or the progress display's thread may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                entry.loss, entry.bad = self._body(entry)
        except RuntimeError as e:
            raise GraphCaptureError(
                f"the training step could not be captured in a CUDA graph ({e}); a model whose forward reads "
                "device data back to the host cannot be: train without --cuda-graphs") from e
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        entry.graph = graph
        self.captures += 1
        log.info("captured the training step for batches of shape %s in CUDA graph %d",
                 tuple(entry.micros[0]["input_ids"].shape), self.captures)


__all__ = ["GraphCaptureError", "GraphedSteps", "check_graphed_training", "pad_rows_to", "pad_sequences"]
