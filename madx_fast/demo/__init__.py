"""``madx demo``: the whole MAD-X pipeline offline on a CPU (``pipeline.py``), on synthetic languages
(``synthetic.py``) and a small XLM-R-architecture model it pretrains. Not part of the training library: it
uses ``madx_fast.training`` like any user would."""
from .pipeline import DemoConfig, real_model_config, run_demo

__all__ = ["DemoConfig", "real_model_config", "run_demo"]
