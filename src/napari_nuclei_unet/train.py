"""Training and fine-tuning: one implementation, used by ``nuclei-unet train`` and the fine-tune widget.

* Targets are derived from instance labels: ``foreground`` and ``boundary`` (the inner
  contour of every nucleus, 2 px, which is also the line between touching nuclei). The
  watershed seeds from ``foreground - boundary``.
* Image and targets are augmented together with ``torchvision.transforms.v2``
  (``tv_tensors.Image`` / ``tv_tensors.Mask``): scale, flips, 90° rotations, brightness,
  contrast, saturation/hue, gamma.
* Loss: BCE + Dice from ``segmentation_models_pytorch.losses``; pixels outside a region
  of interest (or in padding) are ignored.
* Fine-tuning on a few images of one type must not break the others: each patch is also
  redrawn as the other image types, where the model is held to the starting model's output
  (``distill_weight``; learning without forgetting, Li & Hoiem 2016), and the saved model
  mixes a share of the starting weights back in (``start_weight_share``; WiSE-FT).
* The run validates every ``val_every`` epochs with the full segmentation pipeline and
  the Kaggle DSB2018 score, keeps the best checkpoint, logs each epoch to CSV, and can
  resume. ``train_steps`` is a generator of :class:`TrainEvent` (for thread workers);
  ``fit`` drives it with a progress callback and a cancel check. No global state.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .data import LabelledImage, image_type, median_diameter
from .errors import InputError, ModelError
from .io import Normalizer
from .metrics import Scores, evaluate
from .model import Checkpoint, resolve_device

IGNORE = -1.0
STATE_FILE = "training_state.pt"
LOG_FILE = "training_log.csv"


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
    history: list[dict] = field(default_factory=list)


def make_targets(labels: np.ndarray, roi: np.ndarray | None = None, boundary_width: int = 2) -> np.ndarray:
    """``(3, Y, X)`` uint8: foreground, boundary (inner contours, ``boundary_width`` px), valid (loss counts)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    foreground = labels > 0
    boundary = find_boundaries(labels, mode="inner") & foreground
    if boundary_width > 1:
        boundary = ndi.binary_dilation(boundary, iterations=boundary_width - 1) & foreground
    valid = np.ones_like(foreground) if roi is None else np.asarray(roi, bool)
    return np.stack([foreground, boundary, valid]).astype(np.uint8)


def loss_targets(target: torch.Tensor) -> torch.Tensor:
    """Float ``(2, Y, X)`` targets for :func:`make_loss` from :func:`make_targets` output: invalid pixels -> IGNORE."""
    target = torch.as_tensor(target).float()
    labels = target[:2].clone()
    labels[:, target[2] == 0] = IGNORE
    return labels


class RandomRot90(v2.Transform):
    """Rotate image and masks together by a random multiple of 90°."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt, params):
        return inpt if params["k"] == 0 else tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


def _uniform(low: float, high: float) -> float:
    """A random number from torch's generator, like torchvision's own transforms: ``TrainConfig.seed`` makes it repeatable."""
    return float(torch.empty(()).uniform_(low, high))


class RandomGamma(v2.Transform):
    """Gamma change of the image only (masks pass through untouched)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5)):
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs):
        low, high = np.log(self.gamma)
        return {"gamma": math.exp(_uniform(low, high))}

    def transform(self, inpt, params):
        return v2.functional.adjust_gamma(inpt, params["gamma"])


