"""Question answering windows cover every context to its end, or the data is refused.

tokenizers 0.23.1 and 0.23.2 return too few overflow windows for long inputs (huggingface/tokenizers#2091,
fixed in 0.23.3): the end of a long context, and any answer there, silently vanished from QA training and
evaluation (the GPU image has 0.23.2). madx_fast checks the windows against the context and refuses."""
from __future__ import annotations

import pytest
from transformers import BatchEncoding

from madx_fast.training.data import DataError
from madx_fast.training.tasks import qa

CONTEXT = " ".join(f"Ana met Boris in Marlow on day {i} ." for i in range(12)) + " Greta lives in Velden ."


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_base)


def example(context=CONTEXT):
    return qa.QaExample(id="q1", question="Where does Greta live ?", context=context,
                       answers=[{"text": "Velden", "answer_start": context.index("Velden")}])


def test_windows_reach_the_end_of_a_long_context(tok):
    try:
        feats = qa.encode_qa_eval([example()], tok, max_length=32, doc_stride=8)
    except DataError as exc:
        import tokenizers
        assert tokenizers.__version__ in ("0.23.1", "0.23.2") and "tokenizers#2091" in str(exc), exc
        return
    assert len(feats) > 3
    last = max(o[1] for f in feats for o in f["offsets"] if o is not None)
    assert last == len(CONTEXT)
    train = qa.encode_qa_train([example()], tok, max_length=32, doc_stride=8)
    assert any(f["start_positions"] > 0 for f in train)  # the answer at the very end is found


class DroppingWindows:
    """A real tokenizer whose overflowing encodings stop after the second window, as tokenizers 0.23.2's do."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        enc = self.tok(*args, **kwargs)
        if not kwargs.get("return_overflowing_tokens"):
            return enc
        keep = [i for i, k in enumerate(enc["overflow_to_sample_mapping"])
                if sum(1 for j in range(i) if enc["overflow_to_sample_mapping"][j] == k) < 2]
        data = {key: [value[i] for i in keep] for key, value in enc.items()}
        return BatchEncoding(data, encoding=[enc.encodings[i] for i in keep])


def test_a_tokenizer_that_drops_windows_is_refused(tok):
    short = example("Greta lives in Velden .")
    with pytest.raises(DataError, match="tokenizers#2091"):
        qa.encode_qa_train([short, example()], DroppingWindows(tok), max_length=32, doc_stride=8)
    with pytest.raises(DataError, match="stop at character"):
        qa.encode_qa_eval([example()], DroppingWindows(tok), max_length=32, doc_stride=8)
