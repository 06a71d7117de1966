"""What ``save_pretrained`` records about a model's MAD-X adapters: ``config.json``'s ``"madx"`` entry (the
adapters' configs and the active setup; read back by ``pretrained.py``), written by the hook ``add_madx``
puts on the model's ``save_pretrained``."""
from __future__ import annotations

import logging
import os

from .._version import __version__
from .stack import PerRow

log = logging.getLogger("madx_fast")

CONFIG_KEY = "madx"
FORMAT = "madx_fast.pretrained"
FORMAT_VERSION = 1
_MISSING = object()


def setup_record(madx) -> dict:
    """What ``config.json``'s ``"madx"`` entry records about ``madx``: the adapters' configs, the active setup."""
    active = [{"per_row": list(e.names)} if isinstance(e, PerRow) else e for e in madx.state.active]
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "adapters": {name: config.to_dict() for name, config in madx.configs.items()}, "active": active,
            "madx_fast_version": __version__}


# --------------------------------------------------------------------------------------------------------
# saving: model.save_pretrained
# --------------------------------------------------------------------------------------------------------
def install_save_hook(model) -> None:
    """``model.save_pretrained`` records the adapters in ``config.json`` (for this model only; a copy or a pickled
    and loaded model keeps the hook, bound to itself)."""
    model.save_pretrained = SavePretrained(model)


def remove_save_hook(model) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), SavePretrained):
        del model.__dict__["save_pretrained"]


class SavePretrained:
    """``model.save_pretrained`` of a model with MAD-X: HF's, with ``config.madx`` set to the adapters' record
    while it writes config.json. An object (not a bound method) so that it pickles and copies with the model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return _save_pretrained(self.model, save_directory, *args, **kwargs)


def _save_pretrained(model, save_directory, *args, **kwargs):
    """HF's ``save_pretrained`` of ``model``'s class, with the record in ``model.config`` while it runs."""
    madx = model.__dict__.get("madx")
    if madx is None:  # add_madx was undone
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)
    previous = model.config.__dict__.get(CONFIG_KEY, _MISSING)
    setattr(model.config, CONFIG_KEY, setup_record(madx))
    try:
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    finally:
        if previous is _MISSING:
            model.config.__dict__.pop(CONFIG_KEY, None)
        else:
            setattr(model.config, CONFIG_KEY, previous)
    if madx.configs:
        log.info("saved %s with MAD-X adapters %s (active %s) in its weights and config.json; load it with "
                 "madx_fast.model.from_pretrained(%r)", save_directory, ", ".join(madx.configs), madx.active,
                 os.fspath(save_directory))
    return result


__all__ = ["CONFIG_KEY", "FORMAT", "FORMAT_VERSION", "SavePretrained", "install_save_hook", "remove_save_hook",
           "setup_record"]
