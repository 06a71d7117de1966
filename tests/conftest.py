"""Test set-up: without a GPU the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so it is set here, before any test module
imports madx_fast's kernels. bf16 and CUDA-backend tests need a GPU and skip with a reason without one.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (bf16 and the CUDA backend are GPU-only)")


def fused_backends():
    """The fused backends to check here: Triton always (interpreter on CPU), CUDA when it can load."""
    names = ["triton"]
    if GPU:
        names.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return names


def dtypes():
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter's bf16 arithmetic is broken)."""
    return [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu)]


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random inputs on every run (failures reproduce)."""
    torch.manual_seed(0)
