"""A Hugging Face Hub cache built on disk, in the layout huggingface_hub writes and reads (0.x and 1.x alike),
so that Hub names resolve offline (``HF_HUB_OFFLINE=1``) exactly as they would after a download::

    <cache>/models--<org>--<name>/blobs/<sha256 of the content>
    <cache>/models--<org>--<name>/snapshots/<commit>/<path in the repository>  -> ../../blobs/<sha256> (relative link)
    <cache>/models--<org>--<name>/refs/<branch or tag>                          the commit hash, no newline
"""
from __future__ import annotations

import hashlib
import os


def repo_folder(cache_dir: str, repo_id: str, repo_type: str = "model") -> str:
    return os.path.join(cache_dir, f"{repo_type}s--" + repo_id.replace("/", "--"))


def add_snapshot(cache_dir: str, repo_id: str, source: str, *, refs=("main",), subfolder: str = "") -> str:
    """Put every file under the directory ``source`` into ``repo_id`` (under ``subfolder`` in the repository)
    as one commit, pointed at by each of ``refs``; returns the commit hash."""
    files = {}
    for root, _, names in os.walk(source):
        for n in names:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, source).replace(os.sep, "/")
            files[f"{subfolder}/{rel}" if subfolder else rel] = open(full, "rb").read()
    return add_files(cache_dir, repo_id, files, refs=refs)


def add_files(cache_dir: str, repo_id: str, files: dict[str, bytes], *, refs=("main",)) -> str:
    """One commit of ``files`` (repository path -> content); returns its hash."""
    folder = repo_folder(cache_dir, repo_id)
    listing = hashlib.sha1()
    for path in sorted(files):
        listing.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    commit = listing.hexdigest()
    for path, data in files.items():
        blob = os.path.join(folder, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(folder, "snapshots", commit, *path.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        ref_path = os.path.join(folder, "refs", *ref.split("/"))
        os.makedirs(os.path.dirname(ref_path), exist_ok=True)
        with open(ref_path, "w", encoding="utf-8") as f:
            f.write(commit)
    return commit
