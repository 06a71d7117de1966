"""Parameter budget of MAD-X: what each language and each task adds to a base model (``madx params``).

    madx params                                   # the XLM-R base architecture, offline
    madx params --model bert-base-multilingual-cased --langs en,sw
    python -m madx_fast.model.params              # the same table for XLM-R base

The base model is built from its config on the meta device (no weights are read). Each count is the
``numel`` of the modules ``add_madx`` builds, checked against ``MadxConfig.num_parameters`` (the shapes the
adapter files are validated against); a mismatch is reported, never hidden. The paper's Tab. 5 (Pfeiffer
et al., 2020) gives, on XLM-R base, 8.25M added parameters per language for full MAD-X (language +
invertible + task adapter), 7.98M for MAD-X -INV and 0.89M for MAD-X -LAD -INV (task adapter only).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from .config import MadxConfig


def xlmr_base_config():
    """The xlm-roberta-base architecture, without downloading anything."""
    from transformers import XLMRobertaConfig
    return XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def parameter_budget(config=None, *, languages: Sequence[str] = ("en",), lang_reduction_factor: float = 2,
                     task_reduction_factor: float = 16, invertible: bool = True, model_name: str | None = None
                     ) -> dict:
    """Count what MAD-X adds per language and per task on a model of HF ``config`` (default: XLM-R base).

    Returns ``{"model", "base_parameters", "hidden_size", "num_layers", "rows": [...]}`` with one row per
    language (``bottleneck``, ``invertible``, ``total``) and one for the task adapter; each row also has
    ``expected``, the count its config declares (``MadxConfig.num_parameters``)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from .controller import add_madx, check_adapter_name

    config = config if config is not None else xlmr_base_config()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            base = AutoModel.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    if "pooler" in base._modules:
        base.pooler = None  # MAD-X never uses it; count the embeddings and the encoder only
    n_base = sum(p.numel() for p in base.parameters())
    madx = add_madx(base)
    h, n = config.hidden_size, config.num_hidden_layers
    rows = []
    adapters = [(lang, "language", MadxConfig.language(reduction_factor=lang_reduction_factor) if invertible
                 else MadxConfig.seq_bn(reduction_factor=lang_reduction_factor)) for lang in languages]
    adapters.append(("task", "task", MadxConfig.task(reduction_factor=task_reduction_factor)))
    for name, kind, cfg in adapters:
        check_adapter_name(name, f"{kind} name")
        madx.add_adapter(name, cfg)
        inv = madx.invertible_adapter(name)
        n_inv = sum(p.numel() for p in inv.parameters()) if inv is not None else 0
        total = madx.num_parameters(name)
        rows.append({"adapter": name, "kind": kind, "bottleneck": total - n_inv, "invertible": n_inv,
                     "total": total, "expected": cfg.num_parameters(h, n)})
    return {"model": model_name or "xlm-roberta-base (architecture, offline)", "base_parameters": n_base,
            "hidden_size": h, "num_layers": n, "rows": rows}


def format_parameter_budget(budget: dict) -> str:
    base = budget["base_parameters"]
    lines = [f"{budget['model']}: H={budget['hidden_size']}, {budget['num_layers']} layers, {base:,} backbone "
             f"parameters (embeddings + encoder)",
             f"{'adapter':<14} {'kind':<9} {'bottleneck':>12} {'invertible':>11} {'total':>12} {'% of base':>10}"]
    for r in budget["rows"]:
        check = "" if r["total"] == r["expected"] else f"  MISMATCH: the config declares {r['expected']:,}"
        lines.append(f"{r['adapter']:<14} {r['kind']:<9} {r['bottleneck']:>12,} {r['invertible']:>11,} "
                     f"{r['total']:>12,} {100 * r['total'] / base:>9.2f}%{check}")
    langs = [r for r in budget["rows"] if r["kind"] == "language"]
    task = next(r for r in budget["rows"] if r["kind"] == "task")
    if langs:
        lang = langs[0]
        for label, count in (("MAD-X: language + invertible + task (paper Tab. 5 on XLM-R base: 8.25M)",
                              lang["total"] + task["total"]),
                             ("MAD-X -INV: language + task (paper 7.98M)", lang["bottleneck"] + task["total"]),
                             ("MAD-X -LAD -INV: task only (paper 0.89M)", task["total"])):
            lines.append(f"{label:<76} {count:>12,} {100 * count / base:>9.2f}%")
        if len(langs) > 1:
            lines.append(f"{len(langs)} languages + 1 task: {sum(r['total'] for r in langs) + task['total']:,}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    print(format_parameter_budget(parameter_budget()))


if __name__ == "__main__":
    main()
