"""Random training patches, zoomed so nuclei appear at the size segmentation will show them, and restyled as other image
types."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data import LabelledImage, image_type, median_diameter
from ..io import Normalizer
from ..model import Checkpoint
from ..plane import apply_stain, auto_stain
from .augment import LOOKS, build_augmentation, nuclear_signal, signal_levels
from .config import TrainConfig
from .targets import loss_targets, make_targets


class PatchSampler:
    """Random training patches with joint augmentation; in-process (no DataLoader workers to pickle)."""

    def __init__(
        self,
        samples: list[LabelledImage],
        config: TrainConfig,
        in_channels: int,
        percentiles,
        rng: np.random.Generator,
        zooms: list[float] | None = None,
        outputs: tuple[str, ...] = ("foreground", "boundary"),
    ):
        self.config = config
        self.outputs = outputs  # the model's, in order: the loss targets follow them
        self.rng = rng
        self.zooms = zooms or [1.0] * len(samples)  # per image, before the scale augmentation
        self.types = [image_type(s.image) for s in samples]
        # Read as segmentation reads them with the stain "auto" (colour fluorescence: the grey it was rendered from).
        images = [apply_stain(sample.image, auto_stain(kind)) for sample, kind in zip(samples, self.types)]
        self.images = [
            torch.from_numpy(Normalizer.from_image(image, in_channels, percentiles)(image)) for image in images
        ]
        self.targets = [torch.from_numpy(make_targets(s.labels, s.roi)) for s in samples]
        self.weights = patch_weights(
            [s.labels.size for s in samples], self.types if config.balance_image_types else None, config.patch_size
        )
        self.augment = build_augmentation(config) if config.augment else None
        # For restyle (distillation only): each image's background/nucleus signal levels.
        self.levels = (
            [
                signal_levels(image, target[0] > 0, kind)
                for image, target, kind in zip(self.images, self.targets, self.types)
            ]
            if config.distill_weight > 0
            else []
        )

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
        image = tv_tensors.Image(image[:, top : top + crop, left : left + crop])
        target = tv_tensors.Mask(target[:, top : top + crop, left : left + crop])
        # Pad small images (padding is marked invalid in the target), then zoom to the patch size.
        pad_h, pad_w = max(0, crop - image.shape[-2]), max(0, crop - image.shape[-1])
        if pad_h or pad_w:
            image = v2.functional.pad(
                image,
                [0, 0, pad_w, pad_h],
                padding_mode="reflect" if min(image.shape[-2:]) > max(pad_h, pad_w) else "constant",
            )
            target = v2.functional.pad(target, [0, 0, pad_w, pad_h], fill=0)
        if crop != size:
            image = v2.functional.resize(image, [size, size], antialias=True)
            target = v2.functional.resize(target, [size, size])  # masks: nearest
        if self.augment is not None:
            image, target = self.augment(image, target)
        return image.as_subclass(torch.Tensor), loss_targets(target, self.outputs, self.config.touch_weight > 0)

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
            signal = ((nuclear_signal(image, kind) - background) / max(nuclei - background, 0.05)).clamp(-0.2, 1.2)
            look = [t for t in LOOKS if t != kind][int(self.rng.integers(len(LOOKS) - 1))]
            colours = LOOKS[look]
            back = torch.tensor(np.clip(colours[0] + self.rng.uniform(-0.08, 0.08, 3), 0, 1), dtype=image.dtype)
            front = torch.tensor(np.clip(colours[1] + self.rng.uniform(-0.12, 0.12, 3), 0, 1), dtype=image.dtype)
            if look != "tissue":  # greys
                back, front = back.mean().expand(3), front.mean().expand(3)
            painted = back[:, None, None] + (front - back)[:, None, None] * signal[None]
            out[row] = painted.mean(0, keepdim=True).expand_as(image) if image.shape[0] != 3 else painted
        return out.clamp_(0.0, 1.0)


def patch_weights(pixels: list[int], types: list[str] | None, patch_size: int) -> np.ndarray:
    """How often each image is drawn: by its area (in patches, at least one), and with ``types``
    so that every image type gets the same share whatever its number of images."""
    weights = np.maximum(np.asarray(pixels, np.float64) / patch_size**2, 1.0)
    if types is not None:
        kinds = np.asarray(types)
        for kind in set(types):
            weights[kinds == kind] /= weights[kinds == kind].sum()
    return weights / weights.sum()


def reference_zooms(checkpoint: Checkpoint, samples: list[LabelledImage]) -> list[float]:
    """Per image, the zoom segmentation applies to nuclei of its median size (1.0 without a reference)."""
    from ..scale import rescale_factor

    if not checkpoint.nucleus_diameter:
        return [1.0] * len(samples)
    return [rescale_factor(checkpoint, median_diameter([s.labels])) for s in samples]


def reference_nuclei(checkpoint: Checkpoint) -> int:
    """How many nuclei the checkpoint's reference size stands for (0: unknown or none)."""
    if not checkpoint.nucleus_diameter:
        return 0
    training = checkpoint.metadata.get("training") or {}
    return int(training.get("reference_nuclei") or training.get("nuclei") or 0)
