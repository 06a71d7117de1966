"""Activations and their derivatives as Triton device functions, selected by a compile-time code.

Codes match ``madx_fast.reference.ACTIVATION_CODES``. Everything is computed in float32 on values the
caller has already rounded to the activation dtype, as the eager reference does.
"""
import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be tl.constexpr: the interpreter accepts plain floats, the GPU
# compiler refuses them ("Cannot access global variable ... from within @jit'ed function"). Keep a tensor on
# the left of each product with one (the interpreter cannot multiply a constexpr by a tensor).
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1: saturates correctly at +-1 for large |z| (exp overflow gives inf -> 0).
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    if ACT == 1:  # relu
        out = tl.maximum(z, 0.0)
    elif ACT == 2:  # gelu (erf)
        out = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 3:  # gelu (tanh approximation)
        out = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACT == 4:  # silu
        out = z * tl.sigmoid(z)
    elif ACT == 5:  # tanh
        out = _tanh(z)
    elif ACT == 6:  # leaky relu, slope 0.01
        out = tl.where(z > 0, z, 0.01 * z)
    else:  # identity
        out = z
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, with torch's conventions at the kinks (relu'(0) = 0, leaky_relu'(0) = slope)."""
    if ACT == 1:
        out = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        out = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        t = _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _GELU_TANH_C))
    elif ACT == 4:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == 5:
        t = _tanh(z)
        out = 1.0 - t * t
    elif ACT == 6:
        out = tl.where(z > 0, 1.0, 0.01)
    else:
        out = z * 0.0 + 1.0
    return out
