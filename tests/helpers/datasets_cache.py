"""A ``datasets`` cache entry for a Hub dataset, written by the ``datasets`` library's own builder, so that
``load_dataset("<namespace>/<name>", "<config>")`` finds it with ``HF_DATASETS_OFFLINE=1`` exactly as after a
download (``datasets`` then reads its cache and never the network)::

    <cache>/<namespace>___<name>/<config>/0.0.0/<hash>/dataset_info.json
    <cache>/<namespace>___<name>/<config>/0.0.0/<hash>/<name>-<split>.arrow
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile


def add_dataset(cache_dir: str, repo_id: str, config: str, splits: dict[str, list[dict]], features) -> str:
    """Prepare ``splits`` (split -> records) of ``repo_id``/``config`` with ``features`` in ``cache_dir``;
    returns the prepared directory."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, records in splits.items():
            files[split] = os.path.join(tmp, f"{split}.jsonl")
            with open(files[split], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        staging = os.path.join(tmp, "cache")
        builder = Json(cache_dir=staging, dataset_name=name, config_name=config, config_id=config, data_files=files,
                       features=features, hash="0" * 16, version="0.0.0")
        builder.download_and_prepare()
        target = os.path.join(cache_dir, f"{namespace}___{name}", config)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(os.path.join(staging, name, config), target)
    return target


def wikiann_features():
    import datasets
    return datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC",
                                                                 "I-LOC"])),
        "langs": datasets.Sequence(datasets.Value("string")),
        "spans": datasets.Sequence(datasets.Value("string"))})


def squad_features():
    import datasets
    return datasets.Features({
        "id": datasets.Value("string"), "context": datasets.Value("string"), "question": datasets.Value("string"),
        "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")})})


def copa_features():
    import datasets
    return datasets.Features({
        "premise": datasets.Value("string"), "choice1": datasets.Value("string"), "choice2": datasets.Value("string"),
        "question": datasets.Value("string"), "idx": datasets.Value("int32"),
        "label": datasets.ClassLabel(names=["choice1", "choice2"])})
