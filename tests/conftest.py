"""Test set-up: without a GPU the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so it is set here, before any test module
imports madx_fast's kernels. bf16 and CUDA-backend tests need a GPU and skip with a reason without one
(tests/helpers/devices.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random inputs on every run (failures reproduce)."""
    torch.manual_seed(0)
