"""Training objectives, task heads and metrics.

An *objective* turns a list of examples (the global batch) into tensors, says how many loss terms the batch
holds, and computes the SUM of the loss terms of a slice of it. The trainer divides by the global count, so
a loss is the same whether the batch runs in one piece, in accumulation micro-batches, or spread over
data-parallel processes (whose micro-batches hold different numbers of masked tokens).

    objective        loss term                        count                 head (HF class)
    MlmObjective     CE of each masked token          masked tokens         ...ForMaskedLM (tied decoder)
    NER              CE of each word's 1st sub-token  labelled sub-tokens   ...ForTokenClassification
    QA               (CE(start) + CE(end)) / 2        windows               ...ForQuestionAnswering
    MC (COPA)        CE over the choices              examples              ...ForMultipleChoice

Metrics: seqeval entity-level precision / recall / F1 (NER), SQuAD v1.1 F1 / exact match (QA), accuracy
(COPA / XCOPA).
"""
from __future__ import annotations

import collections
import re
import string
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from ..model.inputs import IGNORE_INDEX


def _pad_to(rows: torch.Tensor, value: int, length: int) -> torch.Tensor:
    return F.pad(rows, (0, length - rows.shape[1]), value=value)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def slice_batch(batch: dict, start: int, end: int) -> dict:
    return {k: v[start:end] for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    """Copy a host batch to ``device``; to a GPU through pinned memory, so the copy is queued without
    waiting (a copy from pageable memory synchronises the stream first)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def model_batch(model, batch: dict, device) -> dict:
    """A host batch, made ready for ``model`` on ``device`` without a host-device sync in the step that uses
    it: moved through pinned memory, its attention mask in the form that spares HF the check whether it
    is all ones (``madx_fast.model.inputs.encoder_attention_mask``, decided here from the host copy)."""
    from ..model.inputs import encoder_attention_mask
    mask = batch.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    out = to_device(batch, device)
    if mask is not None:
        out["attention_mask"] = encoder_attention_mask(model, out["attention_mask"], padded=padded)
    return out


# --------------------------------------------------------------------------------------------------------
# masked LM
# --------------------------------------------------------------------------------------------------------
class MlmObjective:
    """Items are block indices into an ``MlmData``; masks come from the trainer's masking generator, drawn
    for the whole global batch (so every process masks identically and takes its own rows)."""

    def __init__(self, mlm: D.MlmData, mlm_probability: float = 0.15):
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.mlm, self.p = mlm, mlm_probability

    def make_batch(self, items: Sequence[int], generator: torch.Generator) -> dict:
        idx = torch.as_tensor(list(items), dtype=torch.long)
        ids, mask = self.mlm.input_ids[idx].long(), self.mlm.attention_mask[idx].long()
        inputs, labels = D.mask_tokens(ids, mask, self.mlm.special_ids, self.mlm.mask_id, self.mlm.vocab_size,
                                       generator, self.p)
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels}

    @staticmethod
    def prepare(batch: dict) -> dict:
        """Host side of a (micro-)batch: the masked positions and their targets, so that the step selects
        the decoder's rows with no host sync (``madx_fast.model.inputs.mlm_positions``)."""
        from ..model.inputs import mlm_positions
        positions, targets = mlm_positions(batch["labels"])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "mlm_positions": positions, "mlm_targets": targets}

    @staticmethod
    def count(batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @staticmethod
    def num_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @staticmethod
    def loss_sum(model, batch: dict) -> torch.Tensor:
        """Sum of the masked tokens' losses of a ``prepare``d batch on the device."""
        from ..model import madx_mlm_loss
        return madx_mlm_loss(model, batch["input_ids"], batch["attention_mask"], positions=batch["mlm_positions"],
                             targets=batch["mlm_targets"], reduction="sum")


@torch.no_grad()
def evaluate_mlm(model, batches: Sequence[dict], device, bf16: bool = False) -> dict:
    """Held-out masked-LM loss (mean over all masked tokens) and perplexity ``exp(loss)``; the batches carry
    fixed masks so that every evaluation of a run sees the same ones."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        count += MlmObjective.count(batch)
        batch = model_batch(model, MlmObjective.prepare(batch), device)
        with autocast(torch.device(device), bf16):
            total += MlmObjective.loss_sum(model, batch).double()
    model.train(was_training)
    loss = float(total) / max(count, 1)
    return {"mlm_loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "masked_tokens": count}


# --------------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------------
class Task:
    """A MAD-X stage-2 task: how to load, encode, batch, train and score it."""

    name: str = ""
    auto_class: str = ""
    main_metric: str = ""
    default_max_length: int = 128
    graph_outputs: tuple[str, ...] | None = None  # model outputs an evaluation uses (None: no graph replay)

    def __init__(self, pad_id: int = 1):
        self.pad_id = pad_id

    # data -------------------------------------------------------------------------------------------------
    def load(self, spec: str, split: str, lang: str | None = None, max_examples: int | None = None,
             label_names: Sequence[str] | None = None):
        raise NotImplementedError

    def labels_of(self, examples) -> list[str] | None:
        """Label names the data defines (NER); None for tasks with fixed heads."""
        return None

    def check_fits(self, examples, label_names: Sequence[str] | None, where: str) -> None:
        """Raise DataError when the examples' labels do not fit a head with ``label_names``."""

    def encode_train(self, examples, tokenizer, max_length: int) -> list[dict]:
        raise NotImplementedError

    def encode_eval(self, examples, tokenizer, max_length: int) -> list[dict]:
        return self.encode_train(examples, tokenizer, max_length)

    def head_kwargs(self, label_names: Sequence[str] | None) -> dict:
        return {}

    def extra_trainable(self, model) -> list[str]:
        """Parameters of the base model that belong to the task head (trained and saved with it)."""
        return []

    # training ---------------------------------------------------------------------------------------------
    def make_batch(self, items: Sequence[dict], generator=None) -> dict:
        raise NotImplementedError

    @staticmethod
    def prepare(batch: dict) -> dict:
        """Host-side work on a (micro-)batch before it goes to the device (nothing for the tasks)."""
        return batch

    @staticmethod
    def num_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def count(self, batch: dict) -> int:
        raise NotImplementedError

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    # evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, model, examples, features, *, batch_size: int, device, bf16: bool = False,
                 graphs: bool = False) -> dict:
        """Metrics of ``model`` on ``examples``; ``graphs=True`` replays the forward from CUDA graphs
        (``madx_fast.graphs``; every batch padded to the longest feature, so that shapes repeat)."""
        raise NotImplementedError

    @torch.no_grad()
    def _forward_batches(self, model, features, batch_size, device, bf16, graphs=False):
        was_training = model.training
        model.eval()
        runner, length = None, None
        if graphs and self.graph_outputs:
            from ..graphs import GraphedInference
            runner = GraphedInference(model, output_key=self.graph_outputs)
            length = max((len(f["input_ids"]) for f in features), default=0)
        try:
            for i in D.progress(range(0, len(features), batch_size), desc=f"eval {self.name}"):
                chunk = features[i:i + batch_size]
                batch = self.make_batch(chunk)
                if runner is not None:
                    ids, mask = _pad_to(batch["input_ids"], self.pad_id, length), _pad_to(batch["attention_mask"], 0,
                                                                                          length)
                    with autocast(torch.device(device), bf16):
                        outs = runner(ids, mask)
                    yield chunk, SimpleNamespace(**dict(zip(self.graph_outputs, outs)))
                    continue
                batch = model_batch(model, {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")},
                                    device)
                with autocast(torch.device(device), bf16):
                    out = model(**batch)
                yield chunk, out
        finally:
            model.train(was_training)


class NerTask(Task):
    name, auto_class, main_metric = "ner", "AutoModelForTokenClassification", "f1"
    default_max_length = 128
    graph_outputs = ("logits",)

    def load(self, spec, split, lang=None, max_examples=None, label_names=None):
        examples, names = D.load_ner(spec, split, lang=lang, label_names=label_names, max_examples=max_examples)
        self._declared = names
        return examples

    def labels_of(self, examples):
        return list(self._declared)

    def check_fits(self, examples, label_names, where):
        D.check_labels(examples, label_names, where)

    def encode_train(self, examples, tokenizer, max_length):
        return D.encode_ner(examples, tokenizer, self.label_names, max_length)

    def head_kwargs(self, label_names):
        self.label_names = list(label_names)
        return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                "label2id": {n: i for i, n in enumerate(label_names)}}

    def make_batch(self, items, generator=None):
        ids = D.pad_rows([f["input_ids"] for f in items], self.pad_id)
        return {"input_ids": ids,
                "attention_mask": D.pad_rows([[1] * len(f["input_ids"]) for f in items], 0, ids.shape[1]),
                "labels": D.pad_rows([f["labels"] for f in items], IGNORE_INDEX, ids.shape[1])}

    def count(self, batch):
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def evaluate(self, model, examples, features, *, batch_size, device, bf16=False, graphs=False):
        names = self.label_names
        preds = []
        for chunk, out in self._forward_batches(model, features, batch_size, device, bf16, graphs):
            best = out.logits.argmax(-1).cpu()
            for row, f in enumerate(chunk):
                words = {}
                for pos, w in enumerate(f["word_ids"]):
                    if w is not None and w not in words:
                        words[w] = names[int(best[row, pos])]
                preds.append(words)
        true_seqs = [ex.tags for ex in examples]
        pred_seqs = [[p.get(w, "O") for w in range(len(ex.tokens))] for ex, p in zip(examples, preds)]
        return ner_scores(true_seqs, pred_seqs)