class RandomLowResolution(v2.Transform):
    """Image only: shrink by a random factor (antialiased) and zoom back up, losing fine detail."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, factor: tuple[float, float] = (1.25, 2.5)):
        super().__init__()
        self.factor = factor

    def make_params(self, flat_inputs):
        return {"factor": _uniform(*self.factor)}

    def transform(self, inpt, params):
        size = list(inpt.shape[-2:])
        small = [max(8, int(round(side / params["factor"]))) for side in size]
        shrunk = v2.functional.resize(inpt, small, antialias=True)
        return tv_tensors.wrap(v2.functional.resize(shrunk, size, antialias=False), like=inpt)


def build_augmentation(config: TrainConfig) -> v2.Transform:
    """Joint geometric + image-only intensity and resolution augmentation (torchvision v2)."""
    geometric = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
    resolution = [v2.RandomApply([RandomLowResolution()], p=config.low_resolution)] if config.low_resolution > 0 else []
    intensity = [
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.08)], p=0.8),
        v2.RandomApply([RandomGamma()], p=0.5),
        v2.RandomGrayscale(p=0.1),
    ]
    return v2.Compose(geometric + resolution + intensity)


class PatchSampler:
    """Random training patches with joint augmentation; in-process (no DataLoader workers to pickle)."""

    def __init__(
        self, samples: list[LabelledImage], config: TrainConfig, in_channels: int, percentiles, rng: np.random.Generator,
        zooms: list[float] | None = None,
    ):  # fmt: skip
        self.config = config
        self.rng = rng
        self.zooms = zooms or [1.0] * len(samples)  # per image, before the scale augmentation
        self.images = [torch.from_numpy(Normalizer.from_image(s.image, in_channels, percentiles)(s.image)) for s in samples]
        self.targets = [torch.from_numpy(make_targets(s.labels, s.roi)) for s in samples]
        areas = np.array([s.labels.size for s in samples], np.float64)
        self.weights = np.maximum(areas / config.patch_size**2, 1.0)
        self.weights /= self.weights.sum()
        self.augment = build_augmentation(config) if config.augment else None
        # For restyle (distillation only): each image's type and its background/nucleus signal levels.
        self.types = [image_type(s.image) for s in samples] if config.distill_weight > 0 else []
        self.levels = [_signal_levels(image, target[0] > 0, kind) for image, target, kind in zip(self.images, self.targets, self.types)]

    def patch(self, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if index is None:
            index = int(self.rng.choice(len(self.images), p=self.weights))
        image, target = self.images[index], self.targets[index]
        size = self.config.patch_size
        zoom = self.zooms[index]
        if self.config.augment:
            low, high = np.log(self.config.scale_range)
            zoom *= float(np.exp(self.rng.uniform(low, high)))
        crop = max(8, int(round(size / zoom)))
        height, width = image.shape[-2:]
        top = int(self.rng.integers(0, max(height - crop, 0) + 1))
        left = int(self.rng.integers(0, max(width - crop, 0) + 1))
        image = tv_tensors.Image(image[:, top:top + crop, left:left + crop])
        target = tv_tensors.Mask(target[:, top:top + crop, left:left + crop])
        # Pad small images (padding is marked invalid in the target), then zoom to the patch size.
        pad_h, pad_w = max(0, crop - image.shape[-2]), max(0, crop - image.shape[-1])
        if pad_h or pad_w:
            image = v2.functional.pad(image, [0, 0, pad_w, pad_h], padding_mode="reflect" if min(image.shape[-2:]) > max(pad_h, pad_w) else "constant")
            target = v2.functional.pad(target, [0, 0, pad_w, pad_h], fill=0)
        if crop != size:
            image = v2.functional.resize(image, [size, size], antialias=True)
            target = v2.functional.resize(target, [size, size])  # masks: nearest
        if self.augment is not None:
            image, target = self.augment(image, target)
        return image.as_subclass(torch.Tensor), loss_targets(target)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Patches, their loss targets and the index of the image each came from."""
        indices = [int(i) for i in self.rng.choice(len(self.images), size=self.config.batch_size, p=self.weights)]
        pairs = [self.patch(index) for index in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), indices

    def restyle(self, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Each patch redrawn as an image type other than its own (for :attr:`TrainConfig.distill_weight`).

        The nuclear signal (grey level, inverted for bright backgrounds) is rescaled so that
        the image's background is 0 and its nuclei 1, then painted with a random background
        and nucleus colour of another type: dark and grey-bright for fluorescence, bright and
        dark grey for brightfield, pink-white and purple for H&E-like tissue.
        """
        out = torch.empty_like(images)
        for row, (image, index) in enumerate(zip(images, indices)):
            kind, (background, nuclei) = self.types[index], self.levels[index]
            signal = ((_nuclear_signal(image, kind) - background) / max(nuclei - background, 0.05)).clamp(-0.2, 1.2)
            look = [t for t in _LOOKS if t != kind][int(self.rng.integers(len(_LOOKS) - 1))]
            colours = _LOOKS[look]
            back = torch.tensor(np.clip(colours[0] + self.rng.uniform(-0.08, 0.08, 3), 0, 1), dtype=image.dtype)
            front = torch.tensor(np.clip(colours[1] + self.rng.uniform(-0.12, 0.12, 3), 0, 1), dtype=image.dtype)
            if look != "tissue":  # greys
                back, front = back.mean().expand(3), front.mean().expand(3)
            painted = back[:, None, None] + (front - back)[:, None, None] * signal[None]
            out[row] = painted.mean(0, keepdim=True).expand_as(image) if image.shape[0] != 3 else painted
        return out.clamp_(0.0, 1.0)


# Background and nucleus colours of the three DSB2018 image types, as normalised model input.
_LOOKS = {
    "fluorescence": (np.array([0.04, 0.04, 0.04]), np.array([0.55, 0.55, 0.55])),
    "brightfield": (np.array([0.8, 0.8, 0.8]), np.array([0.12, 0.12, 0.12])),
    "tissue": (np.array([0.8, 0.7, 0.95]), np.array([0.45, 0.18, 0.88])),
}


def _nuclear_signal(image: torch.Tensor, kind: str) -> torch.Tensor:
    """Grey level that is high on nuclei: as is for fluorescence, inverted for bright backgrounds."""
    return image.mean(0) if kind == "fluorescence" else 1.0 - image.mean(0)


def _signal_levels(image: torch.Tensor, nuclei: torch.Tensor, kind: str) -> tuple[float, float]:
    """Median nuclear signal of the background and of the nuclei (1.0 when there are none)."""
    signal = _nuclear_signal(image, kind)
    background = float(signal[~nuclei].median()) if (~nuclei).any() else 0.0
    inside = float(signal[nuclei].median()) if nuclei.any() else 1.0
    return background, inside


def make_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE + Dice over both output channels, ignoring pixels marked IGNORE."""
    from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

    dice = DiceLoss(mode="multilabel", from_logits=True, ignore_index=IGNORE)
    bce = SoftBCEWithLogitsLoss(ignore_index=IGNORE)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce(logits, target) + dice(logits, target)

    return loss


def split_validation(samples: list[LabelledImage], fraction: float, seed: int) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Hold out whole images for validation (at least one when there are two or more)."""
    if len(samples) < 2 or fraction <= 0:
        return samples, []
    order = np.random.default_rng(seed).permutation(len(samples))
    count = min(len(samples) - 1, max(1, int(round(fraction * len(samples)))))
    held = set(order[:count].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def validate(checkpoint: Checkpoint, samples: list[LabelledImage], device: str = "auto", cancel=None) -> Scores:
    """Score the checkpoint on whole images with the real pipeline (tiling + watershed)."""
    from .segment import segment

    params = _evaluation_params(device)
    with _evaluation_mode(checkpoint.model):
        return evaluate([_within_roi(sample, segment(checkpoint, sample.image, params, cancel=cancel).labels) for sample in samples])


# Candidates for a model's min_confidence: 0 keeps every object; above 0.95 little is left.
CONFIDENCE_CANDIDATES = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
CALIBRATION_MIN_IMAGES = 5  # fewer validation images than this: calibrate on the training images too


def calibrate_min_confidence(
    checkpoint: Checkpoint, samples: list[LabelledImage], device: str = "auto", candidates=CONFIDENCE_CANDIDATES, cancel=None
) -> tuple[float, dict[float, float]]:
    """The ``min_confidence`` giving ``samples`` the best Kaggle DSB2018 score with ``checkpoint``, and the score of every candidate.

    Like StarDist's ``optimize_thresholds``: a model's probabilities are its own (a model
    fine-tuned on a few images is surer of itself than the one it started from), so the level
    below which an object is more likely a fold or debris than a nucleus is measured per model,
    on its data. The network runs once per image; ties go to the lower value (fewer dropped).
    """
    from .segment import label_plane, predict_plane

    params = _evaluation_params(device)
    with _evaluation_mode(checkpoint.model):
        predictions = [predict_plane(checkpoint, sample.image, params, cancel=cancel) for sample in samples]
    scores = {}
    for value in candidates:
        postprocess = replace(params.postprocess, min_confidence=value)
        pairs = [_within_roi(sample, label_plane(prediction, checkpoint.outputs, postprocess)[1]) for sample, prediction in zip(samples, predictions)]
        scores[value] = evaluate(pairs).kaggle_score
    return max(candidates, key=lambda value: (scores[value], -value)), scores


def calibrate(checkpoint: Checkpoint, samples: list[LabelledImage], description: str, device: str = "auto") -> float:
    """Calibrate ``checkpoint``'s ``min_confidence`` on ``samples`` and record it in its metadata (saved with it)."""
    value, scores = calibrate_min_confidence(checkpoint, samples, device)
    checkpoint.metadata["postprocess"] = {
        "min_confidence": value,
        "calibrated_on": description,
        "kaggle_score_by_min_confidence": {str(k): round(v, 5) for k, v in scores.items()},
    }
    return value


def _evaluation_params(device: str):
    from .segment import SegmentParams
    from .tiling import TilingParams

    return SegmentParams(tiling=TilingParams(device=device, precision="float32"))  # the model as trained, not re-quantised every epoch


@contextlib.contextmanager
def _evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode within the block; each module's own mode after it (frozen BatchNorm stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _within_roi(sample: LabelledImage, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, prediction)`` with both cleared outside the sample's region of interest."""
    if sample.roi is None:
        return sample.labels, labels
    return np.where(sample.roi, sample.labels, 0), np.where(sample.roi, labels, 0)


def _learning_rate(config: TrainConfig, iteration: int, total: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay over iterations or wall-clock time, whichever runs out first."""
    if iteration < config.warmup_iterations:
        return config.learning_rate * (iteration + 1) / config.warmup_iterations
    fraction = iteration / max(total, 1)
    if config.max_minutes:
        fraction = max(fraction, elapsed / (60.0 * config.max_minutes))
    return config.learning_rate * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1.0))))


