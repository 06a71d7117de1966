"""A target language served by an ensemble of related languages' adapters, for ``madx transfer`` and
``madx predict``: a language without an adapter of its own (no text to train one) borrows from related ones.

    --lang-adapter es=runs/lang-es pt=runs/lang-pt qu=avg:es,pt           # Average, equal weights
    --lang-adapter es=runs/lang-es pt=runs/lang-pt qu=avg:es=0.7,pt=0.3   # Average, given weights (normalised)
    --lang-adapter es=runs/lang-es pt=runs/lang-pt qu=emea:es,pt          # EMEA: weights tuned per batch

``avg:``: the target runs ``Average(es, pt)`` in the language adapter's place (``madx_fast.model.Average``:
in every layer the weighted average of the adapters' outputs; the first adapter's invertible adapter). The
members are other ``--lang-adapter`` entries, by name. In ``madx transfer`` an ensemble may serve one system's
task adapters only, ``mad-x:qu=avg:es,pt``: its members are then that system's adapters (``mad-x:es=``, else
``es=``), as for any language of that system; a pattern entry (``{lang}=``) is never an ensemble.

``emea:``: test-time ensembling after Wang et al. (2021), "Efficient Test Time Adapter Ensembling for
Low-resource Language Varieties" (EMEA): the weights start uniform for every batch and take ``steps``
entropy-minimisation steps on that batch before it is predicted. madx_fast's version: the loss is the
entropy of the task's predictions (per token for NER, over start and end positions for QA, over the choices
for COPA), averaged over the non-padding tokens of a row, then over the rows of each ensemble (summed over the
ensembles of a mixed batch: each ensemble's weights get the gradient of its own rows only). The weights are
one set per ensemble, shared by every layer, and move by exponentiated-gradient steps, ``w <- w * exp(-lr *
dH/dw)`` renormalised, which keeps them positive and summing to one (with one member: always 1, the member
itself). Nothing else changes: every model parameter is frozen during the steps (no gradients are
accumulated anywhere), and the model's own weights are never written. The steps run eagerly, so EMEA
ensembles do not combine with ``--cuda-graphs`` or ``--compile``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..model.stack import Average, PerRow

ENSEMBLE_KINDS = ("avg", "emea")


@dataclass(frozen=True)
class EnsembleSpec:
    """``--lang-adapter LANG=KIND:MEMBERS``: the kind ("avg" or "emea"), the member languages (other
    ``--lang-adapter`` entries) and, for "avg", their weights (None: equal)."""

    kind: str
    members: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    def __str__(self) -> str:
        if self.weights is None:
            return f"{self.kind}:{','.join(self.members)}"
        return f"{self.kind}:" + ",".join(f"{m}={w:g}" for m, w in zip(self.members, self.weights))


def parse_ensemble(lang: str, value: str) -> EnsembleSpec | None:
    """The ensemble a ``--lang-adapter`` value names, or None when it names an adapter (a directory or Hub
    name). Raises ValueError naming the entry when an ensemble is malformed."""
    kind, sep, rest = value.partition(":")
    if not sep or kind not in ENSEMBLE_KINDS:
        return None
    items = [t.strip() for t in rest.split(",")]
    if not rest.strip() or not all(items):
        raise ValueError(f"--lang-adapter {lang}={value}: give the member languages, e.g. {lang}={kind}:es,pt")
    members, weights = [], []
    for item in items:
        name, eq, weight = item.partition("=")
        members.append(name)
        if eq:
            try:
                weights.append(float(weight))
            except ValueError:
                raise ValueError(f"--lang-adapter {lang}={value}: weight {weight!r} of {name!r} is not a "
                                 "number") from None
    if weights and len(weights) != len(members):
        raise ValueError(f"--lang-adapter {lang}={value}: give a weight for every member or for none")
    if weights and kind == "emea":
        raise ValueError(f"--lang-adapter {lang}={value}: EMEA tunes the weights itself (they start uniform); "
                         f"give the members only, e.g. {lang}=emea:{','.join(members)}")
    if len(set(members)) != len(members):
        raise ValueError(f"--lang-adapter {lang}={value}: a member is named twice")
    if lang.rpartition(":")[2] in members:
        raise ValueError(f"--lang-adapter {lang}={value}: an ensemble cannot contain its own language")
    if weights and not all(math.isfinite(w) for w in weights) or weights and sum(weights) == 0:
        raise ValueError(f"--lang-adapter {lang}={value}: the weights must be finite and not sum to 0")
    return EnsembleSpec(kind, tuple(members), tuple(weights) if weights else None)


def lang_adapter_key(lang: str, system: str | None, lang_adapters: dict[str, str]) -> str | None:
    """The ``--lang-adapter`` entry that serves ``lang`` for the task adapters of ``system``: ``SYSTEM:LANG``,
    else ``LANG``, else a pattern for every language (``SYSTEM:{lang}``, ``{lang}``); None when none does."""
    keys = (f"{system}:{lang}", lang, f"{system}:{{lang}}", "{lang}") if system else (lang, "{lang}")
    return next((k for k in keys if k in lang_adapters), None)


def check_ensembles(lang_adapters: dict[str, str]) -> dict[str, EnsembleSpec]:
    """The ensembles among ``--lang-adapter`` entries, by entry (``qu``, or ``SYSTEM:qu`` for one system's task
    adapters), each checked to name only adapter entries: a member is found as a ``SYSTEM:``-scoped entry of
    the ensemble's system, else a plain one (``lang_adapter_key``). A pattern entry (``{lang}=``) is no
    ensemble: an ensemble serves the one language it names."""
    ensembles = {key: spec for key, value in lang_adapters.items()
                 if (spec := parse_ensemble(key, value)) is not None}
    for key, spec in ensembles.items():
        system, _, lang = key.rpartition(":")
        if lang == "{lang}":
            raise ValueError(f"--lang-adapter {key}={spec}: an ensemble serves one language; name it, e.g. "
                             f"{key.replace('{lang}', 'qu')}={spec}")
        for m in spec.members:
            entry = lang_adapter_key(m, system or None, lang_adapters)
            if entry is None:
                raise ValueError(f"--lang-adapter {key}={spec}: {m!r} is not a --lang-adapter entry; give its "
                                 f"adapter too, e.g. {m}=runs/lang-{m}")
            if entry in ensembles:
                raise ValueError(f"--lang-adapter {key}={spec}: {m!r} is itself an ensemble; members must be "
                                 "adapters")
    return ensembles


def ensemble_block(lang: str, spec: EnsembleSpec, device) -> Average:
    """The ``Average`` serving target ``lang``: given weights for "avg"; for "emea" a weight tensor on
    ``device`` that ``entropy_minimisation`` tunes (reset to uniform for every batch)."""
    if spec.kind == "avg":
        return Average(*spec.members, weights=spec.weights, name=lang)
    k = len(spec.members)
    weights = torch.full((k,), 1.0 / k, dtype=torch.float32, device=device, requires_grad=True)
    return Average(*spec.members, weights=weights, normalize_weights=False, name=lang)


def tuned_blocks(setup) -> list[Average]:
    """The Averages of an active setup whose weights are tensors being tuned (EMEA)."""
    members = [m for e in setup for m in (e.names if isinstance(e, PerRow) else (e,))]
    return [m for m in members if isinstance(m, Average) and isinstance(m.weights, torch.Tensor)
            and m.weights.requires_grad]


# --------------------------------------------------------------------------------------------------------
# the entropy-minimisation steps
# --------------------------------------------------------------------------------------------------------
def prediction_entropy(out, input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Per row of the batch (``[B]``), the entropy of the task's predictions: per token (``logits [B, L, C]``)
    averaged over the row's non-padding tokens; over positions (QA's ``start_logits`` / ``end_logits``
    ``[B, L]``, padding excluded), summed; over choices (multiple choice: ``logits [B, C]`` for ids
    ``[B, C, L]``)."""
    real = input_ids != pad_id if pad_id is not None else torch.ones_like(input_ids, dtype=torch.bool)
    total = None
    for key in ("logits", "start_logits", "end_logits"):
        t = getattr(out, key, None)
        if t is None:
            continue
        t = t.float()
        if t.shape[:-1] == input_ids.shape:  # one distribution per token
            h = _entropy(t)
            h = (h * real).sum(-1) / real.sum(-1).clamp_min(1)
        elif t.shape == input_ids.shape:  # one distribution over the positions of a row
            h = _entropy(t.masked_fill(~real, float("-inf")))
        elif t.dim() == 2 and input_ids.dim() == 3 and t.shape == input_ids.shape[:2]:  # over the choices
            h = _entropy(t)
        else:
            raise ValueError(f"cannot read predictions of shape {tuple(t.shape)} ({key}) for inputs of shape "
                             f"{tuple(input_ids.shape)}: EMEA needs token, position or choice logits")
        total = h if total is None else total + h
    if total is None:
        raise ValueError("the model's output has no logits to take the entropy of")
    return total


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def ensemble_loss(rows_entropy: torch.Tensor, state, blocks: list[Average]) -> torch.Tensor:
    """The mean entropy over each ensemble's rows, summed over the ensembles (a PerRow setup: the rows of a
    member, from ``state.row_groups``; otherwise every row)."""
    entry = next((e for e in state.active if isinstance(e, PerRow)), None)
    if entry is None or state.row_groups is None:
        return rows_entropy.mean()
    groups = state.row_groups.to(rows_entropy.device)
    if groups.shape[0] != rows_entropy.shape[0]:  # multiple choice: a row per choice, one prediction per example
        groups = groups.view(rows_entropy.shape[0], -1)[:, 0]
    loss = rows_entropy.new_zeros(())
    for block in blocks:
        if block in entry.names:
            mine = groups == entry.names.index(block)
            loss = loss + (rows_entropy * mine).sum() / mine.sum().clamp_min(1)
    return loss


