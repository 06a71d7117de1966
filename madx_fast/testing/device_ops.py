"""Count the device work a piece of PyTorch code issues, on any device (``meta`` tensors included).

    from madx_fast.testing.device_ops import DeviceOps
    with DeviceOps() as count:
        model(**batch)
    count.totals()      # {"kernels", "aten_kernels", "triton_launches", "fused_calls", "host_reads", "flops", ...}

What one device op is: an outermost aten op that launches work on the device (the dispatch mode sees the
ops autograd and the composite ops decompose into, each of which is one kernel on a GPU), or one Triton
launch. Not device ops: views and other ops whose outputs all alias their inputs (``view``, ``t``,
``expand``, a ``.to`` to the same dtype...), allocations without a fill (``empty``), ops on no elements.
Multi-tensor ops (``_foreach_*``, ``_fused_adamw_``) count the launches CUDA's multi-tensor-apply would
make (``multi_tensor_launches``).

madx_fast's fused ops are custom ops (``madx_fast::adapter_forward`` ...). The counter runs each one's own
Python body (the launcher call) with itself active, so the launcher's aten ops (allocations, partial sums,
casts) are counted like any other, and every ``kernel[grid](...)`` is recorded as a launch. On ``meta``
tensors a launch is recorded and not run (there is no data; the launchers only look at shapes, strides and
dtypes, so what they launch is what they launch on a GPU with the same shapes); on real tensors it runs.

Per op it also records, for a roofline: FLOPs of matrix products and attention (torch's own formulas,
``torch.utils.flop_counter``); bytes moved, each tensor argument read or written once (distinct elements:
a broadcast dimension counts once; an indexed source only as much as the gathered output); for a Triton
launch the bytes of its tensor arguments, and for a fused op the FLOPs of its eager reference
(``madx_fast.reference``) on the same shapes, counted by this counter (``fused_op_flops``).

On ``meta`` tensors a host read (``.item()``, ``bool(t)``) cannot return data; ``answer_meta_reads=True``
answers 1 (True) and counts it: transformers 4.57's check that an attention mask is all ones is the one
such read in the workloads measured here, and for a batch without padding the true answer is True.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .sync_check import is_host_read

_aten = torch.ops.aten
FUSED_NAMESPACE = "madx_fast"
# allocations: a kernel only when filled (zeros, full), not these
_NO_KERNEL = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
              _aten.new_empty.default, _aten.new_empty_strided.default, _aten.lift_fresh.default,
              _aten.detach.default, _aten.alias.default}
# the first tensor argument is indexed: only the gathered part of it is read
_INDEXED_SOURCE = {_aten.embedding.default, _aten.index_select.default, _aten.index.Tensor, _aten.gather.default}
# in-place ops that write part of their first argument: as many of its elements as the other arguments hold
_SCATTERED = {_aten.scatter_add_.default, _aten.scatter_.src, _aten.scatter_.value, _aten.index_put_.default,
              _aten.index_add_.default, _aten.index_copy_.default}
# in-place ops that write their first argument without reading it
_WRITE_ONLY = {_aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default,
               _aten.normal_.default, _aten.uniform_.default, _aten.bernoulli_.float}
# CUDA's multi-tensor-apply: tensors per launch by list count (depth), blocks per launch, elements per block
_MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_BLOCKS, _MTA_CHUNK = 320, 65536


@dataclasses.dataclass
class OpRecord:
    """One op the code issued. ``kind``: "aten" (launches ``kernels`` kernels), "free" (no kernel: a view, an
    allocation), "triton" (one launch), "fused" (a madx_fast custom-op call: its launches and aten ops are
    their own records with ``parent`` = this record's index), "read" (a host read, also a copy kernel)."""
    name: str
    kind: str
    phase: str
    kernels: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    dtype: str = ""  # the operands' dtype of a matrix product / attention (what sets its rate)
    parent: int | None = None
    grid: tuple = ()


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a stride-0, broadcast dimension counts once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        key = (_storage_id(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors (or tensor lists) the op writes in place, from its schema's alias annotations."""
    out = []
    schema_args = func._schema.arguments
    for i, arg in enumerate(schema_args):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += _tensors(value)
    return out


def multi_tensor_launches(lists) -> int:
    """Kernels CUDA's multi-tensor-apply launches for ``lists`` (parallel lists of tensors): a launch holds at
    most ``_MTA_TENSORS[depth]`` tensors and ``_MTA_BLOCKS`` blocks of ``_MTA_CHUNK`` elements."""
    depth = len(lists)
    max_tensors = _MTA_TENSORS.get(depth, 30)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:
        chunks = -(-t.numel() // _MTA_CHUNK)
        if chunks == 0:
            continue
        tensors += 1
        for _ in range(chunks):
            blocks += 1
            if blocks == _MTA_BLOCKS:
                launches, blocks = launches + 1, 0
        if tensors == max_tensors:
            launches += 1 if blocks else 0
            tensors, blocks = 0, 0
    return launches + (1 if blocks else 0)


def _kernels(func, args, kwargs, outputs) -> int:
    """Device kernels one outermost aten op launches (0 for views, allocations and empty results)."""
    name = func._schema.name
    if func in _NO_KERNEL:
        return 0
    mutated = _mutated(func, args, kwargs)
    if name.startswith(("aten::_foreach_", "aten::_fused_")):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        return multi_tensor_launches(lists) if lists else 1
    if mutated:
        return int(any(t.numel() for t in mutated))
    outs = _tensors(outputs)
    if not outs or not any(t.numel() for t in outs):
        return 0
    inputs = {_storage_id(t) for t in _tensors((args, kwargs))}
    if all(_storage_id(t) in inputs for t in outs):
        return 0  # every output is a view of an input
    return 1


def _bytes(func, args, kwargs, outputs) -> int:
    """Bytes read + written, each tensor read or written once."""
    mutated = _mutated(func, args, kwargs)
    mutated_ids = {id(t) for t in mutated}
    inputs = _tensors((args, kwargs))
    written = [t for t in _tensors(outputs) if id(t) not in mutated_ids]
    inputs_ids = {_storage_id(t) for t in inputs}
    if func in _SCATTERED:  # read and write only the addressed elements of the destination
        others = _unique(inputs[1:])
        touched = max((t.numel() for t in others), default=0)
        return sum(distinct_bytes(t) for t in others) + 2 * touched * inputs[0].element_size()
    total = sum(distinct_bytes(t) for t in _unique(mutated))
    if func in _INDEXED_SOURCE:
        source, rest = inputs[0], inputs[1:]
        total += sum(distinct_bytes(t) for t in written)  # the gathered rows of the source
        inputs = rest
    for t in _unique(inputs):
        if id(t) in mutated_ids and func in _WRITE_ONLY:
            continue
        total += distinct_bytes(t)
    total += sum(distinct_bytes(t) for t in _unique(written) if _storage_id(t) not in inputs_ids)
    return total


def _product_dtype(func, args) -> str:
    ts = _tensors(args)
    return str(ts[0].dtype).replace("torch.", "") if ts else ""


class DeviceOps(TorchDispatchMode):
    """A dispatch mode recording every op (``records``) with the device work it stands for (module
    docstring). ``phase`` labels the records made while it is set ("forward", "backward", ...)."""

    def __init__(self, *, answer_meta_reads: bool = False, fused_flops: bool = True):
        super().__init__()
        self.records: list[OpRecord] = []
        self.phase = ""
        self.answer_meta_reads = answer_meta_reads
        self.fused_flops = fused_flops
        self._parent: int | None = None
        self._pending: list = []

    # ---- recording ------------------------------------------------------------------------------------
    def _add(self, **fields) -> int:
        self.records.append(OpRecord(phase=self.phase, parent=self._parent, **fields))
        return len(self.records) - 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == FUSED_NAMESPACE:
            return self._fused(func, args, kwargs)
        if is_host_read(func, args):
            self._add(name=str(func), kind="read", kernels=1)
            if self.answer_meta_reads and any(t.is_meta for t in _tensors(args)):
                return True if _tensors(args)[0].dtype == torch.bool else 1
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        kernels = _kernels(func, args, kwargs, out)
        counter = flop_registry.get(func._overloadpacket)
        flops = float(counter(*args, **kwargs, out_val=out)) if counter is not None and kernels else 0.0
        self._add(name=str(func), kind="aten" if kernels else "free", kernels=kernels, flops=flops,
                  bytes=_bytes(func, args, kwargs, out) if kernels else 0,
                  dtype=_product_dtype(func, args) if flops else "")
        return out

    def _fused(self, func, args, kwargs):
        """A madx_fast custom op: its Python body runs with this mode active and launches recorded. Its FLOPs
        are counted when the mode exits (the reference's backward needs autograd, which is off in here)."""
        index = self._add(name=str(func), kind="fused", dtype=_product_dtype(func, args))
        if self.fused_flops:
            self._pending.append((index, func._schema.name, _shapes_of(args)))
        outer, self._parent = self._parent, index
        try:
            with self, recording_launches(self):
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        finally:
            self._parent = outer

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._parent is None and exc[0] is None:  # the outermost exit: count the fused ops' FLOPs
            pending, self._pending = self._pending, []
            for index, name, shapes in pending:
                self.records[index].flops = fused_op_flops(name, shapes)
        return out

    def launch(self, fn, grid, args, kwargs) -> None:
        """Record one Triton launch (called by ``recording_launches``)."""
        tensors = _unique(_tensors((args, kwargs)))
        self._add(name=getattr(fn, "__name__", str(fn)), kind="triton", kernels=1,
                  bytes=sum(distinct_bytes(t) for t in tensors), grid=grid)

    # ---- results --------------------------------------------------------------------------------------
    def totals(self, phase: str | None = None) -> dict:
        rs = [r for r in self.records if phase is None or r.phase == phase]
        return dict(
            kernels=sum(r.kernels for r in rs),
            aten_kernels=sum(r.kernels for r in rs if r.kind in ("aten", "read")),
            triton_launches=sum(r.kernels for r in rs if r.kind == "triton"),
            fused_calls=sum(r.kind == "fused" for r in rs),
            free_ops=sum(r.kind == "free" for r in rs),
            host_reads=sum(r.kind == "read" for r in rs),
            flops=sum(r.flops for r in rs),
            bytes=sum(r.bytes for r in rs),
        )


def _grid(grid, args, kwargs) -> tuple:
    if callable(grid):
        return ("computed",)
    dims = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
    return dims + (1,) * (3 - len(dims))


@contextlib.contextmanager
def intercepted_launches(handle):
    """Within the block every Triton ``kernel[grid](...)`` (a JIT function, or one of Triton's interpreter)
    calls ``handle(fn, grid, args, kwargs, launch)`` instead; ``launch()`` runs it (compile-only warm-ups run
    as they are)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def patched(cls):
        def run(self, *args, grid, warmup, **kwargs):
            def launch():
                return saved[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            return launch() if warmup else handle(self, grid, args, kwargs, launch)
        return run

    for cls in saved:
        cls.run = patched(cls)
    try:
        yield
    finally:
        for cls, run in saved.items():
            cls.run = run


def recording_launches(counter: DeviceOps):
    """Every Triton launch within the block is recorded in ``counter``; it runs unless its tensors are on the
    meta device (no data to run on)."""
    def handle(fn, grid, args, kwargs, launch):
        counter.launch(fn, _grid(grid, args, kwargs), args, kwargs)
        return None if any(t.is_meta for t in _tensors((args, kwargs))) else launch()
    return intercepted_launches(handle)


# --------------------------------------------------------------------------------------------------------
# FLOPs of a fused op: those of its eager reference on the same shapes
# --------------------------------------------------------------------------------------------------------
def _activation_name(code: int) -> str:
    from ..reference import ACTIVATION_CODES
    return {v: k for k, v in ACTIVATION_CODES.items()}[int(code)]


def _leaf(t, grad=True):
    return torch.empty_like(t).requires_grad_(grad and t.is_floating_point())


def _flops_of(fn) -> float:
    """FLOPs ``fn()`` dispatches, on meta tensors (forward and, where ``fn`` calls it, backward)."""
    with torch.enable_grad(), DeviceOps(fused_flops=False) as inner:
        fn()
    return inner.totals()["flops"]


def _adapter_flops(x, wd, wu, act, backward, weight_grads=True):
    from .. import reference
    x = _leaf(x.to("meta"))
    wd, wu = wd.to("meta"), wu.to("meta")
    w = [_leaf(wd, weight_grads), _leaf(wd.new_empty(wd.shape[0]), weight_grads), _leaf(wu, weight_grads),
         _leaf(wu.new_empty(wu.shape[0]), weight_grads)]

    def forward():
        return reference.bottleneck_adapter_reference(x, None, *w, 1.0, _activation_name(act))
    if not backward:
        return _flops_of(forward)
    with torch.enable_grad():
        y = forward()
    return _flops_of(lambda: torch.autograd.grad(y, [t for t in (x, *w) if t.requires_grad], torch.empty_like(y)))


def _dense_activation_flops(x, weight, bias, act):
    from ..ops.dense import dense_activation_reference
    x, weight, bias = (t.to("meta") for t in (x, weight, bias))
    return _flops_of(lambda: dense_activation_reference(x, weight, bias, _activation_name(act)))


def _nice_flops(x, weights, act, inverse, backward, rebuild=False, weight_grads=True):
    from .. import reference
    x = _leaf(x.to("meta"))
    w = [_leaf(t.to("meta"), weight_grads) for t in weights]
    name = _activation_name(act)

    def coupling(inp, inv):
        fn = reference.nice_inverse_reference if inv else reference.nice_forward_reference
        return fn(inp, *w, activation_name=name)
    if not backward:
        return _flops_of(lambda: coupling(x, inverse))
    with torch.enable_grad():
        y = coupling(x, inverse)
    grads = _flops_of(lambda: torch.autograd.grad(y, [t for t in (x, *w) if t.requires_grad], torch.empty_like(y)))
    return grads + (_flops_of(lambda: coupling(y.detach(), not inverse)) if rebuild else 0.0)


def _first_group(ws):
    return [w[0] for w in ws]


def _shapes_of(args) -> tuple:
    """The op's arguments with each tensor replaced by its (shape, dtype): what its FLOPs depend on."""
    return tuple(_TensorSpec(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    shape: tuple
    dtype: torch.dtype

    def to(self, device):
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def __getitem__(self, i):  # a stacked weight's first group
        return _TensorSpec(self.shape[1:], self.dtype)


@functools.lru_cache(maxsize=None)
def fused_op_flops(qualname: str, shapes: tuple) -> float:
    """FLOPs of the madx_fast custom op ``qualname`` on arguments ``shapes`` (``_shapes_of``): its eager
    reference's on the same shapes (a grouped op: the single op's on all rows, the same products per row)."""
    return _fused_op_flops(qualname.split("::")[1], shapes)


def _fused_op_flops(name: str, a) -> float:
    if name == "adapter_forward":
        return _adapter_flops(a[0], a[2], a[4], a[7], backward=False)
    if name == "grouped_adapter_forward":
        return _adapter_flops(a[0], a[3][0], a[5][0], a[8], backward=False)
    if name == "adapter_backward":
        return _adapter_flops(a[1], a[3], a[4], a[6], backward=True)
    if name == "grouped_adapter_backward":
        return _adapter_flops(a[1], a[4][0], a[5][0], a[7], backward=True, weight_grads=a[9])
    if name == "nice_coupling":
        return _nice_flops(a[0], a[1:9], a[9], a[10], backward=False)
    if name == "grouped_nice_coupling":
        return _nice_flops(a[0], _first_group(a[2:10]), a[10], a[11], backward=False)
    if name == "nice_coupling_backward":
        return _nice_flops(a[1], a[3:11], a[11], a[12], backward=True, rebuild=a[2] is None)
    if name == "grouped_nice_coupling_backward":
        return _nice_flops(a[1], _first_group(a[4:12]), a[12], a[13], backward=True, rebuild=a[2] is None,
                           weight_grads=a[14])
    if name == "dense_activation":
        return _dense_activation_flops(*a)
    if name in ("softmax_cross_entropy", "add_layer_norm", "add_layer_norm_backward"):
        return 0.0  # no matrix product: elementwise work and row sums only
    raise KeyError(f"no FLOP count for the fused op madx_fast::{name}")