def train_steps(
    checkpoint: Checkpoint,
    train: list[LabelledImage],
    out_dir: str | os.PathLike,
    val: list[LabelledImage] | None = None,
    config: TrainConfig | None = None,
    resume: bool = True,
    base_model: str | None = None,
    data_description: str | None = None,
) -> Iterator[TrainEvent]:
    """Train ``checkpoint`` in place, yielding a :class:`TrainEvent` after every iteration and epoch.

    Closing the generator (or stopping to iterate) is the cancel: the best checkpoint so far
    stays in ``out_dir`` and ``training_state.pt`` allows resuming.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    if not train:
        raise InputError("no training images with labels")
    if not any(int(s.labels.max()) > 0 for s in train):
        raise InputError("the training labels contain no nuclei")
    if val is None:
        train, val = split_validation(train, config.val_fraction, config.seed)
    device = resolve_device(config.device)
    precision = training_precision(config.precision, device)
    if not 0.0 <= config.start_weight_share < 1.0:
        raise InputError(f"the share of the starting weights must be at least 0 and below 1, got {config.start_weight_share}")
    _check_writable(out_dir)  # after the settings are checked, so a bad one leaves no empty folder
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    # Channels-last convolutions train ~30% faster on CPUs (oneDNN); weights are saved contiguous.
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    shown_device = f"{device} ({precision})" if precision != "float32" else str(device)  # for progress reports
    model = checkpoint.model.to(device, memory_format=memory_format)
    _set_training_mode(model, config.freeze_batchnorm)
    trainable = _trainable_parameters(model, config.freeze_encoder)
    anchor = [p.detach().clone() for p in trainable] if config.anchor_weight > 0 else None  # the starting weights
    teacher = _frozen_copy(model) if config.distill_weight > 0 else None  # the starting model, for distillation
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.start_weight_share > 0 else None
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0 if anchor else config.weight_decay)
    total = config.epochs * config.iterations_per_epoch
    history: list[dict] = []
    start_epoch, iteration, best, spent = 0, 0, -1.0, 0.0
    state_path = out_dir / STATE_FILE
    if resume and state_path.exists():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except Exception as error:
            raise ModelError(f"{state_path}: cannot resume ({str(error).splitlines()[0][:200]}); delete it to start over") from None
        start_epoch, iteration, best, spent = int(state["epoch"]), int(state["iteration"]), float(state["best"]), float(state["elapsed"])
        history = _read_log(out_dir / LOG_FILE)
        rng = np.random.default_rng(config.seed + start_epoch)
    zooms = _reference_zooms(checkpoint, train) if config.zoom_to_reference else None
    sampler = PatchSampler(train, config, checkpoint.config.in_channels, checkpoint.percentiles, rng, zooms)
    loss_fn = make_loss()
    nuclei = int(sum(int(np.unique(s.labels).size - (1 if (s.labels == 0).any() else 0)) for s in train))
    data_diameter = median_diameter([s.labels for s in train])
    base_nuclei = _reference_nuclei(checkpoint)
    checkpoint.nucleus_diameter = pooled_diameter(checkpoint.nucleus_diameter, base_nuclei, data_diameter, nuclei)
    started = time.perf_counter() - spent
    record = {
        "base_model": base_model or checkpoint.source or "new",
        "data": data_description or f"{len(train)} images",
        "images": len(train),
        "nuclei": nuclei,
        "data_nucleus_diameter": data_diameter,  # median of these images; nucleus_diameter pools it with the base's
        "reference_nuclei": base_nuclei + nuclei,
        "validation_images": len(val),
        "precision": precision,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    }
    epoch = start_epoch
    running = float("nan")
    finished = False
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            losses = []
            for _ in range(config.iterations_per_epoch):
                elapsed = time.perf_counter() - started
                lr = _learning_rate(config, iteration, total, elapsed)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, targets, indices = sampler.batch()
                images, targets = images.to(device, memory_format=memory_format), targets.to(device)
                if teacher is None:
                    with autocast:
                        logits = model(images)
                    data_loss = loss_fn(logits.float(), targets)
                    loss = data_loss
                else:
                    restyled = sampler.restyle(images.cpu(), indices).to(device, memory_format=memory_format)
                    with torch.no_grad(), autocast:
                        kept = torch.sigmoid(teacher(restyled).float())
                    with autocast:
                        logits, other_looks = model(torch.cat([images, restyled])).float().split(len(images))
                    data_loss = loss_fn(logits, targets)
                    loss = data_loss + config.distill_weight * torch.nn.functional.binary_cross_entropy_with_logits(other_looks, kept)
                if anchor is not None:
                    loss = loss + config.anchor_weight * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, anchor))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                iteration += 1
                # Reported: how well the labels are fitted (BCE + Dice), without the anchor's penalty.
                losses.append(float(data_loss.detach()))
                running = float(np.mean(losses))
                yield TrainEvent("iteration", epoch, iteration, total, losses[-1], time.perf_counter() - started, shown_device)
            elapsed = time.perf_counter() - started
            out_of_time = bool(config.max_minutes and elapsed >= 60.0 * config.max_minutes)
            scores, improved = None, False
            with mixed_with_start(model, start, config.start_weight_share):  # what is validated is what is saved
                if val and (epoch % config.val_every == 0 or epoch == config.epochs or out_of_time):
                    scores = validate(checkpoint, val, str(device))
                    improved = scores.kaggle_score > best
                elif not val:
                    improved = True  # nothing to validate on: keep the latest
                if improved:
                    best = scores.kaggle_score if scores is not None else best
                    _save_best(checkpoint, out_dir, record, scores, epoch, iteration, elapsed, device, memory_format)
            row = {"epoch": epoch, "iteration": iteration, "train_loss": running, "lr": lr, "seconds": round(elapsed, 1)}
            if scores is not None:
                row.update({k: round(v, 5) if isinstance(v, float) else v for k, v in scores.as_dict().items()})
            history.append(row)
            _save_state(state_path, model, optimizer, epoch, iteration, best, elapsed)
            _write_log(out_dir / LOG_FILE, history)
            yield TrainEvent("epoch", epoch, iteration, total, running, elapsed, shown_device, scores, best if best >= 0 else None, improved, history=list(history))
            if out_of_time:
                break
        finished = True
    finally:
        model.eval().to(memory_format=torch.contiguous_format)
        if not finished:  # cancelled (generator closed): make sure a usable model exists
            if not (out_dir / "model.safetensors").exists():
                with mixed_with_start(model, start, config.start_weight_share):
                    _save_best(checkpoint, out_dir, record, None, epoch, iteration, time.perf_counter() - started, device)
    best_checkpoint = Checkpoint.load(out_dir, device=device)
    if config.calibrate:
        yield TrainEvent("calibrating", epoch, iteration, total, running, time.perf_counter() - started, shown_device, best_score=best if best >= 0 else None, history=list(history))
        # A few held-out images are too few to pick a level from: then the training images count too.
        samples, kind = (val, "validation") if len(val) >= CALIBRATION_MIN_IMAGES else (train + val, "training and validation" if val else "training")
        calibrate(best_checkpoint, samples, f"{len(samples)} {kind} image{'s' if len(samples) != 1 else ''}", str(device))
        best_checkpoint.save(out_dir, overwrite=True)
    checkpoint.model.load_state_dict(best_checkpoint.model.state_dict())
    checkpoint.metadata, checkpoint.source = best_checkpoint.metadata, str(out_dir)
    yield TrainEvent("done", epoch, iteration, total, running, time.perf_counter() - started, shown_device, best_score=best if best >= 0 else None, history=list(history))


@contextlib.contextmanager
def mixed_with_start(model: torch.nn.Module, start: dict[str, torch.Tensor] | None, share: float) -> Iterator[None]:
    """Within the block, ``model`` holds ``(1 - share) x`` its weights ``+ share x start`` (WiSE-FT); after it, its own again.

    Every floating-point entry of the state is mixed, BatchNorm statistics included; counters
    stay as trained. ``start`` None or ``share`` 0: the block sees the model as it is.
    """
    if start is None or share <= 0:
        yield
        return
    state = model.state_dict()
    trained = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for name, value in state.items():
            if value.is_floating_point():
                value.lerp_(start[name].to(value.device, value.dtype), share)
    try:
        yield
    finally:
        model.load_state_dict(trained)


def training_precision(setting: str, device: torch.device) -> str:
    """"float32" or "bfloat16": what the forward and backward passes run in for :attr:`TrainConfig.precision` on ``device``."""
    if setting in ("float32", "bfloat16"):
        return setting
    if setting != "auto":
        raise InputError(f"training precision must be auto, float32 or bfloat16, got {setting!r}")
    return "bfloat16" if device.type == "cpu" and _cpu_has_native_bfloat16() else "float32"


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively; elsewhere bfloat16 is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: stay with float32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pooled_diameter(base: float | None, base_nuclei: int, data: float | None, data_nuclei: int) -> float | None:
    """The reference nucleus size of a model trained on ``data_nuclei`` nuclei of median ``data`` px,
    starting from one whose reference ``base`` came from ``base_nuclei`` nuclei.

    A new model (no base) takes its data's median. A fine-tuned one has still learnt mostly
    from its base's nuclei: its reference moves towards the new median by the new nuclei's
    share (on a log scale), so a few corrected images do not re-scale every other image the
    model segments. Measured on the DSB2018 val split (docs/user-guide.md, section 8): with
    the reference set to the median of 3 tissue images (23.4 px instead of 19.8) and the
    weights left as they were, the other 7 tissue images lost 0.016 DSB score and the
    fluorescence images 0.008.
    """
    if not base or not base_nuclei or data is None:
        return data or base
    share = data_nuclei / (data_nuclei + base_nuclei)
    return float(np.exp((1.0 - share) * np.log(base) + share * np.log(data)))


def _reference_zooms(checkpoint: Checkpoint, samples: list[LabelledImage]) -> list[float]:
    """Per image, the zoom segmentation applies to nuclei of its median size (1.0 without a reference)."""
    from .segment import rescale_factor

    if not checkpoint.nucleus_diameter:
        return [1.0] * len(samples)
    return [rescale_factor(checkpoint, median_diameter([s.labels])) for s in samples]


def _reference_nuclei(checkpoint: Checkpoint) -> int:
    """How many nuclei the checkpoint's reference size stands for (0: unknown or none)."""
    if not checkpoint.nucleus_diameter:
        return 0
    training = checkpoint.metadata.get("training") or {}
    return int(training.get("reference_nuclei") or training.get("nuclei") or 0)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _trainable_parameters(model: torch.nn.Module, freeze_encoder: bool) -> list[torch.nn.Parameter]:
    encoder = getattr(model, "encoder", None)
    frozen = {id(p) for p in encoder.parameters()} if freeze_encoder and encoder is not None else set()
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return [p for p in model.parameters() if p.requires_grad]


