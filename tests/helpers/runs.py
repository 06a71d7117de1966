"""Shared builders for tests/training: a tiny XLM-R base model with a locally trained tokenizer, small
synthetic data, and a way to run the ``madx`` command in a subprocess.

The session fixtures built from these (``corpus``, ``tiny_base``, ...) are in tests/training/conftest.py."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import torch

from tests.helpers import ROOT as REPO
from tests.helpers.processes import run_bounded

ROOT = str(REPO)
H, LAYERS = 32, 2


def build_tiny_base(directory: str, data_dir: str, *, hidden: int = H, layers: int = LAYERS, seed: int = 0,
                    max_length: int = 64, dropout: float = 0.0) -> str:
    """Random-init XLM-R masked-LM (hidden 32, 2 layers) + BPE tokenizer trained on the synthetic text.
    Dropout is off by default so that runs split differently (accumulation, processes) compute the same."""
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    from madx_fast.demo import synthetic

    tok = synthetic.train_tokenizer(_corpus_texts(data_dir), vocab_size=300)
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=2, intermediate_size=2 * hidden,
                              max_position_embeddings=max_length + 2, type_vocab_size=1, layer_norm_eps=1e-5,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=dropout,
                              attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = XLMRobertaForMaskedLM(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _corpus_texts(data_dir: str) -> list[str]:
    texts = []
    for lang in ("alpha", "beta"):
        with open(os.path.join(data_dir, lang, "text", "train.txt"), encoding="utf-8") as f:
            texts.extend(f.read().splitlines())
    return texts


def build_tiny_family_base(directory: str, data_dir: str, family: str, *, max_length: int = 64,
                           seed: int = 0) -> str:
    """A random-init model of ``family`` (tests/helpers/models.py's tiny config: hidden 32, 2 layers, no dropout)
    with its LM head (``...ForCausalLM`` for a decoder, ``...ForMaskedLM`` otherwise) and a tokenizer of the
    family's kind trained on the synthetic text (tests/helpers/tokenizers.py: GPT-2 and Llama without a pad
    token), saved in ``directory``. The config's special ids are the tokenizer's."""
    import transformers

    from madx_fast.model.lm_heads import pretraining_objective
    from tests.helpers.models import tiny_config
    from tests.helpers.tokenizers import family_tokenizer

    tok = family_tokenizer(family, _corpus_texts(data_dir))
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    positions = {"gpt2": "n_positions"}.get(family, "max_position_embeddings")
    dropout = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "distilbert": ("dropout", "attention_dropout"),
               "deberta-v2": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
               "xlm-roberta-xl": ("hidden_dropout_prob", "attention_probs_dropout_prob")}.get(family, ())
    config = tiny_config(family, attn="eager" if family == "deberta-v2" else "sdpa", **ids,
                         **{positions: max_length + 2}, **dict.fromkeys(dropout, 0.0))
    auto = "AutoModelForCausalLM" if pretraining_objective(config) == "causal" else "AutoModelForMaskedLM"
    torch.manual_seed(seed)
    getattr(transformers, auto).from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_small_corpus(directory: str) -> dict:
    from madx_fast.demo import synthetic
    return synthetic.write_corpus(directory, ("alpha", "beta"), text_sentences=400, ner_train=64,
                                  ner_validation=24, ner_test=24, seed=0)


def quiet_config(**overrides):
    """A TrainConfig for tests: tiny batches, no progress bar, the eager backend on the CPU."""
    from madx_fast.training import TrainConfig
    base = dict(steps=6, batch_size=8, learning_rate=1e-3, seed=0, log_every=0, save_every=0, eval_batch_size=16,
                progress=False, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def env_for_subprocess(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def madx_command(*args) -> list[str]:
    return [sys.executable, "-m", "madx_fast.cli", *map(str, args)]


def run_madx(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """``madx ARGS`` in a subprocess (``run_bounded``: killed after 5 minutes, stdin empty unless ``input=``
    feeds it, so ``madx predict`` without ``--input`` never waits on the test runner's stdin)."""
    proc = run_bounded(madx_command(*args), env=env_for_subprocess(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"madx {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def torchrun_madx(*args, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m madx_fast.cli ARGS`` (gloo on the CPU; ``run_bounded``: its
    workers are killed with it after 5 minutes); fails with its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "madx_fast.cli", *map(str, args)]
    proc = run_bounded(cmd, env=env_for_subprocess(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-4000:]}"
    return proc


def step_losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e["loss"] for e in entries if "loss" in e]


def adapter_tensors(bundle_dir: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(bundle_dir, "madx_adapter.safetensors"))


def snapshot(directory) -> dict:
    """path -> sha256 of every file under ``directory`` (to prove a refused command changed nothing)."""
    import hashlib
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


class StoppedAfterCheckpoint(Exception):
    """Raised by ``stop_after_checkpoint``: the run stopped as a kill right after a checkpoint would stop it."""


@contextlib.contextmanager
def stop_after_checkpoint(step: int):
    """Within the block, a training run raises StoppedAfterCheckpoint right after writing its checkpoint of
    ``step``: what a run killed then leaves (a run with fewer steps would have another schedule)."""
    import madx_fast.training.trainer as trainer_mod
    original = trainer_mod.Trainer._save_checkpoint

    def save_then_stop(self, state, *args):
        original(self, state, *args)
        if state.step == step:
            raise StoppedAfterCheckpoint(step)

    trainer_mod.Trainer._save_checkpoint = save_then_stop
    try:
        yield
    finally:
        trainer_mod.Trainer._save_checkpoint = original
