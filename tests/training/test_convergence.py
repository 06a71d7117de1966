"""Training curves of the fused Triton kernels equal the eager reference's: 60 steps of language-adapter MLM
training (bottleneck adapters + NICE forward and inverse, forward and backward) on a tiny model in fp32.
Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import pytest
import torch

from madx_fast.backends import resolve_backend
from madx_fast.training import train_language_adapter
from tests.helpers.runs import adapter_tensors, build_tiny_base, quiet_config, step_losses, write_small_corpus

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
                               max_length=16, backend=backend, backbone_dtype="float32")
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton's interpreter has no bf16)")
def test_default_fast_path_tracks_eager_as_closely_as_bf16_allows(tmp_path):
    """The command line's defaults on a GPU (Triton kernels, bfloat16 backbone) against the eager ops on the
    same bfloat16 backbone: per-step losses no further apart than 3x the distance bf16 itself puts between
    eager bf16 and eager fp32 (the project's low-precision parity rule), plus 1e-3."""
    write_small_corpus(str(tmp_path / "corpus"))
    base = build_tiny_base(str(tmp_path / "base"), str(tmp_path / "corpus"))
    data = str(tmp_path / "corpus" / "alpha" / "text" / "train.txt")
    losses = {}
    for name, backend, dtype in (("fast", None, "auto"), ("eager", "eager", "auto"), ("fp32", "eager", "float32")):
        run = str(tmp_path / name)
        train_language_adapter(model=base, lang="alpha", train_data=data, output_dir=run, eval_fraction=0,
                               config=quiet_config(steps=STEPS, batch_size=4, learning_rate=1e-2, warmup_steps=5,
                                                   device="cuda"),
                               max_length=16, backend=backend, backbone_dtype=dtype)
        losses[name] = step_losses(run)
    bf16_error = max(abs(a - b) for a, b in zip(losses["eager"], losses["fp32"]))
    worst = max(abs(a - b) for a, b in zip(losses["fast"], losses["eager"]))
    assert bf16_error > 0  # the runs really were bf16
    assert worst <= 3 * bf16_error + 1e-3, f"fast vs eager {worst:.2e}, bf16 vs fp32 {bf16_error:.2e}"
    assert sum(losses["fast"][STEPS // 2:]) < sum(losses["fast"][:STEPS // 2])
