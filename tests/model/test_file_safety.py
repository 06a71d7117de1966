"""Adapter and checkpoint files under attack: random truncation, bit flips, wrong keys / shapes / dtypes /
values, and saves killed at random points. Every damaged file gives a clear error and leaves the model as it
was (or, for a flip that changes nothing the file means, loads exactly the original); a killed save leaves the
old directory or the new one, never a mix, and nothing a later save trips over."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import XLMRobertaForTokenClassification

from madx_fast.model import AdapterConfigError, AdapterFileError, MadxConfig, Stack, add_madx
from madx_fast.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from tests.helpers.models import randomize, tiny_config

CLEAR = (AdapterFileError, AdapterConfigError)


def _model(seed=0):
    torch.manual_seed(seed)
    return XLMRobertaForTokenClassification(tiny_config(num_labels=5)).eval()


def _trained():
    model = _model()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task(reduction_factor=4))
    randomize(model)
    randomize(model, needle="classifier", seed=1)
    madx.set_active(Stack("en", "ner"))
    return model, madx


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_overwriting_drops_every_file_of_the_earlier_save(tmp_path):
    _, madx = _trained()
    for save, head_files in ((madx.save_adapter, {"madx_head.safetensors"}),
                             (madx.export_adapterhub, {"head_config.json", "pytorch_model_head.bin"})):
        d = tmp_path / save.__name__
        d.mkdir()
        (d / "NOTES.md").write_text("mine")  # a user's file in the directory is kept
        save(d, "ner", with_head=True)
        assert head_files <= set(os.listdir(d))
        save(d, "ner", overwrite=True)  # now without a head: the old head must not survive
        assert not head_files & set(os.listdir(d)) and (d / "NOTES.md").read_text() == "mine"
        fresh = add_madx(_model(seed=5), backend="eager")
        with pytest.raises(AdapterFileError, match="no task head"):
            fresh.load_adapter(d, with_head=True)


def _damaged_copies(src, tmp_path, rng, n):
    """(label, directory) pairs: copies of ``src`` with one random truncation or bit flip in one of the files
    loading reads (the model card, README.md, is documentation: loading never reads it)."""
    files = sorted(os.listdir(src))
    damaged = [f for f in files if f != "README.md"]
    out = []
    for i in range(n):
        name = damaged[i % len(damaged)]
        data = bytearray((src / name).read_bytes())
        if i % 3 == 0:
            label = f"{name} truncated"
            data = data[: rng.randrange(len(data))]
        else:
            pos = rng.randrange(len(data))
            label = f"{name} bit {pos}"
            data[pos] ^= 1 << rng.randrange(8)
        d = tmp_path / f"case{i}"
        d.mkdir()
        for f in files:
            (d / f).write_bytes(bytes(data) if f == name else (src / f).read_bytes())
        out.append((label, d))
    return out


def test_damaged_adapter_files_give_clear_errors_and_change_nothing(tmp_path):
    _, madx = _trained()
    src = tmp_path / "ner"
    madx.save_adapter(src, "ner", with_head=True)
    reference_model = _model(seed=3)
    reference = add_madx(reference_model, backend="eager")
    reference.load_adapter(src, with_head=True)
    want = _state(reference_model)
    rng = random.Random(0)
    target = _model(seed=3)
    tm = add_madx(target, backend="eager")
    clear = same = 0
    for label, d in _damaged_copies(src, tmp_path, rng, 60):
        before = _state(target)
        try:
            tm.load_adapter(d, with_head=True, overwrite=True)
        except CLEAR as exc:
            clear += 1
            assert str(d) in str(exc) or "ner" in str(exc), (label, exc)
            assert _same(_state(target), before), label
            continue
        same += 1  # it loaded: then it must be exactly the original (a flip that means nothing)
        assert _same(_state(target), want), f"{label} loaded something other than the saved adapter"
    assert clear >= 55, (clear, same)


def test_wrong_keys_shapes_dtypes_and_values_are_refused(tmp_path):
    """Files edited by hand (no checksums, as earlier versions wrote them): the content checks decide."""
    _, madx = _trained()
    src = tmp_path / "en"
    madx.save_adapter(src, "en")
    weights = load_file(src / "madx_adapter.safetensors")
    key = "layers.0.adapter_up.weight"
    edits = {
        "drop": lambda w: w.pop(key),
        "extra": lambda w: w.update({"layers.9.adapter_up.bias": torch.zeros(32)}),
        "shape": lambda w: w.update({key: w[key][:, :3].contiguous()}),
        "dtype": lambda w: w.update({key: w[key].to(torch.int32)}),
        "nan": lambda w: w[key].view(-1).__setitem__(3, float("nan")),
        "inf": lambda w: w[key].view(-1).__setitem__(3, float("inf")),
    }
    target = _model(seed=3)
    tm = add_madx(target, backend="eager")
    for label, edit in edits.items():
        d = tmp_path / label
        d.mkdir()
        w = {k: v.clone() for k, v in weights.items()}
        edit(w)
        save_file(w, d / "madx_adapter.safetensors")
        meta = json.loads((src / "madx_adapter.json").read_text())
        meta.pop("checksum"), meta.pop("weights_sha256")
        (d / "madx_adapter.json").write_text(json.dumps(meta))
        before = _state(target)
        with pytest.raises(AdapterFileError):
            tm.load_adapter(d)
        assert _same(_state(target), before) and "en" not in tm, label
    for label, change in (("scaling nan", {"scaling": float("nan")}), ("scaling inf", {"scaling": float("inf")})):
        d = tmp_path / label.replace(" ", "_")
        d.mkdir()
        save_file(weights, d / "madx_adapter.safetensors")
        meta = json.loads((src / "madx_adapter.json").read_text())
        meta.pop("checksum"), meta.pop("weights_sha256")
        meta["config"].update(change)
        (d / "madx_adapter.json").write_text(json.dumps(meta))
        with pytest.raises(AdapterConfigError, match="scaling must be a finite number"):
            tm.load_adapter(d)
    meta = json.loads((src / "madx_adapter.json").read_text())
    meta.pop("checksum")
    meta["config"] = ["not", "a", "dict"]
    d = tmp_path / "listconfig"
    d.mkdir()
    save_file(weights, d / "madx_adapter.safetensors")
    (d / "madx_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="'config' is missing or not a dict"):
        tm.load_adapter(d)


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    ckpt = {"identity": {"stage": "language"}, "step": 3, "history": [{"step": 1, "loss": 2.5}], "best": None,
            "trainable": {"w": torch.randn(8, 4, generator=g)}, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 3}, "stream": {"epoch": 0}, "mask_generator": g.get_state(),
            "rng": [{"torch": torch.get_rng_state()}]}
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(str(path), ckpt)
    good = read_checkpoint(str(path))
    data = path.read_bytes()
    rng = random.Random(1)
    clear = 0
    for i in range(60):
        damaged = bytearray(data)
        if i % 3 == 0:
            damaged = damaged[: rng.randrange(len(damaged))]
        else:
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        p = tmp_path / f"c{i}.pt"
        p.write_bytes(bytes(damaged))
        try:
            got = read_checkpoint(str(p))
        except CheckpointError as exc:
            clear += 1
            assert str(p) in str(exc)
            continue
        assert got["digest"] == good["digest"] and torch.equal(got["trainable"]["w"], good["trainable"]["w"])
    assert clear >= 50, clear


def _save_forever(target):
    """In a forked child: save two adapters in turn to ``target`` until killed."""
    torch.manual_seed(0)
    model = _model()
    madx = add_madx(model, backend="eager")
    for name, rf in (("a", 2), ("b", 4)):
        madx.add_adapter(name, MadxConfig.language(reduction_factor=rf))
    i = 0
    while True:
        name = "ab"[i % 2]
        madx.save_adapter(target, name, overwrite=True, with_head=(name == "a"))
        i += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_adapter(tmp_path):
    target = tmp_path / "adapter"
    rng = random.Random(2)
    seen, interrupted = set(), 0
    for trial in range(25):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                _save_forever(target)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted += any(f.endswith(".tmp") for f in os.listdir(tmp_path))  # killed in the middle of a save
        if not target.exists():
            continue  # killed before the first save finished
        fresh = add_madx(_model(seed=7), backend="eager")
        name = fresh.load_adapter(target, with_head=os.path.exists(target / "madx_head.safetensors"))
        seen.add(name)
        # the directory is one whole save: config, weights (and the head of "a" only) belong together
        assert (name == "a") == os.path.exists(target / "madx_head.safetensors"), sorted(os.listdir(target))
    assert seen == {"a", "b"} and interrupted >= 3, (seen, interrupted)
    # what killed saves left next to it never gets in the way of the next save, which cleans it up
    _, madx = _trained()
    madx.save_adapter(target, "en", overwrite=True)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], os.listdir(tmp_path)
    assert add_madx(_model(seed=8), backend="eager").load_adapter(target) == "en"