class QaTask(Task):
    name, auto_class, main_metric = "qa", "AutoModelForQuestionAnswering", "f1"
    default_max_length = 384
    graph_outputs = ("start_logits", "end_logits")
    doc_stride = 128
    n_best, max_answer_length = 20, 30

    def load(self, spec, split, lang=None, max_examples=None, label_names=None):
        return D.load_squad(spec, split, lang=lang, max_examples=max_examples)

    def _stride(self, max_length):
        return min(self.doc_stride, max_length // 4)

    def encode_train(self, examples, tokenizer, max_length):
        return D.encode_qa_train(examples, tokenizer, max_length, self._stride(max_length))

    def encode_eval(self, examples, tokenizer, max_length):
        return D.encode_qa_eval(examples, tokenizer, max_length, self._stride(max_length))

    def make_batch(self, items, generator=None):
        ids = D.pad_rows([f["input_ids"] for f in items], self.pad_id)
        batch = {"input_ids": ids,
                 "attention_mask": D.pad_rows([[1] * len(f["input_ids"]) for f in items], 0, ids.shape[1])}
        if "start_positions" in items[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in items], dtype=torch.long)
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in items], dtype=torch.long)
        return batch

    def count(self, batch):
        return int(batch["input_ids"].shape[0])

    def loss_sum(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"], reduction="sum")
        return (start + end) / 2

    def evaluate(self, model, examples, features, *, batch_size, device, bf16=False, graphs=False):
        best: dict[int, tuple[float, str]] = {}
        for chunk, out in self._forward_batches(model, features, batch_size, device, bf16, graphs):
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, f in enumerate(chunk):
                ex = examples[f["example"]]
                score, text = best_span(starts[row], ends[row], f["offsets"], ex.context, self.n_best,
                                        self.max_answer_length)
                if f["example"] not in best or score > best[f["example"]][0]:
                    best[f["example"]] = (score, text)
        predictions = [best.get(i, (0.0, ""))[1] for i in range(len(examples))]
        return squad_scores(predictions, [[a["text"] for a in ex.answers] for ex in examples])


class CopaTask(Task):
    """COPA / XCOPA: two choices per example, the head scores each (premise + question, choice) pair at token
    0. The pooler (dense + tanh, part of HF's base model) is trained and saved with the head, which gives
    AdapterHub's multiple-choice head: Dropout, Linear(H, H), tanh, Dropout, Linear(H, 1)."""

    name, auto_class, main_metric = "copa", "AutoModelForMultipleChoice", "accuracy"
    default_max_length = 128

    def load(self, spec, split, lang=None, max_examples=None, label_names=None):
        return D.load_copa(spec, split, lang=lang, max_examples=max_examples)

    def encode_train(self, examples, tokenizer, max_length):
        return D.encode_copa(examples, tokenizer, max_length)

    def extra_trainable(self, model):
        return [n for n, _ in model.named_parameters() if ".pooler." in n or n.startswith("pooler.")]

    def make_batch(self, items, generator=None):
        rows = [ids for f in items for ids in f["choice_ids"]]
        ids = D.pad_rows(rows, self.pad_id)
        mask = D.pad_rows([[1] * len(r) for r in rows], 0, ids.shape[1])
        c = len(items[0]["choice_ids"])
        return {"input_ids": ids.view(len(items), c, -1), "attention_mask": mask.view(len(items), c, -1),
                "labels": torch.tensor([f["label"] for f in items], dtype=torch.long)}

    def count(self, batch):
        return int(batch["labels"].shape[0])

    def loss_sum(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def evaluate(self, model, examples, features, *, batch_size, device, bf16=False, graphs=False):
        correct = 0
        for chunk, out in self._forward_batches(model, features, batch_size, device, bf16):
            pred = out.logits.argmax(-1).cpu()
            correct += sum(int(p) == f["label"] for p, f in zip(pred, chunk))
        return {"accuracy": correct / max(len(features), 1), "examples": len(features)}


TASKS = {"ner": NerTask, "qa": QaTask, "copa": CopaTask}
TASK_ALIASES = {"ner": "ner", "wikiann": "ner", "qa": "qa", "squad": "qa", "xquad": "qa", "copa": "copa",
                "xcopa": "copa", "mc": "copa", "multiple-choice": "copa"}


def get_task(name: str, pad_id: int = 1) -> Task:
    key = TASK_ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (aliases: {sorted(TASK_ALIASES)})")
    return TASKS[key](pad_id)


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------
def ner_scores(true_seqs: list[list[str]], pred_seqs: list[list[str]]) -> dict:
    """seqeval's entity-level scores (its default, CoNLL-style chunking, as XTREME and the MAD-X paper)."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"f1": float(f1_score(true_seqs, pred_seqs, zero_division=0)),
            "precision": float(precision_score(true_seqs, pred_seqs, zero_division=0)),
            "recall": float(recall_score(true_seqs, pred_seqs, zero_division=0)),
            "token_accuracy": float(accuracy_score(true_seqs, pred_seqs)),
            "examples": len(true_seqs)}


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no English articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """SQuAD v1.1 ``f1`` and ``exact_match`` in percent: per question the best over its gold answers."""
    f1 = em = 0.0
    scored = 0
    for pred, golds in zip(predictions, answers):
        if not golds:
            continue
        scored += 1
        f1 += max(squad_f1(pred, g) for g in golds)
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
    n = max(scored, 1)
    return {"f1": 100.0 * f1 / n, "exact_match": 100.0 * em / n, "examples": scored}


def best_span(start_logits, end_logits, offsets, context: str, n_best: int = 20, max_answer_length: int = 30):
    """The highest ``start + end`` score over spans inside the context with ``start <= end`` and at most
    ``max_answer_length`` tokens (HF ``run_qa``'s post-processing); ``(score, answer text)``."""
    starts = np.argsort(start_logits)[::-1][:n_best]
    ends = np.argsort(end_logits)[::-1][:n_best]
    best = (-np.inf, "")
    for s in starts:
        if s >= len(offsets) or offsets[s] is None:
            continue
        for e in ends:
            if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if score > best[0]:
                best = (score, context[offsets[s][0]:offsets[e][1]])
    return best


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == t) for p, t in zip(predictions, labels)) / max(len(labels), 1)
