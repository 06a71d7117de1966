"""Activations and their backward as Triton device functions, selected by a compile-time code.

Codes match ``madx_fast.reference.ACTIVATION_CODES``. Everything is computed in float32 on values the
caller has already rounded to the activation dtype, as the eager reference does.

NaN and Inf give what torch gives (the reference is the specification): relu(NaN) = NaN (so no
``tl.maximum``, which drops NaN on GPUs), gelu/silu(-Inf) = NaN, tanh(+-Inf) = +-1. In backward, relu and
leaky relu *select* as torch's autograd does (relu: 0 where z <= 0, else the incoming gradient unchanged,
even an Inf or NaN one; a NaN z passes it through), the identity passes the gradient through, and the
smooth activations multiply by their derivative (an Inf gradient times tanh'(z) = 0 is NaN, as in torch).

Constants used inside @triton.jit functions must be ``tl.constexpr``: the GPU compiler refuses plain Python
float globals (the interpreter does not, so scripts/triton_compile_check.py is what catches it). They are
written to the right of a tensor (``z * C``): the interpreter turns ``C * z`` into a constexpr wrapping a
tensor, which tl.exp and tl.sigmoid then reject.
"""
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)
_LEAKY_SLOPE = tl.constexpr(0.01)  # madx_fast.reference.LEAKY_RELU_SLOPE


@triton.jit
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1: saturates correctly at +-1 for large |z| (exp overflow gives inf -> 0).
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    if ACT == 1:  # relu; where(z < 0) keeps NaN (tl.maximum would return 0 for it on a GPU)
        out = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:  # gelu (erf)
        out = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 3:  # gelu (tanh approximation)
        out = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACT == 4:  # silu
        out = z * tl.sigmoid(z)
    elif ACT == 5:  # tanh
        out = _tanh(z)
    elif ACT == 6:  # leaky relu
        out = tl.where(z > 0, z, z * _LEAKY_SLOPE)
    else:  # identity
        out = z
    return out


@triton.jit
def activation_backward(g, z, ACT: tl.constexpr):
    """``g * act'(z)`` as torch's autograd computes it, NaN and Inf included (see the module doc).

    Derivatives: relu' = [z > 0]; leaky' = 1 if z > 0 else slope; gelu' = Phi(z) + z phi(z);
    gelu_tanh' = (1 + t)/2 + z (1 - t^2) sqrt(2/pi) (1 + 3c z^2) / 2 with t = tanh(sqrt(2/pi)(z + c z^3));
    silu' = s (1 + z (1 - s)) with s = sigmoid(z); tanh' = 1 - tanh(z)^2.
    """
    if ACT == 1:  # torch: threshold_backward(g, relu(z), 0) = where(relu(z) <= 0, 0, g)
        out = tl.where(z <= 0.0, 0.0, g)
    elif ACT == 2:
        out = g * (0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z))
    elif ACT == 3:
        t = _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        out = g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * _GELU_TANH_C * 3.0))
    elif ACT == 4:
        s = tl.sigmoid(z)
        out = g * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 5:
        t = _tanh(z)
        out = g * (1.0 - t * t)
    elif ACT == 6:  # torch: where(z > 0, g, g * slope)
        out = tl.where(z > 0.0, g, g * _LEAKY_SLOPE)
    else:  # identity: the gradient passes unchanged (never g * (z * 0 + 1), which is NaN at z = +-Inf)
        out = g
    return out
