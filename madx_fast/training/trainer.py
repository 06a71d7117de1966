"""The training loop shared by every stage: language-adapter MLM, task adapters, and (in the demo) a short
full-model MLM pretraining of the base.

One step = one GLOBAL batch of ``batch_size`` examples, drawn from a seeded ``ShuffledStream`` and made into
tensors (for MLM: masked with the masking generator) identically in every process. Process ``r`` of ``W``
takes rows ``[r*B/W, (r+1)*B/W)`` and runs them as ``grad_accum`` micro-batches. Each micro-batch loss is a
SUM of loss terms divided by the number of terms in the whole global batch (times ``W``, which
DistributedDataParallel's gradient averaging divides out), so one process, accumulation, and W processes
all compute the gradient of the same global mean. Then: gradient clipping, AdamW, linear warm-up / decay.

Checkpoints (every ``save_every`` steps and at the end) hold the trainable weights, optimizer, schedule,
stream position, every RNG state (torch / CUDA / Python / NumPy per process, and the masking generator),
the step history and the best validation score; they are written to a temporary file and moved into place
with ``os.replace``. ``resume=True`` continues the same run: same data order, same masks, same dropout, so
the resumed per-step losses equal those of an uninterrupted run.

Launch with ``torchrun --nproc_per_node N`` for data parallelism (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import logging
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import artifacts
from .data import ShuffledStream
from .tasks import autocast, model_batch, slice_batch

log = logging.getLogger("madx_fast.training")


@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is the global batch (all processes and accumulation steps together)."""

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0          # 0: evaluate only after the last step
    save_every: int = 500        # 0: checkpoint only after the last step
    eval_batch_size: int = 64
    progress: bool = True
    device: str | None = None

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "log_every", "eval_every", "save_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def check_split(self, world: int) -> None:
        """The global batch must split evenly over ``world`` processes x ``grad_accum`` micro-batches."""
        per_process = self.batch_size / world
        if per_process != int(per_process) or int(per_process) % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must split evenly over {world} process(es) x "
                             f"{self.grad_accum} accumulation step(s)")

    def identity(self) -> dict:
        """Settings that must not change when a run is resumed."""
        keys = ("steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "bf16",
                "seed")
        return {k: getattr(self, k) for k in keys}


