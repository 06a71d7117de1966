"""``madx merge`` / ``merge_adapters``: one adapter averaged from several adapter directories, equal to
``MadxAdapters.average_adapter`` (itself equal to AdapterHub's base-model ``average_adapter``, tests/model) on the
same inputs, written as a normal adapter directory that loads anywhere an adapter does."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import XLMRobertaForMaskedLM

from madx_fast.model import MadxConfig, add_madx
from madx_fast.training import models, runs
from madx_fast.training.merge import merge_adapters
from tests.helpers.models import randomize
from tests.helpers.runs import run_madx


def _language_bundles(base: str, out: str, langs=("es", "pt"), **config) -> dict[str, str]:
    """Language-adapter bundles on ``base`` as stage 1 writes them (random weights)."""
    model = XLMRobertaForMaskedLM.from_pretrained(base)
    fingerprint = models.base_fingerprint(model)
    madx = add_madx(model)
    paths = {}
    for i, lang in enumerate(langs):
        madx.add_adapter(lang, MadxConfig.language(**config))
        randomize(model, needle=f".{lang}.", seed=i)
        paths[lang] = os.path.join(out, f"lang-{lang}")
        runs.write_bundle(madx, paths[lang], lang, {"stage": "language", "language": lang, "base_model": base,
                                                    "base_fingerprint": fingerprint})
    return paths


def _expected(base: str, paths: dict, weights, normalize=True) -> dict:
    model = XLMRobertaForMaskedLM.from_pretrained(base)
    madx = add_madx(model)
    for name, path in paths.items():
        madx.load_adapter(path, load_as=name)
    madx.average_adapter("want", list(paths), weights=weights, normalize_weights=normalize)
    return madx.adapter_state_dict("want")


def _merged(path: str, base: str):
    model = XLMRobertaForMaskedLM.from_pretrained(base)
    madx = add_madx(model)
    name = madx.load_adapter(path)
    return name, madx


def test_merge_equals_average_adapter_and_loads_as_a_language_adapter(tiny_base, tmp_path):
    paths = _language_bundles(tiny_base, str(tmp_path))
    out = tmp_path / "lang-qu"
    result = merge_adapters(adapters=paths, output_dir=str(out), weights=[0.7, 0.3], name="qu")
    assert result["weights"] == pytest.approx([0.7, 0.3]) and result["stage"] == "language"
    name, madx = _merged(str(out), tiny_base)
    assert name == "qu" and madx.invertible_adapter("qu") is not None
    want = _expected(tiny_base, paths, [0.7, 0.3])
    got = madx.adapter_state_dict("qu")
    assert set(got) == set(want) and any(k.startswith("invertible.") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    meta = runs.read_bundle_meta(str(out))
    assert meta["language"] == "qu" and [m["name"] for m in meta["merged_from"]] == ["es", "pt"]
    # a merged language adapter is a language adapter to transfer and predict
    from madx_fast.training.loading import resolve_language_adapter
    assert resolve_language_adapter("qu", str(out), tiny_base) == str(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_adapters(adapters=paths, output_dir=str(out))


def test_merge_reads_adapterhub_directories_and_unnormalised_weights(tiny_base, tmp_path):
    paths = _language_bundles(tiny_base, str(tmp_path))
    model = XLMRobertaForMaskedLM.from_pretrained(tiny_base)
    madx = add_madx(model)
    madx.load_adapter(paths["pt"], load_as="pt")
    hub_dir = str(tmp_path / "pt-hub")
    madx.export_adapterhub(hub_dir, "pt")
    inputs = {"es": paths["es"], "pt": hub_dir}
    out = str(tmp_path / "merged")
    merge_adapters(adapters=inputs, output_dir=out, weights=[2.0, 0.5], normalize_weights=False)
    name, merged = _merged(out, tiny_base)
    want = _expected(tiny_base, inputs, [2.0, 0.5], normalize=False)
    assert name == "es+pt"
    assert all(torch.equal(merged.adapter_state_dict(name)[k], want[k]) for k in want)


def test_merge_refuses_what_does_not_fit(tiny_base, tiny_base_other, tmp_path):
    paths = _language_bundles(tiny_base, str(tmp_path / "a"))
    other = _language_bundles(tiny_base_other, str(tmp_path / "b"), langs=("it",))
    with pytest.raises(runs.BundleError, match="different base models"):
        merge_adapters(adapters={**paths, **other}, output_dir=str(tmp_path / "x"))
    wide = _language_bundles(tiny_base, str(tmp_path / "c"), langs=("it",), reduction_factor=4)
    with pytest.raises(ValueError, match="different configurations"):
        merge_adapters(adapters={**paths, **wide}, output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        merge_adapters(adapters=paths, output_dir=str(tmp_path / "x"), weights=[1, 2, 3])
    assert not (tmp_path / "x").exists()


def test_madx_merge_command(tiny_base, tmp_path):
    paths = _language_bundles(tiny_base, str(tmp_path))
    out = tmp_path / "merged"
    proc = run_madx("merge", "--output", out, *(f"{k}={v}" for k, v in paths.items()), "--weights", "0.7,0.3")
    assert "merged adapter 'es+pt'" in proc.stdout
    name, madx = _merged(str(out), tiny_base)
    want = _expected(tiny_base, paths, [0.7, 0.3])
    assert all(torch.equal(madx.adapter_state_dict(name)[k], want[k]) for k in want)
    bad = run_madx("merge", "--output", tmp_path / "y", f"es={paths['es']}", "--weights", "1,2", check=False)
    assert bad.returncode == 2 and "2 weights for 1 adapters" in bad.stderr
