"""The classical baseline the model is measured against: Gaussian, Otsu, distance-transform watershed.

Brightfield/H&E-like images (dark nuclei on a bright background) are inverted first.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .data import image_kind
from .io import Normalizer
from .postprocess import PostprocessParams, instances


def classical_segment(image: np.ndarray, sigma: float = 1.0, min_size: int = 15) -> np.ndarray:
    """Instance labels (int32) of a 2D grey or colour image without any learning."""
    from skimage.filters import threshold_otsu

    grey = Normalizer.from_image(image, channels=1)(image)[0]
    if image_kind(image) == "brightfield":
        grey = 1.0 - grey
    smooth = ndi.gaussian_filter(grey, sigma)
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(grey.shape, np.int32)
    mask = (smooth > threshold_otsu(smooth)).astype(np.float32)
    return instances(
        mask[None],
        ("foreground",),
        PostprocessParams(
            threshold=0.5, min_size=min_size, markers="distance", marker_threshold=0.5, min_confidence=0.0
        ),
    )[1]
