"""The segmentation pipeline shared by the CLI, the widgets and dask workers.

``predict_probabilities`` runs the network (slow, cached by callers);
``label_probabilities`` turns cached probabilities into mask + instances (fast, re-run
when the user tunes post-processing). ``segment`` chains them over every plane of an
image or stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import Cancelled, InputError
from .io import Normalizer, hematoxylin, is_single_plane, plane_count, planes
from .model import Checkpoint
from .postprocess import PostprocessParams, instances
from .tiling import CancelCheck, ProgressCallback, TilingParams, plan_tiles, predict


@dataclass
class SegmentParams:
    """Everything that decides a segmentation, grouped as the user sees it."""

    tiling: TilingParams = field(default_factory=TilingParams)
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    # Typical nucleus diameter in the image, pixels; None runs at the image's own scale.
    diameter: float | None = None
    # "hematoxylin": segment the hematoxylin channel of a brightfield RGB (colour deconvolution),
    # for stains the model has not seen, such as DAB immunohistochemistry. "none": the image as is.
    stain: str = "none"

    def network_key(self) -> tuple:
        """Parameters that change the probabilities (post-processing does not)."""
        return (asdict(self.tiling), self.diameter, self.stain)


@dataclass
class Segmentation:
    """Result for an image or stack; arrays have a leading plane axis only for stacks."""

    probabilities: np.ndarray  # (C, Y, X) or (N, C, Y, X), float32
    mask: np.ndarray  # bool
    labels: np.ndarray  # int32, 1..N per plane

    @property
    def count(self) -> int:
        """Number of nuclei (summed over planes)."""
        if self.labels.ndim == 2:
            return int(self.labels.max())
        return int(sum(int(plane.max()) for plane in self.labels))


# Rescaling by less than this is not worth the interpolation.
_RESCALE_TOLERANCE = 0.1


def rescale_factor(checkpoint: Checkpoint, diameter: float | None) -> float:
    """Zoom that brings nuclei of ``diameter`` px to the size the model was trained on (1.0: none)."""
    if diameter is None:
        return 1.0
    if not diameter > 0:
        raise InputError(f"nucleus diameter must be a positive number of pixels, got {diameter}")
    if not checkpoint.nucleus_diameter:
        raise InputError(f"model {checkpoint.name} does not record the nucleus size it was trained on; leave the diameter empty")
    factor = float(checkpoint.nucleus_diameter) / float(diameter)
    return 1.0 if abs(factor - 1.0) < _RESCALE_TOLERANCE else factor


def predict_probabilities(
    checkpoint: Checkpoint,
    plane,
    params: SegmentParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Probabilities ``(C, Y, X)`` of one 2D plane at its own size, normalised as the checkpoint expects.

    With ``params.diameter``, the plane is zoomed so its nuclei match the model's training
    size and the probabilities are zoomed back, so post-processing always works in the
    image's own pixels.
    """
    params = params or SegmentParams()
    tiling = params.tiling
    if params.stain == "hematoxylin":
        plane = hematoxylin(plane)
    elif params.stain != "none":
        raise InputError(f"stain must be 'none' or 'hematoxylin', got {params.stain!r}")
    normalizer = Normalizer.from_image(plane, checkpoint.config.in_channels, checkpoint.percentiles)
    factor = rescale_factor(checkpoint, params.diameter)
    if factor == 1.0:
        return predict(checkpoint.model, plane, normalizer, tiling, progress=progress, cancel=cancel)
    from skimage.transform import rescale, resize

    height, width = plane.shape[:2]
    colour = plane.ndim == 3
    zoomed = rescale(
        np.asarray(plane, dtype=np.float32), factor, order=1, preserve_range=True,
        anti_aliasing=factor < 1, channel_axis=-1 if colour else None,
    ).astype(np.float32, copy=False)
    small = predict(checkpoint.model, zoomed, normalizer, tiling, progress=progress, cancel=cancel)
    return np.stack([resize(channel, (height, width), order=1, preserve_range=True).astype(np.float32) for channel in small])


def label_probabilities(
    probabilities: np.ndarray, outputs: tuple[str, ...], postprocess: PostprocessParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)`` from cached probabilities of a plane ``(C, Y, X)`` or stack ``(N, C, Y, X)``."""
    if probabilities.ndim == 3:
        return instances(probabilities, outputs, postprocess)
    results = [instances(p, outputs, postprocess) for p in probabilities]
    return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])


def _tiles_per_plane(image, tile_size: int, overlap: int, factor: float) -> int:
    first = next(planes(image))
    shape = tuple(max(1, int(round(side * factor))) for side in first.shape[:2])
    return len(plan_tiles(shape, tile_size, overlap)[1])


def segment(
    checkpoint: Checkpoint,
    image,
    params: SegmentParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> Segmentation:
    """Segment a 2D image or a stack plane by plane; ``progress(done, total)`` counts tiles over all planes."""
    params = params or SegmentParams()
    tiling = params.tiling
    factor = rescale_factor(checkpoint, params.diameter)
    per_plane = _tiles_per_plane(image, tiling.tile_size, tiling.overlap, factor)
    total = plane_count(image) * per_plane
    probabilities = []
    for index, plane in enumerate(planes(image)):

        def plane_progress(done: int, _total: int, offset: int = index * per_plane) -> None:
            if progress is not None:
                progress(offset + done, total)

        probabilities.append(predict_probabilities(checkpoint, plane, params, plane_progress, cancel))
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    stacked = probabilities[0] if is_single_plane(image) else np.stack(probabilities)
    mask, labels = label_probabilities(stacked, checkpoint.outputs, params.postprocess)
    return Segmentation(stacked, mask, labels)

