"""Training and fine-tuning: one implementation, used by ``nuclei-unet train`` and the Fine-tune widget.

``config`` (what a run is told), ``targets`` (labels -> targets, loss), ``augment``
(joint augmentation, image-type looks), ``sampler`` (patches), ``calibrate`` (validation
and the min confidence), ``loop`` (``train_steps``/``fit``: the run itself).
"""

from .calibrate import CALIBRATION_MIN_IMAGES, CONFIDENCE_CANDIDATES, calibrate, calibrate_min_confidence, validate
from .config import FINETUNE_DEFAULTS, TrainConfig, TrainEvent, finetune_config
from .loop import LOG_FILE, STATE_FILE, fit, mixed_with_start, pooled_diameter, split_validation, train_steps, training_precision
from .targets import IGNORE, loss_targets, make_loss, make_targets

__all__ = [
    "CALIBRATION_MIN_IMAGES", "CONFIDENCE_CANDIDATES", "FINETUNE_DEFAULTS", "IGNORE", "LOG_FILE", "STATE_FILE", "TrainConfig", "TrainEvent",
    "calibrate", "calibrate_min_confidence", "finetune_config", "fit", "loss_targets", "make_loss", "make_targets", "mixed_with_start",
    "pooled_diameter", "split_validation", "train_steps", "training_precision", "validate",
]  # fmt: skip
