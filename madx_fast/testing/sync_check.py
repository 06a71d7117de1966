"""Find the places where a step reads tensor data back to the host (each one a host-device sync on a GPU).

    from madx_fast.testing.sync_check import HostReads
    with HostReads() as reads:
        loss = step(batch); loss.backward()
    print(reads.report())        # one line per read: the op and the line of Python that asked for it

Unlike ``torch.cuda.set_sync_debug_mode``, this works on any device (the CPU included), so a test on a
machine without a GPU can prove that a step queues all its work without waiting. It sees the ops that need
a tensor's values on the host: ``.item()`` / ``bool()`` / ``int()`` (``_local_scalar_dense``),
``nonzero``, ``masked_select``, boolean-mask indexing, ``equal`` ... An explicit copy to the host
(``.cpu()``, ``.to("cpu")``) is not reported: on a CPU-only run it cannot be told from any other copy.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose result depends on tensor values the host must see (sizes or Python scalars)
_READS = {
    _aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.nonzero.default,
    _aten.masked_select.default, _aten.equal.default, _aten.unique_consecutive.default,
    _aten._unique2.default, _aten.repeat_interleave.Tensor,
}
_BOOL_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}


@dataclass
class HostRead:
    op: str
    where: str  # the innermost frame outside torch / this module

    def __str__(self):
        return f"{self.op} at {self.where}"


_THIS_FILE = os.path.normcase(os.path.abspath(__file__))


def _caller() -> str:
    """The innermost frame outside torch and this module (this module's frames stand in the stack once per
    ``HostReads`` that passes the op on to an enclosing one)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or os.path.normcase(os.path.abspath(frame.filename)) == _THIS_FILE:
            continue
        return f"{name}:{frame.lineno} ({frame.name})"
    return "?"


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def is_host_read(func, args) -> bool:
    """Whether the aten op ``func`` on ``args`` needs tensor values on the host (a sync on a GPU)."""
    return func in _READS or (func in _BOOL_INDEXED and _bool_index(args))


class HostReads(TorchDispatchMode):
    """A dispatch mode that records (``raise_on_read=False``) or refuses (``True``) every host read."""

    def __init__(self, raise_on_read: bool = False):
        super().__init__()
        self.raise_on_read = raise_on_read
        self.reads: list[HostRead] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_host_read(func, args):
            read = HostRead(str(func), _caller())
            if self.raise_on_read:
                raise RuntimeError(f"host read inside a step that must not sync: {read}")
            self.reads.append(read)
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(map(str, self.reads)) or "no host reads"
