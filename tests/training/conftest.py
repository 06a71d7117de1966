"""Session fixtures of the training tests: a small synthetic corpus and tiny base models built from it."""
import pytest

from tests.helpers.runs import build_tiny_base, write_small_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("corpus"))
    write_small_corpus(d)
    return d


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, corpus):
    return build_tiny_base(str(tmp_path_factory.mktemp("base")), corpus)


@pytest.fixture(scope="session")
def tiny_base_dropout(tmp_path_factory, corpus):
    """With dropout 0.1, as real models: a resumed run must also replay the dropout masks."""
    return build_tiny_base(str(tmp_path_factory.mktemp("base_dropout")), corpus, dropout=0.1)


@pytest.fixture(scope="session")
def tiny_base_other(tmp_path_factory, corpus):
    """Same architecture and tokenizer size, other weights: adapters of ``tiny_base`` must not load here."""
    return build_tiny_base(str(tmp_path_factory.mktemp("base_other")), corpus, seed=1)
