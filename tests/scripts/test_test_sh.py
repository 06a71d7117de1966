"""scripts/test.sh runs the paths it is given (and only those), the whole suite without any."""
from __future__ import annotations

import os

from tests.helpers import ROOT
from tests.helpers.processes import run_bounded


def _collect(*args) -> list[str]:
    env = dict(os.environ, MADX_NO_SETUP="1")
    proc = run_bounded(["bash", "scripts/test.sh", *args, "--collect-only", "-n", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_only_the_paths_given_are_collected():
    ids = _collect("tests/scripts/test_test_sh.py", "tests/training/test_metrics.py")
    files = {i.split("::")[0] for i in ids}
    assert files == {"tests/scripts/test_test_sh.py", "tests/training/test_metrics.py"}, files


def test_a_test_id_and_options_pass_through():
    ids = _collect("tests/scripts/test_test_sh.py::test_a_test_id_and_options_pass_through",
                   "tests/training/test_metrics.py", "-k", "pass_through or squad")
    assert sorted(ids) == ["tests/scripts/test_test_sh.py::test_a_test_id_and_options_pass_through",
                           "tests/training/test_metrics.py::test_squad_scores"], ids
