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
    """A random number from torch's generator, like torchvision's own transforms: ``TrainConfig.seed`` makes it
    repeatable."""
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


def _is_colour(image: torch.Tensor) -> bool:
    """Whether an RGB patch has colour (stained tissue) rather than three equal grey channels."""
    return image.shape[-3] == 3 and float((image - image.mean(-3, keepdim=True)).abs().mean()) > 0.01


class RandomHEDJitter(v2.Transform):
    """Image only, coloured RGB patches only: scale and shift the hematoxylin, eosin and DAB concentrations.

    Colour deconvolution (scikit-image ``rgb2hed``) separates the stains; each is scaled by
    a random factor in ``1 +- strength`` and shifted by up to ``strength / 25`` (about a tenth
    of a typical nucleus' hematoxylin), then recombined (Tellez et al. 2019, "HED"). Only the
    change is added back, so pixels the round trip cannot represent (saturated white) keep
    their value.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength

    def make_params(self, flat_inputs):
        scale = [_uniform(1.0 - self.strength, 1.0 + self.strength) for _ in range(3)]
        shift = [_uniform(-self.strength / 25, self.strength / 25) for _ in range(3)]
        return {"scale": np.array(scale, np.float32), "shift": np.array(shift, np.float32)}

    def transform(self, inpt, params):
        if not _is_colour(inpt):
            return inpt
        from skimage.color import hed2rgb, rgb2hed

        rgb = inpt.movedim(-3, -1).clamp(0, 1).numpy()
        stains = rgb2hed(rgb)
        change = hed2rgb(stains * params["scale"] + params["shift"]) - hed2rgb(stains)
        out = torch.from_numpy(np.clip(rgb + change, 0, 1).astype(np.float32)).movedim(-1, -3)
        return tv_tensors.wrap(out, like=inpt)


class RandomInvertGrey(v2.Transform):
    """Image only, grey patches only: invert, so fluorescence is also seen as brightfield and back."""

    _transformed_types = (tv_tensors.Image,)

    def transform(self, inpt, params):
        return inpt if _is_colour(inpt) else tv_tensors.wrap(1.0 - inpt, like=inpt)


# Pseudo-colours fluorescence is saved in: blue (Hoechst, DAPI), green, red, magenta.
TINTS = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 1.0))


class RandomTint(v2.Transform):
    """Image only, dark grey RGB patches only (fluorescence): render the grey level in one pseudo-colour, so that
    blue-on-black Hoechst or green-on-black GFP reads as the same nuclei."""

    _transformed_types = (tv_tensors.Image,)

    def make_params(self, flat_inputs):
        tint = torch.tensor(TINTS[int(torch.randint(len(TINTS), ()))])
        return {"tint": tint * _uniform(0.7, 1.0)}

    def transform(self, inpt, params):
        if inpt.shape[-3] != 3 or _is_colour(inpt) or float(inpt.median()) > 0.5:
            return inpt
        return tv_tensors.wrap(inpt.mean(-3, keepdim=True) * params["tint"][:, None, None], like=inpt)


class RandomNoise(v2.Transform):
    """Image only: additive Gaussian noise of a random strength (camera and shot noise)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, sigma: tuple[float, float] = (0.01, 0.08)):
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs):
        return {"sigma": _uniform(*self.sigma)}

    def transform(self, inpt, params):
        noisy = inpt + params["sigma"] * torch.randn(inpt.shape[-2:], dtype=inpt.dtype)  # the same in every channel
        return tv_tensors.wrap(noisy.clamp(0, 1), like=inpt)


class RandomIllumination(v2.Transform):
    """Image only: uneven lighting across the patch, as a linear ramp in a random direction that either dims the
    image (vignetting, uneven excitation: by up to ``dimming``) or adds background (haze: up to ``haze``)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, dimming: float = 0.5, haze: float = 0.3):
        super().__init__()
        self.dimming, self.haze = dimming, haze

    def make_params(self, flat_inputs):
        additive = bool(torch.randint(2, ()))
        return {
            "angle": _uniform(0.0, 2.0 * math.pi),
            "additive": additive,
            "strength": _uniform(0.0, self.haze if additive else self.dimming),
        }

    def transform(self, inpt, params):
        height, width = inpt.shape[-2:]
        y = torch.linspace(-0.5, 0.5, height, dtype=inpt.dtype)[:, None]
        x = torch.linspace(-0.5, 0.5, width, dtype=inpt.dtype)[None, :]
        along = x * math.cos(params["angle"]) + y * math.sin(params["angle"])
        ramp = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)  # 0 .. 1 across the patch
        field = params["strength"] * ramp
        lit = inpt + field if params["additive"] else inpt * (1.0 - field)
        return tv_tensors.wrap(lit.clamp(0, 1), like=inpt)


def build_augmentation(config: TrainConfig) -> v2.Transform:
    """Joint geometric + image-only stain, intensity, resolution and noise augmentation (torchvision v2)."""
    geometric = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
    resolution = [v2.RandomApply([RandomLowResolution()], p=config.low_resolution)] if config.low_resolution > 0 else []
    stain = [v2.RandomApply([RandomHEDJitter(config.hed_jitter)], p=0.8)] if config.hed_jitter > 0 else []
    intensity = [
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.08)], p=0.8),
        v2.RandomApply([RandomGamma()], p=0.5),
        v2.RandomGrayscale(p=0.1),
    ]
    invert = [v2.RandomApply([RandomInvertGrey()], p=config.invert_grey)] if config.invert_grey > 0 else []
    tint = [v2.RandomApply([RandomTint()], p=config.tint_grey)] if config.tint_grey > 0 else []
    degrade = (
        [
            v2.RandomApply([v2.GaussianBlur(7, sigma=(0.3, 1.5))], p=config.blur_noise),
            v2.RandomApply([RandomNoise((min(0.01, config.noise_sigma), config.noise_sigma))], p=config.blur_noise),
        ]
        if config.blur_noise > 0
        else []
    )
    lighting = (
        [v2.RandomApply([RandomIllumination()], p=config.uneven_illumination)] if config.uneven_illumination > 0 else []
    )
    return v2.Compose(geometric + resolution + stain + intensity + invert + lighting + degrade + tint)


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
