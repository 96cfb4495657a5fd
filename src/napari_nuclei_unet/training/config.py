"""What a training run is told: :class:`TrainConfig` (defaults for training from scratch), the fine-tuning defaults, and the progress events it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..metrics import Scores


@dataclass
class TrainConfig:
    """Training parameters; defaults suit fine-tuning on a CPU laptop."""

    epochs: int = 20
    iterations_per_epoch: int = 50
    max_minutes: float | None = None
    patch_size: int = 256
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    augment: bool = True
    scale_range: tuple[float, float] = (0.5, 2.0)  # zoom factors of the scale augmentation
    # Show each image's nuclei at the zoom segmentation will run them at (their median size
    # against the model's reference, segment.rescale_factor); scale_range then jitters around it.
    zoom_to_reference: bool = False
    # Share of patches shown at up to 2.5x lower resolution, zoomed back up: what the network
    # sees when an image taken at low magnification is zoomed up to its nuclei's training size.
    # Off by default: 0.25 gained only 0.015 at x0.5 and made the size estimate overshoot (model card).
    low_resolution: float = 0.0
    val_every: int = 1
    val_fraction: float = 0.15  # used when no validation images are given
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    # Keep BatchNorm statistics of the starting model. For fine-tuning on a few images of one
    # kind: re-estimating them from those images alone breaks the model on every other kind.
    freeze_batchnorm: bool = False
    # Train only the decoder and head: the encoder's general features stay as they were.
    freeze_encoder: bool = False
    # L2-SP (Li et al., ICML 2018): pulls the weights towards the starting model's, so a few
    # corrected images adapt it without making it forget the rest. 0: off.
    anchor_weight: float = 0.0
    # Learning without forgetting across image types: every patch is also shown restyled as
    # the other types (fluorescence, brightfield, stained tissue), where the model is held to
    # the starting model's output with this weight. 0: off.
    distill_weight: float = 0.0
    # Weight-space ensembling (WiSE-FT, Wortsman et al., CVPR 2022): the model validated and
    # saved is (1 - share) x the trained weights + share x the starting weights. Fine-tuning
    # fits a few images' outlines and also learns their quirks; mixing the start back in keeps
    # more of the first and less of the second. 0: the trained weights as they are.
    start_weight_share: float = 0.0
    # "auto": bfloat16 autocast on CPUs with native bfloat16 (AVX512-BF16 or AMX; a step ~1.5x
    # faster, measured in docs/performance.md), float32 elsewhere. "float32" | "bfloat16" force it.
    # Weights and optimiser state stay float32 either way.
    precision: str = "auto"
    # After training, measure the model's min_confidence (calibrate_min_confidence) on the
    # validation images (with the training images when there are few) and save it with the model.
    calibrate: bool = True


# Settings for fine-tuning a trained model on a few corrected images: the Fine-tune
# widget's defaults, measured with benchmarks/finetune.py (docs/user-guide.md, section 8).
FINETUNE_DEFAULTS = dict(
    epochs=10, iterations_per_epoch=20, learning_rate=3e-4, batch_size=4, patch_size=256, warmup_iterations=20,
    freeze_batchnorm=True, freeze_encoder=False, anchor_weight=0.0, distill_weight=1.0, zoom_to_reference=True, scale_range=(0.8, 1.25),
    start_weight_share=0.25,
)  # fmt: skip


def finetune_config(**overrides) -> TrainConfig:
    """A :class:`TrainConfig` with the fine-tuning defaults, ``overrides`` applied."""
    return TrainConfig(**{**FINETUNE_DEFAULTS, **overrides})


@dataclass
class TrainEvent:
    """Progress report: ``kind`` is 'iteration', 'epoch' (with validation), 'calibrating' (after the last epoch) or 'done'."""

    kind: str
    epoch: int
    iteration: int
    total_iterations: int
    loss: float
    elapsed: float
    device: str
    scores: Scores | None = None
    best_score: float | None = None
    improved: bool = False
    cancelled: bool = False
    saved: bool = True  # False: cancelled before the first epoch ended, so no model was saved
    history: list[dict] = field(default_factory=list)
