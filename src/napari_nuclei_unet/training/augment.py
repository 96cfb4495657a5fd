"""Joint image/target augmentation (torchvision.transforms.v2) and the image-type looks used to restyle patches."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .config import TrainConfig


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


# Background and nucleus colours of the three DSB2018 image types, as normalised model input.
LOOKS = {
    "fluorescence": (np.array([0.04, 0.04, 0.04]), np.array([0.55, 0.55, 0.55])),
    "brightfield": (np.array([0.8, 0.8, 0.8]), np.array([0.12, 0.12, 0.12])),
    "tissue": (np.array([0.8, 0.7, 0.95]), np.array([0.45, 0.18, 0.88])),
}


def nuclear_signal(image: torch.Tensor, kind: str) -> torch.Tensor:
    """Grey level that is high on nuclei: as is for fluorescence, inverted for bright backgrounds."""
    return image.mean(0) if kind == "fluorescence" else 1.0 - image.mean(0)


def signal_levels(image: torch.Tensor, nuclei: torch.Tensor, kind: str) -> tuple[float, float]:
    """Median nuclear signal of the background and of the nuclei (1.0 when there are none)."""
    signal = nuclear_signal(image, kind)
    background = float(signal[~nuclei].median()) if (~nuclei).any() else 0.0
    inside = float(signal[nuclei].median()) if nuclei.any() else 1.0
    return background, inside
