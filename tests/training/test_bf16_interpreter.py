"""A ``madx`` run on the CPU with Triton's interpreter and a bfloat16 backbone stops with a clear error
instead of training on what the interpreter's broken bfloat16 arithmetic returns (values around 1e9)."""
from __future__ import annotations

import os

from tests.helpers.runs import env_for_subprocess, madx_command


def test_cli_refuses_bf16_on_the_triton_interpreter(tmp_path, tiny_base, corpus):
    import subprocess

    out = tmp_path / "run"
    args = ["train-lang", "--model", tiny_base, "--lang", "alpha", "--output", out,
            "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"), "--steps", "2", "--batch-size", "4",
            "--max-length", "32", "--device", "cpu", "--backbone-dtype", "bfloat16", "--no-progress"]
    env = env_for_subprocess(TRITON_INTERPRET="1")
    env.pop("MADX_FAST_BACKEND", None)
    proc = subprocess.run(madx_command(*args), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "bfloat16" in err and "interpreter" in err and "float32" in err, err[-3000:]
    assert not (out / "adapter").exists()  # nothing trained on garbage was saved