class EntropyMinimisation:
    """A forward pre-hook on the model: before each forward (in eval mode), the tuned Averages of the active
    setup get ``steps`` exponentiated-gradient steps on the entropy of that very batch's predictions, from
    uniform weights; the forward then runs with the tuned weights. ``last``: the loss before the first and
    after the last step of the latest batch (for logs and tests)."""

    def __init__(self, model, madx, steps: int, lr: float):
        self.model, self.madx, self.steps, self.lr = model, madx, int(steps), float(lr)
        self.pad_id = getattr(model.config, "pad_token_id", None)
        self.busy = False
        self.last: tuple[float, float] | None = None

    def __call__(self, module, args, kwargs):
        blocks = tuned_blocks(self.madx.state.active)
        if self.busy or not blocks or self.model.training:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("EMEA needs the model called with input_ids")
        self.busy = True
        try:
            with torch.no_grad():
                for block in blocks:
                    block.weights.fill_(1.0 / len(block))
            with torch.enable_grad(), _frozen(self.model):
                first = None
                for step in range(self.steps + 1):  # the last pass measures the tuned weights' loss
                    loss = ensemble_loss(prediction_entropy(self.model(*args, **kwargs), ids, self.pad_id),
                                         self.madx.state, blocks)
                    first = loss.item() if first is None else first
                    if step == self.steps:
                        break
                    grads = torch.autograd.grad(loss, [b.weights for b in blocks], allow_unused=True)
                    with torch.no_grad():
                        for block, g in zip(blocks, grads):
                            if g is not None:
                                w = block.weights * torch.exp(-self.lr * g)
                                block.weights.copy_(w / w.sum())
                self.last = (first, loss.item())
        finally:
            self.busy = False
        return None


@contextlib.contextmanager
def _frozen(model):
    """Every parameter without gradients for the block (autograd then tracks only the ensemble weights)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def entropy_minimisation(model, madx, steps: int, lr: float):
    """Within the block, every eval forward of ``model`` tunes the active setup's EMEA ensembles first
    (``EntropyMinimisation``); yields the hook (its ``last`` losses)."""
    hook = EntropyMinimisation(model, madx, steps, lr)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield hook
    finally:
        handle.remove()


__all__ = ["ENSEMBLE_KINDS", "EnsembleSpec", "EntropyMinimisation", "check_ensembles", "ensemble_block",
           "entropy_minimisation", "parse_ensemble", "prediction_entropy"]