def _set_training_mode(model: torch.nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def fit(
    checkpoint: Checkpoint,
    train: list[LabelledImage],
    out_dir: str | os.PathLike,
    val: list[LabelledImage] | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    **kwargs,
) -> TrainEvent:
    """Run :func:`train_steps` to the end; ``cancel()`` is checked after every iteration."""
    steps = train_steps(checkpoint, train, out_dir, val, config, **kwargs)
    last = None
    for event in steps:
        last = event
        if progress is not None:
            progress(event)
        if event.kind == "done":
            return event
        if cancel is not None and cancel():
            steps.close()
            best = Checkpoint.load(out_dir)
            checkpoint.model.load_state_dict(best.model.state_dict())
            checkpoint.metadata, checkpoint.source = best.metadata, str(out_dir)
            last.kind, last.cancelled = "done", True
            return last
    return last


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{out_dir}: output folder is not writable ({error.strerror})") from None


def _save_best(checkpoint, out_dir, record, scores, epoch, iteration, elapsed, device, memory_format=torch.contiguous_format) -> None:
    checkpoint.metadata.setdefault("name", out_dir.name)
    checkpoint.metadata["training"] = {
        **record,
        "epochs": epoch,
        "iterations": iteration,
        "seconds": round(elapsed, 1),
        "device": str(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if scores is not None:
        checkpoint.metadata["metrics"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in scores.as_dict().items()}
        checkpoint.metadata["metrics"]["measured_on"] = "validation images"
    checkpoint.model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    checkpoint.save(out_dir, overwrite=True)
    checkpoint.model.to(memory_format=memory_format)


def _save_state(path, model, optimizer, epoch, iteration, best, elapsed) -> None:
    tmp = path.with_suffix(".part")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "iteration": iteration, "best": best, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)


def _write_log(path: Path, history: list[dict]) -> None:
    from .io import atomic_write

    columns = list(dict.fromkeys(k for row in history for k in row))
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]
