"""The Python packages a GPU run needs beside the GPU image, as wheels prepared where PyPI is reachable.

The lent GPU machine reaches no network: what its image lacks travels with the working tree as wheels in
the ignored folder ``.whl/`` (the whole tree that travels must stay under 64 MiB; these are about 20 MiB).
``scripts/gpu_session.sh`` installs each set into its own ``--target`` folder, never mixed, and puts that
folder first on PYTHONPATH only for the phase that needs it:

* ``adapterhub``: AdapterHub's ``adapters`` 1.3.0 and what it accepts: transformers 4.57.6, huggingface_hub
  0.36.x, tokenizers 0.22.x. The image has transformers 5.17, huggingface_hub 1.33 and tokenizers 0.23.2,
  which adapters' import-time version checks refuse. For bench_train's AdapterHub column.
* ``training``: what madx_fast's training stack needs that the image lacks: seqeval (PyPI has only its
  sdist: built into a wheel here), datasets 5.0.x with dill and multiprocess, and tokenizers 0.23.3 (the
  image's 0.23.2 drops question-answering windows, huggingface/tokenizers#2091). For the training GPU tests.

    python scripts/gpu_wheels.py prepare                       # .whl/ for the GPU image: CPython 3.12, x86_64
    python scripts/gpu_wheels.py prepare --python 3.11 --dest /tmp/whl     # for another Python (rehearsal)
    python scripts/gpu_wheels.py standin --dest /tmp/standin   # the image's transformers/hub/tokenizers
    PYTHONPATH=/tmp/site/adapterhub python scripts/gpu_wheels.py check /tmp/site/adapterhub

``check`` verifies that every requirement of every distribution in the given ``--target`` folders is met by
the distribution Python finds first on its path (the one an import would load), and names each clash.
``standin`` installs, as a --target folder, the versions of those packages the GPU image was seen with, so
that the CPU rehearsal (``STANDIN=folder gpu_session.sh --rehearsal``) meets the clash the GPU machine has.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Binary wheels, one spec per package; each set is installed into its own --target folder.
WHEEL_SETS = {
    "adapterhub": ["adapters==1.3.0", "transformers==4.57.6", "huggingface_hub==0.36.*", "tokenizers==0.22.*"],
    "training": ["datasets==5.0.*", "dill==0.4.1", "multiprocess==0.70.19", "tokenizers==0.23.3"],
}
# Packages PyPI has only as source: built here into pure-Python wheels (py3-none-any).
SDIST_SETS = {"training": ["seqeval==1.2.2"]}
# What the GPU image ("cuda", python 3.12) was seen with, which the sets above must override.
IMAGE_STANDIN = ["transformers==5.17.0", "huggingface_hub==1.33.0", "tokenizers==0.23.2"]
GPU_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TREE_LIMIT_MIB = 64  # what the device tool carries: tracked + untracked-not-ignored files + carried paths


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_wheels: {' '.join(cmd[3:])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def _download(specs: list[str], dest: Path, python: str) -> None:
    platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python,
         "--implementation", "cp", *platform, "--dest", str(dest), *specs)


def _build_sdists(specs: list[str], dest: Path) -> None:
    if not specs:
        return
    names = [re.split(r"[=<>!~]", s)[0] for s in specs]
    with tempfile.TemporaryDirectory() as tmp:
        _pip("wheel", "--quiet", "--no-deps", "--no-binary", ",".join(names), "--wheel-dir", tmp, *specs)
        for wheel in Path(tmp).glob("*.whl"):
            if not wheel.name.endswith("-py3-none-any.whl"):
                raise SystemExit(f"gpu_wheels: {wheel.name} is not a pure-Python wheel; it cannot travel")
            wheel.replace(dest / wheel.name)


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _tree_bytes() -> int:
    """Bytes of what the device tool carries from this checkout: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def prepare(dest: Path, python: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    lines = [f"# wheels for CPython {python}, manylinux x86_64; made by scripts/gpu_wheels.py prepare"]
    total = 0
    for name in WHEEL_SETS:
        folder = dest / name
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.whl"):
            old.unlink()
        _download(WHEEL_SETS[name], folder, python)
        _build_sdists(SDIST_SETS.get(name, []), folder)
        wheels = sorted(folder.glob("*.whl"))
        names = [_dist_name(w) for w in wheels]
        expected = len(WHEEL_SETS[name]) + len(SDIST_SETS.get(name, []))
        if len(set(names)) != len(names) or len(wheels) != expected:
            raise SystemExit(f"gpu_wheels: set {name} holds {len(wheels)} wheels {names}, expected {expected}, one each")
        for w in wheels:
            size = w.stat().st_size
            total += size
            lines.append(f"{name}/{w.name}  {size}  sha256:{hashlib.sha256(w.read_bytes()).hexdigest()}")
    (dest / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"# {_mib(total)} of wheels in {dest}")
    inside = dest.resolve().is_relative_to(ROOT)
    tree = _tree_bytes() + (total if inside else 0)
    if inside:
        print(f"# the tree that travels with .whl carried: {_mib(tree)} (limit {TREE_LIMIT_MIB} MiB)")
        if tree > TREE_LIMIT_MIB * 2**20:
            print(f"gpu_wheels: {_mib(tree)} would not travel (limit {TREE_LIMIT_MIB} MiB)", file=sys.stderr)
            return 1
    return 0


def standin(dest: Path, python: str) -> int:
    """The image's versions of the packages the sets override, installed as a --target folder."""
    with tempfile.TemporaryDirectory() as tmp:
        _download(IMAGE_STANDIN, Path(tmp), python)
        _pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", str(dest),
             *map(str, Path(tmp).glob("*.whl")))
    print(f"# {', '.join(IMAGE_STANDIN)} installed in {dest} (put it after the sets, before site-packages)")
    return 0


def _requirements(dist) -> list:
    from packaging.requirements import Requirement
    reqs = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            reqs.append(req)
    return reqs


def check(targets: list[Path]) -> int:
    """Every requirement of the distributions in ``targets``, against what an import would load here."""
    from packaging.utils import canonicalize_name
    problems, checked = [], 0
    for target in targets:
        for dist in importlib.metadata.distributions(path=[str(target)]):
            name = dist.metadata["Name"]
            first = importlib.metadata.distribution(name)
            if Path(first._path).parent.resolve() != target.resolve():  # noqa: SLF001 - where it loads from
                problems.append(f"{name} {dist.version} in {target} is shadowed by {first.version} at "
                                f"{Path(first._path).parent}: put {target} first on PYTHONPATH")
            for req in _requirements(dist):
                checked += 1
                try:
                    have = importlib.metadata.version(canonicalize_name(req.name))
                except importlib.metadata.PackageNotFoundError:
                    problems.append(f"{name} {dist.version} needs {req}: not installed")
                    continue
                if req.specifier and not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{name} {dist.version} needs {req}: found {req.name} {have}")
    for line in problems:
        print(f"clash: {line}")
    print(f"# {checked} requirements of {', '.join(map(str, targets))}: {len(problems)} clashes")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for cmd, default in (("prepare", ROOT / ".whl"), ("standin", None)):
        s = sub.add_parser(cmd)
        s.add_argument("--dest", type=Path, default=default, required=default is None)
        s.add_argument("--python", default=GPU_PYTHON, help=f"CPython version the wheels are for (default {GPU_PYTHON})")
    s = sub.add_parser("check")
    s.add_argument("targets", nargs="+", type=Path)
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.dest, args.python)
    if args.command == "standin":
        return standin(args.dest, args.python)
    return check(args.targets)


if __name__ == "__main__":
    sys.exit(main())
