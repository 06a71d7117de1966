"""``--cuda-graphs`` training (madx_fast.training.graphed_step): the static-shape step computes what the plain
loop computes, step by step, for MLM (decoder rows padded, accumulation) and NER (lengths padded); it reads
nothing back from the device; the combinations it cannot capture are refused. On a GPU the step is captured
and replayed and still equals the plain loop."""
from __future__ import annotations

import json
import os

import pytest
import torch

from madx_fast.model.inputs import IGNORE_INDEX, mlm_positions
from madx_fast.testing.sync_check import HostReads
from madx_fast.training import TrainConfig, train_language_adapter, train_task_adapter
from madx_fast.training.graphed_step import GraphedSteps, pad_rows_to, pad_sequences
from madx_fast.training.trainer import read_log
from tests.helpers.runs import quiet_config

CUDA = torch.cuda.is_available()


def _losses(run_dir):
    return [(h["step"], h["loss"]) for h in read_log(os.path.join(run_dir, "log.jsonl")) if "loss" in h]


def _weights(run_dir):
    from safetensors.torch import load_file
    out = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            if name.endswith(".safetensors"):
                out.update({f"{os.path.relpath(root, run_dir)}/{k}": v for k, v in
                            load_file(os.path.join(root, name)).items()})
    assert out, f"no weights written under {run_dir}"
    return out


def _same_run(plain, graphed, atol):
    a, b = _losses(plain), _losses(graphed)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 4
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= atol * max(1.0, abs(x)), f"step {step}: plain loss {x}, graphed {y}"
    wa, wb = _weights(plain), _weights(graphed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=atol, msg=lambda m: f"{k}: {m}")


def _lang(tiny_base, corpus, out, graphs, device="cpu", backend="eager", steps=5, **kwargs):
    return train_language_adapter(
        model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
        output_dir=out, eval_fraction=0, max_length=32, backend=backend, **kwargs,
        config=quiet_config(steps=steps, grad_accum=2, warmup_steps=2, cuda_graphs=graphs, device=device))


def _ner(tiny_base, corpus, out, graphs, device="cpu", backend="eager", steps=5):
    return train_task_adapter(task="ner", model=tiny_base, train_data=os.path.join(corpus, "alpha", "ner"),
                              output_dir=out, max_length=48, backend=backend,
                              config=quiet_config(steps=steps, cuda_graphs=graphs, device=device))


def test_language_adapter_steps_equal_the_plain_loop(tmp_path, tiny_base, corpus, monkeypatch):
    from madx_fast.training import graphed_step
    sizes, inner = [], graphed_step.pad_rows_to

    def spied(micros, row_keys):
        sizes.append([m[row_keys[0]].shape[0] for m in micros])
        return inner(micros, row_keys)
    monkeypatch.setattr(graphed_step, "pad_rows_to", spied)
    # half the tokens masked: the two micro-batches of a step often differ in decoder rows (64 or 128)
    plain = _lang(tiny_base, corpus, str(tmp_path / "plain"), False, mlm_probability=0.5)
    graphed = _lang(tiny_base, corpus, str(tmp_path / "graphed"), True, mlm_probability=0.5)
    assert any(len(set(s)) > 1 for s in sizes), sizes  # rows were padded in some step
    assert plain["cuda_graphs"] is None
    assert graphed["cuda_graphs"] == {"captured": 0, "replayed_steps": 0}  # nothing is captured on a CPU
    _same_run(str(tmp_path / "plain"), str(tmp_path / "graphed"), atol=1e-5)


def test_ner_steps_equal_the_plain_loop(tmp_path, tiny_base, corpus):
    _ner(tiny_base, corpus, str(tmp_path / "plain"), False)
    _ner(tiny_base, corpus, str(tmp_path / "graphed"), True)
    _same_run(str(tmp_path / "plain"), str(tmp_path / "graphed"), atol=1e-5)


