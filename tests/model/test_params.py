"""Parameter budget on XLM-R base (meta device): built modules = declared shapes, and the paper's Tab. 5."""
from __future__ import annotations

import math

from madx_fast import BottleneckAdapter, InvertibleAdapter
from madx_fast.model import MadxConfig
from madx_fast.model.params import format_parameter_budget, main, parameter_budget


def test_counts_on_xlmr_base_match_the_declared_shapes_and_the_paper(capsys):
    budget = parameter_budget(languages=["en", "sw"])
    rows = {r["adapter"]: r for r in budget["rows"]}
    assert all(r["total"] == r["expected"] for r in rows.values()), rows
    H, L = 768, 12
    d = H // 2
    lang = L * (2 * H * d + d + H)  # 12 x (down [384, 768] + [384] + up [768, 384] + [768])
    nice = 2 * ((H // 2) * (H // 4) + H // 4 + (H // 4) * (H // 2) + H // 2)  # F and G: 384 -> 192 -> 384
    task = L * (2 * H * 48 + 48 + H)
    assert (lang, nice, task) == (7_091_712, 296_064, 894_528)
    assert (rows["en"]["bottleneck"], rows["en"]["invertible"], rows["en"]["total"]) == (lang, nice, lang + nice)
    assert rows["sw"]["total"] == lang + nice and rows["task"]["total"] == task
    # paper Tab. 5: MAD-X 8.25M, MAD-X -INV 7.98M, MAD-X -LAD -INV 0.89M (its own rounding)
    assert abs((lang + nice + task) / 1e6 - 8.25) < 0.05
    assert abs((lang + task) / 1e6 - 7.98) < 0.02
    assert abs(task / 1e6 - 0.89) < 0.01
    assert 277e6 < budget["base_parameters"] < 279e6  # XLM-R base backbone without the LM head
    text = format_parameter_budget(budget)
    assert "8,282,304" in text and "7,986,240" in text and "MISMATCH" not in text
    main([])
    assert "8,282,304" in capsys.readouterr().out


def test_declared_shapes_follow_the_config():
    cfg = MadxConfig(reduction_factor={"0": 4, "default": 8}, leave_out=[2], inv_adapter="nice",
                     inv_adapter_reduction_factor=4)
    shapes = cfg.state_shapes(32, 3)
    assert shapes["layers.0.adapter_down.0.weight"] == (8, 32) and shapes["layers.1.adapter_up.weight"] == (32, 4)
    assert not any(k.startswith("layers.2.") for k in shapes)
    assert shapes["invertible.F.0.weight"] == (4, 16) and shapes["invertible.G.2.weight"] == (16, 4)
    by_hand = (2 * 32 * 8 + 8 + 32) + (2 * 32 * 4 + 4 + 32) + 2 * (16 * 4 + 4 + 4 * 16 + 16)
    assert cfg.num_parameters(32, 3) == by_hand
    # the modules are built with exactly these shapes
    bn = BottleneckAdapter(32, 8)
    assert {k: tuple(v.shape) for k, v in bn.state_dict().items()} == BottleneckAdapter.parameter_shapes(32, 4)
    inv = InvertibleAdapter(33, 2)
    assert {k: tuple(v.shape) for k, v in inv.state_dict().items()} == InvertibleAdapter.parameter_shapes(33, 2)
    assert sum(math.prod(s) for s in InvertibleAdapter.parameter_shapes(33, 2).values()) == \
        (17 * 8 + 8 + 8 * 16 + 16) + (16 * 8 + 8 + 8 * 17 + 17)


def test_a_mismatch_is_reported():
    budget = parameter_budget(languages=["en"])
    budget["rows"][0]["expected"] += 1
    assert "MISMATCH" in format_parameter_budget(budget)
