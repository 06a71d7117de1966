"""Adapter and checkpoint files under attack: random truncation, bit flips, wrong keys / shapes / dtypes /
values, and saves killed at random points. Every damaged file gives a clear error and leaves the model as it
was (or, for a flip that changes nothing the file means, loads exactly the original); a killed save leaves the
old directory or the new one, never a mix, and nothing a later save trips over."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import XLMRobertaForTokenClassification

from madx_fast.model import AdapterConfigError, AdapterFileError, MadxConfig, Stack, add_madx
from madx_fast.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from tests.helpers.models import randomize, tiny_config
from tests.helpers.processes import FifoReader, run_bounded, unshare_available

CLEAR = (AdapterFileError, AdapterConfigError)


def _model(seed=0):
    torch.manual_seed(seed)
    return XLMRobertaForTokenClassification(tiny_config(num_labels=5)).eval()


def _trained():
    model = _model()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task(reduction_factor=4))
    randomize(model)
    randomize(model, needle="classifier", seed=1)
    madx.set_active(Stack("en", "ner"))
    return model, madx


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_overwriting_drops_every_file_of_the_earlier_save(tmp_path):
    _, madx = _trained()
    for save, head_files in ((madx.save_adapter, {"madx_head.safetensors"}),
                             (madx.export_adapterhub, {"head_config.json", "pytorch_model_head.bin"})):
        d = tmp_path / save.__name__
        d.mkdir()
        (d / "NOTES.md").write_text("mine")  # a user's file in the directory is kept
        save(d, "ner", with_head=True)
        assert head_files <= set(os.listdir(d))
        save(d, "ner", overwrite=True)  # now without a head: the old head must not survive
        assert not head_files & set(os.listdir(d)) and (d / "NOTES.md").read_text() == "mine"
        fresh = add_madx(_model(seed=5), backend="eager")
        with pytest.raises(AdapterFileError, match="no task head"):
            fresh.load_adapter(d, with_head=True)


def _damaged_copies(src, tmp_path, rng, n):
    """(label, directory) pairs: copies of ``src`` with one random truncation or bit flip in one of the files
    loading reads (the model card, README.md, is documentation: loading never reads it)."""
    files = sorted(os.listdir(src))
    damaged = [f for f in files if f != "README.md"]
    out = []
    for i in range(n):
        name = damaged[i % len(damaged)]
        data = bytearray((src / name).read_bytes())
        if i % 3 == 0:
            label = f"{name} truncated"
            data = data[: rng.randrange(len(data))]
        else:
            pos = rng.randrange(len(data))
            label = f"{name} bit {pos}"
            data[pos] ^= 1 << rng.randrange(8)
        d = tmp_path / f"case{i}"
        d.mkdir()
        for f in files:
            (d / f).write_bytes(bytes(data) if f == name else (src / f).read_bytes())
        out.append((label, d))
    return out


def test_damaged_adapter_files_give_clear_errors_and_change_nothing(tmp_path):
    _, madx = _trained()
    src = tmp_path / "ner"
    madx.save_adapter(src, "ner", with_head=True)
    reference_model = _model(seed=3)
    reference = add_madx(reference_model, backend="eager")
    reference.load_adapter(src, with_head=True)
    want = _state(reference_model)
    rng = random.Random(0)
    target = _model(seed=3)
    tm = add_madx(target, backend="eager")
    clear = same = 0
    for label, d in _damaged_copies(src, tmp_path, rng, 60):
        before = _state(target)
        try:
            tm.load_adapter(d, with_head=True, overwrite=True)
        except CLEAR as exc:
            clear += 1
            assert str(d) in str(exc) or "ner" in str(exc), (label, exc)
            assert _same(_state(target), before), label
            continue
        same += 1  # it loaded: then it must be exactly the original (a flip that means nothing)
        assert _same(_state(target), want), f"{label} loaded something other than the saved adapter"
    assert clear >= 55, (clear, same)


def test_wrong_keys_shapes_dtypes_and_values_are_refused(tmp_path):
    """Files edited by hand (no checksums, as earlier versions wrote them): the content checks decide."""
    _, madx = _trained()
    src = tmp_path / "en"
    madx.save_adapter(src, "en")
    weights = load_file(src / "madx_adapter.safetensors")
    key = "layers.0.adapter_up.weight"
    edits = {
        "drop": lambda w: w.pop(key),
        "extra": lambda w: w.update({"layers.9.adapter_up.bias": torch.zeros(32)}),
        "shape": lambda w: w.update({key: w[key][:, :3].contiguous()}),
        "dtype": lambda w: w.update({key: w[key].to(torch.int32)}),
        "nan": lambda w: w[key].view(-1).__setitem__(3, float("nan")),
        "inf": lambda w: w[key].view(-1).__setitem__(3, float("inf")),
    }
    target = _model(seed=3)
    tm = add_madx(target, backend="eager")
    for label, edit in edits.items():
        d = tmp_path / label
        d.mkdir()
        w = {k: v.clone() for k, v in weights.items()}
        edit(w)
        save_file(w, d / "madx_adapter.safetensors")
        meta = json.loads((src / "madx_adapter.json").read_text())
        meta.pop("checksum"), meta.pop("weights_sha256")
        (d / "madx_adapter.json").write_text(json.dumps(meta))
        before = _state(target)
        with pytest.raises(AdapterFileError):
            tm.load_adapter(d)
        assert _same(_state(target), before) and "en" not in tm, label
    for label, change in (("scaling nan", {"scaling": float("nan")}), ("scaling inf", {"scaling": float("inf")})):
        d = tmp_path / label.replace(" ", "_")
        d.mkdir()
        save_file(weights, d / "madx_adapter.safetensors")
        meta = json.loads((src / "madx_adapter.json").read_text())
        meta.pop("checksum"), meta.pop("weights_sha256")
        meta["config"].update(change)
        (d / "madx_adapter.json").write_text(json.dumps(meta))
        with pytest.raises(AdapterConfigError, match="scaling must be a finite number"):
            tm.load_adapter(d)
    meta = json.loads((src / "madx_adapter.json").read_text())
    meta.pop("checksum")
    meta["config"] = ["not", "a", "dict"]
    d = tmp_path / "listconfig"
    d.mkdir()
    save_file(weights, d / "madx_adapter.safetensors")
    (d / "madx_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="'config' is missing or not a dict"):
        tm.load_adapter(d)


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    ckpt = {"identity": {"stage": "language"}, "step": 3, "history": [{"step": 1, "loss": 2.5}], "best": None,
            "trainable": {"w": torch.randn(8, 4, generator=g)}, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 3}, "stream": {"epoch": 0}, "mask_generator": g.get_state(),
            "rng": [{"torch": torch.get_rng_state()}]}
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(str(path), ckpt)
    good = read_checkpoint(str(path))
    data = path.read_bytes()
    rng = random.Random(1)
    clear = 0
    for i in range(60):
        damaged = bytearray(data)
        if i % 3 == 0:
            damaged = damaged[: rng.randrange(len(damaged))]
        else:
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        p = tmp_path / f"c{i}.pt"
        p.write_bytes(bytes(damaged))
        try:
            got = read_checkpoint(str(p))
        except CheckpointError as exc:
            clear += 1
            assert str(p) in str(exc)
            continue
        assert got["digest"] == good["digest"] and torch.equal(got["trainable"]["w"], good["trainable"]["w"])
    assert clear >= 50, clear


def _save_forever(target):
    """In a forked child: save two adapters in turn to ``target`` until killed."""
    torch.manual_seed(0)
    model = _model()
    madx = add_madx(model, backend="eager")
    for name, rf in (("a", 2), ("b", 4)):
        madx.add_adapter(name, MadxConfig.language(reduction_factor=rf))
    i = 0
    while True:
        name = "ab"[i % 2]
        madx.save_adapter(target, name, overwrite=True, with_head=(name == "a"))
        i += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_adapter(tmp_path):
    target = tmp_path / "adapter"
    rng = random.Random(2)
    seen, interrupted = set(), 0
    for trial in range(25):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                _save_forever(target)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted += any(f.endswith(".tmp") for f in os.listdir(tmp_path))  # killed in the middle of a save
        if not target.exists():
            continue  # killed before the first save finished
        fresh = add_madx(_model(seed=7), backend="eager")
        name = fresh.load_adapter(target, with_head=os.path.exists(target / "madx_head.safetensors"))
        seen.add(name)
        # the directory is one whole save: config, weights (and the head of "a" only) belong together
        assert (name == "a") == os.path.exists(target / "madx_head.safetensors"), sorted(os.listdir(target))
    assert seen == {"a", "b"} and interrupted >= 3, (seen, interrupted)
    # what killed saves left next to it never gets in the way of the next save, which cleans it up
    _, madx = _trained()
    madx.save_adapter(target, "en", overwrite=True)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], os.listdir(tmp_path)
    assert add_madx(_model(seed=8), backend="eager").load_adapter(target) == "en"


# ------------------------------------------------------------------------------------------------------------
# output paths: only regular files and directories are replaced; devices, FIFOs and descriptors written through
# ------------------------------------------------------------------------------------------------------------
def test_output_paths_are_written_through_or_refused_never_replaced(tmp_path):
    import socket
    import stat

    from madx_fast import files

    def write(path, text="new\n"):
        files.write_file(path, lambda tmp: open(tmp, "w").write(text))

    # a FIFO: its reader gets the output, and the FIFO stays a FIFO
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with FifoReader(fifo) as reader:
        write(fifo, "through the pipe\n")
        assert reader.close() == b"through the pipe\n" and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # a link to /dev/null: written through; the link stays a link, /dev/null a device
    null_link = tmp_path / "null"
    os.symlink("/dev/null", null_link)
    write(null_link)
    assert os.path.islink(null_link) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # an open descriptor's name (what /dev/stdout is): written through, whatever it is
    r, w = os.pipe()
    write(f"/proc/self/fd/{w}", "to the descriptor\n")
    os.close(w)
    assert os.read(r, 100) == b"to the descriptor\n"
    os.close(r)
    # a socket: refused, left as it was
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    with pytest.raises(OSError, match=f"cannot write {sock_path}: it is a socket"):
        write(sock_path)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    sock.close()
    # a directory where a file belongs, and a link loop: refused, nothing changed
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError, match="it is a directory"):
        write(tmp_path / "adir")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    with pytest.raises(OSError, match="symbolic links"):
        write(tmp_path / "loop_a")
    assert os.listdir(tmp_path / "adir") == [] and os.path.islink(tmp_path / "loop_a")
    # a link to a regular file: the file it names is replaced whole (a new inode), the link stays a link
    (tmp_path / "real.txt").write_text("old\n")
    os.symlink("real.txt", tmp_path / "link.txt")
    inode = os.stat(tmp_path / "real.txt").st_ino
    write(tmp_path / "link.txt")
    assert os.readlink(tmp_path / "link.txt") == "real.txt" and (tmp_path / "real.txt").read_text() == "new\n"
    assert os.stat(tmp_path / "real.txt").st_ino != inode
    # a link to nothing: the file it names is created
    os.symlink("created.txt", tmp_path / "dangling")
    write(tmp_path / "dangling")
    assert (tmp_path / "created.txt").read_text() == "new\n" and os.path.islink(tmp_path / "dangling")
    # a device node of its own (where this process may make one): written through, never replaced
    if os.geteuid() == 0:
        dev = tmp_path / "devnull"
        try:
            os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except OSError:
            dev = None
        if dev is not None:
            write(dev)
            assert stat.S_ISCHR(os.lstat(dev).st_mode)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_directory_output_through_a_link_replaces_the_directory_it_names(tmp_path):
    _, madx = _trained()
    (tmp_path / "store").mkdir()
    os.symlink("store", tmp_path / "adapter")
    madx.save_adapter(tmp_path / "adapter", "en")
    madx.save_adapter(tmp_path / "adapter", "ner", overwrite=True)
    assert os.readlink(tmp_path / "adapter") == "store"
    assert json.loads((tmp_path / "store" / "madx_adapter.json").read_text())["name"] == "ner"
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(OSError, match="is not a directory|it is a regular file"):
        madx.save_adapter(tmp_path / "afile", "en")
    assert (tmp_path / "afile").read_text() == "mine"


def test_everything_written_has_one_mode_from_the_umask(tmp_path):
    from madx_fast import files
    _, madx = _trained()
    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            root = tmp_path / f"m{mask:o}"
            madx.save_adapter(root / "own", "ner", with_head=True)
            madx.export_adapterhub(root / "hub_safe", "ner", safetensors=True, with_head=True)
            madx.export_adapterhub(root / "hub_bin", "en")
            files.write_json(root / "x.json", {"a": 1})
            write_checkpoint(str(root / "checkpoint.pt"), {"w": torch.zeros(2)})
        finally:
            os.umask(old)
        modes = {}
        for dirpath, dirs, names in os.walk(root):
            for name in dirs:
                modes[os.path.join(dirpath, name)] = (os.stat(os.path.join(dirpath, name)).st_mode & 0o777,
                                                      0o777 & ~mask)
            for name in names:
                modes[os.path.join(dirpath, name)] = (os.stat(os.path.join(dirpath, name)).st_mode & 0o777,
                                                      0o666 & ~mask)
        wrong = {p: (oct(a), oct(b)) for p, (a, b) in modes.items() if a != b}
        assert len(modes) >= 12 and not wrong, wrong


# ------------------------------------------------------------------------------------------------------------
# a failed write: one line naming the file and the cause, the previous file intact
# ------------------------------------------------------------------------------------------------------------
def _tree(path):
    """name -> bytes of the files directly in ``path``."""
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, f))}


def test_a_failed_write_names_the_file_and_the_cause_and_keeps_the_old_one(tmp_path, monkeypatch):
    """Each cause as the system reports it (OSError of the right subclass and errno), raised where it arises:
    inside torch's writer (which wraps it in its own RuntimeError), in safetensors' serialiser, at the rename."""
    import errno as errno_
    _, madx = _trained()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    write_checkpoint(str(ckpt), {"w": torch.zeros(3)})
    madx.save_adapter(tmp_path / "run" / "adapter", "en")
    before = _tree(tmp_path / "run"), _tree(tmp_path / "run" / "adapter")
    real_save = torch.save
    for code in (errno_.ENOSPC, errno_.EDQUOT, errno_.EROFS, errno_.EACCES, errno_.EIO):
        def failing_torch_save(obj, f, *args, **kwargs):
            class Failing:  # the file torch writes into: a few bytes pass, then the write fails
                def write(self, data):
                    if len(data) > 64:
                        raise OSError(code, os.strerror(code))
                    return f.write(data)

                def flush(self):
                    f.flush()
            real_save(obj, Failing(), *args, **kwargs)

        def failing(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        for where, target, call in (
                ("torch.save", ckpt, lambda: write_checkpoint(str(ckpt), {"w": torch.ones(300)})),
                ("safetensors.torch.save", tmp_path / "run" / "adapter",
                 lambda: madx.save_adapter(tmp_path / "run" / "adapter", "ner", overwrite=True)),
                ("os.replace", ckpt, lambda: write_checkpoint(str(ckpt), {"w": torch.ones(3)}))):
            with monkeypatch.context() as m:
                m.setattr(where, failing_torch_save if where == "torch.save" else failing)
                with pytest.raises(OSError) as info:
                    call()
            message = str(info.value)
            assert info.value.errno == code and "\n" not in message, (where, message)
            assert message.startswith(f"cannot write {target}: {os.strerror(code)} ({errno_.errorcode[code]})"), \
                (where, message)
            assert (_tree(tmp_path / "run"), _tree(tmp_path / "run" / "adapter")) == before, where
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_file_size_limit_hit_while_saving_is_reported_by_the_kernel_errno(tmp_path):
    """A real failing write(2): under RLIMIT_FSIZE the kernel refuses the bytes past the limit with EFBIG (as
    a full disk refuses them with ENOSPC), in the middle of torch's and safetensors' own serialisers."""
    import resource
    _, madx = _trained()
    ckpt = tmp_path / "checkpoint.pt"
    write_checkpoint(str(ckpt), {"w": torch.zeros(3)})
    madx.save_adapter(tmp_path / "adapter", "en")
    before = _tree(tmp_path), _tree(tmp_path / "adapter")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            signal.alarm(120)  # a child stuck on a lock another thread held at the fork dies, and the test fails
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
            out = []
            for call in (lambda: write_checkpoint(str(ckpt), {"w": torch.ones(20000)}),
                         lambda: madx.save_adapter(tmp_path / "adapter", "ner", overwrite=True, with_head=True)):
                try:
                    call()
                    out.append(["no error", "", None])
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    out.append([type(exc).__name__, str(exc), getattr(exc, "errno", None)])
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    got = json.loads(os.read(r, 1 << 16))
    os.close(r)
    for (kind, message, code), target in zip(got, (ckpt, tmp_path / "adapter")):
        assert kind == "WriteError" and code == errno.EFBIG, (kind, message)
        assert message.startswith(f"cannot write {target}: File too large (EFBIG)") and "\n" not in message
    assert (_tree(tmp_path), _tree(tmp_path / "adapter")) == before


@pytest.mark.skipif(not unshare_available(), reason="needs user and mount namespaces (unshare -rm) for a small tmpfs")
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_files(tmp_path):
    """On a real tmpfs of 256 KiB filled up: ENOSPC from the kernel, while checkpointing and saving adapters."""
    import sys
    script = f"""
