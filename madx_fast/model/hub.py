"""Where an adapter comes from: a local directory, or a repository on the Hugging Face Hub.

Every place that takes an adapter (``MadxAdapters.load_adapter`` / ``import_adapterhub``, ``madx train-task
--lang-adapter``, ``madx transfer --task-adapter`` and ``--lang-adapter LANG=...``) resolves what it is given
with ``resolve_adapter`` to a local directory, then reads that directory as before (madx_fast's format, or
AdapterHub's with or without a head; ``.bin`` weights are read weights-only). The accepted forms::

    runs/lang-sw                                 a path that exists is always a path
    ./lang-sw  /data/lang-sw  ~/lang-sw          always a path (a missing one is an error, never a Hub lookup)
    AdapterHub/xlm-roberta-base-sw-wiki_pfeiffer a Hub model repository, at its main branch
    org/name@v1.0                                at a tag, branch or commit
    org/name@v1.0/runs/lang-sw                   a folder inside the repository, at a revision
    org/name/runs/lang-sw                        a folder inside the repository, at main
    hf:org/name                                  the Hub even if a local directory has that name
    org/name@refs%2Fpr%2F3                       a revision with "/" is written URL-encoded
    en/wiki@ukp  en/wiki  en  @ukp/xlm-roberta-base-en-wiki_pfeiffer
                                                 AdapterHub's short names (below)

This is the path syntax of huggingface_hub's ``HfFileSystem`` (``org/name@revision/path``). Repositories are
fetched with ``huggingface_hub.snapshot_download`` (only the adapter files), into and from its cache
(``HF_HUB_CACHE`` / ``HF_HOME``); ``HF_HUB_OFFLINE=1`` reads the cache only; private and gated repositories use
the token huggingface_hub finds itself (``HF_TOKEN``, or ``hf auth login``).

AdapterHub's short names (``<task>/<subtask>@<org>``, from its archived index of adapters) depend on the base
model: ``en/wiki@ukp`` is ``AdapterHub/xlm-roberta-base-en-wiki_pfeiffer`` on XLM-R base and
``AdapterHub/bert-base-multilingual-cased-en-wiki_pfeiffer_relu`` on mBERT. They are mapped exactly as
AdapterHub's ``adapters`` library redirects them (the index entry's default adapter, ``AdapterHub/`` + its file
name) for the MAD-X language adapters (``<lang>/wiki``) and mBERT's WikiANN task adapters (``wikiann/<lang>``)
of XLM-R base / large and mBERT; ``@org/<file>`` is ``AdapterHub/<file>`` for any model. Other short names are
refused with a message that says what to write instead.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from .._version import __version__
from ..paths import LocalPathError, check_local
from .adapter_files import ADAPTER_FILES

HUB_PREFIX = "hf:"
ADAPTERHUB_EXPLORE = "https://adapterhub.ml/explore"


class AdapterNameError(ValueError):
    """A name that cannot be an adapter: neither a directory nor a Hub repository, or an AdapterHub short
    name madx_fast does not map; the message says what to write instead."""


class AdapterNotFoundError(FileNotFoundError):
    """No such directory here, and no such repository (revision, folder) on the Hub or in its cache."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """A local directory holding the adapter, and where it came from (``repo_id`` None: a local path)."""

    path: str
    spec: str
    repo_id: str | None = None
    revision: str | None = None     # as asked (None: main)
    commit: str | None = None       # the snapshot's commit
    subfolder: str = ""

    @property
    def local(self) -> bool:
        return self.repo_id is None

    @property
    def ref(self) -> str:
        """``org/name@commit[/folder]`` for a Hub adapter (names the exact files), else the path."""
        if self.local:
            return self.path
        at = f"@{self.commit or self.revision or 'main'}"
        return f"{self.repo_id}{at}" + (f"/{self.subfolder}" if self.subfolder else "")


# --------------------------------------------------------------------------------------------------------
# AdapterHub's short names
# --------------------------------------------------------------------------------------------------------
# AdapterHub's archived index (github.com/adapter-hub/Hub, dist/v2/index/<model>.json, last commit a53c6b7 of
# 2024-05-07): for each "<task>/<subtask>" the default entry's file name, which the `adapters` library
# redirects to the Hub repository "AdapterHub/<file name>". All these entries are by the "ukp" organisation.
def _regular(model: str, langs: str) -> dict[str, str]:
    return {f"{lang}/wiki": f"{model}-{lang}-wiki_pfeiffer" for lang in langs.split()}


_MBERT = "bert-base-multilingual-cased"
ADAPTERHUB_INDEX: dict[str, dict[str, str]] = {
    "xlm-roberta-base": _regular("xlm-roberta-base", "ar cdo de el en es et gn hi ht id ilo is it ja jv mhr mi my "
                                                     "qu ru sw ta th tk tr vi xmf zh"),
    "xlm-roberta-large": _regular("xlm-roberta-large", "ar cdo en gn ilo is ja jv mhr mi my qu sw tk xmf zh"),
    _MBERT: {
        **{f"{lang}/wiki": _MBERT + suffix for lang, suffix in {
            "am": "_am_wiki_pfeiffer", "ar": "-ar-wiki_pfeiffer_relu", "bh": "_bh_wiki_pfeiffer",
            "bn": "_wiki_bn_pfeiffer", "bxr": "_bxr_wiki_pfeiffer", "cdo": "-cdo-wiki_pfeiffer",
            "cs": "_cs_wiki_pfeiffer", "de": "-de-wiki_pfeiffer", "el": "-el-wiki_pfeiffer",
            "en": "-en-wiki_pfeiffer_relu", "es": "-es-wiki_pfeiffer", "et": "-et-wiki_pfeiffer",
            "eu": "_eu_wiki_pfeiffer", "fa": "_fa_wiki_pfeiffer", "fi": "-fi-wiki_pfeiffer",
            "fr": "-fr-wiki_pfeiffer", "gn": "-gn-wiki_pfeiffer_relu", "hi": "-hi-wiki_pfeiffer",
            "ht": "-ht-wiki_pfeiffer", "hu": "_hu_wiki_pfeiffer", "hy": "_hy_wiki_pfeiffer",
            "id": "_wiki_id_pfeiffer", "ilo": "-ilo-wiki_pfeiffer", "is": "-is-wiki_pfeiffer",
            "ja": "-ja-wiki_pfeiffer", "jv": "-jv-wiki_pfeiffer_relu", "ka": "_ka_wiki_pfeiffer",
            "ko": "-ko-wiki_pfeiffer", "kv": "_kv_wiki_pfeiffer", "la": "_la_wiki_pfeiffer",
            "lv": "_lv_wiki_pfeiffer", "mhr": "-mhr-wiki_pfeiffer_relu", "mi": "-mi-wiki_pfeiffer",
            "my": "-my-wiki_pfeiffer_relu", "myv": "_myv_wiki_pfeiffer", "pt": "_pt_wiki_pfeiffer",
            "qu": "-qu-wiki_pfeiffer", "ru": "-ru-wiki_pfeiffer", "se": "_se_wiki_pfeiffer",
            "sw": "-sw-wiki_pfeiffer_relu", "tk": "-tk-wiki_pfeiffer", "tr": "_tr_wiki_pfeiffer",
            "vi": "_vi_wiki_pfeiffer", "wo": "_wo_wiki_pfeiffer", "xmf": "-xmf-wiki_pfeiffer_relu",
            "zh": "-zh-wiki_pfeiffer_relu", "zh_yue": "_zh_yue_wiki_pfeiffer"}.items()},
        **{f"wikiann/{lang}": f"{_MBERT}_wikiann_ner_{lang}_pfeiffer" for lang in ("ar", "en", "ja", "zh")},
    },
}
ADAPTERHUB_ORG = "ukp"
# Hub organisations that now hold the models the index was written for.
_MODEL_ORGS = ("FacebookAI/", "google-bert/")

_LEGACY = re.compile(r"^(?P<task>[A-Za-z0-9_\-]+)(?:/(?P<subtask>[A-Za-z0-9_\-]+))?(?:@(?P<org>[A-Za-z0-9_\-]+))?$")


def index_model_name(model_name: str | None) -> str | None:
    """The name AdapterHub's index knows a base model by (``FacebookAI/xlm-roberta-base`` and a local
    directory named ``xlm-roberta-base`` are ``xlm-roberta-base``), or None."""
    if not model_name:
        return None
    name = str(model_name).rstrip("/\\")
    for org in _MODEL_ORGS:
        if name.startswith(org):
            name = name[len(org):]
    if name not in ADAPTERHUB_INDEX and os.path.isdir(os.path.expanduser(name)):
        name = os.path.basename(os.path.abspath(os.path.expanduser(name)))
    return name if name in ADAPTERHUB_INDEX else None


def _known_short_names() -> set[str]:
    return {key for entries in ADAPTERHUB_INDEX.values() for key in entries}


def adapterhub_short_name(spec: str, model_name: str | None) -> str | None:
    """The Hub repository an AdapterHub short name stands for on ``model_name``, None when ``spec`` is not a
    short name; raises AdapterNameError for a short name that has no known mapping (saying what to write)."""
    if spec.startswith("@"):
        org, sep, file_name = spec[1:].partition("/")
        if not (sep and org and file_name) or "/" in file_name:
            raise AdapterNameError(f"{spec!r}: an AdapterHub id of this form is '@<org>/<adapter file name>', e.g. "
                                   "'@ukp/xlm-roberta-base-en-wiki_pfeiffer'")
        return f"AdapterHub/{file_name}"
    m = _LEGACY.match(spec)
    if m is None:
        return None
    task, subtask, org = m.group("task"), m.group("subtask"), m.group("org")
    known = _known_short_names()
    if subtask is not None and f"{task}/{subtask}" not in known:
        return None  # "org/name" or "org/name@revision": a Hub repository id
    model = index_model_name(model_name)
    mapped_for = sorted(m_ for m_, entries in ADAPTERHUB_INDEX.items()
                        if any(_matches(key, task, subtask) for key in entries))
    if model is None:
        if not mapped_for:
            raise AdapterNameError(_unmapped(spec))
        examples = "; ".join(f"{_hub_id(m_, task, subtask)} on {m_}" for m_ in mapped_for if _hub_id(m_, task, subtask))
        base = f"the base model {model_name!r} is not one of {', '.join(mapped_for)}" if model_name else \
            "no base model was given"
        raise AdapterNameError(f"{spec!r} is an AdapterHub short name, whose adapter depends on the base model, and "
                               f"{base}: pass the base model (--model), or write the Hub repository id: {examples}")
    candidates = [key for key in ADAPTERHUB_INDEX[model] if _matches(key, task, subtask)]
    if org not in (None, ADAPTERHUB_ORG) or not candidates:
        raise AdapterNameError(_unmapped(spec, model))
    if len(candidates) > 1:
        options = ", ".join(f"{key} (AdapterHub/{ADAPTERHUB_INDEX[model][key]})" for key in sorted(candidates))
        raise AdapterNameError(f"{spec!r} matches several AdapterHub adapters for {model}: {options}; write one")
    return f"AdapterHub/{ADAPTERHUB_INDEX[model][candidates[0]]}"


def _matches(key: str, task: str, subtask: str | None) -> bool:
    """AdapterHub's own lookup: "task/subtask" exactly, or a bare name as a task or as a subtask."""
    k_task, k_sub = key.split("/")
    return (k_task, k_sub) == (task, subtask) if subtask is not None else task in (k_task, k_sub)


