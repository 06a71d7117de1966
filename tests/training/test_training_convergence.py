"""Training curves of the fused Triton kernels equal the eager reference's: 60 steps of language-adapter MLM
training (bottleneck adapters + NICE forward and inverse, forward and backward) on a tiny model in fp32.
Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch
from madx_training_helpers import adapter_tensors, build_tiny_base, quiet_config, step_losses, write_small_corpus

from madx_fast.backends import resolve_backend
from madx_fast.training import train_language_adapter

STEPS = 60


def test_triton_and_eager_training_curves_match(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU, Triton's interpreter
    assert resolve_backend("triton", torch.device(device)) == "triton"
    write_small_corpus(str(tmp_path / "corpus"))
    base = build_tiny_base(str(tmp_path / "base"), str(tmp_path / "corpus"))
    data = str(tmp_path / "corpus" / "alpha" / "text" / "train.txt")
    runs = {}
    for backend in ("eager", "triton"):
        runs[backend] = str(tmp_path / backend)
        train_language_adapter(model=base, lang="alpha", train_data=data, output_dir=runs[backend], eval_fraction=0,
                               config=quiet_config(steps=STEPS, batch_size=4, learning_rate=1e-2, warmup_steps=5,
                                                   device=device),
                               max_length=16, backend=backend)
    eager, triton = step_losses(runs["eager"]), step_losses(runs["triton"])
    assert len(eager) == len(triton) == STEPS
    worst = max(abs(a - b) for a, b in zip(eager, triton))
    assert worst < 1e-4, f"largest per-step loss difference {worst:.2e}"
    # it trains: the second half of the curve is lower than the first
    assert sum(eager[STEPS // 2:]) < sum(eager[:STEPS // 2])
    a = adapter_tensors(os.path.join(runs["eager"], "adapter"))
    b = adapter_tensors(os.path.join(runs["triton"], "adapter"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
