"""The segmentation pipeline shared by the CLI, the widgets and dask workers.

``predict_probabilities`` runs the network (slow, cached by callers);
``label_probabilities`` turns cached probabilities into mask + instances (fast, re-run
when the user tunes post-processing). ``segment`` chains them over every plane of an
image or stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import Cancelled
from .io import Normalizer, is_single_plane, plane_count, planes
from .model import Checkpoint
from .postprocess import PostprocessParams, instances
from .tiling import CancelCheck, ProgressCallback, TilingParams, plan_tiles, predict


@dataclass
class SegmentParams:
    """Everything that decides a segmentation, grouped as the user sees it."""

    tiling: TilingParams = field(default_factory=TilingParams)
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)


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


def predict_probabilities(
    checkpoint: Checkpoint,
    plane,
    tiling: TilingParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Probabilities ``(C, Y, X)`` of one 2D plane, normalised as the checkpoint expects."""
    normalizer = Normalizer.from_image(plane, checkpoint.config.in_channels, checkpoint.percentiles)
    return predict(checkpoint.model, plane, normalizer, tiling, progress=progress, cancel=cancel)


def label_probabilities(
    probabilities: np.ndarray, outputs: tuple[str, ...], postprocess: PostprocessParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)`` from cached probabilities of a plane ``(C, Y, X)`` or stack ``(N, C, Y, X)``."""
    if probabilities.ndim == 3:
        return instances(probabilities, outputs, postprocess)
    results = [instances(p, outputs, postprocess) for p in probabilities]
    return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])


def count_tiles(image, tile_size: int, overlap: int) -> int:
    """Total tiles over all planes (for a progress bar's length)."""
    first = next(planes(image))
    return plane_count(image) * len(plan_tiles(first.shape[:2], tile_size, overlap)[1])


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
    total = count_tiles(image, tiling.tile_size, tiling.overlap)
    done_before = 0
    probabilities = []
    for plane in planes(image):
        per_plane = len(plan_tiles(plane.shape[:2], tiling.tile_size, tiling.overlap)[1])

        def plane_progress(done: int, _total: int, offset: int = done_before) -> None:
            if progress is not None:
                progress(offset + done, total)

        probabilities.append(predict_probabilities(checkpoint, plane, tiling, plane_progress, cancel))
        done_before += per_plane
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    stacked = probabilities[0] if is_single_plane(image) else np.stack(probabilities)
    mask, labels = label_probabilities(stacked, checkpoint.outputs, params.postprocess)
    return Segmentation(stacked, mask, labels)

