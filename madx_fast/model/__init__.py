"""MAD-X on Hugging Face encoders and decoder LMs: BERT, RoBERTa, XLM-R, XLM-R XL, DeBERTa-v2, DistilBERT, GPT-2,
Llama, Mistral (``wiring.SUPPORTED_MODEL_TYPES``; see docs/model_api.md).

    from madx_fast.model import add_madx, MadxConfig, Stack
    madx = add_madx(model)                        # model.madx; the model keeps its HF class and forward
    madx.add_adapter("en", MadxConfig.language()) # language adapter (rf 2) + NICE invertible adapter
    madx.add_adapter("ner", MadxConfig.task())    # task adapter (rf 16)
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")

Layout: ``config.py`` (MadxConfig, AdapterHub config conversion), ``stack.py`` (the active setup: ``Stack``, and
``PerRow`` for many languages in one batch, ``Average`` for several adapters' outputs averaged), ``average.py``
(running an ``Average``), ``wiring.py`` (where the adapters and NICE go in each model family),
``lm_heads.py`` (masked / causal / seq2seq LM heads of HF models), ``per_row.py`` (running a ``PerRow`` entry:
each row through its own language's adapter), ``controller.py`` (``add_madx`` and the ``MadxAdapters`` handle),
``adapter_files.py`` (files), ``pretrained.py`` (``from_pretrained`` of a whole model with its adapters;
``pretrained_record.py``: what ``save_pretrained`` records), ``card.py`` (model cards), ``push.py`` (to the Hub),
``hub.py`` (adapters by directory or Hugging Face Hub name), ``mlm_loss.py`` (the LM
loss at the positions with a target only: chunked fused linear cross-entropy), ``params.py`` (parameter budget
command), ``inputs.py`` (batch inputs prepared on the host: LM positions, attention masks, so that a step never
waits for the GPU).
"""
from .adapter_files import AdapterFileError
from .config import AdapterConfigError, MadxConfig
from .controller import AdapterExistsError, MadxAdapters, add_madx, check_adapter_name
from .hub import AdapterNameError, AdapterNotFoundError, resolve_adapter
from .mlm_loss import FusedLinearCrossEntropy, fused_linear_cross_entropy, madx_lm_loss, madx_mlm_loss
from .pretrained import from_pretrained, load_madx
from .stack import Average, PerRow, Stack

__all__ = [
    "AdapterConfigError", "AdapterExistsError", "AdapterFileError", "AdapterNameError", "AdapterNotFoundError",
    "Average", "FusedLinearCrossEntropy", "MadxAdapters", "MadxConfig", "PerRow", "Stack", "add_madx", "check_adapter_name",
    "from_pretrained", "fused_linear_cross_entropy", "load_madx", "madx_lm_loss", "madx_mlm_loss", "resolve_adapter",
]
