"""Training curves for experiment trackers: ``report_to=["tensorboard"]`` (``--report-to tensorboard``) writes
TensorBoard event files to ``<output>/tensorboard``; ``"wandb"`` logs to Weights & Biases (a run named after
the output directory, in the project ``$WANDB_PROJECT`` or ``madx_fast``; ``WANDB_MODE=offline`` keeps it on
disk under ``<output>/wandb``). Every logging step (``log_every``) reports

    train/loss            the mean loss of the steps since the previous logging step
    train/learning_rate   the learning rate of the step
    train/tokens_per_s    throughput since the previous logging step (evaluations and checkpoints excluded)
    train/steps_per_s
    eval/<metric>         at every evaluation (eval_every, and the last step): the task's metrics

under the names Hugging Face's Trainer uses. Both trackers are optional dependencies, checked when the
settings are (``check_report_to``): ``pip install tensorboard`` / ``pip install wandb``. A resumed run
continues the same TensorBoard curves (what an interrupted run wrote after its last checkpoint is dropped).
"""
from __future__ import annotations

import importlib.util
import json
import os

REPORT_TOOLS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tool -> the package it needs
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


def check_report_to(tools) -> None:
    """Refuse an unknown tool, or one whose package is not installed (saying what to install)."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"report_to must be a list of tools ({', '.join(REPORT_TOOLS)}), got {tools!r}")
    for tool in tools:
        if tool not in REPORT_TOOLS:
            raise ValueError(f"report_to {tool!r}: choose from {', '.join(REPORT_TOOLS)}")
        if importlib.util.find_spec(REPORT_TOOLS[tool]) is None:
            raise ValueError(f"--report-to {tool} needs the {REPORT_TOOLS[tool]} package, which is not installed: "
                             f"pip install {REPORT_TOOLS[tool]}")


class Reporters:
    """The trackers of one run: ``scalars(step, values)`` at each logging step, ``close()`` at the end.
    Without tools it does nothing."""

    def __init__(self, tools, output_dir: str, *, config: dict | None = None, start_step: int = 0):
        check_report_to(list(tools))
        self.writers = []
        for tool in dict.fromkeys(tools):
            self.writers.append(_TensorBoard(output_dir, config, start_step) if tool == "tensorboard" else
                                _Wandb(output_dir, config))

    def scalars(self, step: int, values: dict) -> None:
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            for writer in self.writers:
                writer.scalars(step, numbers)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class _TensorBoard:
    def __init__(self, output_dir: str, config: dict | None, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run drops the events an interrupted run wrote after its checkpoint
        self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR), flush_secs=30,
                                    purge_step=start_step + 1 if start_step else None)
        if config and not start_step:
            self.writer.add_text("run", "```\n" + json.dumps(config, indent=1, sort_keys=True, default=str) + "\n```")

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output_dir: str, config: dict | None):
        import wandb
        os.makedirs(os.path.join(output_dir, WANDB_DIR), exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "madx_fast"),
                              name=os.path.basename(os.path.abspath(output_dir)), dir=output_dir,
                              config=config or {})

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


__all__ = ["REPORT_TOOLS", "Reporters", "check_report_to"]
