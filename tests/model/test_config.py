"""MadxConfig: presets, validation messages, AdapterHub config conversion."""
from __future__ import annotations

import pytest

from madx_fast.model import AdapterConfigError, MadxConfig, Stack
from madx_fast.model.config import ADAPTERHUB_SEQ_BN_DEFAULTS
from madx_fast.model.stack import normalize_setup
from tests.helpers.models import import_adapterhub


def test_presets():
    lang = MadxConfig.language()
    assert (lang.reduction_factor, lang.inv_adapter, lang.inv_adapter_reduction_factor) == (2, "nice", 2)
    assert MadxConfig.task().reduction_factor == 16 and MadxConfig.task().inv_adapter is None
    assert MadxConfig.from_name("pfeiffer+inv") == MadxConfig.seq_bn_inv()
    assert MadxConfig.coerce("seq_bn") == MadxConfig()
    assert MadxConfig.coerce({"reduction_factor": 4}) == MadxConfig(reduction_factor=4)
    assert MadxConfig.from_dict(MadxConfig.language(leave_out=[3, 1, 1]).to_dict()).leave_out == [1, 3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction_factor=0), "reduction_factor must be a positive number"),
    (dict(reduction_factor={"x": 2}), "neither a layer index"),
    (dict(non_linearity="wiggle"), "unknown activation 'wiggle'"),
    (dict(scaling="learned"), "learned or per-channel scaling is not supported"),
    (dict(init_weights="lora"), "init_weights 'lora'"),
    (dict(leave_out=[-1]), "leave_out entries"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(inv_adapter="glow", inv_adapter_reduction_factor=2), "GLOW"),
    (dict(inv_adapter="nice"), "needs inv_adapter_reduction_factor"),
])
def test_validation_names_the_option(kwargs, match):
    with pytest.raises(AdapterConfigError, match=match):
        MadxConfig(**kwargs)


def test_fit_checks():
    with pytest.raises(AdapterConfigError, match="leave_out names layer"):
        MadxConfig(leave_out=[12]).check_fits(768, 12)
    with pytest.raises(AdapterConfigError, match="leaves no bottleneck"):
        MadxConfig(reduction_factor=64).check_fits(32, 2)
    with pytest.raises(AdapterConfigError, match="no value for layer 1"):
        MadxConfig(reduction_factor={"0": 2}).check_fits(32, 2)
    with pytest.raises(AdapterConfigError, match="unknown adapter option"):
        MadxConfig.from_dict({"reduction_factor": 2, "ln_before": True})


def test_adapterhub_dict_conversion_without_the_library():
    hub = MadxConfig.language(leave_out=[11]).to_adapterhub()
    assert set(hub) == set(ADAPTERHUB_SEQ_BN_DEFAULTS)
    assert hub["reduction_factor"] == 2 and hub["inv_adapter"] == "nice" and hub["leave_out"] == [11]
    assert MadxConfig.from_adapterhub(hub) == MadxConfig.language(leave_out=[11])
    # adapter-transformers v1 wrote the invertible adapter as a nested dict
    legacy = {k: v for k, v in MadxConfig.task().to_adapterhub().items() if not k.startswith("inv_")}
    legacy["invertible_adapter"] = {"block_type": "nice", "reduction_factor": 2}
    assert MadxConfig.from_adapterhub(legacy) == MadxConfig.seq_bn_inv()
    for key, value in [("is_parallel", True), ("residual_before_ln", "post_add"), ("use_gating", True),
                       ("original_ln_after", False), ("phm_layer", True), ("stochastic_depth", 0.1)]:
        with pytest.raises(AdapterConfigError, match=key):
            MadxConfig.from_adapterhub({**hub, key: value})
    with pytest.raises(AdapterConfigError, match="architecture 'lora'"):
        MadxConfig.from_adapterhub({"architecture": "lora", "r": 8})


def test_adapterhub_configs_from_the_library():
    adapters = import_adapterhub()
    assert MadxConfig.from_adapterhub(adapters.SeqBnInvConfig(reduction_factor=2)) == MadxConfig.language()
    assert MadxConfig.from_adapterhub(adapters.SeqBnConfig()) == MadxConfig.task()
    for ours, theirs in [(MadxConfig.language(), adapters.SeqBnInvConfig(reduction_factor=2)),
                         (MadxConfig.task(), adapters.SeqBnConfig())]:
        assert ours.to_adapterhub() == theirs.to_dict()
    with pytest.raises(AdapterConfigError, match="mh_adapter"):
        MadxConfig.from_adapterhub(adapters.DoubleSeqBnConfig())  # Houlsby: adapter after attention too
    with pytest.raises(AdapterConfigError, match="phm_layer"):
        MadxConfig.from_adapterhub(adapters.CompacterPlusPlusConfig())


def test_setup_normalisation():
    assert normalize_setup("en") == ("en",)
    assert normalize_setup(Stack("en", "ner")) == ("en", "ner")
    assert normalize_setup(["en", "ner"]) == ("en", "ner")
    assert normalize_setup(None) == ()
    with pytest.raises(ValueError, match="nested"):
        normalize_setup(Stack("en", Stack("a", "b")))
