"""madx_fast.testing.device_ops / gpu_plan: the counts a roofline is built on, checked against what each op
must cost by hand (the FLOPs and bytes of a GEMM of known shape, the launches of CUDA's multi-tensor apply,
the kernels the fused ops are designed to launch)."""
import pytest
import torch
import torch.nn.functional as F

from madx_fast import ops
from madx_fast.testing.device_ops import DeviceOps, distinct_bytes, multi_tensor_launches
from madx_fast.testing.gpu_plan import cuda_autocast, planned_gpu

META = torch.device("meta")


def _records(ops_, kind=None):
    return [r for r in ops_.records if kind is None or r.kind == kind]


def test_gemm_flops_bytes_and_one_kernel():
    m, k, n = 96, 64, 40
    x = torch.empty(m, k, device=META, dtype=torch.bfloat16)
    w = torch.empty(n, k, device=META, dtype=torch.bfloat16)
    with DeviceOps() as count:
        wt = w.t()  # a view: no kernel
        x @ wt
    totals = count.totals()
    assert totals["kernels"] == 1 and totals["free_ops"] == 1
    assert totals["flops"] == 2 * m * n * k
    assert totals["bytes"] == (m * k + n * k + m * n) * 2
    (mm,) = _records(count, "aten")
    assert mm.dtype == "bfloat16"


def test_views_allocations_and_same_dtype_casts_launch_nothing():
    x = torch.empty(8, 16, device=META)
    with DeviceOps() as count:
        x.view(16, 8)
        x.to(torch.float32)
        torch.empty(4, device=META)
        x[:, :3]
        x.expand(2, 8, 16)
    assert count.totals()["kernels"] == 0
    with DeviceOps() as count:
        x.to(torch.bfloat16)
        torch.zeros(4, device=META)
        x.add_(1)
    assert count.totals()["kernels"] == 3


def test_bytes_count_distinct_elements():
    x = torch.empty(1, 64, device=META).expand(32, 64)
    assert distinct_bytes(x) == 64 * 4
    y = torch.empty(32, 64, device=META)
    with DeviceOps() as count:
        y + x  # reads y and the 64 broadcast elements once, writes 32 x 64
    assert count.totals()["bytes"] == (32 * 64 + 64 + 32 * 64) * 4
    table, ids = torch.empty(1000, 16, device=META), torch.empty(10, dtype=torch.long, device=META)
    with DeviceOps() as count:
        F.embedding(ids, table)  # only the 10 gathered rows are read
    assert count.totals()["bytes"] == 10 * 8 + 2 * 10 * 16 * 4


def test_multi_tensor_apply_launches():
    def tensors(*sizes):
        return [torch.empty(s, device=META) for s in sizes]
    assert multi_tensor_launches([tensors(10)] * 4) == 1
    assert multi_tensor_launches([tensors(*[10] * 40)] * 4) == 2  # 36 tensors per launch at depth 4
    assert multi_tensor_launches([tensors(*[10] * 40)]) == 1  # 110 at depth 1
    assert multi_tensor_launches([tensors(320 * 65536 + 1)] * 4) == 2  # 320 blocks of 65536 per launch


def _adapter_inputs(n, h, d, grad=True):
    x = torch.empty(n, h, device=META, dtype=torch.float16, requires_grad=grad)
    w = [torch.empty(s, device=META, requires_grad=grad) for s in ((d, h), (d,), (h, d), (h,))]
    return x, w


