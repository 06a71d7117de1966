"""Parameter budget on XLM-R base (meta device): counted = closed form, and the paper's Tab. 5 sizes."""
from __future__ import annotations

from madx_fast.model import MadxConfig
from madx_fast.model.params import (
    adapter_params_formula,
    bottleneck_params,
    format_table,
    madx_parameter_table,
    main,
    nice_params,
)


def test_counts_on_xlmr_base_match_the_formula_and_the_paper(capsys):
    table = madx_parameter_table()
    rows = {label: (counted, formula) for label, counted, formula in table["rows"]}
    assert all(counted == formula for counted, formula in rows.values()), rows
    H, L = 768, 12
    d = H // 2
    lang = L * (2 * H * d + d + H)  # 12 x (down [384, 768] + [384] + up [768, 384] + [768])
    nice = 2 * ((H // 2) * (H // 4) + H // 4 + (H // 4) * (H // 2) + H // 2)  # F and G: 384 -> 192 -> 384
    task = L * (2 * H * 48 + 48 + H)
    assert (lang, nice, task) == (7_091_712, 296_064, 894_528)
    counted = {label.split(" (")[0].split(",")[0]: c for label, (c, _) in rows.items()}
    assert counted["language + invertible"] == lang + nice
    assert counted["task adapter"] == task
    full = counted["language + invertible + task"]
    assert full == lang + nice + task
    # paper Tab. 5: MAD-X 8.25M, MAD-X -INV 7.98M, MAD-X -LAD -INV 0.89M (its own rounding)
    assert abs(full / 1e6 - 8.25) < 0.05
    assert abs(counted["language + task"] / 1e6 - 7.98) < 0.02
    assert abs(task / 1e6 - 0.89) < 0.01
    assert 277e6 < table["base"] < 279e6  # XLM-R base backbone without the LM head
    main([])
    out = capsys.readouterr().out
    assert "8,282,304" in out and "MISMATCH" not in out
    assert format_table(table).count("\n") == len(table["rows"]) + 1


def test_formula_helpers():
    assert bottleneck_params(32, 16) == 2 * 32 * 2 + 2 + 32
    assert nice_params(33, 2) == (17 * 8 + 8 + 8 * 16 + 16) + (16 * 8 + 8 + 8 * 17 + 17)
    cfg = MadxConfig(reduction_factor={"0": 4, "default": 8}, leave_out=[2], inv_adapter="nice",
                     inv_adapter_reduction_factor=4)
    assert adapter_params_formula(cfg, 32, 3) == bottleneck_params(32, 4) + bottleneck_params(32, 8) + \
        nice_params(32, 4)
