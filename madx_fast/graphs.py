"""Inference replayed from CUDA graphs: the eval forward of an HF model (with or without MAD-X) for batches
of a repeated shape, without the Python and kernel-launch cost of each layer.

    from madx_fast.graphs import GraphedInference
    run = GraphedInference(model)              # model.eval(); on the GPU it will be on
    logits = run(input_ids, attention_mask)    # host (CPU) tensors from the collator, or device tensors
    logits = run(input_ids, attention_mask, languages=["sw", "en", ...])   # a Stack(PerRow(...), task) setup

At batch 32 x 128 tokens an XLM-R base forward is ~1-2 ms of GPU arithmetic but several ms of Python and
launches; a graph replays all of the forward's kernels with one launch. One graph is captured per input
shape, active adapter setup and set of parameter storages (so ``set_active``, ``load_adapter``,
``cast_backbone`` or ``.to()`` never replay a stale graph); at most ``max_graphs`` are kept (least recently
used dropped). The inputs are copied into the graph's static buffers; the output is copied out, so a
result stays valid after the next call. With a per-row setup (``Stack(PerRow("en", "sw", ...), task)``) the
row -> language ids are one more input buffer of the graph: one graph per shape serves every mix of languages.

On a CPU the same bookkeeping runs with a plain call in place of the replay (tests check it there).
Masks: host inputs tell on the host whether the batch has padding, so the forward makes no host-device
sync (``madx_fast.model.inputs``), which capture requires; a device mask is always treated as padded, and
so is every mask on transformers 4.x (whose check of an unpadded mask would sync). No mask means all ones.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch

from .model import per_row
from .model.inputs import TRANSFORMERS_MAJOR, encoder_attention_mask
from .model.stack import per_row_entry


class _Entry:
    def __init__(self, ids, mask, padded, languages=None):
        self.ids, self.mask, self.padded, self.languages = ids, mask, padded, languages
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
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, languages=None):
        """``languages``: each row's language for a ``PerRow`` setup (names, ids, or a tensor of ids; see
        ``MadxAdapters.row_languages``); default: those set with ``madx.set_row_languages`` / ``row_languages``."""
        model = self.model
        if model.training:
            raise ValueError("GraphedInference replays an eval forward: call model.eval() first")
        device = model_device(model)
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
        row_ids = _row_ids(model, languages, input_ids.shape[0])
        key = (tuple(input_ids.shape), padded, _setup_key(model), _storage_key(model))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._new_entry(key, input_ids, attention_mask, padded, device, row_ids)
        else:
            self._entries.move_to_end(key)
        copy_in(entry.ids, input_ids)
        copy_in(entry.mask, attention_mask)
        if row_ids is not None:
            copy_in(entry.languages, row_ids)
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
        if entry.languages is None:
            result = self.model(input_ids=entry.ids, attention_mask=mask)
        else:
            with self.model.madx.row_languages(entry.languages):  # a device buffer: no host read, no copy
                result = self.model(input_ids=entry.ids, attention_mask=mask)
        if isinstance(self.output_key, tuple):
            return tuple(result[k] for k in self.output_key)
        return result[self.output_key]

    def _new_entry(self, key, input_ids, attention_mask, padded, device, row_ids) -> _Entry:
        ids = torch.empty(input_ids.shape, dtype=torch.long, device=device)
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=device)
        languages = None
        if row_ids is not None:
            languages = torch.zeros(input_ids.shape[:1], dtype=torch.long, device=device)
            copy_in(languages, row_ids)
        entry = _Entry(ids, mask, padded, languages)
        copy_in(ids, input_ids)
        copy_in(mask, attention_mask)
        if device.type == "cuda":
            self._capture(entry, device)
        while len(self._entries) >= self.max_graphs:
            self._entries.popitem(last=False)
        self._entries[key] = entry
        return entry

    def _capture(self, entry, device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad(), autocast_without_cache():
            for _ in range(self.warmup):  # compiles Triton kernels, settles the allocator
                self._forward(entry)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), autocast_without_cache(), torch.cuda.graph(graph, pool=self._pool):
            entry.output = self._forward(entry)
        entry.graph = graph
        self.captures += 1


def autocast_without_cache():
    """Under an enclosing CUDA autocast, the same autocast with its weight-cast cache off: a graph must not
    keep pointers to cached casts that autocast frees when its region ends (the casts are replayed instead)."""
    if not torch.is_autocast_enabled("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def graph_lengths(max_length: int) -> list[int]:
    """The padded lengths of CUDA-graph batches: powers of two from 16, and ``max_length``."""
    out, n = [], 16
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def padded_length(length: int, max_length: int | None) -> int:
    """The graph length a batch of ``length`` tokens is padded to: the smallest of ``graph_lengths(max_length)``
    that holds it (without ``max_length``, or beyond it: the next power of two from 16)."""
    if max_length is None or length > max_length:
        max_length = max(16, 1 << (length - 1).bit_length())
    return next(n for n in graph_lengths(max_length) if n >= length)


def model_device(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def copy_in(static: torch.Tensor, value: torch.Tensor | None) -> None:
    """Copy ``value`` into a graph's static input buffer (a host tensor through pinned memory, queued without
    waiting); None fills the buffer with ones (an absent mask)."""
    if value is None:  # no mask: all ones (the buffer may hold an earlier batch's padding)
        static.fill_(1)
        return
    if static.device.type == "cuda" and value.device.type == "cpu":
        value = value.pin_memory()
    static.copy_(value, non_blocking=True)


def _row_ids(model, languages, batch: int):
    """The row -> language ids of this call (host or device tensor), or None for a setup without a PerRow."""
    madx = getattr(model, "madx", None)
    if madx is None:
        if languages is not None:
            raise ValueError("languages= needs a MAD-X model with a PerRow setup (madx_fast.model.add_madx)")
        return None
    active = madx.state.active
    if per_row_entry(active) is None:
        if languages is not None:
            raise ValueError(f"languages= given, but the active setup {madx.active!r} has no PerRow")
        return None
    if languages is not None:
        row_ids = per_row.row_group_ids(active, languages)
    elif madx.state.row_groups is not None:
        row_ids = madx.state.row_groups
    elif per_row.needs_row_languages(active):
        raise ValueError(f"the active setup {madx.active!r} runs each row in its own language: pass "
                         "languages=[...] (one per row)")
    else:
        row_ids = torch.zeros(batch, dtype=torch.long)  # a PerRow of one language
    if row_ids.shape[0] != batch:
        raise ValueError(f"languages has {row_ids.shape[0]} entries, but the batch has {batch} rows")
    return row_ids


def _setup_key(model):
    madx = getattr(model, "madx", None)
    return None if madx is None else repr(madx.active)


def _storage_key(model) -> tuple:
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())
