"""Host batches made ready for the device without a host-device sync in the step that uses them."""
from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..model.inputs import encoder_attention_mask


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def slice_batch(batch: dict, start: int, end: int) -> dict:
    return {k: v[start:end] for k, v in batch.items()}


def pad_to(rows: torch.Tensor, value: int, length: int) -> torch.Tensor:
    return F.pad(rows, (0, length - rows.shape[1]), value=value)


def pad_rows(rows, pad_value: int, length: int | None = None) -> torch.Tensor:
    """Lists of ids as one ``[len(rows), length]`` long tensor, right-padded with ``pad_value``."""
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def to_device(batch: dict, device) -> dict:
    """Copy a host batch to ``device``; to a GPU through pinned memory, so the copy is queued without
    waiting (a copy from pageable memory synchronises the stream first)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def model_batch(model, batch: dict, device) -> dict:
    """A host batch, made ready for ``model`` on ``device``: moved through pinned memory, its attention mask
    in the form that spares HF the check whether it is all ones (``encoder_attention_mask``, decided here
    from the host copy)."""
    mask = batch.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    out = to_device(batch, device)
    if mask is not None:
        out["attention_mask"] = encoder_attention_mask(model, out["attention_mask"], padded=padded, host_mask=mask)
    return out


@torch.no_grad()
def forward_batches(task, model, features, batch_size: int, device, bf16: bool = False, graphs: bool = False):
    """Yield ``(features of the batch, model outputs)`` over ``features`` in eval mode. ``graphs=True``
    replays the forward from CUDA graphs (``madx_fast.graphs``; every batch padded to the longest feature so
    that shapes repeat) for tasks that name their ``graph_outputs``."""
    from .progress import progress
    was_training = model.training
    model.eval()
    runner, length = None, None
    if graphs and task.graph_outputs:
        from ..graphs import GraphedInference
        runner = GraphedInference(model, output_key=task.graph_outputs)
        length = max((len(f["input_ids"]) for f in features), default=0)
    try:
        for i in progress(range(0, len(features), batch_size), desc=f"eval {task.name}"):
            chunk = features[i:i + batch_size]
            batch = task.make_batch(chunk)
            if runner is not None:
                ids = pad_to(batch["input_ids"], task.pad_id, length)
                mask = pad_to(batch["attention_mask"], 0, length)
                with autocast(torch.device(device), bf16):
                    outs = runner(ids, mask)
                yield chunk, SimpleNamespace(**dict(zip(task.graph_outputs, outs)))
                continue
            inputs = model_batch(model, {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")},
                                 device)
            with autocast(torch.device(device), bf16):
                out = model(**inputs)
            yield chunk, out
    finally:
        model.train(was_training)
