"""madx_fast.testing.sync_check.HostReads: each host read is reported at the line of Python that asked for it."""
from __future__ import annotations

import inspect

import pytest
import torch

from madx_fast.testing.sync_check import HostReads


def _read(t: torch.Tensor) -> float:
    return t.sum().item()  # the line every report below must name


READ_AT = f"{__file__}:{inspect.getsourcelines(_read)[1] + 1} (_read)"


def test_a_read_is_reported_at_the_line_that_asked_for_it():
    with HostReads() as reads:
        _read(torch.ones(3))
        mask = torch.arange(4) > 1
        torch.arange(4)[mask]
    assert [r.op for r in reads.reads] == ["aten._local_scalar_dense.default", "aten.index.Tensor"]
    assert reads.reads[0].where == READ_AT
    assert reads.reads[1].where.endswith(f"({inspect.currentframe().f_code.co_name})")


def test_nested_checkers_name_the_callers_frame_not_their_own():
    """The inner mode passes the op on to the outer one from inside its own ``__torch_dispatch__``: the
    outer one must still see past the checker's frames to the caller's line."""
    with HostReads() as outer, HostReads() as inner:
        _read(torch.ones(3))
    assert inner.reads[0].where == READ_AT
    assert outer.reads[0].where == READ_AT


def test_the_refusal_names_the_callers_line():
    with pytest.raises(RuntimeError, match="host read inside a step that must not sync") as exc:
        with HostReads(raise_on_read=True), HostReads():
            _read(torch.ones(3))
    assert str(exc.value).endswith(READ_AT)
    assert "madx_fast/testing/sync_check.py" not in str(exc.value).replace("\\", "/")


def test_no_read_no_report():
    with HostReads(raise_on_read=True) as reads:
        (torch.ones(3) * 2).sum()
    assert reads.report() == "no host reads"
