"""Adapters onto the Hugging Face Hub, through huggingface_hub's upload API (``HfApi.create_repo`` and one
``create_commit``; huggingface_hub 0.36 and 1.x):

    url = madx.push_adapter_to_hub("me/madx-lang-sw", "sw")                 # the adapter, its model card
    url = madx.push_adapter_to_hub("me/madx-ner-en", "ner", with_head=True, private=True)

The token is the one huggingface_hub finds itself (``HF_TOKEN``, or a stored ``hf auth login``) unless
``token=`` is given; ``HF_ENDPOINT`` picks another Hub. The repository is created when missing. Run
directories go up with ``madx push`` (``madx_fast.training.publish``), through ``upload`` here. A failure is
one line saying what was tried and what to do.
"""
from __future__ import annotations

import os
import tempfile

from .hub import connection_problem


class PushError(OSError):
    """The Hub refused an upload, or could not be reached; the message says why and what to do."""


def upload(files: dict[str, str | bytes], repo_id: str, *, commit_message: str, private: bool | None = None,
           revision: str | None = None, token: str | None = None) -> str:
    """One commit of ``files`` (path in the repository -> a local file, or the content) to the model repository
    ``repo_id`` (created if missing); returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(token=token, library_name="madx_fast", library_version=_version())
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=source) for path, source in sorted(files.items())]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise PushError(push_failure(exc, repo_id)) from None
    return str(getattr(commit, "commit_url", "") or f"{api.endpoint}/{repo_id}")


def push_failure(exc: BaseException, repo_id: str) -> str:
    """Why pushing to ``repo_id`` failed, in one line with what to do (no library text)."""
    from huggingface_hub import constants, errors
    where = f"cannot push to the Hub repository {repo_id} ({constants.ENDPOINT})"
    if isinstance(exc, errors.HFValidationError):
        return f"{where}: not a valid repository id (write 'namespace/name')"
    if isinstance(exc, errors.LocalTokenNotFoundError):
        return f"{where}: no Hugging Face token found: log in with `hf auth login`, or set HF_TOKEN"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return f"{where}: the Hub did not accept the token (401): log in with `hf auth login`, or set HF_TOKEN"
    if status == 403:
        return (f"{where}: the token may not write there (403): use a token with write access to "
                f"{repo_id.split('/')[0]!r}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{where}: the repository (or its namespace) was not found, or the token may not create it"
    reason = connection_problem(exc)
    if reason:
        return f"{where}: the Hub cannot be reached ({reason}); check the network, or HF_ENDPOINT"
    if status is not None:
        return f"{where}: the Hub answered HTTP {status}"
    return f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def directory_files(directory: str, *, exclude=(), prefix: str = "") -> dict[str, str]:
    """Path in the repository -> local path for every file under ``directory`` (hidden files and names in
    ``exclude`` left out, at any depth)."""
    out = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude)
        for name in sorted(names):
            if name.startswith(".") or name in exclude:
                continue
            full = os.path.join(root, name)
            out[prefix + os.path.relpath(full, directory).replace(os.sep, "/")] = full
    return out


def push_adapter_to_hub(madx, repo_id: str, name: str, *, with_head: bool = False, private: bool | None = None,
                        revision: str | None = None, commit_message: str | None = None,
                        token: str | None = None) -> str:
    """Save adapter ``name`` (madx_fast's format and its model card; ``with_head``: the task head too) and push
    it to the root of ``repo_id``; returns the commit's URL. Loading it back:
    ``madx.load_adapter(repo_id, with_head=...)``."""
    with tempfile.TemporaryDirectory(prefix="madx-push-") as tmp:
        folder = os.path.join(tmp, name)
        madx.save_adapter(folder, name, with_head=with_head)
        return upload(directory_files(folder), repo_id, private=private, revision=revision, token=token,
                      commit_message=commit_message or f"madx_fast: adapter {name}")


def _version() -> str:
    from .._version import __version__
    return __version__


__all__ = ["PushError", "directory_files", "push_adapter_to_hub", "push_failure", "upload"]
