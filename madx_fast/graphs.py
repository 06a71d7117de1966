"""Inference replayed from CUDA graphs: the eval forward of an HF model (with or without MAD-X) for batches
of a repeated shape, without the Python and kernel-launch cost of each layer.

    from madx_fast.graphs import GraphedInference
    run = GraphedInference(model)              # model.eval(); on the GPU it will be on
    logits = run(input_ids, attention_mask)    # host (CPU) tensors from the collator, or device tensors

At batch 32 x 128 tokens an XLM-R base forward is ~1-2 ms of GPU arithmetic but several ms of Python and
launches; a graph replays all of the forward's kernels with one launch. One graph is captured per input
shape, active adapter setup and set of parameter storages (so ``set_active``, ``load_adapter``,
``cast_backbone`` or ``.to()`` never replay a stale graph); at most ``max_graphs`` are kept (least recently
used dropped). The inputs are copied into the graph's static buffers; the output is copied out, so a
result stays valid after the next call.

On a CPU the same bookkeeping runs with a plain call in place of the replay (tests check it there).
Masks: host inputs tell on the host whether the batch has padding, so the forward makes no host-device
sync (``madx_fast.model.inputs``), which capture requires; a device mask is always treated as padded, and
so is every mask on transformers 4.x (whose check of an unpadded mask would sync). No mask means all ones.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch

from .model.inputs import TRANSFORMERS_MAJOR, encoder_attention_mask


class _Entry:
    def __init__(self, ids, mask, padded):
        self.ids, self.mask, self.padded = ids, mask, padded
        self.graph = None
        self.output = None


class GraphedInference:
    """Callable ``(input_ids, attention_mask=None) -> output`` (``output_key`` of the model's output, e.g.
    ``"logits"``; a tuple of keys returns a tuple) for a model in eval mode, under ``torch.no_grad``."""

    def __init__(self, model: torch.nn.Module, *, output_key: str | tuple[str, ...] = "logits",
                 max_graphs: int = 8, warmup: int = 2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model, self.output_key, self.max_graphs, self.warmup = model, output_key, max_graphs, warmup
        self._entries: OrderedDict = OrderedDict()
        self._pool = None
        self.captures = 0  # graphs captured so far (a count for tests and logs)

    # ---------------------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        model = self.model
        if model.training:
            raise ValueError("GraphedInference replays an eval forward: call model.eval() first")
        device = _model_device(model)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is None:
            padded = False
        elif attention_mask.device.type == "cpu":
            padded = not bool(attention_mask.all())  # host data: no sync
        else:
            padded = True  # a device mask is not read back: the padded form is right for any mask
        padded = padded or TRANSFORMERS_MAJOR < 5
        key = (tuple(input_ids.shape), padded, _setup_key(model), _storage_key(model))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._new_entry(key, input_ids, attention_mask, padded, device)
        else:
            self._entries.move_to_end(key)
        _copy_in(entry.ids, input_ids)
        _copy_in(entry.mask, attention_mask)
        with torch.no_grad():
            if entry.graph is not None:
                entry.graph.replay()
                out = entry.output
            else:
                out = self._forward(entry)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    # ---------------------------------------------------------------------------------------------------
    def _forward(self, entry):
        mask = encoder_attention_mask(self.model, entry.mask, padded=entry.padded)
        result = self.model(input_ids=entry.ids, attention_mask=mask)
        if isinstance(self.output_key, tuple):
            return tuple(result[k] for k in self.output_key)
        return result[self.output_key]

    def _new_entry(self, key, input_ids, attention_mask, padded, device) -> _Entry:
        ids = torch.empty(input_ids.shape, dtype=torch.long, device=device)
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=device)
        entry = _Entry(ids, mask, padded)
        _copy_in(ids, input_ids)
        _copy_in(mask, attention_mask)
        if device.type == "cuda":
            self._capture(entry, device)
        while len(self._entries) >= self.max_graphs:
            self._entries.popitem(last=False)
        self._entries[key] = entry
        return entry

    def _capture(self, entry, device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad(), _autocast_without_cache():
            for _ in range(self.warmup):  # compiles Triton kernels, settles the allocator
                self._forward(entry)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), _autocast_without_cache(), torch.cuda.graph(graph, pool=self._pool):
            entry.output = self._forward(entry)
        entry.graph = graph
        self.captures += 1


def _autocast_without_cache():
    """Under an enclosing CUDA autocast, the same autocast with its weight-cast cache off: a graph must not
    keep pointers to cached casts that autocast frees when its region ends (the casts are replayed instead)."""
    if not torch.is_autocast_enabled("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _copy_in(static: torch.Tensor, value: torch.Tensor | None) -> None:
    if value is None:  # no mask: all ones (the buffer may hold an earlier batch's padding)
        static.fill_(1)
        return
    if static.device.type == "cuda" and value.device.type == "cpu":
        value = value.pin_memory()
    static.copy_(value, non_blocking=True)


def _setup_key(model):
    madx = getattr(model, "madx", None)
    return None if madx is None else repr(madx.active)


def _storage_key(model) -> tuple:
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())