def test_padding_adds_no_loss_term():
    ids = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    batch = {"input_ids": ids, "attention_mask": (ids != 1).long(), "labels": torch.tensor([[-100, 5, 6, -100],
                                                                                             [-100, 7, -100, -100]]),
             "start_positions": torch.tensor([1, 2])}
    padded = pad_sequences(batch, 16, pad_id=1)
    assert padded["input_ids"].shape == (2, 16) and (padded["input_ids"][:, 4:] == 1).all()
    assert (padded["attention_mask"][:, 4:] == 0).all() and (padded["labels"][:, 4:] == IGNORE_INDEX).all()
    assert torch.equal(padded["start_positions"], batch["start_positions"])  # not a sequence: unchanged
    with pytest.raises(ValueError, match="cannot pad a batch of 4 tokens to 3"):
        pad_sequences(batch, 3, pad_id=1)
    # decoder rows: the shorter micro-batch is padded with position 0 and an ignored target
    pos_a, tgt_a = mlm_positions(padded["labels"][:1], multiple=2)
    pos_b, tgt_b = mlm_positions(torch.full((1, 16), IGNORE_INDEX).index_fill_(1, torch.arange(5), 3), multiple=2)
    micros = pad_rows_to([{"p": pos_a, "t": tgt_a}, {"p": pos_b, "t": tgt_b}], ("p", "t"))
    assert [m["p"].shape[0] for m in micros] == [6, 6]
    assert torch.equal(micros[0]["p"][2:], torch.zeros(4, dtype=torch.long))
    assert torch.equal(micros[0]["t"], torch.tensor([5, 6, -100, -100, -100, -100]))


def test_a_graphed_step_reads_nothing_back(tmp_path, tiny_base, corpus, monkeypatch):
    """The whole step (forward, backward of both micro-batches, clipping, update) queues its work without a
    read of device data, on either transformers line: the padded mask form is never tested by HF."""
    seen = []
    inner = GraphedSteps._body

    def spied(self, entry):
        with HostReads() as reads:
            out = inner(self, entry)
        seen.append(reads.reads)
        return out
    monkeypatch.setattr(GraphedSteps, "_body", spied)
    _lang(tiny_base, corpus, str(tmp_path / "lang"), True)
    _ner(tiny_base, corpus, str(tmp_path / "ner"), True)
    assert len(seen) == 10 and all(reads == [] for reads in seen), seen


def test_combinations_that_cannot_be_captured_are_refused(tmp_path, tiny_base, corpus):
    with pytest.raises(ValueError, match="--compile and --cuda-graphs"):
        TrainConfig(cuda_graphs=True, compile="inductor").check()
    earlier = _lang(tiny_base, corpus, str(tmp_path / "run"), False, steps=1)
    with pytest.raises(ValueError, match="float16 backbone"):
        _lang(tiny_base, corpus, str(tmp_path / "run"), True, backbone_dtype="float16", overwrite=True)
    # refused before --overwrite removed anything: the earlier run is intact
    with open(os.path.join(tmp_path, "run", "run.json"), encoding="utf-8") as f:
        assert json.load(f)["steps"] == earlier["steps"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="captures CUDA graphs: needs a CUDA GPU")
def test_captured_steps_replay_and_equal_the_plain_loop(tmp_path, tiny_base, corpus):
    run = dict(device="cuda", backend="triton", backbone_dtype="float32", steps=16)
    plain = _lang(tiny_base, corpus, str(tmp_path / "plain"), False, **run)
    graphed = _lang(tiny_base, corpus, str(tmp_path / "graphed"), True, **run)
    assert plain["cuda_graphs"] is None
    assert graphed["cuda_graphs"]["captured"] >= 1 and graphed["cuda_graphs"]["replayed_steps"] >= 4
    _same_run(str(tmp_path / "plain"), str(tmp_path / "graphed"), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="captures CUDA graphs: needs a CUDA GPU")
def test_captured_ner_steps_on_a_bfloat16_backbone(tmp_path, tiny_base, corpus):
    """The GPU default (bfloat16 backbone, Triton kernels), batches padded to the graph lengths."""
    plain = _ner(tiny_base, corpus, str(tmp_path / "plain"), False, device="cuda", backend="triton", steps=12)
    graphed = _ner(tiny_base, corpus, str(tmp_path / "graphed"), True, device="cuda", backend="triton", steps=12)
    assert "bfloat16" in str(graphed["backbone_dtype"]) and plain["cuda_graphs"] is None
    assert graphed["cuda_graphs"]["captured"] >= 1 and graphed["cuda_graphs"]["replayed_steps"] >= 1
    _same_run(str(tmp_path / "plain"), str(tmp_path / "graphed"), atol=3e-2)
