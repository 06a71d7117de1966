"""Device functions shared by the Triton kernels.

Weights and biases may come in any float dtype (fp32 master weights with bf16 activations, as in training):
the kernels round them to the activation dtype on load, where the eager reference casts them
(``F.linear(x, w.to(x.dtype), b.to(x.dtype))``), so no cast of the weights runs before a launch."""
import triton
import triton.language as tl


@triton.jit
def rows_times_weight_t(SRC, stride_sm, stride_sk, rows, rmask, W, stride_wo, stride_wi, IN, OUT,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_OUT: tl.constexpr):
    """``src[rows, :IN] @ W^T`` for one token block, accumulated over IN in fp32: [BLOCK_M, BLOCK_OUT].

    ``W[o, i]`` lives at ``W + o * stride_wo + i * stride_wi`` (an nn.Linear weight [OUT, IN] has strides
    (IN, 1); passing (1, OUT) multiplies by the weight itself instead of its transpose). Padding rows and
    columns come out as exactly 0, also where src holds Inf or NaN (the masked-out weight entries are 0, and
    Inf * 0 would make them NaN): callers feed them into further products as padding. The weight is
    converted to the source dtype for the product.
    """
    dt = SRC.dtype.element_ty
    ocol = tl.arange(0, BLOCK_OUT)
    omask = ocol < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < IN
        s = tl.load(SRC + rows[:, None] * stride_sm + kc[None, :] * stride_sk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + ocol[None, :] * stride_wo + kc[:, None] * stride_wi,
                    mask=omask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(s, w.to(dt), acc, input_precision=DOT_PREC)
    return tl.where(rmask[:, None] & omask[None, :], acc, 0.0)


@triton.jit
def load_bias(B, cols, cmask, dt):
    """A bias vector as fp32 after rounding to the activation dtype ``dt`` (0 in masked lanes): [len(cols)]."""
    return tl.load(B + cols, mask=cmask, other=0.0).to(dt).to(tl.float32)
