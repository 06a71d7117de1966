"""scripts/gpu_session.sh rehearsed on the CPU, so that GPU minutes are never lost to a missing wheel, a
version clash or a broken phase.

The wheels a GPU run carries (scripts/gpu_wheels.py) are fetched from PyPI for the GPU image's Python and
for this one; the rehearsal installs the latter exactly as the GPU machine does (each set into its own
--target folder, first on PYTHONPATH only where needed) over a stand-in for the image's own transformers 5.17,
huggingface_hub 1.33 and tokenizers 0.23.2, and runs every phase at tiny sizes. Needs PyPI (CI has it)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import ROOT

WHEELS = [sys.executable, str(ROOT / "scripts" / "gpu_wheels.py")]
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
PHASES = ["a", "b", "c", "d", "e", "f", "g", "h"]


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kwargs.pop("timeout", 600), **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The wheel sets for this Python and a stand-in for the GPU image's packages."""
    base = tmp_path_factory.mktemp("gpu_wheels")
    run([*WHEELS, "prepare", "--python", THIS_PYTHON, "--dest", str(base / "whl")])
    run([*WHEELS, "standin", "--python", THIS_PYTHON, "--dest", str(base / "standin")])
    return base / "whl", base / "standin"


def session(tmp_path, wheels, standin, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), WHEELS=str(wheels), STANDIN=str(standin), PYTHON=sys.executable,
                    TMPDIR=str(tmp_path), **env)
    full_env.pop("TRITON_INTERPRET", None)  # the script sets what each mode needs
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "--rehearsal"], env=full_env,
                          capture_output=True, text=True, timeout=2600, cwd=tmp_path)  # the rehearsal budget, 2400 s, and margin
    return proc, out


def test_the_gpu_images_wheels_resolve(tmp_path):
    """Every wheel exists for CPython 3.12 on manylinux x86_64 (the GPU image), seqeval builds from its sdist,
    and the sets fit what travels."""
    out = run([*WHEELS, "prepare", "--dest", str(tmp_path / "whl")])
    manifest = (tmp_path / "whl" / "MANIFEST.txt").read_text()
    for name in ("adapters-1.3.0", "transformers-4.57.6", "huggingface_hub-0.36.", "tokenizers-0.22.",
                 "datasets-5.0.", "dill-", "multiprocess-", "seqeval-1.2.2-py3-none-any", "tokenizers-0.23.3"):
        assert name in manifest, name
    assert "cp312" in manifest or "py312" in manifest  # version-specific wheels are for the GPU's Python
    total = sum(int(line.split()[1]) for line in manifest.splitlines() if not line.startswith("#"))
    assert total < 30 * 2**20, out


def test_a_version_clash_is_named(tmp_path, wheels):
    """adapters without its transformers, over the image's transformers 5.17: check names the clash."""
    whl, standin = wheels
    target = tmp_path / "site"
    adapters_wheel = next((whl / "adapterhub").glob("adapters-*.whl"))
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
         str(adapters_wheel)])
    env = dict(os.environ, PYTHONPATH=f"{target}:{standin}")
    proc = subprocess.run([*WHEELS, "check", str(target)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "adapters 1.3.0 needs transformers~=4.57.6: found transformers 5.17.0" in proc.stdout, proc.stdout


def test_gpu_session_rehearsal_runs_every_phase(tmp_path, wheels):
    proc, out = session(tmp_path, *wheels)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    summary = (out / "summary.txt").read_text()
    for name in PHASES:
        assert re.search(rf"^== phase {name}: ok in \d+ s$", summary, re.M), (name, summary)
    # phase a: the image stand-in is what the base path sees; each set installs clash-free and imports
    assert "transformers 5.17.0; tokenizers 0.23.2; huggingface_hub 1.33.0" in summary
    assert summary.count(": 0 clashes") == 2
    assert "adapterhub set: adapters 1.3.0 transformers 4.57.6 tokenizers 0.22.2" in summary
    assert "training set: datasets 5.0.1 tokenizers 0.23.3 seqeval ok" in summary
    # phase c: madx_fast and AdapterHub measured in one process, for every workload
    rows = [line.split() for line in summary.splitlines() if re.match(r"^(mlm|ner|infer) +\d", line)]
    assert {(r[0], r[3]) for r in rows} >= {(w, i) for w in ("mlm", "ner", "infer") for i in ("fused", "adapterhub")}
    assert all(float(r[-2]) > 0 for r in rows)  # "x AdapterHub" is a number, not nan
    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        names = set(tar.getnames())
    for name in [f"logs/{p}.log" for p in PHASES] + ["json/bench_ops.json", "json/bench_train_mlm.json",
                                                     "json/bench_train_ner.json", "json/bench_train_infer.json",
                                                     "json/bench_train_mlm_rf2.json"]:
        assert name in names, name
    assert (out / "session.log").stat().st_size > 0
    assert "################ summary ################" in proc.stdout  # the key tables end the output
    # and the archive turns into the tables of docs/benchmarks.md
    md = run([sys.executable, str(ROOT / "scripts" / "gpu_tables.py"), str(out / "gpu_session.tar.gz")])
    assert "| e | ops and fused model paths |" in md and "| f | training |" in md
    assert re.search(r"^\| adapter d=48 \| 64 \| float32 \| triton \|", md, re.M)
    assert re.search(r"^\| mlm \| 2 \| 4 x 32 \| adapterhub \|", md, re.M)  # the --lang-rf 2 row


def test_a_failing_phase_does_not_stop_the_next(tmp_path, wheels):
    _, standin = wheels
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    proc, out = session(tmp_path, empty, standin, PHASES="a b")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert re.search(r"^== phase a: FAILED \(exit 1\)", summary, re.M), summary
    assert re.search(r"^== phase b: ok", summary, re.M), summary
    assert "no wheels in" in proc.stdout and "scripts/gpu_wheels.py prepare" in proc.stdout
    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        assert {"logs/a.log", "logs/b.log"} <= set(tar.getnames())
