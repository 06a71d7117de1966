"""The kernel report (scripts/kernel_report.py): every Triton launch at the target shapes compiles for sm_90 with
the JIT's specialization, and none spills, falls back to mma.sync in bf16 or needs more shared memory than an
H100 has, at every hidden size the report covers (768 to 4096, the bottlenecks of rf 16 and 2, NICE rf 2,
grouped with 8 languages, the averaged adapters, the MLM loss, the add + LayerNorm, the backbone FFN's
intermediate with its GELU epilogue); docs/triton_kernels.md shows the report's tables. Runs without a GPU (the
real compiler, ahead of time, 112 distinct kernels in parallel over the machine's cores; Triton's on-disk cache
keeps them across runs: about 15 s of CPU time warm, about 100 s cold)."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.kernels.triton.test_sm90_compile import compiler_env

SCRIPT = ROOT / "scripts" / "kernel_report.py"
DOC = ROOT / "docs" / "triton_kernels.md"
BEGIN, END = "<!-- kernel-report:begin -->", "<!-- kernel-report:end -->"
FIELDS = {"kernel", "case", "tokens", "dtype", "grid", "num_warps", "num_stages", "registers", "spill_bytes",
          "shared_bytes", "mma"}
KERNELS = {"_adapter_fwd_kernel", "_adapter_bwd_da_kernel", "_adapter_bwd_dx_dw_kernel", "_linear_kernel",
           "_tn_kernel", "_nice_fwd_kernel", "_nice_bwd_b_kernel", "_nice_bwd_a_kernel", "_grouped_linear_kernel",
           "_grouped_tn_kernel", "_grouped_nice_fwd_kernel", "_grouped_nice_bwd_b_kernel",
           "_grouped_nice_bwd_a_kernel", "_average_up_kernel", "_average_dz_kernel", "_average_dx_kernel",
           "_softmax_xent_kernel", "_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel"}
# the MLM loss (a streaming reduction over the logits) and the add + LayerNorm (row sums): no matrix product
NO_MMA = {"_softmax_xent_kernel", "_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel"}
HIDDEN = (768, 1024, 1536, 2048, 2560, 4096)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.json"
    jobs = max(1, min(os.cpu_count() or 1, 8))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(path), "--markdown", "--jobs", str(jobs)],
                          env=compiler_env(), capture_output=True, text=True, timeout=2400)
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_report_has_no_spill_and_no_mma_sync_at_any_hidden_size(report):
    proc, data = report
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    records = data["records"]
    assert all(FIELDS <= set(r) for r in records)
    assert {r["kernel"] for r in records} == KERNELS
    for r in records:  # the script's own verdict, checked again from the records
        assert r["spill_bytes"] == 0, r
        assert r["dtype"] == "bfloat16" and r["mma"] == ("none" if r["kernel"] in NO_MMA else "wgmma"), r
        assert r["shared_bytes"] <= 232448, r
    cases = " | ".join(r["case"] for r in records)
    for want in ("adapter H=768 d=48", "adapter H=768 d=384", "NICE H=768 (forward)", "NICE H=768 (inverse)",
                 "input rebuilt", "input saved", "grouped adapter G=8", "grouped NICE G=8 H=768",
                 "MLM loss H=768 V=250002", "loss and gradient", "Average K=8", "backward, frozen LN",
                 "backward, LN trained", "FFN intermediate H=768 -> 3072 + GELU: forward"):
        assert want in cases, want
    assert {r["tokens"] for r in records} == {65536, 4096}
    for h in HIDDEN:  # every architecture's hidden size: both adapter bottlenecks, NICE and grouped NICE
        for want in (f"adapter H={h} d={h // 16}:", f"adapter H={h} d={h // 2}:", f"NICE H={h} (forward)",
                     f"NICE H={h} (inverse)", f"grouped NICE G=8 H={h} ", f"add + LayerNorm H={h} "):
            assert want in cases, want
        # NICE's route by hidden width (kernels/triton/nice.py): fused kernels up to H=1024, GEMMs above
        nice_kernels = {r["kernel"] for r in records if f"NICE H={h} " in r["case"] and "grouped" not in r["case"]}
        wide = h >= 1536
        assert ("_linear_kernel" in nice_kernels) == wide, (h, nice_kernels)
        assert ("_nice_fwd_kernel" in nice_kernels) != wide, (h, nice_kernels)


def test_docs_show_the_report(report):
    """The doc's tables are the script's (same rows; same figures when the doc was made with this Triton)."""
    proc, data = report
    doc = DOC.read_text()
    assert BEGIN in doc and END in doc, "docs/triton_kernels.md lost its generated section"
    section = doc[doc.index(BEGIN) + len(BEGIN):doc.index(END)]
    made_with = re.search(r"triton (\d+\.\d+\.\d+)", section)
    generated = proc.stdout[proc.stdout.index("Hidden size"):].split("\nFAIL")[0].split("\n# ")[0].strip()

    def keys(text):
        return sorted(tuple(cell.strip() for cell in line.split("|")[1:4]) for line in text.splitlines()
                      if line.startswith("| `"))
    assert keys(section) == keys(generated), "regenerate the tables: python scripts/kernel_report.py --markdown"
    if made_with and made_with.group(1) == data["triton"]:
        assert generated in section, "regenerate the tables: python scripts/kernel_report.py --markdown"