def _hub_id(model: str, task: str, subtask: str | None) -> str | None:
    keys = [k for k in ADAPTERHUB_INDEX[model] if _matches(k, task, subtask)]
    return f"AdapterHub/{ADAPTERHUB_INDEX[model][keys[0]]}" if len(keys) == 1 else None


def _unmapped(spec: str, model: str | None = None) -> str:
    where = f" for {model}" if model else ""
    return (f"{spec!r} is not a directory, and as an AdapterHub short name it has no mapping{where} in madx_fast "
            f"(it maps the MAD-X language adapters '<lang>/wiki@ukp' of {', '.join(ADAPTERHUB_INDEX)} and "
            f"mBERT's 'wikiann/<lang>@ukp'): write the adapter's Hugging Face Hub repository id instead, e.g. "
            f"AdapterHub/xlm-roberta-base-sw-wiki_pfeiffer (search {ADAPTERHUB_EXPLORE}), or a local directory")


# --------------------------------------------------------------------------------------------------------
# the one resolution function
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubLocation:
    repo_id: str
    revision: str | None
    subfolder: str


def parse_hub_location(text: str) -> HubLocation:
    """``org/name[@revision][/folder]`` -> its parts (``revision`` URL-decoded), each checked
    (``check_hub_location``)."""
    head, at, tail = text.partition("@")
    if at:
        repo_id = head
        revision, _, subfolder = tail.partition("/")
        revision = unquote(revision)
        if not revision:
            raise AdapterNameError(f"{text!r}: nothing after '@' (write org/name@revision)")
    else:
        parts = text.split("/")
        repo_id, revision, subfolder = "/".join(parts[:2]), None, "/".join(parts[2:])
    subfolder = subfolder.strip("/")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise AdapterNameError(f"{text!r} is not a directory here, and not a Hub repository id ('namespace/name', "
                               "optionally '@revision' and '/folder')")
    location = HubLocation(repo_id, revision, subfolder)
    check_hub_location(location, text)
    return location