# --------------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK); one process otherwise.
    NCCL when the run uses CUDA, gloo when it runs on the CPU (``device="cpu"`` or no GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str | None, ctx: Dist) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} asked for, but CUDA is not available here")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", ctx.local_rank)
        return device
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------------------
# schedule, RNG, memory
# --------------------------------------------------------------------------------------------------------
def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total`` (HF's default)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class PeakMemory:
    """Peak memory of a run: CUDA allocator peak on a GPU, the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2 ** 20,
                    "peak_memory_kind": "cuda max_memory_allocated"}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mb = rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024
        return {"peak_memory_mb": rss_mb, "peak_memory_kind": "process peak RSS (CPU)"}


class _LossModule(torch.nn.Module):
    """``forward(batch) -> sum of loss terms``: the module DistributedDataParallel wraps, so that its
    gradient hooks see the forward that produced the loss."""

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective.loss_sum(self.model, batch)


# --------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------
class Trainer:
    """Runs ``config.steps`` steps of ``objective`` on ``items`` for the trainable parameters of ``model``.

    ``evaluate()`` returns a metrics dict (called on process 0 every ``eval_every`` steps and at the end);
    with ``main_metric`` set, ``on_best(step, metrics)`` is called on process 0 whenever it improves.
    ``identity`` describes the run (model, data, settings); a checkpoint of another identity is refused."""

    def __init__(self, model, objective, items: Sequence, config: TrainConfig, output_dir: str, *,
                 evaluate: Callable[[], dict] | None = None, main_metric: str | None = None,
                 greater_is_better: bool = True, on_best: Callable[[int, dict], None] | None = None,
                 identity: dict | None = None, ctx: Dist | None = None, device: torch.device | None = None):
        config.check()
        self.model, self.objective, self.items, self.config = model, objective, items, config
        self.output_dir = output_dir
        self.evaluate_fn, self.main_metric, self.greater = evaluate, main_metric, greater_is_better
        self.on_best = on_best
        self.identity = dict(identity or {}, **config.identity())
        self.ctx = ctx or Dist()
        self.device = device or pick_device(config.device, self.ctx)
        config.check_split(self.ctx.world)
        self.per_process = config.batch_size // self.ctx.world
        self.micro = self.per_process // config.grad_accum
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter of the model requires grad")
        self.checkpoint_path = os.path.join(output_dir, artifacts.CHECKPOINT)
        self.log_path = os.path.join(output_dir, artifacts.LOG_FILE)

    # ---------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        cfg, ctx = self.config, self.ctx
        seed_everything(cfg.seed + ctx.rank)  # dropout streams differ per process
        stream = ShuffledStream(len(self.items), cfg.seed)
        mask_gen = torch.Generator().manual_seed(cfg.seed + 7919)  # same on every process
        fused = self.device.type == "cuda" and all(p.is_cuda and p.dtype == torch.float32 for _, p in self.params)
        optimizer = torch.optim.AdamW([p for _, p in self.params], lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay, fused=fused or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, cfg.steps))
        state = {"step": 0, "history": [], "best": None, "elapsed": 0.0, "tokens": 0}
        if resume and os.path.isfile(self.checkpoint_path):
            state = self._load_checkpoint(optimizer, scheduler, stream, mask_gen)
            log.info("resumed from %s at step %d of %d", self.checkpoint_path, state["step"], cfg.steps)
        elif resume:
            log.info("no checkpoint in %s: starting the run from step 0", self.output_dir)
        if ctx.main:
            os.makedirs(self.output_dir, exist_ok=True)
            artifacts.atomic_write_bytes(self.log_path, lambda p: _write_log(p, state["history"]))
        ctx.barrier()

        module = _LossModule(self.model, self.objective)
        ddp = None
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        runner = ddp or module
        self.model.train()
        memory = PeakMemory(self.device)
        segment_start = time.perf_counter()
        history, step = state["history"], state["step"]
        progress = _progress(cfg, ctx, step)
        pending: list[tuple[dict, torch.Tensor]] = []  # losses still on the device (no host sync per step)

        def flush():
            for entry, loss_t in pending:
                entry["loss"] = float(loss_t)
                history.append(entry)
                self._append_log(entry)
            pending.clear()

        try:
            while step < cfg.steps:
                step += 1
                loss_t, tokens = self._step(runner, ddp, stream, mask_gen, optimizer, scheduler)
                state["tokens"] += tokens
                # the learning rate this step used (the schedule has already moved on to the next one)
                pending.append(({"step": step, "lr": cfg.learning_rate * scheduler.lr_lambdas[0](step - 1)}, loss_t))
                progress.update(1)
                evaluate = self.evaluate_fn and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                save = step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
                logged = cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps)
                if logged or evaluate or save or not cfg.log_every:
                    flush()
                if logged:
                    last = history[-1]
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                    if not progress.enabled:
                        log.info("step %d/%d  loss %.4f  lr %.3e", step, cfg.steps, last["loss"], last["lr"])
                if evaluate:
                    metrics = self._evaluate(step, state)
                    history.append({"step": step, "eval": metrics})
                    self._append_log(history[-1])
                if save:
                    state.update(step=step, elapsed=state["elapsed"] + time.perf_counter() - segment_start)
                    segment_start = time.perf_counter()
                    self._save_checkpoint(state, optimizer, scheduler, stream, mask_gen)
        finally:
            progress.close()
        state["elapsed"] += time.perf_counter() - segment_start
        evals = [h["eval"] for h in history if "eval" in h]
        summary = {"steps": cfg.steps, "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
                   "final_eval": evals[-1] if evals else None, "best": state["best"],
                   "train_time_s": state["elapsed"], "train_tokens": state["tokens"],
                   "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "world_size": ctx.world,
                   "device": str(self.device), **memory.read()}
        return summary

    # ---------------------------------------------------------------------------------------------------
    def _step(self, runner, ddp, stream, mask_gen, optimizer, scheduler) -> tuple[torch.Tensor, int]:
        """One optimizer step; returns the global mean loss (a device scalar) and the tokens it saw."""
        cfg, ctx = self.config, self.ctx
        indices = stream.take(cfg.batch_size)
        batch = self.objective.make_batch([self.items[i] for i in indices], mask_gen)
        total = max(self.objective.count(batch), 1)
        tokens = self.objective.num_tokens(batch)
        mine = slice_batch(batch, ctx.rank * self.per_process, (ctx.rank + 1) * self.per_process)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in range(cfg.grad_accum):
            micro = self.objective.prepare(slice_batch(mine, a * self.micro, (a + 1) * self.micro))
            micro = model_batch(self.model, micro, self.device)
            sync = ddp.no_sync() if ddp is not None and a < cfg.grad_accum - 1 else nullcontext()
            with sync:
                loss_sum += self._micro_step(runner, micro, ctx.world / total)
        if ctx.enabled:
            dist.all_reduce(loss_sum)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / total, tokens

    def _micro_step(self, runner, micro: dict, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch already on the device; returns its loss sum (float64,
        on the device). Everything here is queued without waiting for the device (tests check it)."""
        with autocast(self.device, self.config.bf16):
            part = runner(micro)
        (part * scale).backward()
        return part.detach().double()

    def _evaluate(self, step: int, state: dict) -> dict:
        metrics = None
        if self.ctx.main:
            t0 = time.perf_counter()
            metrics = dict(self.evaluate_fn())
            metrics["eval_time_s"] = time.perf_counter() - t0
            log.info("step %d eval: %s", step, _fmt(metrics))
        if self.ctx.enabled:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        if self.main_metric:
            value = metrics[self.main_metric]
            best = state["best"]
            better = best is None or (value > best["value"] if self.greater else value < best["value"])
            if better:
                state["best"] = {"step": step, "value": value, "metric": self.main_metric}
                if self.ctx.main and self.on_best:
                    self.on_best(step, metrics)
                self.ctx.barrier()
        return metrics

    def _append_log(self, entry: dict) -> None:
        if self.ctx.main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(_json_line(entry))

    # ---------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, state, optimizer, scheduler, stream, mask_gen) -> None:
        rngs = [rng_state()]
        if self.ctx.enabled:
            rngs = [None] * self.ctx.world
            dist.all_gather_object(rngs, rng_state())
        if self.ctx.main:
            ckpt = {
                "format": "madx_fast.checkpoint", "version": 1, "identity": self.identity,
                "step": state["step"], "history": state["history"], "best": state["best"],
                "elapsed": state["elapsed"], "tokens": state["tokens"], "world_size": self.ctx.world,
                "trainable": {n: p.detach().to("cpu").clone() for n, p in self.params},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "stream": stream.state_dict(), "mask_generator": mask_gen.get_state(), "rng": rngs,
            }
            artifacts.atomic_write_bytes(self.checkpoint_path, lambda p: torch.save(ckpt, p))
        self.ctx.barrier()

    def _load_checkpoint(self, optimizer, scheduler, stream, mask_gen) -> dict:
        ckpt = read_checkpoint(self.checkpoint_path)
        diff = {k: (ckpt["identity"].get(k), v) for k, v in self.identity.items() if ckpt["identity"].get(k) != v}
        diff.update({k: (v, None) for k, v in ckpt["identity"].items() if k not in self.identity})
        if diff:
            listing = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{self.checkpoint_path} belongs to a run with other settings ({listing}); resume "
                             "with the original settings, or start over with --overwrite")
        names = {n for n, _ in self.params}
        if set(ckpt["trainable"]) != names:
            raise ValueError(f"{self.checkpoint_path}: trainable parameters differ from this run's "
                             f"({len(ckpt['trainable'])} vs {len(names)})")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(ckpt["trainable"][n])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        stream.load_state_dict(ckpt["stream"])
        mask_gen.set_state(ckpt["mask_generator"])
        rngs = ckpt["rng"]
        if len(rngs) != self.ctx.world:
            log.warning("the checkpoint was written by %d process(es), this run has %d: the data order and masks "
                        "continue exactly, the dropout random streams do not", len(rngs), self.ctx.world)
        set_rng_state(rngs[self.ctx.rank % len(rngs)])
        return {k: ckpt[k] for k in ("step", "history", "best", "elapsed", "tokens")}


def read_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is reported as such
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "madx_fast.checkpoint":
        raise ValueError(f"{path} is not a madx_fast training checkpoint")
    return ckpt


def _progress(cfg: TrainConfig, ctx: Dist, start: int):
    enabled = cfg.progress and ctx.main
    if enabled:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
            bar.enabled = True
            return bar
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return _NoBar()


class _NoBar:
    enabled = False

    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _json_line(entry: dict) -> str:
    import json
    return json.dumps(entry, sort_keys=True, default=float) + "\n"


def _write_log(path: str, history: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for entry in history:
            f.write(_json_line(entry))


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def read_log(path: str) -> list[dict]:
    """The entries of a run's ``log.jsonl``."""
    import json
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["Dist", "TrainConfig", "Trainer", "init_distributed", "linear_schedule", "read_checkpoint", "read_log"]
