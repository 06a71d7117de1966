"""Cross-entropy of a chunk of LM logits and its gradient, written over the logits: the loss end of the fused
decoder + cross-entropy (``madx_fast.model.mlm_loss``).

    loss_rows = softmax_cross_entropy(logits, targets, count, ignore_index=-100, grad=True)

``logits [R, V]`` (the decoder's output for R rows, in its own dtype), ``targets [R]``, ``count`` a one-element
tensor: the number of labelled rows the loss is averaged over (1 for a sum). Returns ``loss_i = lse_i - z_i,t_i``
per row (float32, 0 for ignored rows); with ``grad=True`` the logits then hold ``dloss/dz = (softmax(z_i) -
onehot(t_i)) * [t_i labelled] / count`` in their own dtype. Derivation: ``loss = sum_i (lse_i - z_i,t_i) / count``
and ``d lse_i / d z_iv = softmax(z_i)_v``.

The fused path (``madx_fast::softmax_cross_entropy``, Triton, also for a model on backend "cuda", which has no
kernel of its own for it) reads the logits twice and writes them once; the eager path is the same arithmetic in
torch ops (float32 logits, then logsumexp, exp, scatter and scale): the specification the kernel is tested
against. Which runs: the fused path where the adapter ops would run fused (``madx_fast.backends``: CUDA tensors,
or Triton's CPU interpreter for float32 / float16), the eager one otherwise.
"""
from __future__ import annotations

import torch

from . import dispatch
from .dispatch import LIB


def softmax_cross_entropy_reference(logits, targets, count, ignore_index, grad):
    """The eager specification (module docstring); overwrites ``logits`` with the gradient when ``grad``."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    loss = torch.where(valid, lse - z.gather(1, safe.unsqueeze(1)).squeeze(1), torch.zeros_like(lse))
    if grad:
        g = (z - lse.unsqueeze(1)).exp_()
        g.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
        g.mul_((valid.to(torch.float32) / count).unsqueeze(1))
        logits.copy_(g)
    return loss


@torch.library.custom_op(f"{LIB}::softmax_cross_entropy", mutates_args=("logits",))
def _fused_op(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, ignore_index: int,
              grad: bool) -> torch.Tensor:
    """Per-row losses; the logits overwritten by their gradient when ``grad``."""
    from ..kernels.triton import lm_loss  # imported on first use, as every backend is
    return lm_loss.softmax_cross_entropy(logits, targets, count, ignore_index, grad)


@_fused_op.register_fake
def _(logits, targets, count, ignore_index, grad):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


def fused_available(logits: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on these logits here (module docstring)."""
    return dispatch.triton_kernel_runs(None, logits)


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, *,
                          ignore_index: int = -100, grad: bool = True, fused: bool | None = None) -> torch.Tensor:
    """Per-row cross-entropy of ``logits [R, V]``; with ``grad`` the logits are overwritten by its gradient.
    ``fused=None`` picks the Triton kernel where it can run (``fused_available``)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [R, V] and targets [R], got shapes {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if fused is None:
        fused = fused_available(logits)
    if not fused:
        return softmax_cross_entropy_reference(logits, targets, count, ignore_index, grad)
    if logits.stride(1) != 1:
        raise ValueError("the fused cross-entropy needs logits with unit column stride")
    return _fused_op(logits, targets, count.reshape(1).to(torch.float32), int(ignore_index), bool(grad))
