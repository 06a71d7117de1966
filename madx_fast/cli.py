"""``madx``: the command line, a thin layer over ``madx_fast.training``.

    madx train-lang  --model xlm-roberta-base --lang sw --train-data data/sw.txt --output runs/lang-sw
    madx train-task  --task ner --lang-adapter runs/lang-en --train-data wikiann:en --output runs/ner-en
    madx transfer    --task-adapter runs/ner-en --lang-adapter sw=runs/lang-sw --targets sw \\
                     --eval-data wikiann:{lang} --output runs/transfer
    madx params      [--model NAME] [--langs en,sw]
    madx demo        (offline, CPU, a few minutes)

Data-parallel training: ``torchrun --nproc_per_node N -m madx_fast.cli train-lang ...`` (same arguments;
``--batch-size`` stays the global batch). Every command checks its inputs before it starts working and
exits with status 2 and a one-line reason when one is wrong.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("madx_fast.training")


def _loop_args(p: argparse.ArgumentParser, *, steps, batch, lr, save_every=500) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=batch,
                   help=f"global batch: all processes and accumulation steps together (default {batch})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps, then linear decay to 0")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    g.add_argument("--backbone-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="keep the frozen backbone in this dtype; adapters stay float32 (default auto: bfloat16 "
                        "on a GPU, float32 on the CPU)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint (starts fresh if there is none)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --output")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--backend", default=None, choices=["auto", "eager", "triton", "cuda"],
                   help="adapter kernels (default: triton on CUDA, eager on CPU)")
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def _train_config(a):
    from .training import TrainConfig
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr, warmup_steps=a.warmup_steps,
                       weight_decay=a.weight_decay, grad_accum=a.grad_accum, max_grad_norm=a.max_grad_norm or None,
                       bf16=a.bf16, seed=a.seed, log_every=a.log_every, eval_every=a.eval_every,
                       save_every=a.save_every, eval_batch_size=a.eval_batch_size, progress=not a.no_progress,
                       device=a.device)


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="madx", description="MAD-X adapters: train, transfer, count, demo.")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-lang", help="stage 1: a language adapter (+ invertible adapter) by masked-LM")
    p.add_argument("--model", required=True, help="HF masked-LM model name or directory (e.g. xlm-roberta-base)")
    p.add_argument("--lang", required=True, help="language code; also the adapter's name")
    p.add_argument("--train-data", required=True,
                   help="text file, directory of text files, or HF dataset 'name[:config]'; {lang} expands")
    p.add_argument("--eval-data", default=None, help="held-out text (default: the last --eval-fraction of it)")
    p.add_argument("--eval-fraction", type=float, default=0.01)
    p.add_argument("--train-split", default="train", help="split of an HF dataset --train-data")
    p.add_argument("--eval-split", default="validation", help="split of an HF dataset --eval-data")
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--max-length", type=int, default=None, help="block length (default 256, or the model's limit)")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--reduction-factor", type=float, default=2)
    p.add_argument("--no-invertible", action="store_true", help="no NICE invertible adapter (MAD-X -INV)")
    p.add_argument("--leave-out", type=int, nargs="*", default=[], help="layers without an adapter")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-texts", type=int, default=None, help="read at most this many texts (streams datasets)")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: --model)")
    p.add_argument("--export-adapterhub", action="store_true", help="also write <output>/adapterhub")
    _loop_args(p, steps=250_000, batch=64, lr=1e-4)

    p = sub.add_parser("train-task", help="stage 2: a task adapter on a frozen language adapter")
    p.add_argument("--task", required=True, help="ner (WikiANN format), qa (SQuAD format), copa (COPA/XCOPA)")
    p.add_argument("--train-data", required=True, help="file, directory with split files, or HF dataset")
    p.add_argument("--validation-data", default=None,
                   help="default: the validation split of --train-data when it is a dataset or directory")
    p.add_argument("--train-split", default="train")
    p.add_argument("--validation-split", default="validation")
    p.add_argument("--lang-adapter", default=None,
                   help="the source language adapter (run or adapter directory); omit for MAD-X -LAD -INV")
    p.add_argument("--lang", default=None, help="source language (default: the language adapter's)")
    p.add_argument("--model", default=None, help="base model (default: the one the language adapter was trained on)")
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--name", default=None, help="task adapter name (default: the task)")
    p.add_argument("--labels", default=None, help="NER label names in id order, comma-separated")
    p.add_argument("--epochs", type=float, default=None, help="sets --steps to epochs x batches per epoch")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--reduction-factor", type=float, default=16)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--tokenizer", default=None)
    _loop_args(p, steps=1000, batch=16, lr=1e-4)

    p = sub.add_parser("transfer", help="stage 3: zero-shot transfer matrix (swap the language adapter)")
    p.add_argument("--task-adapter", nargs="+", required=True, help="task adapter run or bundle directories")
    p.add_argument("--lang-adapter", nargs="*", default=[], metavar="LANG=DIR",
                   help="language adapters, e.g. sw=runs/lang-sw")
    p.add_argument("--targets", required=True, help="comma-separated target languages")
    p.add_argument("--eval-data", required=True, help="evaluation data spec with {lang}, e.g. wikiann:{lang}")
    p.add_argument("--split", default="test")
    p.add_argument("--settings", default="target", help="comma-separated: target, source, none")
    p.add_argument("--system", default="MAD-X", help="name of this system in the report")
    p.add_argument("--model", default=None, help="base model (default: the one the adapters were trained on)")
    p.add_argument("--output", required=True, help="directory for the CSV / JSON / PNG report")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--backbone-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="keep the frozen backbone in this dtype (default auto: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each evaluation forward from CUDA graphs (NER, QA): less host time per batch")
    p.add_argument("--backend", default=None, choices=["auto", "eager", "triton", "cuda"])

    p = sub.add_parser("params", help="parameter counts per language and task (MAD-X budget)")
    p.add_argument("--model", default=None, help="model name or directory (default: XLM-R base, offline)")
    p.add_argument("--langs", default="en", help="comma-separated languages to count")
    p.add_argument("--lang-reduction-factor", type=float, default=2)
    p.add_argument("--task-reduction-factor", type=float, default=16)
    p.add_argument("--no-invertible", action="store_true")

    p = sub.add_parser("demo", help="the whole MAD-X pipeline offline on synthetic languages (a few CPU minutes)")
    p.add_argument("--output-dir", default="madx_demo_out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in --output-dir")
    p.add_argument("--model", default=None,
                   help="a pretrained base model instead of the small one (then the paper's lr / batch / reduction "
                        "factors, 10k MLM steps, 10 NER epochs, length 128; override with the flags below)")
    p.add_argument("--text-data", default=None, help="unlabeled text per language ({lang}) for real data")
    p.add_argument("--text-eval-data", default=None)
    p.add_argument("--ner-data", default=None, help="NER data per language ({lang}), e.g. wikiann:{lang}")
    p.add_argument("--max-texts", type=int, default=None)
    p.add_argument("--sources", default=None, help="comma-separated source languages (default alpha)")
    p.add_argument("--targets", default=None, help="comma-separated target languages (default alpha,beta,gamma)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--lang-steps", type=int, default=None)
    p.add_argument("--task-epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="MLM batch (pretraining, language adapters)")
    p.add_argument("--task-batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--no-ablations", action="store_true", help="skip MAD-X -INV and -LAD -INV")
    p.add_argument("--no-cache", action="store_true", help="pretrain the base model even if it is cached")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--backend", default=None, choices=["auto", "eager", "triton", "cuda"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return parser


def cmd_train_lang(a) -> None:
    from .training import train_language_adapter
    train_language_adapter(model=a.model, lang=a.lang, train_data=a.train_data, output_dir=a.output,
                           config=_train_config(a), eval_data=a.eval_data, eval_fraction=a.eval_fraction,
                           train_split=a.train_split, eval_split=a.eval_split,
                           text_column=a.text_column, max_texts=a.max_texts, max_length=a.max_length,
                           mlm_probability=a.mlm_probability, reduction_factor=a.reduction_factor,
                           invertible=not a.no_invertible, leave_out=a.leave_out, backend=a.backend,
                           backbone_dtype=a.backbone_dtype, tokenizer=a.tokenizer, resume=a.resume,
                           overwrite=a.overwrite, export_adapterhub=a.export_adapterhub)


def cmd_train_task(a) -> None:
    from .training import train_task_adapter
    train_task_adapter(task=a.task, train_data=a.train_data, output_dir=a.output, model=a.model,
                       lang_adapter=a.lang_adapter, lang=a.lang, validation_data=a.validation_data,
                       train_split=a.train_split, validation_split=a.validation_split,
                       labels=_csv(a.labels) or None, name=a.name, config=_train_config(a), epochs=a.epochs,
                       max_length=a.max_length, reduction_factor=a.reduction_factor,
                       max_train_examples=a.max_train_examples, max_eval_examples=a.max_eval_examples,
                       backend=a.backend, backbone_dtype=a.backbone_dtype, tokenizer=a.tokenizer,
                       resume=a.resume, overwrite=a.overwrite)


def cmd_transfer(a) -> None:
    from .training import evaluate_transfer
    from .training.transfer import format_table
    langs = {}
    for item in a.lang_adapter:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise ValueError(f"--lang-adapter takes LANG=DIR, got {item!r}")
        if lang in langs:
            raise ValueError(f"--lang-adapter names {lang!r} twice")
        langs[lang] = path
    result = evaluate_transfer(task_adapters=a.task_adapter, lang_adapters=langs, targets=_csv(a.targets),
                               eval_data=a.eval_data, split=a.split, settings=_csv(a.settings), system=a.system,
                               model=a.model, batch_size=a.batch_size, max_examples=a.max_examples,
                               device=a.device, bf16=a.bf16, backend=a.backend, backbone_dtype=a.backbone_dtype,
                               cuda_graphs=a.cuda_graphs, output_dir=a.output)
    print(format_table(result["records"]))
    print(f"report written to {a.output} ({result['wall_time_s']:.1f} s)")


def cmd_params(a) -> None:
    from .model.params import format_parameter_budget, parameter_budget
    from .training.stages import load_config
    config = load_config(a.model) if a.model else None
    print(format_parameter_budget(parameter_budget(config, model_name=a.model, languages=_csv(a.langs) or ["en"],
                                                   lang_reduction_factor=a.lang_reduction_factor,
                                                   task_reduction_factor=a.task_reduction_factor,
                                                   invertible=not a.no_invertible)))


def cmd_demo(a) -> None:
    from .training.demo import DemoConfig, real_model_config, run_demo
    if (a.text_data or a.ner_data) and not (a.sources and a.targets):
        raise ValueError("with --text-data / --ner-data, name the languages: --sources en --targets en,sw")
    common = dict(output_dir=a.output_dir, overwrite=a.overwrite, text_data=a.text_data,
                  text_eval_data=a.text_eval_data, ner_data=a.ner_data, max_texts=a.max_texts,
                  ablations=not a.no_ablations, use_cache=not a.no_cache, cache_dir=a.cache_dir, device=a.device,
                  bf16=a.bf16, backend=a.backend, progress=not a.no_progress)
    cfg = real_model_config(a.model, **common) if a.model else DemoConfig(**common)
    if a.sources:
        cfg.sources = _csv(a.sources)
    if a.targets:
        cfg.targets = _csv(a.targets)
    for arg, attr in (("pretrain_steps", "pretrain_steps"), ("lang_steps", "lang_steps"),
                      ("task_epochs", "task_epochs"), ("batch_size", "batch_size"),
                      ("task_batch_size", "task_batch_size"), ("max_length", "max_length"),
                      ("seed", "seed")):
        if getattr(a, arg) is not None:
            setattr(cfg, attr, getattr(a, arg))
    run_demo(cfg)


COMMANDS = {"train-lang": cmd_train_lang, "train-task": cmd_train_task, "transfer": cmd_transfer,
            "params": cmd_params, "demo": cmd_demo}


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
    from .model import AdapterConfigError, AdapterExistsError, AdapterFileError
    from .training import BundleError, DataError
    expected = (FileNotFoundError, FileExistsError, NotADirectoryError, DataError, BundleError, AdapterFileError,
                AdapterConfigError, AdapterExistsError, ValueError, KeyError, OSError)
    try:
        COMMANDS[args.command](args)
    except expected as exc:
        if os.environ.get("MADX_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"madx {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"madx {args.command}: interrupted (with --save-every, --resume continues from the last checkpoint)",
              file=sys.stderr)
        return 130
    finally:
        _shutdown_distributed()
    return 0


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
