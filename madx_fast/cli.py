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
    madx merge       --output runs/lang-qu es=runs/lang-es pt=runs/lang-pt --weights 0.7,0.3 --name qu
    madx push        runs/lang-sw me/madx-lang-sw      (a run or adapter onto the Hugging Face Hub, with a card)
    madx params      [--model NAME] [--langs en,sw]
    madx demo        (offline, CPU, a few minutes)

Data-parallel training: ``torchrun --nproc_per_node N -m madx_fast.cli train-lang ...`` (same arguments;
``--batch-size`` stays the global batch). Every command checks its inputs before it starts working and
exits with status 2 and a one-line reason when one is wrong; so does a command that cannot write an output
(no space, read-only, ...: the line names the file and the cause, and what was there before is unchanged). A
run that diverges (non-finite loss) stops with status 1 without writing outputs from the diverged state.
``madx predict`` exits with status 3 when it finished but left lines unpredicted (malformed, too long, or in
a language without an adapter; each reported on stderr), with status 2 when it has to read a standard input
the process was started without (``<&-``) or write a standard output it was started without (``>&-``), and
with status 141 (what a shell shows for a program stopped by SIGPIPE), silently, when the reader of its
standard output went away (``madx predict ... | head``). An interrupted command (Ctrl-C) exits with 130.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("madx_fast.training")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .training.settings import (LanguageAdapterSettings, MergeSettings, ParameterBudgetSettings, PredictSettings,
                                    PushSettings, ReportSettings, TaskAdapterSettings, TransferSettings,
                                    add_arguments)

    parser = argparse.ArgumentParser(prog="madx", description="MAD-X adapters: train, transfer, report, predict, "
                                     "merge, push, count, demo.", epilog="madx COMMAND -h: the options of a command")
    _add_verbosity(parser)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity(common, after_command=True)  # -q / -v also after the command

    def command(name: str, help: str, cls, **kwargs) -> None:  # noqa: A002
        add_arguments(sub.add_parser(name, help=help, description=help, parents=[common]), cls, **kwargs)

    command("train-lang", "stage 1: a language adapter (+ invertible adapter) by masked-LM (--full-model: the whole "
            "model, MLM-SRC / MLM-TRG)", LanguageAdapterSettings)
    command("train-task", "stage 2: a task adapter on a frozen language adapter (--full-finetune: the whole model, "
            "the XLM-R baseline)", TaskAdapterSettings)
    command("transfer", "stage 3: zero-shot transfer matrix (swap the language adapter)", TransferSettings)
    command("report", "transfer results of separate runs (madx transfer --output) in one matrix: CSV, JSON, "
            "Markdown, heatmaps", ReportSettings)
    command("predict", "label JSON lines of many languages in mixed batches (a language adapter per line under one "
            "task adapter)", PredictSettings)
    command("merge", "one adapter averaged from several (a language without text of its own from related "
            "languages' adapters)", MergeSettings)
    command("push", "upload a run, bundle or adapter directory to the Hugging Face Hub, with a model card",
            PushSettings)
    command("params", "parameter counts per language and task (MAD-X budget)", ParameterBudgetSettings)
    command("demo", "the whole MAD-X pipeline offline on synthetic languages (a few CPU minutes)", DemoConfig,
            given_only=True)
    return parser