# A namespace or repository name on the Hub (huggingface_hub's rule): word characters, "-" and ".", not at either
# end, no "--" or "..", at most 96 characters.
_HUB_NAME = re.compile(r"^(?!.*(--|\.\.))[\w](?:[\w.-]{0,94}[\w])?$")
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_REF_CHARS = re.compile(r"[~^:?*\[]|@\{")


def check_hub_location(where: HubLocation, text: str) -> None:
    """Every part of a Hub location, after URL-decoding: the namespace and name are Hub names, the revision
    a git ref or commit (no ``..``, no empty or dot-led component, none of git's forbidden characters), the
    folder a plain relative path (no ``.`` / ``..`` / empty component, no backslash or control character).
    Anything else is an AdapterNameError, before the cache or the network is asked."""
    for part in where.repo_id.split("/"):
        if not _HUB_NAME.match(unquote(part)) or unquote(part) != part:
            raise AdapterNameError(f"{text!r}: {part!r} is not a valid Hub repository id part (letters, digits, "
                                   "'-', '_', '.'; not at either end; no '--' or '..')")
    if where.revision is not None:
        rev = where.revision
        parts = rev.split("/")
        if (_UNSAFE_CHARS.search(rev) or _REF_CHARS.search(rev) or rev.endswith(".lock")
                or any(p in ("", ".", "..") or p.startswith(".") for p in parts) or ".." in rev):
            raise AdapterNameError(f"{text!r}: revision {rev!r} (URL-decoded) is not a branch, tag or commit name")
    if where.subfolder:
        for form in (where.subfolder, unquote(where.subfolder)):
            if _UNSAFE_CHARS.search(form) or any(p in ("", ".", "..") for p in form.split("/")):
                raise AdapterNameError(f"{text!r}: the folder inside the repository must be a plain relative path "
                                       f"(got {form!r})")


