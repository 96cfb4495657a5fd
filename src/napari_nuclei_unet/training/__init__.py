"""Training and fine-tuning: one implementation, used by ``nuclei-unet train`` and the Fine-tune widget.

``config`` (what a run is told), ``targets`` (labels -> targets, loss), ``augment``
(joint augmentation, image-type looks), ``sampler`` (patches), ``calibrate`` (validation
and the min confidence), ``loop`` (``train_steps``/``fit``: the run itself).

Names are loaded from their module on first use, so that ``from ..training import TrainEvent``
(the Fine-tune widget) does not import torch: the widget's module is imported on napari's
GUI thread, before the heavy imports may safely run (see ``_triton_guard``).
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "CALIBRATION_MIN_IMAGES": "calibrate",
    "CONFIDENCE_CANDIDATES": "calibrate",
    "calibrate": "calibrate",
    "calibrate_min_confidence": "calibrate",
    "validate": "calibrate",
    "FINETUNE_DEFAULTS": "config",
    "TrainConfig": "config",
    "TrainEvent": "config",
    "finetune_config": "config",
    "LOG_FILE": "loop",
    "STATE_FILE": "loop",
    "fit": "loop",
    "mixed_with_start": "loop",
    "pooled_diameter": "loop",
    "split_validation": "loop",
    "train_steps": "loop",
    "training_precision": "loop",
    "IGNORE": "targets",
    "loss_targets": "targets",
    "make_loss": "targets",
    "make_targets": "targets",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
