"""Hub specs cannot reach outside the Hugging Face cache: every part of ``org/name[@revision][/folder]`` is
checked after URL-decoding, and whatever a spec resolves to (snapshot, folder, adapter files, links followed)
must lie inside the cache, or the spec is refused before anything is read from it."""
from __future__ import annotations

import os
import shutil

import pytest

from madx_fast.cli import main
from madx_fast.model import AdapterNameError, AdapterNotFoundError, add_madx, resolve_adapter
from tests.helpers.hub_cache import add_snapshot, repo_folder
from tests.model.test_hub import _model, _trained, cache  # noqa: F401 - the Hub cache fixture


def test_an_encoded_revision_cannot_leave_the_cache(cache, tmp_path, capsys):  # noqa: F811
    """The revision ``../../../evil/ref``, URL-encoded, names a refs file outside the cache whose "commit"
    is a directory outside it too (huggingface_hub joins both into paths as they are)."""
    src = _trained(tmp_path)
    add_snapshot(cache, "me/lang-sw", src["own_en"])
    outside = tmp_path / "outside"
    shutil.copytree(src["own_en"], outside)
    evil_ref = tmp_path / "evil" / "ref"
    evil_ref.parent.mkdir()
    evil_ref.write_text(str(outside))
    spec = "me/lang-sw@..%2F..%2F..%2Fevil%2Fref"
    assert os.path.realpath(os.path.join(repo_folder(cache, "me/lang-sw"), "refs", "../../../evil/ref")) == \
        str(evil_ref)  # what huggingface_hub would open
    madx = add_madx(_model(), backend="eager")
    with pytest.raises(AdapterNameError, match=r"revision '\.\./\.\./\.\./evil/ref' \(URL-decoded\) is not a branch"):
        madx.load_adapter(spec)
    assert "en" not in madx
    source = tmp_path / "in.jsonl"
    source.write_text('{"lang": "en", "text": "a b"}\n')
    code = main(["predict", "--task-adapter", src["own_head"], "--lang-adapter", f"en={spec}", "--input", str(source),
                 "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"])
    assert code == 2 and "is not a branch, tag or commit name" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_refs_and_links_pointing_out_of_the_cache_are_refused(cache, tmp_path):  # noqa: F811
    src = _trained(tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(src["own_en"], outside)
    # a branch whose "commit" is a path out of the cache
    add_snapshot(cache, "me/moved", src["own_en"])
    with open(os.path.join(repo_folder(cache, "me/moved"), "refs", "main"), "w") as f:
        f.write(str(outside))
    # a snapshot whose adapter file links out of the cache
    commit = add_snapshot(cache, "me/linked", src["own_en"])
    link = os.path.join(repo_folder(cache, "me/linked"), "snapshots", commit, "madx_adapter.safetensors")
    os.remove(link)
    os.symlink(outside / "madx_adapter.safetensors", link)
    madx = add_madx(_model(), backend="eager")
    for spec in ("me/moved", "me/linked"):
        with pytest.raises(AdapterNameError, match="outside the Hugging Face cache"):
            madx.load_adapter(spec)
        assert "en" not in madx
    add_snapshot(cache, "me/fine", src["own_en"])  # the same files inside the cache load
    assert madx.load_adapter("me/fine") == "en"


@pytest.mark.parametrize("spec", [
    "me/lang@..%2F..%2Fx",          # a revision climbing out
    "me/lang@%2E%2E",               # ".." encoded
    "me/lang@refs%2F..%2Fmain",     # ".." inside a ref
    "me/lang@main%00",              # a control character
    "me/lang@main%5Cx",             # a backslash
    "me/lang@%2Fabs",               # an absolute "ref"
    "me/lang@main/%2E%2E/x",        # a folder climbing out, encoded
    "me/lang/a%2F..%2F..%2Fb",      # the same without a revision
    "%2E%2E/lang",                  # the namespace
    "me/..lang",                    # the name
    "me/la--ng",
    "me/lang%2Fx",
])
def test_every_part_of_a_hub_spec_is_checked_after_decoding(cache, spec):  # noqa: F811
    with pytest.raises(AdapterNameError):
        resolve_adapter(spec)


def test_ordinary_specs_still_resolve_to_their_parts(cache):  # noqa: F811
    from madx_fast.model.hub import HubLocation, parse_hub_location
    assert parse_hub_location("me/lang@refs%2Fpr%2F3/runs/sw") == HubLocation("me/lang", "refs/pr/3", "runs/sw")
    assert parse_hub_location("me/lang.v2@v1.0") == HubLocation("me/lang.v2", "v1.0", "")
    with pytest.raises(AdapterNotFoundError, match="not in the Hugging Face cache"):
        resolve_adapter("me/lang@0123456789abcdef0123456789abcdef01234567")
