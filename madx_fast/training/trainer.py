"""The training loop shared by every stage: language-adapter MLM, task adapters, and (in the demo) a short
full-model MLM pretraining of the base.

One step = one GLOBAL batch of ``batch_size`` examples, drawn from a seeded ``ShuffledStream`` and made into
tensors (for MLM: masked with the masking generator) identically in every process. Process ``r`` of ``W``
takes rows ``[r*B/W, (r+1)*B/W)`` and runs them as ``grad_accum`` micro-batches. Each micro-batch loss is a
SUM of loss terms divided by the number of terms in the whole global batch (times ``W``, which
DistributedDataParallel's gradient averaging divides out), so one process, accumulation, and W processes
all compute the gradient of the same global mean. Then: gradient clipping, AdamW, linear warm-up / decay.

A step whose loss or gradients are not finite changes nothing: the optimizer skips it on the device (fused
AdamW's ``found_inf``, no host sync). The trainer counts such steps and stops the run with
``TrainingDiverged`` once more than ``skip_nonfinite`` have happened (0 by default: at the first), before it
writes a checkpoint or outputs from the diverged state. With a float16 backbone the loss is scaled
dynamically (``torch.amp.GradScaler``): a step whose scaled gradients overflow is skipped and the scale
lowered, as mixed-precision trainers do; only a non-finite loss counts as divergence there.

Checkpoints (``checkpoint.py``; every ``save_every`` steps and at the end) let ``resume=True`` continue the
same run: same data order, same masks, same dropout, so the resumed per-step losses equal those of an
uninterrupted run. Launch with ``torchrun --nproc_per_node N`` for data parallelism (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import files
from .batches import autocast, model_batch, slice_batch
from .checkpoint import check_checkpoint, read_checkpoint, rng_state, set_rng_state, write_checkpoint
from .data import DataError
from .distributed import Dist
from .devices import PeakMemory, pick_device
from .graphed_step import GraphedSteps, check_graphed_training
from .progress import StepProgress
from .reporting import Reporters
from .runs import CHECKPOINT, LOG_FILE
from .settings import TrainConfig
from .tasks.base import Objective

log = logging.getLogger("madx_fast.training")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite (more often than ``skip_nonfinite`` allows)."""


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total`` (HF's default)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class ShuffledStream:
    """An endless stream of example indices: epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``.

    ``state_dict()`` is the position ``(epoch, offset)``; a stream restored from it continues with exactly the
    indices the original would have produced. Every process of a data-parallel run holds the same stream and
    draws the same global batch; each takes its own slice."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise DataError("no training examples")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            n = min(k - len(out), self.size - self.offset)
            out.extend(self._perm[self.offset:self.offset + n].tolist())
            self.offset += n
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "offset": self.offset}

    def load_state_dict(self, state: dict, *, resized: bool = False) -> None:
        """Continue where ``state`` stood; ``resized``: the data were allowed to change size, so the order
        continues with the next epoch of the new size."""
        if resized and state["size"] != self.size:
            state = dict(state, size=self.size, epoch=state["epoch"] + 1, offset=0)
        for key in ("size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's data stream has {key}={state[key]!r} but this run has "
                                f"{getattr(self, key)!r}: the training data or seed changed")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation(self.epoch)


@dataclass
class _Optimization:
    """What a step changes besides the weights (and a checkpoint restores with them)."""

    stream: ShuffledStream
    mask_gen: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None


@dataclass
class _RunState:
    """Where a run stands: ``step`` (the last one taken), ``history`` (log entries), ``best`` score, ``elapsed``
    training seconds, ``tokens`` seen, ``nonfinite`` steps skipped, ``data_changes`` accepted on resume (all
    in checkpoints); ``pending``: steps whose loss is still on the device; ``checkpoint_step``: the step of
    the last checkpoint (0: none)."""

    step: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    elapsed: float = 0.0
    tokens: int = 0
    nonfinite: int = 0
    data_changes: list = field(default_factory=list)
    pending: list = field(default_factory=list)
    checkpoint_step: int = 0
    segment_start: float = 0.0  # when the time not yet in ``elapsed`` started
    interval: "_Interval | None" = None  # since the last logging step

    _SAVED = ("step", "history", "best", "elapsed", "tokens", "nonfinite", "data_changes")

    def checkpoint(self) -> dict:
        return {k: getattr(self, k) for k in self._SAVED}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "_RunState":
        defaults = cls()
        state = cls(**{k: ckpt.get(k, getattr(defaults, k)) for k in cls._SAVED})
        state.checkpoint_step = state.step
        return state


@dataclass
class _Interval:
    """The steps since the last logging step: where they started (step, time, tokens) and the seconds spent on
    evaluations and checkpoints meanwhile (left out of the throughput)."""

    step: int
    time: float
    tokens: int
    paused: float = 0.0

    def summary(self, state: _RunState, now: float) -> dict:
        """The logging step's values: the mean loss of the interval's steps (skipped ones left out), the last
        step's learning rate, tokens and steps per second."""
        losses = []
        for entry in reversed(state.history):
            if entry["step"] <= self.step:
                break
            if "loss" in entry and not entry.get("skipped"):
                losses.append(entry["loss"])
        last = next(e for e in reversed(state.history) if "lr" in e)
        seconds = max(now - self.time - self.paused, 1e-9)
        return {"loss": sum(losses) / len(losses) if losses else float("nan"), "lr": last["lr"],
                "tokens_per_s": (state.tokens - self.tokens) / seconds, "steps_per_s": (state.step - self.step) / seconds}


class _LossModule(torch.nn.Module):
    """``forward(batch) -> sum of loss terms``: the module DistributedDataParallel wraps, so that its
    gradient hooks see the forward that produced the loss."""

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective.loss_sum(self.model, batch)


class Trainer:
    """Runs ``config.steps`` steps of ``objective`` on ``items`` for the trainable parameters of ``model``.

    ``evaluate()`` returns a metrics dict (called on process 0 every ``eval_every`` steps and at the end);
    with ``main_metric`` set, ``on_best(step, metrics)`` is called on process 0 whenever it improves.
    ``identity`` describes the run (model, data, settings); a checkpoint of another identity is refused, one
    whose data alone differ only without ``allow_data_change`` (the change is then logged and returned in
    ``data_changes``)."""

    def __init__(self, model, objective: Objective, items: Sequence, config: TrainConfig, output_dir: str, *,
                 evaluate: Callable[[], dict] | None = None, main_metric: str | None = None,
                 greater_is_better: bool = True, on_best: Callable[[int, dict], None] | None = None,
                 identity: dict | None = None, procs: Dist | None = None, device: torch.device | None = None,
                 allow_data_change: bool = False, max_length: int | None = None):
        config.check()
        self.model, self.objective, self.items, self.config = model, objective, items, config
        self.output_dir = output_dir
        self.evaluate_fn, self.main_metric, self.greater = evaluate, main_metric, greater_is_better
        self.on_best = on_best
        self.identity = dict(identity or {}, **config.identity())
        self.allow_data_change = allow_data_change
        self.procs = procs or Dist()
        self.device = device or pick_device(config.device, self.procs.local_rank)
        config.check_split(self.procs.world)
        self.per_process = config.batch_size // self.procs.world
        self.micro = self.per_process // config.grad_accum
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter of the model requires grad")
        self.checkpoint_path = os.path.join(output_dir, CHECKPOINT)
        self.log_path = os.path.join(output_dir, LOG_FILE)
        # float16 activations (a float16 backbone) need their gradients scaled up to stay representable
        self.scale_loss = any(p.dtype == torch.float16 for p in model.parameters())
        self.max_length = max_length  # the longest batch: CUDA-graph steps pad to a few lengths up to it
        self.graphed = None
        if config.cuda_graphs:
            check_graphed_training(self.procs, model)

    # ---------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Train to ``config.steps`` (from the checkpoint with ``resume``); returns the run's results."""
        cfg, procs = self.config, self.procs
        seed_everything(cfg.seed + procs.rank)  # dropout streams differ per process
        opt = self._optimization()
        state = self._start(opt, resume)
        module = _LossModule(self.model, self.objective)
        ddp = None
        if procs.enabled:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        self.model.train()
        if cfg.cuda_graphs:
            self.graphed = GraphedSteps(self.model, self.objective, opt.optimizer, self.device,
                                        grad_accum=cfg.grad_accum, max_length=self.max_length,
                                        run_micro=lambda micro, scale: self._micro_step(module, micro, scale),
                                        optimizer_step=lambda loss_sum: self._optimizer_step(opt.optimizer, None,
                                                                                             loss_sum))
        memory = PeakMemory(self.device)
        progress = StepProgress(cfg.steps, state.step, enabled=cfg.progress and procs.main)
        self.reporters = Reporters(cfg.report_to if procs.main else [], self.output_dir, config=self.identity,
                                   start_step=state.step)
        state.segment_start = time.perf_counter()
        state.interval = _Interval(state.step, state.segment_start, state.tokens)
        try:
            while state.step < cfg.steps:
                self._train_step(state, opt, ddp or module, ddp, progress)
        finally:
            progress.close()
            self.reporters.close()
        state.elapsed += time.perf_counter() - state.segment_start
        evals = [h["eval"] for h in state.history if "eval" in h]
        return {"steps": cfg.steps,
                "final_loss": next((h["loss"] for h in reversed(state.history) if "loss" in h), None),
                "final_eval": evals[-1] if evals else None, "best": state.best,
                "train_time_s": state.elapsed, "train_tokens": state.tokens,
                "tokens_per_s": state.tokens / max(state.elapsed, 1e-9), "world_size": procs.world,
                "nonfinite_steps": state.nonfinite, "data_changes": state.data_changes,
                "loss_scale": opt.scaler.get_scale() if opt.scaler else None,
                "cuda_graphs": None if self.graphed is None else {"captured": self.graphed.captures,
                                                                  "replayed_steps": self.graphed.replays},
                "device": str(self.device), **memory.read()}

    def _optimization(self) -> _Optimization:
        cfg = self.config
        # fused AdamW (CPU and CUDA): one kernel per step, and it can skip a step on the device (found_inf)
        # capturable: the update can be recorded in a CUDA graph (its learning rate then a device tensor)
        optimizer = torch.optim.AdamW([p for _, p in self.params], lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay, fused=True, capturable=cfg.cuda_graphs)
        return _Optimization(
            stream=ShuffledStream(len(self.items), cfg.seed),
            mask_gen=torch.Generator().manual_seed(cfg.seed + 7919),  # same on every process
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, cfg.steps)),
            scaler=torch.amp.GradScaler(self.device.type) if self.scale_loss else None)

    def _start(self, opt: _Optimization, resume: bool) -> _RunState:
        """A fresh state, or (``resume``) the checkpoint's, restored into ``opt`` and the weights; the log file
        rewritten from its history."""
        state = _RunState()
        if resume and os.path.isfile(self.checkpoint_path):
            state = self._load_checkpoint(opt)
            log.info("resumed from %s at step %d of %d", self.checkpoint_path, state.step, self.config.steps)
        elif resume:
            log.info("no checkpoint in %s: starting the run from step 0", self.output_dir)
        self.procs.on_main(lambda: files.write_file(self.log_path, lambda p: _write_log(p, state.history)))
        return state

    def _train_step(self, state: _RunState, opt: _Optimization, runner, ddp, progress: StepProgress) -> None:
        """One step, then what is due after it: the log (the losses read from the device only then), the
        progress display, an evaluation, a checkpoint."""
        cfg = self.config
        state.step += 1
        step = state.step
        loss_t, bad_t, tokens = self._step(runner, ddp, opt)
        state.tokens += tokens
        # the learning rate this step used (the schedule has already moved on to the next one)
        state.pending.append(({"step": step, "lr": cfg.learning_rate * opt.scheduler.lr_lambdas[0](step - 1)},
                              loss_t, bad_t))
        evaluate = self.evaluate_fn and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
        save = step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
        logged = cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps)
        if logged or evaluate or save or not cfg.log_every:
            self._flush(state)
        interval = self._log_interval(state) if logged or not cfg.log_every else {}
        progress.update(step, loss=interval.get("loss") if logged else None, lr=interval.get("lr"), tokens=tokens)
        if logged and not progress.enabled and self.procs.main:
            log.info("step %d/%d  loss %.4f  lr %.3e", step, cfg.steps, interval["loss"], interval["lr"])
        paused = time.perf_counter()
        if evaluate:
            metrics = self._evaluate(step, state)
            state.history.append({"step": step, "eval": metrics})
            self._append_log(state.history[-1])
            self.reporters.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        if save:
            now = time.perf_counter()
            state.elapsed += now - state.segment_start
            state.segment_start = now
            self._save_checkpoint(state, opt)
        state.interval.paused += time.perf_counter() - paused

    def _log_interval(self, state: _RunState) -> dict:
        """A logging step: the interval's mean loss, learning rate and throughput, reported to the trackers;
        the next interval starts."""
        now = time.perf_counter()
        values = state.interval.summary(state, now)
        self.reporters.scalars(state.step, {"train/loss": values["loss"], "train/learning_rate": values["lr"],
                                            "train/tokens_per_s": values["tokens_per_s"],
                                            "train/steps_per_s": values["steps_per_s"]})
        state.interval = _Interval(state.step, now, state.tokens)
        return values

    def _flush(self, state: _RunState) -> None:
        """Read the pending steps' losses from the device into the history and the log; stop the run when
        more steps than allowed were not finite."""
        for entry, loss_t, bad_t in state.pending:
            entry["loss"] = float(loss_t)
            if bool(bad_t):
                entry["skipped"] = True
                state.nonfinite += 1
            state.history.append(entry)
            self._append_log(entry)
        state.pending.clear()
        if state.nonfinite > self.config.skip_nonfinite:
            self._diverged(state)

    # ---------------------------------------------------------------------------------------------------
    def _step(self, runner, ddp, opt: _Optimization):
        """One optimizer step; returns the global mean loss and whether the step was skipped as non-finite
        (both device scalars) and the tokens it saw."""
        cfg, procs = self.config, self.procs
        indices = opt.stream.take(cfg.batch_size)
        batch = self.objective.make_batch([self.items[i] for i in indices], opt.mask_gen)
        total = max(self.objective.count(batch), 1)
        tokens = self.objective.num_tokens(batch)
        mine = slice_batch(batch, procs.rank * self.per_process, (procs.rank + 1) * self.per_process)
        if self.graphed is not None:
            loss_sum, bad = self.graphed.step(mine, procs.world / total)
            opt.scheduler.step()
            return loss_sum / total, bad, tokens
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in range(cfg.grad_accum):
            micro = self.objective.prepare(slice_batch(mine, a * self.micro, (a + 1) * self.micro))
            micro = model_batch(self.model, micro, self.device)
            sync = ddp.no_sync() if ddp is not None and a < cfg.grad_accum - 1 else nullcontext()
            with sync:
                loss_sum += self._micro_step(runner, micro, procs.world / total, opt.scaler)
        if procs.enabled:
            dist.all_reduce(loss_sum)
        bad = self._optimizer_step(opt.optimizer, opt.scaler, loss_sum)
        opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        return loss_sum / total, bad, tokens

    def _optimizer_step(self, optimizer, scaler, loss_sum: torch.Tensor) -> torch.Tensor:
        """Clip and step, all on the device. Returns the device flag "this step counts as non-finite": a
        non-finite loss, or (without loss scaling) non-finite gradients; such a step leaves the weights and
        the optimizer state as they were."""
        params = [p for _, p in self.params]
        if scaler is not None:
            scaler.unscale_(optimizer)  # overflowing gradients make scaler.step skip and lower the scale
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, norm)
        bad_loss = ~torch.isfinite(loss_sum)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            return bad_loss
        bad = bad_loss | ~torch.isfinite(norm)
        optimizer.grad_scale, optimizer.found_inf = None, bad.to(torch.float32)  # fused AdamW skips on found_inf
        optimizer.step()
        return bad

    def _micro_step(self, runner, micro: dict, scale, scaler=None) -> torch.Tensor:
        """Forward and backward of one micro-batch already on the device; returns its loss sum (float64,
        on the device). ``scale``: a float, or a device scalar (a CUDA-graph step's buffer). Everything here is
        queued without waiting for the device (tests check it)."""
        with autocast(self.device, self.config.bf16):
            part = runner(micro)
        scaled = part * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return part.detach().double()

    def _diverged(self, state: _RunState) -> None:
        bad = [h for h in state.history if h.get("skipped")]
        first = bad[0]
        saved = f"the last checkpoint ({self.checkpoint_path}, step {state.checkpoint_step}) is from before it" \
            if state.checkpoint_step and os.path.isfile(self.checkpoint_path) else "no checkpoint was written"
        raise TrainingDiverged(
            f"training diverged: step {first['step']} had a non-finite loss ({first['loss']}) or gradients "
            f"({len(bad)} such step(s), at most {self.config.skip_nonfinite} allowed by --skip-nonfinite); the run "
            f"stopped without writing outputs and {saved}. Lower the learning rate (now "
            f"{self.config.learning_rate:g}), or check the data and the backbone dtype")

    def _evaluate(self, step: int, state: _RunState) -> dict:
        metrics = None
        if self.procs.main:
            t0 = time.perf_counter()
            metrics = dict(self.evaluate_fn())
            metrics["eval_time_s"] = time.perf_counter() - t0
            log.info("step %d eval: %s", step, _fmt(metrics))
        if self.procs.enabled:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        if self.main_metric:
            value = metrics[self.main_metric]
            best = state.best
            better = best is None or (value > best["value"] if self.greater else value < best["value"])
            if better:
                state.best = {"step": step, "value": value, "metric": self.main_metric}
                self.procs.on_main(lambda: self.on_best and self.on_best(step, metrics))
        return metrics

    def _append_log(self, entry: dict) -> None:
        if self.procs.main:
            files.append_text(self.log_path, _json_line(entry))

    # ---------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, state: _RunState, opt: _Optimization) -> None:
        rngs = [rng_state()]
        if self.procs.enabled:
            rngs = [None] * self.procs.world
            dist.all_gather_object(rngs, rng_state())
        self.procs.on_main(lambda: write_checkpoint(self.checkpoint_path, {
            "identity": self.identity, **state.checkpoint(), "world_size": self.procs.world,
            "trainable": {n: p.detach().to("cpu").clone() for n, p in self.params},
            "optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
            "stream": opt.stream.state_dict(), "mask_generator": opt.mask_gen.get_state(), "rng": rngs,
            "scaler": opt.scaler.state_dict() if opt.scaler is not None else None}))
        state.checkpoint_step = state.step

    def _load_checkpoint(self, opt: _Optimization) -> _RunState:
        ckpt = read_checkpoint(self.checkpoint_path)
        changed = check_checkpoint(self.checkpoint_path, ckpt, self.identity, self.params,
                                   allow_data_change=self.allow_data_change)
        # checks size and seed before anything else changes
        opt.stream.load_state_dict(ckpt["stream"], resized=bool(changed))
        opt.optimizer.load_state_dict(ckpt["optimizer"])
        for group in opt.optimizer.param_groups:  # a checkpoint of a run with or without --cuda-graphs
            group["capturable"] = self.config.cuda_graphs
        opt.scheduler.load_state_dict(ckpt["scheduler"])
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(ckpt["trainable"][n])
        opt.mask_gen.set_state(ckpt["mask_generator"])
        if opt.scaler is not None and ckpt.get("scaler"):
            opt.scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        if len(rngs) != self.procs.world:
            log.warning("the checkpoint was written by %d process(es), this run has %d: the data order and masks "
                        "continue exactly, the dropout random streams do not", len(rngs), self.procs.world)
        set_rng_state(rngs[self.procs.rank % len(rngs)])
        state = _RunState.from_checkpoint(ckpt)
        if changed:
            state.data_changes.append({"step": state.step, "changed": {k: list(v) for k, v in sorted(changed.items())}})
            log.warning("resuming at step %d on other data than the checkpoint's (--allow-data-change): %s", state.step,
                        ", ".join(sorted(changed)))
        return state


def _json_line(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, default=float) + "\n"


def _write_log(path: str, history: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for entry in history:
            f.write(_json_line(entry))


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def read_log(path: str) -> list[dict]:
    """The entries of a run's ``log.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["ShuffledStream", "TrainConfig", "Trainer", "TrainingDiverged", "linear_schedule",
           "read_log", "seed_everything"]