def resolve_adapter(spec, *, model_name: str | None = None, files=ADAPTER_FILES, subdirs=()) -> ResolvedAdapter:
    """A local directory for the adapter ``spec`` names (see the module docstring): an existing path as is;
    otherwise the Hub repository (folder, revision) it names, or an AdapterHub short name mapped for the base
    model ``model_name``, downloaded (only ``files``, at the folder and in its ``subdirs``) into the Hub cache
    or found there. Raises AdapterNotFoundError / AdapterNameError with what was looked for."""
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise AdapterNameError(f"empty adapter name {spec!r}")
    text = spec.strip()
    forced = text.startswith(HUB_PREFIX)
    if forced:
        text = text[len(HUB_PREFIX):]
    else:
        try:
            if check_local(text, "adapter directory"):  # a path, never a Hub lookup
                return ResolvedAdapter(os.path.expanduser(text), spec)
        except LocalPathError as exc:
            raise AdapterNotFoundError(str(exc)) from None
    repo_id = adapterhub_short_name(text, model_name)
    location = HubLocation(repo_id, None, "") if repo_id else parse_hub_location(text)
    if repo_id:
        check_hub_location(location, text)
    return _download(spec, location, files, subdirs)


def _download(spec: str, where: HubLocation, files, subdirs) -> ResolvedAdapter:
    import huggingface_hub
    from huggingface_hub import errors

    prefix = f"{where.subfolder}/" if where.subfolder else ""
    patterns = [prefix + f for f in files] + [f"{prefix}{sub}/{f}" for sub in subdirs for f in files]
    offline = _offline()
    named = "the Hub repository " + where.repo_id + (f"@{where.revision}" if where.revision else "") + (
        f" (folder {where.subfolder!r})" if where.subfolder else "")
    text = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    if not text.startswith(where.repo_id):
        named += f" (what AdapterHub's {text!r} names)"
    start = "" if spec.startswith(HUB_PREFIX) else f"{spec!r} is not a directory here, and "
    unreachable = None if offline else unreachable_reason()
    try:
        snapshot = huggingface_hub.snapshot_download(where.repo_id, revision=where.revision, allow_patterns=patterns,
                                                     local_files_only=offline or bool(unreachable),
                                                     library_name="madx_fast", library_version=__version__)
    except errors.HFValidationError as exc:
        raise AdapterNameError(f"{start}not a valid Hub repository id ({exc})") from None
    except errors.GatedRepoError:
        raise AdapterNotFoundError(f"{named} is gated: accept its terms on https://huggingface.co/{where.repo_id} and "
                                   "log in (HF_TOKEN, or `hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise AdapterNotFoundError(f"{start}{named} does not exist (or is private: log in with HF_TOKEN, or "
                                   "`hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise AdapterNotFoundError(f"{named}: no such revision") from None
    except errors.LocalEntryNotFoundError as exc:
        if type(exc).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows the files it misses
            why = f"its cached copy is incomplete and the Hub cannot be reached ({str(exc).split('. ')[0]})"
        else:
            why = _not_cached(unreachable or connection_problem(exc) or "no answer")
        raise AdapterNotFoundError(f"{start}{named}: {why}") from None
    path = os.path.join(snapshot, where.subfolder) if where.subfolder else snapshot
    found = [p for p in [path] + [os.path.join(path, s) for s in subdirs]
             if any(os.path.isfile(os.path.join(p, f)) for f in files)]
    _check_inside_cache(named, [snapshot, path] + [os.path.join(p, f) for p in found for f in files
                                                   if os.path.lexists(os.path.join(p, f))])
    if not found:
        raise AdapterNotFoundError(f"{named} holds no adapter files ({', '.join(files[:4])}, ...)"
                                   + (" in its cached copy (HF_HUB_OFFLINE=1)" if offline else ""))
    return ResolvedAdapter(path, spec, where.repo_id, where.revision, os.path.basename(snapshot), where.subfolder)


def _check_inside_cache(named: str, paths: list[str]) -> None:
    """Whatever a Hub location resolved to (its snapshot, folder and adapter files, links followed) lies inside
    the Hugging Face cache; anything else (a ref or link in the cache pointing out of it) is refused."""
    cache = os.path.realpath(_cache_dir())
    for path in paths:
        real = os.path.realpath(path)
        if os.path.commonpath([cache, real]) != cache:
            raise AdapterNameError(f"{named}: {path} resolves to {real}, outside the Hugging Face cache ({cache}); "
                                   "refused (a reference or link in the cache points out of it)")


# --------------------------------------------------------------------------------------------------------
# the Hub out of reach, and other Hub failures in one line
# --------------------------------------------------------------------------------------------------------
HUB_PROBE_TIMEOUT_S = 10.0


def unreachable_reason() -> str | None:
    """None when the Hub (``HF_ENDPOINT``) answers at all (any HTTP status), else why it cannot be reached
    ("connection refused", ...). One request per endpoint and process, without the retries huggingface_hub
    makes (which take ~40 s on a network that refuses connections): callers then read the cache alone."""
    from huggingface_hub import constants
    return _probe(constants.ENDPOINT)


@functools.lru_cache(maxsize=8)
def _probe(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to get an answer means: out of reach
        return connection_problem(exc) or f"{type(exc).__name__}"
    return None


@contextlib.contextmanager
def cache_only():
    """Within the block, huggingface_hub (and datasets, when imported) read their caches only, as with
    ``HF_HUB_OFFLINE=1``: for libraries that take no ``local_files_only``, once the Hub is known to be out of
    reach (``unreachable_reason``)."""
    import sys

    from huggingface_hub import constants
    targets = [constants] + ([sys.modules["datasets"].config] if "datasets" in sys.modules else [])
    saved = [t.HF_HUB_OFFLINE for t in targets]
    for t in targets:
        t.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for t, value in zip(targets, saved):
            t.HF_HUB_OFFLINE = value


def connection_problem(exc: BaseException) -> str | None:
    """Why a request failed, in words ("connection refused", "the host name could not be resolved", "timed
    out", ...), from the exception and its causes; None when no network failure is among them."""
    import socket
    names = []
    seen = exc
    while seen is not None and len(names) < 16:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "the host name could not be resolved"
        if isinstance(seen, (TimeoutError, socket.timeout)):
            return "timed out"
        names.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(names).lower()
    for needle, reason in (("nameresolution", "the host name could not be resolved"), ("timeout", "timed out"),
                           ("proxy", "proxy error"), ("ssl", "TLS error"), ("connect", "connection failed")):
        if needle in text:
            return reason
    return None


def hub_failure(exc: BaseException, name: str, *, cache: str | None = None) -> str | None:
    """Why ``name`` could not be had from the Hub, as the end of a one-line message ("it is not a local
    directory, and the Hub has no repository ..."): what was tried and what to do, no library text; None when
    ``exc`` is not a Hub or network failure. ``cache``: the cache that was read (default huggingface_hub's)."""
    from huggingface_hub import errors
    kinds, seen = set(), exc
    while seen is not None and len(kinds) < 16:
        kinds.add(type(seen))
        seen = seen.__cause__ or seen.__context__

    def has(cls) -> bool:
        return any(issubclass(k, cls) for k in kinds)

    start = "it is not a local directory, and"
    if has(errors.HFValidationError):
        return f"{start} not a valid Hub repository id ('namespace/name')"
    if has(errors.GatedRepoError):
        return (f"the Hub repository {name} is gated: accept its terms on its Hub page and log in (HF_TOKEN, or "
                "`hf auth login`)")
    if has(errors.RepositoryNotFoundError):
        return f"{start} the Hub has no repository {name} (or it is private: log in with HF_TOKEN, or `hf auth login`)"
    if has(errors.RevisionNotFoundError):
        return f"the Hub repository {name} has no such revision"
    missing = re.search(r"does not appear to have a file named (\S+?)\.?(\s|$)", str(exc))
    if missing and not has(errors.LocalEntryNotFoundError):
        return f"the Hub repository {name} has no file {missing.group(1)}"
    reason = connection_problem(exc)
    if _offline() or reason or has(errors.LocalEntryNotFoundError) or has(errors.OfflineModeIsEnabled):
        probed = None if _offline() else unreachable_reason()
        return f"{start} {_not_cached(probed or reason or 'no answer', cache)}"
    return None


def _not_cached(reason: str, cache: str | None = None) -> str:
    """The end of a message for a Hub name that is not in the cache while the Hub cannot be used."""
    from huggingface_hub import constants
    cache = cache or _cache_dir()
    if _offline():
        return (f"it is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 is set: run once with "
                "network access (without HF_HUB_OFFLINE), or pass a local directory")
    return (f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}) and it is not in the cache "
            f"({cache}): check the network (or HF_ENDPOINT, a proxy), set HF_HUB_OFFLINE=1 to read only the "
            "cache, or pass a local directory")


def _cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _offline() -> bool:
    """huggingface_hub's offline switch (``HF_HUB_OFFLINE=1``, read when it is imported)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


__all__ = ["ADAPTERHUB_INDEX", "AdapterNameError", "AdapterNotFoundError", "ResolvedAdapter", "adapterhub_short_name",
           "cache_only", "connection_problem", "hub_failure", "parse_hub_location", "resolve_adapter", "unreachable_reason"]
