"""``--compile`` (``compile=`` of the loop settings, ``TransferSettings.compile``): the encoder, MAD-X adapters
and NICE included, runs as one torch.compile graph with no graph break (``fullgraph``), is compiled a fixed
number of times however many steps run (sequence lengths that change from batch to batch become dynamic shapes
once, not a recompilation per step), and computes what the eager model computes. On the CPU with the
``aot_eager`` backend (dynamo and AOTAutograd, as inductor sees them, without inductor's minutes of C++
compilation); the adapters through their custom ops (the Triton kernels, interpreted) where it matters."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

from madx_fast.cli import build_parser, main
from madx_fast.training import evaluate_transfer, train_language_adapter, train_task_adapter
from tests.helpers.runs import quiet_config, step_losses


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiled():
    """(graphs compiled, graph breaks) since the last reset."""
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def _ner(tmp_path, tiny_base, corpus, name, steps, compile_backend, backend="triton"):
    out = str(tmp_path / name)
    train_task_adapter(task="ner", model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "ner"),
                       output_dir=out, config=quiet_config(steps=steps, eval_every=2, compile=compile_backend),
                       max_length=32, backend=backend, max_eval_examples=16)
    return out


def test_task_training_compiles_a_fixed_number_of_graphs_and_trains_as_eager(tmp_path, tiny_base, corpus):
    """8 steps on batches of other lengths and 4 evaluations: a graph per mode (training, evaluation), static and
    then with dynamic lengths; a recompilation per step would make at least 8."""
    compiled = _ner(tmp_path, tiny_base, corpus, "compiled", 8, "aot_eager")
    graphs, breaks = _compiled()
    assert breaks == {} and 2 <= graphs <= 4, graphs
    eager = _ner(tmp_path, tiny_base, corpus, "eager", 8, None)
    assert step_losses(compiled) == pytest.approx(step_losses(eager), rel=1e-5, abs=1e-6)
    evals = [[json.loads(line)["eval"]["f1"] for line in open(os.path.join(run, "log.jsonl")) if '"eval"' in line]
             for run in (compiled, eager)]
    assert len(evals[0]) == 4 and evals[0] == evals[1]


def test_compile_flag_on_every_command(tmp_path, capsys, tiny_base, corpus):
    parser = build_parser()
    common = ["--lang", "sw", "--train-data", "x", "--output", "o", "--model", "m"]
    assert parser.parse_args(["train-lang", *common, "--compile"]).compile == "inductor"
    assert parser.parse_args(["train-lang", *common, "--compile", "aot_eager"]).compile == "aot_eager"
    assert parser.parse_args(["train-lang", *common]).compile is None
    assert parser.parse_args(["train-task", "--task", "ner", "--train-data", "x", "--output", "o",
                              "--compile"]).compile == "inductor"
    with pytest.raises(SystemExit):
        parser.parse_args(["train-lang", *common, "--compile", "tvm"])
    assert main(["transfer", "--task-adapter", "x", "--targets", "sw", "--eval-data", "y", "--compile",
                 "--cuda-graphs"]) == 2
    assert "choose one" in capsys.readouterr().err

    # stage 1 by the command: masked-LM blocks of one length, so one training graph (and the evaluation's)
    out = tmp_path / "lang"
    assert main(["train-lang", "--model", tiny_base, "--lang", "alpha", "--train-data",
                 os.path.join(corpus, "alpha", "text", "train.txt"), "--output", str(out), "--steps", "6",
                 "--batch-size", "8", "--eval-every", "2", "--max-length", "32", "--backend", "triton", "--device",
                 "cpu", "--no-progress", "--compile", "aot_eager"]) == 0
    graphs, breaks = _compiled()
    assert breaks == {} and 1 <= graphs <= 3, graphs
    assert json.loads((out / "run.json").read_text())["config"]["compile"] == "aot_eager"


def test_transfer_compiled_evaluates_as_eager(tmp_path, tiny_base, corpus):
    langs = {}
    for lang in ("alpha", "beta"):
        langs[lang] = str(tmp_path / f"lang-{lang}")
        train_language_adapter(model=tiny_base, lang=lang, train_data=os.path.join(corpus, lang, "text", "train.txt"),
                               output_dir=langs[lang], config=quiet_config(steps=2), max_length=32, backend="eager")
    ner = str(tmp_path / "ner")
    train_task_adapter(task="ner", lang_adapter=langs["alpha"], train_data=os.path.join(corpus, "alpha", "ner"),
                       output_dir=ner, config=quiet_config(steps=3), max_length=32, backend="eager")

    def run(compile_backend):
        torch._dynamo.reset()
        counters.clear()
        result = evaluate_transfer(task_adapters=[ner], lang_adapters=langs, targets=["alpha", "beta"],
                                   eval_data=os.path.join(corpus, "{lang}", "ner"), settings=["target", "none"],
                                   backend="eager", device="cpu", batch_size=32, compile=compile_backend)
        return [(r["target"], r["setting"], r["metrics"]["f1"]) for r in result["records"]], _compiled()

    compiled, (graphs, breaks) = run("aot_eager")
    eager, _ = run(None)
    assert compiled == eager
    # a graph per adapter setup (Stack(alpha, ner), Stack(beta, ner), ner alone), at most once more when the
    # batch length changes (then dynamic); not one per batch
    assert breaks == {} and 3 <= graphs <= 6, graphs