import json, os, subprocess, torch
from tests.model.test_file_safety import _trained, _tree
from madx_fast.training.checkpoint import write_checkpoint
d = {str(tmp_path / 'disk')!r}
os.makedirs(d)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "none", d], check=True, stdin=subprocess.DEVNULL,
               timeout=60)
_, madx = _trained()
write_checkpoint(d + "/checkpoint.pt", {{"w": torch.zeros(3)}})
madx.save_adapter(d + "/adapter", "en")
before = _tree(d), _tree(d + "/adapter")
fd = os.open(d + "/filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    os.close(fd)
out = []
for call in (lambda: write_checkpoint(d + "/checkpoint.pt", {{"w": torch.ones(20000)}}),
             lambda: madx.save_adapter(d + "/adapter", "ner", overwrite=True, with_head=True)):
    try:
        call()
        out.append(["no error", "", None])
    except BaseException as exc:
        out.append([type(exc).__name__, str(exc), getattr(exc, "errno", None)])
os.remove(d + "/filler")
out.append((_tree(d), _tree(d + "/adapter")) == before)
out.append([f for f in os.listdir(d) if f.endswith(".tmp")])
print(json.dumps(out))
"""
    from tests.helpers import ROOT
    proc = run_bounded(["unshare", "-rm", sys.executable, "-c", script], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    *errors, intact, leftovers = json.loads(proc.stdout.strip().splitlines()[-1])
    disk = tmp_path / "disk"
    for (kind, message, code), target in zip(errors, (disk / "checkpoint.pt", disk / "adapter")):
        assert kind == "WriteError" and code == errno.ENOSPC, (kind, message)
        assert message.startswith(f"cannot write {target}: No space left on device (ENOSPC)") and "\n" not in message
    assert intact and leftovers == []


# ------------------------------------------------------------------------------------------------------------
# files that cannot be parsed, adapters of another model type
# ------------------------------------------------------------------------------------------------------------
def test_deeply_nested_json_is_a_one_line_refusal(tmp_path):
    _, madx = _trained()
    madx.export_adapterhub(tmp_path / "hub", "ner", with_head=True)
    madx.save_adapter(tmp_path / "own", "en")
    deep = "[" * 200_000 + "]" * 200_000
    model = _model(seed=3)
    target = add_madx(model, backend="eager")
    before = _state(model)
    for directory, name in ((tmp_path / "hub", "adapter_config.json"), (tmp_path / "hub", "head_config.json"),
                            (tmp_path / "own", "madx_adapter.json")):
        d = tmp_path / f"deep_{name}"
        shutil.copytree(directory, d)
        (d / name).write_text('{"config": ' + deep + "}")
        with pytest.raises(AdapterFileError, match=f"{d / name}: not readable JSON \\(nested too deeply\\)"):
            target.load_adapter(d, with_head=True)
        assert _same(_state(model), before) and "ner" not in target and "en" not in target


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/statm"),
                    reason="needs os.fork and /proc/self/statm to limit a child's memory")
def test_json_too_large_for_memory_is_a_one_line_refusal(tmp_path):
    """A real MemoryError: a child whose address space may grow by 32 MiB parses a 24 MB JSON list (12M items:
    ~100 MB of list alone): ``parse_json`` and ``read_json`` refuse it in one line naming the file."""
    import resource

    from madx_fast.files import parse_json, read_json
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 12_000_000 + "0]")
    text = path.read_text()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            signal.alarm(120)
            page = os.sysconf("SC_PAGE_SIZE")
            size = int(open("/proc/self/statm").read().split()[0]) * page
            resource.setrlimit(resource.RLIMIT_AS, (size + (32 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
            out = []
            for call in (lambda: parse_json(text, AdapterFileError, str(path)),
                         lambda: read_json(path, AdapterFileError)):
                try:
                    call()
                    out.append("parsed")
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    out.append(f"{type(exc).__name__}: {exc}")
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = json.loads(os.read(r, 1 << 16) or b"null")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got is not None and len(got) == 2, got
    for message in got:
        assert message == f"AdapterFileError: {path}: not readable JSON (too large to parse in memory)", got


def test_an_adapterhub_adapter_of_another_model_type_is_refused(tmp_path):
    """A config recorded for BERT, with keys saved without a model prefix (so they would fit): refused, as
    madx_fast's own format refuses it."""
    _, madx = _trained()
    madx.export_adapterhub(tmp_path / "hub", "en")
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps(config))
    weights = torch.load(tmp_path / "hub" / "pytorch_adapter.bin", weights_only=True)
    torch.save({k.split(".", 1)[1]: v for k, v in weights.items()}, tmp_path / "hub" / "pytorch_adapter.bin")
    madx.save_adapter(tmp_path / "own", "en")
    meta = json.loads((tmp_path / "own" / "madx_adapter.json").read_text())
    meta["model"]["model_type"] = "bert"
    meta.pop("checksum")
    (tmp_path / "own" / "madx_adapter.json").write_text(json.dumps(meta))
    target = add_madx(_model(seed=3), backend="eager")
    for d in (tmp_path / "hub", tmp_path / "own"):
        with pytest.raises(AdapterFileError, match="was saved for model_type 'bert', but this model is 'xlm-roberta'"):
            target.load_adapter(d)
        assert "en" not in target
    config["model_type"] = "xlm-roberta"  # the same file recorded for this model type loads
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps(config))
    assert target.load_adapter(tmp_path / "hub") == "en"


# ------------------------------------------------------------------------------------------------------------
# one writer per directory
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_directory_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    from madx_fast.files import LOCK_FILE, DirectoryInUseError, DirectoryLock
    run = tmp_path / "run"
    lock = DirectoryLock(run)  # creates the directory
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(DirectoryInUseError, match=f"{run} is in use by another madx run \\(process {os.getpid()}\\)"):
        DirectoryLock(run)
    lock.release()
    assert not run.exists()  # created by the lock, and left empty: removed again
    # a lock file left by a process that no longer runs (no lock held on it) never blocks
    run.mkdir()
    (run / LOCK_FILE).write_text("999999999\n")
    with DirectoryLock(run):
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert run.is_dir() and not (run / LOCK_FILE).exists()
    # held by another process: refused naming it; killed, its lock is gone with it
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(120)  # never outlives the test by long, whatever happens to it
            DirectoryLock(run)
            os.write(w, b"locked")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 10) == b"locked"  # or b"": the child ended without the lock
        with pytest.raises(DirectoryInUseError, match=f"process {pid}\\)"):
            DirectoryLock(run)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with DirectoryLock(run):
        pass
