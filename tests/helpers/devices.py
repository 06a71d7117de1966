"""Where the tests run: the device, the fused backends and dtypes to check there, the GPU-only marker."""
import pytest
import torch

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
