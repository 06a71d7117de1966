"""``madx``: the command line, a thin layer over ``madx_fast.training``.

    madx train-lang  --model xlm-roberta-base --lang sw --train-data data/sw.txt --output runs/lang-sw
    madx train-task  --task ner --lang-adapter runs/lang-en --train-data wikiann:en --output runs/ner-en
    madx transfer    --task-adapter runs/ner-en --lang-adapter sw=runs/lang-sw --targets sw \\
                     --eval-data wikiann:{lang} --output runs/transfer
    madx train-task  --task ner --full-finetune --model xlm-roberta-base --lang en --train-data wikiann:en \\
                     --seeds 1,2,3 --output runs/xlmr-ner-en                  (the XLM-R baseline, 3 seeds)
    madx report      runs/transfer runs/transfer-xlmr --output runs/report  (one matrix from several runs)
    madx predict     --task-adapter runs/ner-en --lang-adapter sw=runs/lang-sw qu=runs/lang-qu \\
                     --input lines.jsonl --output predictions.jsonl
    madx params      [--model NAME] [--langs en,sw]
    madx demo        (offline, CPU, a few minutes)

Data-parallel training: ``torchrun --nproc_per_node N -m madx_fast.cli train-lang ...`` (same arguments;
``--batch-size`` stays the global batch). Every command checks its inputs before it starts working and
exits with status 2 and a one-line reason when one is wrong; a run that diverges (non-finite loss) stops with
status 1 without writing outputs from the diverged state. ``madx predict`` exits with status 3 when it
finished but left lines unpredicted (malformed, or in a language without an adapter; each reported on stderr).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("madx_fast.training")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .training.settings import (LanguageAdapterSettings, ParameterBudgetSettings, PredictSettings,
                                    ReportSettings, TaskAdapterSettings, TransferSettings, add_arguments)

    parser = argparse.ArgumentParser(prog="madx", description="MAD-X adapters: train, transfer, predict, count, demo.")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("train-lang", help="stage 1: a language adapter (+ invertible adapter) by "
                                 "masked-LM (--full-model: the whole model, MLM-SRC / MLM-TRG)"), LanguageAdapterSettings)
    add_arguments(sub.add_parser("train-task", help="stage 2: a task adapter on a frozen language adapter "
                                 "(--full-finetune: the whole model, the XLM-R baseline)"), TaskAdapterSettings)
    add_arguments(sub.add_parser("transfer", help="stage 3: zero-shot transfer matrix (swap the language "
                                 "adapter)"), TransferSettings)
    add_arguments(sub.add_parser("report", help="transfer results of separate runs (madx transfer --output) in one "
                                 "matrix: CSV, JSON, Markdown, heatmaps"), ReportSettings)
    add_arguments(sub.add_parser("predict", help="label JSON lines of many languages in mixed batches (a language "
                                 "adapter per line under one task adapter)"), PredictSettings)

    add_arguments(sub.add_parser("params", help="parameter counts per language and task (MAD-X budget)"),
                  ParameterBudgetSettings)
    add_arguments(sub.add_parser("demo", help="the whole MAD-X pipeline offline on synthetic languages (a few CPU "
                                 "minutes)"), DemoConfig, given_only=True)
    return parser


def cmd_train_lang(args) -> None:
    from .training import LanguageAdapterSettings, train_language
    from .training.settings import from_args
    train_language(from_args(LanguageAdapterSettings, args))


def cmd_train_task(args) -> None:
    from .training import TaskAdapterSettings, train_task
    from .training.settings import from_args
    train_task(from_args(TaskAdapterSettings, args))


def cmd_transfer(args) -> None:
    from .training import TransferSettings, evaluate_transfer
    from .training.report import build_report, format_report
    from .training.settings import from_args
    result = evaluate_transfer(from_args(TransferSettings, args))
    print(format_report(build_report(result["records"])))
    print(f"report written to {args.output_dir} ({result['wall_time_s']:.1f} s)" if args.output_dir else
          f"({result['wall_time_s']:.1f} s)")


def cmd_report(args) -> None:
    from .training.report import merge_runs
    from .training.settings import ReportSettings, from_args
    merge_runs(from_args(ReportSettings, args), echo=print)


# ``madx predict`` finished, but some lines were not predicted (each reported on stderr with its number).
EXIT_LINES_NOT_PREDICTED = 3


def cmd_predict(args) -> int:
    from .training.predict import predict
    from .training.settings import PredictSettings, from_args
    summary = predict(from_args(PredictSettings, args))
    bad = summary["errors"]
    numbers = ", ".join(str(e["line"]) for e in summary["first_errors"][:10])
    more = ", ..." if bad > 10 else ""
    log.info("predict: %d lines, %d predicted, %d not predicted%s in %.1f s (%.0f lines/s)", summary["lines"],
             summary["predicted"], bad, f" ({'line' if bad == 1 else 'lines'} {numbers}{more})" if bad else "",
             summary["wall_time_s"],
             summary["lines_per_s"])
    return EXIT_LINES_NOT_PREDICTED if bad else 0


def cmd_params(args) -> None:
    from .model.params import format_parameter_budget, parameter_budget
    from .training.models import load_config
    from .training.settings import ParameterBudgetSettings, from_args
    s = from_args(ParameterBudgetSettings, args)
    config = load_config(s.model) if s.model else None
    print(format_parameter_budget(parameter_budget(config, model_name=s.model, languages=s.langs or ["en"],
                                                   lang_reduction_factor=s.lang_reduction_factor,
                                                   task_reduction_factor=s.task_reduction_factor,
                                                   invertible=s.invertible)))


def cmd_demo(args) -> None:
    from .demo import DemoConfig, real_model_config, run_demo
    from .training.settings import args_values
    given = args_values(DemoConfig, args)  # only the flags given: --model changes the defaults of the others
    if (given.get("text_data") or given.get("ner_data")) and not (given.get("sources") and given.get("targets")):
        raise ValueError("with --text-data / --ner-data, name the languages: --sources en --targets en,sw")
    run_demo(real_model_config(**given) if given.get("model") else DemoConfig(**given))


COMMANDS = {"train-lang": cmd_train_lang, "train-task": cmd_train_task, "transfer": cmd_transfer,
            "report": cmd_report, "predict": cmd_predict, "params": cmd_params, "demo": cmd_demo}


class _ProgressAwareHandler(logging.StreamHandler):
    """Log lines printed above a running tqdm bar instead of through it."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - never lose a log line over the progress bar
            super().emit(record)


def _setup_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("madx_fast.training")
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[madx] %(message)s" if rank == 0 else f"[madx rank {rank}] %(message)s"))
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from .training.progress import library_bars
    library_bars()  # in a log (stderr not a terminal), no library draws bar frames either
    from .backends import BackendUnavailableError
    from .model import AdapterConfigError, AdapterExistsError, AdapterFileError
    from .training import BundleError, DataError
    from .training.checkpoint import CheckpointError
    from .training.trainer import TrainingDiverged
    expected = (FileNotFoundError, FileExistsError, NotADirectoryError, DataError, BundleError, CheckpointError,
                AdapterFileError, AdapterConfigError, AdapterExistsError, BackendUnavailableError, ValueError, KeyError,
                OSError)
    finished = False
    try:
        status = COMMANDS[args.command](args)
        finished = True
    except TrainingDiverged as exc:  # the inputs were fine; the run failed
        if os.environ.get("MADX_DEBUG"):
            raise
        print(f"madx {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except expected as exc:
        if os.environ.get("MADX_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"madx {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (with --save-every, --resume continues from the last checkpoint)" if args.command.startswith(
            "train") else ""
        print(f"madx {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        from .training.distributed import shutdown_distributed
        shutdown_distributed(wait_for_peers=finished)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
