"""The skeleton of a training stage: the steps every run takes, in order, written once; a stage fills in what
is its own (its data, objective, model wiring, record and outputs).

``TrainingStage.train(settings)`` (or ``Stage(settings).run()``) does, in this order:

 1. join the data-parallel processes; lock the output directory (process 0, for the whole run: a second run
    there is refused at once, naming this one's process id)
 2. resolve the inputs the settings name (``resolve_inputs``), refuse an output directory holding another
    run, check the global batch splits over the processes, pick this process's device
 3. load the tokenizer, read and encode the data (``read_data``), settle the loop (``make_loop``):
    every input is checked before any model is loaded
 4. seed; load the model (``load_model``), add and select what trains (``wire``), cast the frozen backbone
    and place it on the device (``place``), ``torch.compile`` the encoder with ``--compile``
 5. prepare the output directory (an earlier run removed with ``--overwrite``, leftovers of killed runs)
 6. record the run's facts (``record``), the digests of its data (``digested_data``) and parameter counts;
    train (``Trainer``, resumable: a checkpoint of other settings or data is refused, other data accepted
    with ``allow_data_change``)
 7. on process 0: write the stage's outputs (``save``) and ``run.json`` while the others wait (a failure
    stops them all: ``Dist.on_main``, as for every write of process 0 that the others wait for); the lock is
    released (also when the run fails; when the process dies, by the operating system)

``run.json`` has the same keys for every stage (``RUN_FACTS``, then ``settings``, ``config``, ``epochs``, the
parameter counts, the trainer's results, ``wall_time_s``, ``madx_fast_version``; docs/file_formats.md): a
stage without a fact records None. A stage's settings have ``output_dir``, ``resume``, ``overwrite``,
``tokenizer``, ``backbone_dtype``, ``backend`` and ``config`` (the loop's ``TrainConfig``), and may have
``allow_data_change``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Callable, ClassVar

import numpy as np
import torch

from ... import files
from ..._version import __version__
from .. import models, runs
from ..devices import pick_device
from ..distributed import init_distributed
from ..settings import TrainConfig
from ..graphed_step import check_graphed_training
from ..trainer import Trainer, seed_everything

log = logging.getLogger("madx_fast.training")

# The facts of a run, in run.json for every stage (None where a stage has no such fact): what was trained, on
# what, from which data. A stage's ``record`` returns some of them; its bundles carry that record.
RUN_FACTS = ("stage", "adapter", "language", "source_language", "task", "base_model", "base_fingerprint",
             "adapter_config", "labels", "language_adapter", "train_data", "train_blocks", "train_features",
             "data_tokens", "train_data_sha256", "eval_data_sha256", "objective", "mlm_probability", "max_length",
             "auto_class", "backbone_dtype", "backend", "seed", "init_model")


class TrainingStage:
    """One training run of a stage; subclasses set the class attributes and fill in the hooks below. The
    skeleton sets ``s`` (the settings), ``procs``, ``device``, ``tokenizer``, ``loop``, ``model``, ``madx``,
    ``fingerprint`` and ``backbone_dtype`` as it goes; ``resolve_inputs`` sets ``base_model`` and
    ``read_data`` sets ``objective``, ``items`` and ``max_length``."""

    kind: ClassVar[str]                     # run.json's "stage"
    settings_class: ClassVar[type]
    identity_keys: ClassVar[tuple[str, ...]]  # facts a resumed run must share with its checkpoint
    auto_class: ClassVar[str]              # the HF class ``load_model`` builds by default
    need_mask: ClassVar[bool] = False      # the tokenizer must have a mask token
    main_metric: str | None = None         # the metric the best checkpoint is chosen by (None: no best)
    epochs: float | None = None            # run.json's "epochs": the loop's length in epochs, when given so

    @classmethod
    def train(cls, settings=None, /, **kwargs) -> dict:
        """Run the stage with ``settings`` (a ``settings_class``, or its fields as keywords); returns run.json."""
        return cls(cls.settings_class.build(settings, **kwargs)).run()

    def __init__(self, settings):
        self.s = settings

    # ---------------------------------------------------------------------------------------------------
    # what a stage fills in
    # ---------------------------------------------------------------------------------------------------
    def resolve_inputs(self) -> list[str]:
        """Resolve what the settings name (set ``base_model``); the paths returned are inputs that
        ``--overwrite`` must never remove."""
        self.base_model = self.s.model
        return []

    def read_data(self) -> None:
        """Read, check and encode the data: set ``objective``, ``items`` (what the loop samples) and
        ``max_length``."""
        raise NotImplementedError

    def make_loop(self) -> TrainConfig:
        """The loop's settings (the stage may derive them, e.g. steps from epochs; set ``epochs`` then)."""
        return self.s.config

    def load_model(self):
        """``(model, madx, base fingerprint)``."""
        return models.wired_model(self.auto_class, self.base_model, self.s.backend)

    def wire(self) -> None:
        """Add what the stage trains to ``model`` / ``madx`` and make it (alone) trainable."""
        raise NotImplementedError

    def place(self):
        """Cast the frozen backbone, move the model to the device; returns the backbone dtype (None: float32)."""
        return models.place(self.model, self.madx, self.s.backbone_dtype, self.device)

    def record(self) -> dict:
        """The run's facts (keys of ``RUN_FACTS``), after the model is placed; kept as ``run_record`` (what the
        stage's bundles carry)."""
        raise NotImplementedError

    def identity(self, facts: dict) -> dict:
        """What must not change when the run is resumed (the loop's own settings are added by the Trainer)."""
        return {k: facts[k] for k in self.identity_keys}

    def digested_data(self) -> tuple[object, object]:
        """``(training data, evaluation data or None)`` as the loop and the evaluation use them (encoded, in
        order, with what shapes their batches): ``train_data_sha256`` / ``eval_data_sha256`` hash them, and a
        resumed run must have the same (``data_digest``)."""
        return self.items, None

    def trained_adapters(self) -> list[str]:
        """The adapters whose parameters are counted in run.json (``adapter_parameters[name]``)."""
        return []

    def counts(self) -> dict:
        """``base_parameters``, ``trainable_parameters``, ``head_parameters`` (None: no head of its own) and, per
        adapter of ``trained_adapters``, ``adapter_parameters[name]`` and ``adapter_percent_of_base[name]``."""
        out = models.param_counts(self.madx, self.trained_adapters())
        out["trainable_parameters"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out["head_parameters"] = None
        return out

    def evaluation(self) -> Callable[[], dict] | None:
        """The evaluation the trainer runs every ``eval_every`` steps and at the end (None: none)."""
        return None

    def on_best(self, step: int, metrics: dict) -> None:
        """Called on process 0 when ``main_metric`` improves."""

    def describe(self, counts: dict) -> str:
        """The log line before training starts."""
        raise NotImplementedError

    def save(self, result: dict) -> str:
        """Write the stage's outputs (process 0, after training); returns what it wrote where, for the log."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------
    # the skeleton
    # ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.lock = None
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict:
        t_start = time.perf_counter()
        self._set_up()
        facts = dict.fromkeys(RUN_FACTS)
        record = self.run_record = dict(self.record(), seed=self.loop.seed)
        unknown = sorted(set(record) - set(RUN_FACTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}.record() returns {unknown}: not among RUN_FACTS")
        train, evaluation = self.digested_data()
        digests = {"train_data_sha256": data_digest(train),
                   "eval_data_sha256": None if evaluation is None else data_digest(evaluation)}
        facts.update(record, **digests)
        counts = self.counts()
        log.info("%s", self.describe(counts))
        trainer = Trainer(self.model, self.objective, self.items, self.loop, self.s.output_dir,
                          evaluate=self.evaluation(), main_metric=self.main_metric, on_best=self.on_best,
                          identity=dict(self.identity(record), **digests), procs=self.procs, device=self.device,
                          allow_data_change=getattr(self.s, "allow_data_change", False),
                          max_length=self.max_length)
        result = trainer.run(resume=self.s.resume)
        summary = {**facts, "settings": self.s.to_dict(), "config": dataclasses.asdict(self.loop),
                   "epochs": self.epochs, **counts, **result, "madx_fast_version": __version__}
        def finish():
            written = self.save(result)
            summary["wall_time_s"] = time.perf_counter() - t_start
            files.write_json(os.path.join(self.s.output_dir, runs.RUN_SUMMARY), summary)
            log.info("%s (train %.1fs, peak memory %.0f MB)", written, result["train_time_s"],
                     result["peak_memory_mb"])
        self.procs.on_main(finish)
        return summary

    def _set_up(self) -> None:
        """Steps 1-5: processes, the lock, inputs checked, device, tokenizer, data, loop, model, output directory."""
        s = self.s
        self.procs = init_distributed(s.config.device)
        self.lock = _lock_output(s.output_dir, self.procs)
        inputs = self.resolve_inputs()
        runs.check_output_dir(s.output_dir, resume=s.resume, overwrite=s.overwrite, inputs=inputs)
        s.config.check_split(self.procs.world)
        self.device = pick_device(s.config.device, self.procs.local_rank)
        self.tokenizer = models.load_tokenizer(s.tokenizer or self.base_model, need_mask=self.need_mask,
                                               model=self.base_model)
        self.read_data()
        self.loop = self.make_loop()
        seed_everything(self.loop.seed)
        self.model, self.madx, self.fingerprint = self.load_model()
        self.wire()
        self.backbone_dtype = self.place()
        if self.loop.cuda_graphs:  # refused before the output directory is touched
            check_graphed_training(self.procs, self.model)
        models.compile_encoder(self.model, self.loop.compile)
        self.procs.on_main(lambda: runs.prepare_output(s.output_dir, resume=s.resume, overwrite=s.overwrite))


def _lock_output(directory: str, procs) -> files.DirectoryLock | None:
    """Process 0 locks the output directory (``files.DirectoryLock``); a refusal stops every process."""
    return procs.on_main(lambda: files.DirectoryLock(directory))


def data_digest(data) -> str:
    """sha256 of data as a run uses them: tensors and arrays by dtype, shape and bytes, mappings by sorted key,
    sequences in order (a sequence of JSON scalars as its JSON text), dataclasses by field, other values by
    type and ``repr``. Equal digests: the same examples, encoded the same way, in the same order."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            h.update(f"D{type(x).__name__}".encode())
            feed({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple, range)):
            if all(v is None or type(v) in (int, float, str, bool) for v in x):
                h.update(b"J" + json.dumps(list(x)).encode())
            else:
                h.update(b"[")
                for v in x:
                    feed(v)
                h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(data)
    return h.hexdigest()
