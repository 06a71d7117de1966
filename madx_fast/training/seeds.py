"""Repeated runs that differ only in their seed, so that every cell of a report can carry a mean and a spread.

``madx train-task --seeds 1,2,3 --output runs/ner-en`` trains one run per seed, in ``runs/ner-en/seed-1``,
``seed-2``, ``seed-3`` (each a complete run directory, its own ``config.seed``); ``madx transfer`` takes
``runs/ner-en`` for all of them (``seed_runs``), and ``madx report`` puts the mean and standard deviation over
the seeds in each cell. Every seed's output directory is checked before the first run starts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Callable

from . import runs

log = logging.getLogger("madx_fast.training")

SEED_DIR = "seed-{}"
_SEED_DIR_RE = re.compile(r"^seed-(\d+)$")


def seed_dir(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, SEED_DIR.format(seed))


def seed_runs(path: str) -> list[str]:
    """The ``seed-<N>`` run directories of a local directory of repeated runs, in seed order; ``[path]`` for
    anything else (a run directory, a bundle, a Hub name)."""
    local = os.path.expanduser(path)
    if not os.path.isdir(local) or os.path.isfile(os.path.join(local, runs.RUN_SUMMARY)):
        return [path]
    found = sorted((int(m.group(1)), name) for name in os.listdir(local) if (m := _SEED_DIR_RE.match(name))
                   and os.path.isdir(os.path.join(local, name)))
    return [os.path.join(path, name) for _, name in found] or [path]


def train_each_seed(run_one: Callable, settings) -> dict:
    """``run_one(settings of one seed)`` for every seed of ``settings.seeds``: ``output_dir`` the seed's
    directory, ``config.seed`` the seed, ``seeds`` None (one run). Returns ``{"seeds", "output_dir", "runs": [run.json of each]}``."""
    dirs = [seed_dir(settings.output_dir, seed) for seed in settings.seeds]
    for d in dirs:  # a refusal (an earlier run there) before the first seed trains
        runs.check_output_dir(d, resume=settings.resume, overwrite=settings.overwrite)
    summaries = []
    for seed, d in zip(settings.seeds, dirs):
        log.info("seed %d of %s: %s", seed, settings.seeds, d)
        one = dataclasses.replace(settings, output_dir=d, seeds=None, config=dataclasses.replace(settings.config, seed=seed))
        summaries.append(run_one(one))
    return {"seeds": list(settings.seeds), "output_dir": settings.output_dir, "runs": summaries}


__all__ = ["seed_dir", "seed_runs", "train_each_seed"]
