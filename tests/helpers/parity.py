"""Comparing a fused op with the eager reference, forward and every gradient.

The oracle is the reference evaluated in float64 on the same inputs. float32 must match to rounding
(relative error 1e-5). In float16/bfloat16 the fused op must be no less accurate than the eager reference
run at the same precision (within ``factor`` = 3x by default, or a small floor): a ReLU whose input sits near zero can flip sign
under rounding in either implementation, so an absolute tolerance alone would be arbitrary.
"""
from __future__ import annotations

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run_with_grads(fn, inputs, grad_out=None):
    """Call fn on fresh leaf copies of inputs; return the output, the grads of all float inputs and grad_out."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    want = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, want, grad_out.to(out.dtype), allow_unused=True)
    return out, list(grads), grad_out


def check_parity(fused, reference_fn, inputs, dtype, names, check_grad_floor=1e-6, factor=3.0):
    """fused(*inputs) vs reference_fn in float64 and in ``dtype``; raise with a per-tensor report."""
    out, grads, g = run_with_grads(fused, inputs)
    assert out.dtype == inputs[0].dtype, f"output dtype {out.dtype} != input dtype {inputs[0].dtype}"
    ref64 = [t.double() if t is not None else None for t in inputs]
    ref_out, ref_grads, _ = run_with_grads(reference_fn, ref64, g.double())
    if dtype == torch.float32:
        low_out, low_grads = ref_out, ref_grads
        budget = [FLOOR[dtype]] * (1 + len(grads))
    else:
        low_out, low_grads, _ = run_with_grads(reference_fn, inputs, g)
        budget = [max(factor * rel_err(lo, r), FLOOR[dtype]) for lo, r in zip([low_out] + low_grads,
                                                                           [ref_out] + ref_grads)]
    report, ok = [], True
    for name, got, ref, tol in zip(["out"] + list(names), [out] + grads, [ref_out] + ref_grads, budget):
        assert got is not None, f"no gradient for {name}"
        assert ref.norm() > check_grad_floor, f"reference {name} is near zero: the comparison would be vacuous"
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = rel_err(got, ref)
        ok &= err <= tol
        report.append(f"{name}: err {err:.2e} (allowed {tol:.1e})")
    assert ok, "fused op differs from the reference:\n  " + "\n  ".join(report)
    return out, grads
