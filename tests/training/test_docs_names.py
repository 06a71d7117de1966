"""The documentation shows only names that resolve: every dataset spec and adapter name in README.md,
docs/training.md and docs/model_api.md is a local path of the example (runs/..., data/...) or resolves through
the tables the code uses (``data.HUB_DATASETS``, ``hub.ADAPTERHUB_INDEX``), the same code paths the offline tests
exercise (tests/training/test_datasets.py, tests/model/test_hub.py). And what the docs say about train-task's
default length is what the code does."""
from __future__ import annotations

import re
import shlex

import pytest

from madx_fast.model import hub
from madx_fast.training import data as D
from madx_fast.training.settings import TaskAdapterSettings
from madx_fast.training.stages.task_adapter import task_loop
from madx_fast.training.tasks import task_class
from tests.helpers import ROOT

DOCS = ("README.md", "docs/training.md", "docs/model_api.md")
LOCAL_ROOTS = ("runs", "data", "adapters", "hub", "downloaded", "madx_demo_out")
DATA_FLAGS = ("--train-data", "--eval-data", "--validation-data", "--ner-data", "--text-data", "--text-eval-data")
ADAPTER_FLAGS = ("--lang-adapter", "--task-adapter")
PUBLISHED = {f"AdapterHub/{name}" for entries in hub.ADAPTERHUB_INDEX.values() for name in entries.values()}


def _commands(text: str):
    """Every `madx ...` / `torchrun ... madx_fast.cli ...` command of the code blocks, as argument lists."""
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("madx ") and "..." not in line:
                yield shlex.split(line)


def _flag_values(args, flags):
    for i, arg in enumerate(args):
        if arg in flags:
            for value in args[i + 1:]:
                if value.startswith("--"):
                    break
                yield value


def _python_names(text: str):
    """Data and adapter names in the Python examples: train_data= / eval_data= / lang_adapter= arguments and
    load_adapter / import_adapterhub calls."""
    data = re.findall(r"\b(?:train_data|eval_data)=\"([^\"]+)\"", text)
    adapters = re.findall(r"(?:load_adapter|import_adapterhub)\(\"([^\"]+)\"", text)
    adapters += re.findall(r"\blang_adapter=\"([^\"]+)\"", text)
    for group in re.findall(r"lang_adapters=\{([^}]*)\}", text):
        adapters += re.findall(r":\s*\"([^\"]+)\"", group)
    for group in re.findall(r"task_adapters=\[([^\]]*)\]", text):
        adapters += re.findall(r"\"([^\"]+)\"", group)
    return data, adapters


def _is_local(name: str) -> bool:
    return name.split("/")[0] in LOCAL_ROOTS or name.startswith((".", "/", "~"))


def _names():
    datasets, adapters = [], []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for args in _commands(text):
            targets = next(_flag_values(args, ("--targets",)), "sw").split(",")
            datasets += [(doc, v.replace("{lang}", targets[-1])) for v in _flag_values(args, DATA_FLAGS)]
            adapters += [(doc, v.partition("=")[2] if "=" in v else v) for v in _flag_values(args, ADAPTER_FLAGS)]
        py_data, py_adapters = _python_names(text)
        datasets += [(doc, v) for v in py_data]
        adapters += [(doc, v) for v in py_adapters]
    return datasets, adapters


def test_the_docs_name_datasets_and_adapters():
    datasets, adapters = _names()
    assert {"wikiann:en", "xquad:ar", "xcopa:ht", "squad", "copa"} <= {v for _, v in datasets}
    assert "AdapterHub/xlm-roberta-base-en-wiki_pfeiffer" in {v for _, v in adapters}


@pytest.mark.parametrize("doc,spec", _names()[0])
def test_every_dataset_spec_in_the_docs_resolves(doc, spec):
    if _is_local(spec):
        return
    source = D.resolve_spec(spec, "sw")
    assert source.kind == "hf" and source.known is not None, f"{doc}: {spec!r} is not one of the known datasets"
    assert source.known.repo.count("/") == 1


@pytest.mark.parametrize("doc,name", _names()[1])
def test_every_adapter_name_in_the_docs_resolves(doc, name):
    if _is_local(name):
        return
    repo = hub.adapterhub_short_name(name, "xlm-roberta-base")
    if repo is None:
        repo = hub.parse_hub_location(name).repo_id
    assert repo in PUBLISHED, f"{doc}: {name!r} is neither a local example path nor a published adapter"


def test_train_task_length_is_what_the_docs_say():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    training = (ROOT / "docs/training.md").read_text(encoding="utf-8")
    assert "100 epochs" in readme and "NER 100 epochs" in training
    settings = TaskAdapterSettings(task="ner", train_data="wikiann:en", output_dir="runs/ner-en")
    settings.check()
    loop, epochs = task_loop(settings, task_class("ner"), 20_000)
    assert epochs == 100 and loop.steps == 100 * 20_000 // 16 and loop.batch_size == 16 and loop.learning_rate == 1e-4
    assert loop.eval_every == 20_000 // 16  # validated once per epoch, the best kept
    for task in ("qa", "copa"):
        loop, epochs = task_loop(TaskAdapterSettings(task=task, train_data="x", output_dir="o"), task_class(task), 500)
        assert epochs is None and loop.steps == 1000