@pytest.mark.parametrize("d,forward_launches", [(48, 1), (384, 2)])
def test_fused_adapter_launches_and_reference_flops(d, forward_launches):
    """The narrow adapter is one forward kernel (two GEMMs, then "gemm" route above d=128); its FLOPs are the
    reference's: 2 products of N x H x d forward (4 N H d), 4 backward (dx, da, dW_down, dW_up)."""
    n, h = 256, 768
    x, w = _adapter_inputs(n, h, d)
    with planned_gpu(), DeviceOps() as count:
        count.phase = "forward"
        y = ops.bottleneck_adapter(x, None, *w)
        count.phase = "backward"
        torch.autograd.grad(y, [x, *w], torch.empty_like(y))
    fwd, bwd = count.totals("forward"), count.totals("backward")
    assert fwd["fused_calls"] == 1 and fwd["triton_launches"] == forward_launches
    assert bwd["fused_calls"] == 1 and bwd["triton_launches"] >= 2
    assert fwd["flops"] == 4 * n * h * d and bwd["flops"] == 8 * n * h * d
    # the internal z output's gradient is not materialised: no zero-filled N x d tensor per backward
    assert not [r for r in _records(count, "aten") if r.phase == "backward" and "zeros" in r.name]
    launches = _records(count, "triton")
    assert all(r.parent is not None and count.records[r.parent].kind == "fused" for r in launches)
    assert all(r.bytes >= n * h * 2 for r in launches)  # each reads or writes at least one N x H tensor


def test_eager_backend_on_meta_stays_eager():
    x, w = _adapter_inputs(64, 32, 8)
    with planned_gpu(), DeviceOps() as count:
        ops.bottleneck_adapter(x, None, *w, backend="eager")
    assert count.totals()["triton_launches"] == 0 and count.totals()["fused_calls"] == 0


def test_attention_and_dropout_take_the_cuda_kernels():
    q = torch.empty(2, 4, 16, 8, device=META, dtype=torch.bfloat16)
    mask = torch.empty(2, 1, 16, 16, device=META, dtype=torch.bool)
    with planned_gpu(), DeviceOps() as count:
        F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        F.dropout(q, 0.1, training=True)
    names = [r.name for r in _records(count, "aten")]
    assert names[0].startswith("aten._scaled_dot_product_flash_attention")
    assert names[-2].startswith("aten._scaled_dot_product_efficient_attention")
    assert names[-1].startswith("aten.native_dropout")
    assert sum(r.flops > 0 for r in count.records) == 2


def test_cuda_autocast_casts_as_cuda_autocast_does():
    x = torch.empty(8, 16, device=META, dtype=torch.bfloat16)
    w = torch.empty(4, 16, device=META, requires_grad=True)
    ln = torch.nn.LayerNorm(16, device=META)
    with DeviceOps() as count, cuda_autocast(torch.bfloat16):
        y = F.linear(x, w)
        F.linear(x, w)  # the cast of a leaf that requires grad is cached
        z = ln(x)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32
    casts = [r for r in _records(count, "aten") if "_to_copy" in r.name]
    assert len(casts) == 2  # w once (cached), x to float32 for LayerNorm once


def test_meta_host_reads_are_answered_and_counted():
    mask = torch.empty(4, 4, device=META)
    with DeviceOps(answer_meta_reads=True) as count:
        assert bool(torch.all(mask == 1))
    assert count.totals()["host_reads"] == 1
    with pytest.raises(Exception), DeviceOps():
        bool(torch.all(mask == 1))


def test_planning_for_a_gpu_leaves_the_interpreters_kernels_alone():
    """planned_gpu unsets TRITON_INTERPRET for the launchers' plans; a kernel module first imported inside it
    must still be interpreted afterwards in a process that runs the interpreter (a fresh process: this one
    has imported the kernels already)."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT
    code = ("import torch\n"
            "from madx_fast import ops\n"
            "from madx_fast.testing.device_ops import DeviceOps\n"
            "from madx_fast.testing.gpu_plan import planned_gpu\n"
            "x = torch.empty(8, 16, device='meta')\n"
            "w = [torch.empty(s, device='meta') for s in ((4, 16), (4,), (16, 4), (16,))]\n"
            "with planned_gpu(), DeviceOps():  # the launchers run: the kernels are imported here\n"
            "    ops.bottleneck_adapter(x, None, *w)\n"
            "from madx_fast.kernels.triton import grouped, lm_loss\n"
            "print(type(grouped._grouped_nice_fwd_kernel).__name__, type(lm_loss._softmax_xent_kernel).__name__)\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["InterpretedFunction", "InterpretedFunction"]
