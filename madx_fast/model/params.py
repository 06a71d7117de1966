"""Parameter budget of MAD-X on XLM-R base, counted on a model built from a config on the meta device.

    python -m madx_fast.model.params            # XLM-R base (H=768, 12 layers, V=250002)

Counts come from the adapters ``add_madx`` actually builds (``numel`` of their parameters), next to the
closed-form counts below; the paper's Tab. 5 (Pfeiffer et al., 2020) reports 8.25M (3.05%) for full MAD-X,
7.98M (2.95%) for MAD-X -INV and 0.89M (0.33%) for MAD-X -LAD -INV (task adapter only).
"""
from __future__ import annotations

import argparse

import torch

from .config import MadxConfig


def bottleneck_params(hidden: int, reduction_factor: float) -> int:
    """One layer's adapter: down ``[d, H] + [d]`` and up ``[H, d] + [H]``, ``d = int(H // rf)``."""
    d = int(hidden // reduction_factor)
    return 2 * hidden * d + d + hidden


def nice_params(hidden: int, reduction_factor: float) -> int:
    """NICE coupling: F ``H-H//2 -> hf -> H//2`` and G ``H//2 -> hg -> H-H//2``, ``h* = int(in // rf)``."""
    len1, len2 = hidden // 2, hidden - hidden // 2
    hf, hg = int(len2 // reduction_factor), int(len1 // reduction_factor)
    return (len2 * hf + hf + hf * len1 + len1) + (len1 * hg + hg + hg * len2 + len2)


def adapter_params_formula(config: MadxConfig, hidden: int, num_layers: int) -> int:
    total = sum(bottleneck_params(hidden, config.reduction_factor_for(i)) for i in config.layers(num_layers))
    if config.inv_adapter is not None:
        total += nice_params(hidden, config.inv_adapter_reduction_factor)
    return total


def xlmr_base_config():
    """The xlm-roberta-base architecture, without downloading anything."""
    from transformers import XLMRobertaConfig
    return XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def madx_parameter_table(config=None) -> dict:
    """Build ``XLMRobertaModel(config)`` on the meta device, add the paper's adapters and count.

    Returns ``{"base": n, "rows": [(label, counted, formula), ...]}``: language adapter (rf 2), its NICE
    adapter (rf 2), both (what each new language adds), the task adapter (rf 16), and the full MAD-X setup
    as the paper counts it in Tab. 5 (language + invertible + task)."""
    from transformers import XLMRobertaModel

    from .controller import add_madx

    config = config or xlmr_base_config()
    with torch.device("meta"):
        model = XLMRobertaModel(config, add_pooling_layer=False)
    base = sum(p.numel() for p in model.parameters())
    madx = add_madx(model)
    h, n = config.hidden_size, config.num_hidden_layers
    lang_cfg, task_cfg = MadxConfig.language(), MadxConfig.task()
    madx.add_adapter("lang", lang_cfg)
    madx.add_adapter("task", task_cfg)
    madx.add_adapter("lang_v2", MadxConfig.language(leave_out=[n - 1]))
    lang_bn = sum(p.numel() for m in madx.layer_adapters("lang").values() for p in m.parameters())
    lang_inv = sum(p.numel() for p in madx.invertible_adapter("lang").parameters())
    lang = madx.num_parameters("lang")
    task = madx.num_parameters("task")
    bn_formula = sum(bottleneck_params(h, lang_cfg.reduction_factor_for(i)) for i in range(n))
    inv_formula = nice_params(h, lang_cfg.inv_adapter_reduction_factor)
    rows = [
        ("language adapter, rf 2, all layers", lang_bn, bn_formula),
        ("invertible adapter (NICE), rf 2", lang_inv, inv_formula),
        ("language + invertible (each new language)", lang, adapter_params_formula(lang_cfg, h, n)),
        (f"  MAD-X 2.0 language + invertible (leave_out [{n - 1}])", madx.num_parameters("lang_v2"),
         adapter_params_formula(MadxConfig.language(leave_out=[n - 1]), h, n)),
        ("task adapter, rf 16 (MAD-X -LAD -INV; paper 0.89M)", task, adapter_params_formula(task_cfg, h, n)),
        ("language + task (MAD-X -INV; paper 7.98M)", lang_bn + task,
         bn_formula + adapter_params_formula(task_cfg, h, n)),
        ("language + invertible + task (MAD-X; paper 8.25M)", lang + task,
         adapter_params_formula(lang_cfg, h, n) + adapter_params_formula(task_cfg, h, n)),
    ]
    return {"base": base, "rows": rows, "hidden_size": h, "num_layers": n}


def format_table(table: dict) -> str:
    base = table["base"]
    lines = [f"XLM-R base architecture (H={table['hidden_size']}, {table['num_layers']} layers): "
             f"{base:,} backbone parameters (no LM head), built on the meta device",
             f"{'component':<58} {'params':>12} {'M':>7} {'% of base':>10}  formula"]
    for label, counted, formula in table["rows"]:
        check = "ok" if counted == formula else f"MISMATCH ({formula:,})"
        lines.append(f"{label:<58} {counted:>12,} {counted / 1e6:>7.2f} {100 * counted / base:>9.2f}%  {check}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    print(format_table(madx_parameter_table()))


if __name__ == "__main__":
    main()
