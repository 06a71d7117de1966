"""``madx push DIR REPO_ID``: a run directory, a bundle or an adapter directory onto the Hugging Face Hub, in
one commit, with a model card at the repository's root.

    madx push runs/lang-sw me/madx-lang-sw            # the run: adapter/, run.json, log.jsonl, ...; README.md
    madx push runs/ner-en/best me/madx-ner-en --private
    push(directory="runs/ner-en", repo_id="me/madx-ner-en")     # the same from Python

What goes up: every file of the directory except a run's ``checkpoint.pt`` (optimizer state; with
``include_checkpoint`` it goes too) and hidden or temporary files. The card (``README.md``) at the root is the
directory's own when it has one, else written from the adapter's files and its run's record: base model,
language, task, configuration, training data, steps and metrics (``madx_fast.model.card``). A pushed run
loads back by its repository name wherever madx_fast takes an adapter (``--lang-adapter me/madx-lang-sw``,
``madx.load_adapter("me/madx-lang-sw/adapter")``). The token is the one huggingface_hub finds (``HF_TOKEN``,
``hf auth login``); ``HF_ENDPOINT`` picks another Hub.
"""
from __future__ import annotations

import logging
import os

from ..model.adapter_files import read_adapter_info
from ..model.card import CARD_FILE, adapter_card
from ..model.push import directory_files, upload
from . import runs
from .settings import PushSettings

log = logging.getLogger("madx_fast.training")


def push(settings: PushSettings | None = None, /, **kwargs) -> dict:
    """Push ``settings.directory`` to ``settings.repo_id`` (a ``PushSettings``, or its fields as keywords);
    returns ``{"url": the commit's URL, "files": the paths pushed}``."""
    s = PushSettings.build(settings, **kwargs)
    directory = os.path.abspath(os.path.expanduser(s.directory))
    contents, what = _contents(directory, s)
    url = upload(contents, s.repo_id, private=s.private or None, revision=s.revision, token=s.token,
                 commit_message=s.message or f"madx_fast: {what}")
    log.info("pushed %s to %s (%d files): %s", what, s.repo_id, len(contents), url)
    return {"url": url, "files": sorted(contents)}


def _contents(directory: str, s: PushSettings) -> tuple[dict, str]:
    """The files to push (path in the repository -> local path or content) and what they are, in words."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{s.directory!r} is not a directory: give a run, bundle or adapter directory")
    if runs.is_adapter_dir(directory):
        contents = directory_files(directory)
        bundle, sub, what = directory, "", f"adapter {read_adapter_info(directory).name!r}"
    else:
        subs = [sub for sub in runs.BUNDLES if runs.is_adapter_dir(os.path.join(directory, sub))]
        if not subs:
            raise runs.BundleError(f"{s.directory}: not a run directory, bundle or adapter directory (no "
                                   f"{'/'.join(runs.BUNDLES)}/ and no adapter files)")
        skip = () if s.include_checkpoint else (runs.CHECKPOINT,)
        contents = directory_files(directory, exclude=skip)
        sub = "best" if "best" in subs else subs[0]
        bundle, what = os.path.join(directory, sub), f"run {os.path.basename(directory)}"
    if CARD_FILE not in contents:  # (the directory's own card is kept)
        contents[CARD_FILE] = _card(bundle, s.repo_id + (f"/{sub}" if sub else "")).encode("utf-8")
    return contents, what


def _card(bundle: str, location: str) -> str:
    """The model card of a bundle or adapter directory, with its run's facts when it has a run record."""
    info = read_adapter_info(bundle)
    meta = runs.read_bundle_meta(bundle)
    head = info.head
    return adapter_card(info.name, info.config.to_dict(), base_model=info.base_model or "",
                        model_class=(head.model_class or "") if head else "", with_head=head is not None,
                        run=runs.card_facts(meta) if meta else None, location=location,
                        adapterhub=info.format == "adapterhub")


__all__ = ["push"]