def _add_verbosity(parser, after_command: bool = False) -> None:
    """``-q`` / ``-v``; after the command they only override what was given before it (argparse.SUPPRESS)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if after_command else False,
                        help="warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if after_command else 0,
                        help="more detail: -v debug lines and the libraries' info, -vv everything")


def _version() -> str:
    from importlib import metadata

    from ._version import __version__
    found = []
    for package in ("torch", "triton", "transformers"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return f"madx_fast {__version__} ({', '.join(found)})"


def check_names(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Before argparse reads ``argv``: a mistyped command, or a flag the command does not have, is answered with
    that command's usage and the nearest names (argparse would report a missing required flag first, or
    print the top-level usage for a flag after the command). Exits with status 2 like argparse."""
    import difflib
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = {o for a in parser._actions for o in a.option_strings}
    position = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if position is None or any(a in ("-h", "--help", "--version") for a in argv[:position]):
        return
    name = argv[position]
    if name not in sub.choices:
        near = difflib.get_close_matches(name, list(sub.choices), n=1, cutoff=0.5)
        parser.error(f"unknown command {name!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                     f" (commands: {', '.join(sub.choices)})"))
    command = sub.choices[name]
    known = {o for a in command._actions for o in a.option_strings}
    for arg in argv[:position] + argv[position + 1:]:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-") or flag == "-" or _number(flag) or flag in known or flag in top:  # "-": stdin
            continue
        prefixed = [o for o in known if o.startswith(flag) and flag.startswith("--")]
        if len(prefixed) == 1:  # argparse's unique abbreviation
            continue
        near = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
        command.error(f"unrecognized argument {flag}" + (f"; did you mean {near[0]}?" if near else
                                                        f" (madx {name} -h lists the options)"))


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
# The reader of standard output went away (a closed pipe): stop silently, as a Unix tool stopped by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13


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


def cmd_merge(args) -> None:
    from .training.merge import merge_adapters
    from .training.settings import MergeSettings, from_args
    result = merge_adapters(from_args(MergeSettings, args))
    weights = ", ".join(f"{n} {w:.4g}" for n, w in zip(result["inputs"], result["weights"]))
    print(f"merged adapter {result['name']!r} ({weights}) written to {result['path']}")


def cmd_push(args) -> None:
    from .training.publish import push
    from .training.settings import PushSettings, from_args
    print(push(from_args(PushSettings, args))["url"])


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
            "report": cmd_report, "predict": cmd_predict, "merge": cmd_merge, "push": cmd_push, "params": cmd_params,
            "demo": cmd_demo}


def _hold_standard_descriptors() -> None:
    """A standard descriptor the process was started without (``<&-``, ``>&-``, ``2>&-``) gets /dev/null, so
    that no file opened later takes its number and receives what was meant for it. Python has already set
    ``sys.stdin`` / ``sys.stdout`` to None for such a descriptor (commands that need one refuse: predict);
    a missing ``sys.stderr`` becomes /dev/null."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the rest of the process


def _stdout_gone() -> bool:
    """Whether standard output is a pipe or socket whose reader has gone (poll says error or hang-up)."""
    import select
    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """/dev/null in place of a standard output whose reader has gone, so that nothing else fails writing to
    it (Python's own flush at exit included)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def _stderr_line(text: str) -> None:
    """``text`` and its newline on stderr in one write. Data-parallel processes share the stream, and
    ``print`` writes a text and its newline separately (stderr is write-through): two processes' lines could
    run together on one line."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    _hold_standard_descriptors()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    check_names(parser, argv)
    args = parser.parse_args(argv)
    from . import logs
    logs.setup(-1 if args.quiet else args.verbose, int(os.environ.get("RANK", "0")))
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
    except BrokenPipeError as exc:
        if not _stdout_gone():
            _stderr_line(f"madx {args.command}: error: {exc}")
            return 2
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except TrainingDiverged as exc:  # the inputs were fine; the run failed
        if os.environ.get("MADX_DEBUG"):
            raise
        _stderr_line(f"madx {args.command}: error: {exc}")
        return 1
    except expected as exc:
        if os.environ.get("MADX_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        _stderr_line(f"madx {args.command}: error: {msg}")
        return 2
    except KeyboardInterrupt:
        hint = " (with --save-every, --resume continues from the last checkpoint)" if args.command.startswith(
            "train") else ""
        _stderr_line(f"madx {args.command}: interrupted{hint}")
        return 130
    finally:
        from .training.distributed import shutdown_distributed
        shutdown_distributed(wait_for_peers=finished)
    return status or 0


def run() -> None:
    """The ``madx`` command (console script and ``python -m madx_fast.cli``): ``main()``, then exit with its
    status. A data-parallel process (``WORLD_SIZE`` > 1, torchrun) leaves with ``os._exit`` once its streams
    and logs are flushed: by then ``main`` has closed every file and left the process group, and what is left
    for the interpreter's shutdown is destroying the distributed backend's threads, which aborts a process now
    and then (gloo: "terminate called without an active exception", SIGABRT) after a run that succeeded."""
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import logging
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
