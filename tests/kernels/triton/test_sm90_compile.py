"""Every Triton kernel variant compiles for sm_90 (H100/H200) and fits its shared memory, checked without a GPU.

The interpreter that runs the parity tests on CPU never lowers kernels to GPU code; this runs the real
compiler ahead of time (scripts/triton_compile_check.py --full: every activation, dtype, route, block
configuration (NICE's at the larger models' hidden sizes too), NICE and GEMM kernel, and the kernels standing in
for the backbone's ops (add + LayerNorm, FFN intermediate, MLM loss); in parallel over the
machine's cores) so a GPU-only compile error fails CI."""
import os
import re
import subprocess
import sys
import textwrap

from madx_fast.reference import ACTIVATION_CODES
from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "triton_compile_check.py"
KERNELS = ["_adapter_fwd_kernel", "_adapter_bwd_da_kernel", "_adapter_bwd_dx_dw_kernel", "_linear_kernel",
           "_tn_kernel", "_nice_fwd_kernel", "_nice_bwd_b_kernel", "_nice_bwd_a_kernel", "_grouped_linear_kernel",
           "_grouped_tn_kernel", "_grouped_nice_fwd_kernel", "_grouped_nice_bwd_b_kernel",
           "_grouped_nice_bwd_a_kernel", "_average_up_kernel", "_average_dz_kernel", "_average_dx_kernel",
           "_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel", "_softmax_xent_kernel"]


def compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_every_triton_kernel_variant_compiles_for_sm90():
    jobs = max(1, min(os.cpu_count() or 1, 8))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--full", "--jobs", str(jobs)], env=compiler_env(),
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failures"), last
    assert int(last.split()[1]) >= 150, last  # the full set, not the quick one
    rows = [line for line in proc.stdout.splitlines() if line.startswith("_")]
    # the set covers every kernel, activation and dtype (a shrinking enumeration would fail here)
    assert {line.split()[0] for line in rows} == set(KERNELS)
    acts = {int(m) for m in re.findall(r"act=(\d+)", proc.stdout)}
    assert acts == set(ACTIVATION_CODES.values())
    for dtype in ("bfloat16", "float16", "float32", "float32 tf32"):
        assert any(f" {dtype} act=" in line for line in rows), dtype
    for kernel in ("_nice_fwd_kernel", "_nice_bwd_b_kernel", "_nice_bwd_a_kernel"):
        assert any(line.startswith(kernel) and " inverse " in line for line in rows)
        assert any(line.startswith(kernel) and " forward " in line for line in rows)
        for h in (1024,):  # XLM-R large's NICE (wider hidden chunks), in bf16 and fp32; wider: the GEMM route
            for dtype in ("bfloat16", "float32"):
                assert any(line.startswith(kernel) and f"H={h} forward {dtype} " in line for line in rows), (h, dtype)
    # the backbone's stand-ins: add + LayerNorm and the MLM loss in every storage dtype, the FFN intermediate's
    # GEMM epilogue with every activation
    for kernel, tag in (("_add_layer_norm_fwd_kernel", "add+LN"), ("_add_layer_norm_bwd_kernel", "add+LN"),
                        ("_softmax_xent_kernel", "MLM loss")):
        for dtype in ("bfloat16", "float16", "float32"):
            assert any(line.startswith(kernel) and tag in line and f" {dtype}" in line for line in rows), (kernel, dtype)
    ffn_acts = {int(m) for line in rows if line.startswith("_linear_kernel") and " FFN " in f" {line}"
                for m in re.findall(r"act=(\d+)", line)}
    assert ffn_acts == set(ACTIVATION_CODES.values()), ffn_acts


def test_the_check_catches_what_only_the_gpu_compiler_refuses(tmp_path):
    """A kernel reading a plain float global runs in the interpreter but not on a GPU; the check says so."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        SCALE = 0.5

        @triton.jit
        def scale_kernel(X, N, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(X + i, tl.load(X + i, mask=i < N) * SCALE, mask=i < N)
    """))
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        sys.path.insert(0, {str(tmp_path)!r})
        spec = importlib.util.spec_from_file_location("check", {str(SCRIPT)!r})
        check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(check)
        import bad_kernel
        log = []
        with check.aot.recording(log):
            bad_kernel.scale_kernel[(1,)](torch.empty(64, device="meta"), 64, BLOCK=64)
        task = (check.aot.specialize(log[0]), "test", "BLOCK=64")
        line, failed = check.compile_one(task, 90, None)
        print(line)
        sys.exit(3 if failed else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=compiler_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert "COMPILE ERROR" in proc.stdout and "SCALE" in proc.stdout, proc.stdout
