"""The segmentation pipeline: one dispatcher for the CLI, dask workers and the widgets.

::

    resolve(checkpoint, image, params)   every "auto" the image or model decides, once
    segment_planes(...)                  each requested plane: whole (plane.predict_plane +
                                         plane.label_plane) or block by block (blocks),
                                         reusing cached predictions -> Segmentation

The threshold's "auto" is resolved per plane, on that plane's probabilities (Otsu); the
value used is recorded in the result like the others, so a run can be reproduced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from .blocks import segment_large
from .errors import Cancelled, InputError
from .io import is_single_plane
from .model import Checkpoint
from .params import AUTO, IMAGE_TYPES, STAINS, SegmentParams
from .plane import LabelledPlane, PlanePrediction, estimate_diameter, label_plane, predict_plane, resolve_stain
from .postprocess import resolve_min_confidence, resolve_threshold
from .scale import DiameterEstimate, rescale_factor
from .tiling import CancelCheck, ProgressCallback

__all__ = ["AUTO", "PlaneResult", "SegmentParams", "Segmentation", "resolve", "segment", "segment_planes"]

PlaneIndex = int | None  # None: a single 2D image; i: plane i of a Z/T stack


@dataclass
class PlaneResult:
    """One segmented plane."""

    labels: np.ndarray  # int32, 1..N (for a plane written into ``labels_out``: what was written there)
    mask: np.ndarray | None  # bool; None for a plane segmented block by block
    threshold: float  # the foreground threshold used (Otsu's when "auto")
    count: int
    prediction: PlanePrediction | None  # the network output, for re-labelling; None block by block
    unsure: int = 0  # objects dropped by the min confidence alone (not counted block by block)


@dataclass
class Segmentation:
    """The result for an image or a stack, with the values every "auto" became."""

    planes: dict[PlaneIndex, PlaneResult]
    params: SegmentParams  # resolved: diameter a number or None, min confidence a number
    diameter: float | None  # nucleus diameter, image pixels (estimated with "auto")
    factor: float = 1.0  # zoom the network ran at
    megapixels: float = 0.0  # pixels the network ran on (cached planes excluded)
    seconds: float = 0.0
    labels_out: object | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        """Number of nuclei, summed over planes."""
        return sum(plane.count for plane in self.planes.values())

    @property
    def unsure(self) -> int:
        """Objects dropped because the network was unsure of them (min confidence), summed over planes."""
        return sum(plane.unsure for plane in self.planes.values())

    @property
    def max_label(self) -> int:
        return max((plane.count for plane in self.planes.values()), default=0)

    @property
    def thresholds(self) -> dict[PlaneIndex, float]:
        return {index: plane.threshold for index, plane in self.planes.items()}

    @property
    def min_confidence(self) -> float:
        return float(self.params.postprocess.min_confidence)

    @property
    def single(self) -> bool:
        return list(self.planes) == [None]

    @property
    def labels(self):
        """Labels: 2D for an image, ``(N, Y, X)`` for the segmented planes of a stack."""
        if self.labels_out is not None:
            return self.labels_out
        return self.planes[None].labels if self.single else np.stack([p.labels for p in self.planes.values()])

    @property
    def mask(self) -> np.ndarray | None:
        if any(p.mask is None for p in self.planes.values()):
            return None
        return self.planes[None].mask if self.single else np.stack([p.mask for p in self.planes.values()])

    @property
    def probabilities(self) -> np.ndarray | None:
        """``(C, Y, X)`` or ``(N, C, Y, X)`` float32; None when a plane went block by block."""
        if any(p.prediction is None for p in self.planes.values()):
            return None
        if self.single:
            return self.planes[None].prediction.probabilities
        return np.stack([p.prediction.probabilities for p in self.planes.values()])

    def record(self) -> dict:
        """The values used, for layer metadata and summaries: enough to reproduce the result."""
        return {
            "diameter": None if self.diameter is None else round(self.diameter, 2),
            "zoom": round(self.factor, 4),
            "image_type": self.params.image_type,
            "stain": self.params.stain,
            "threshold": recorded_thresholds(self.thresholds.values()),
            "min_confidence": self.min_confidence,
        }


def recorded_thresholds(thresholds) -> float | list[float]:
    """Thresholds as recorded: one number for one plane, a list for a stack's planes."""
    values = [round(float(t), 4) for t in thresholds]
    return values[0] if len(values) == 1 else values


def resolve(
    checkpoint: Checkpoint,
    image,
    params: SegmentParams | None = None,
    plane_indices: list[PlaneIndex] | None = None,
    keep_pass: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> tuple[SegmentParams, DiameterEstimate]:
    """``params`` with the "auto" that belong to the image and model made numbers, and the size estimate.

    * min confidence: the model's calibrated level (0 for a model never calibrated);
    * image type: detected on the middle one of the planes to segment (``data.image_type``);
    * stain: what the model reads best for that image type (``Checkpoint.stain_for``), for RGB
      images; grey images are read as they are;
    * diameter: estimated on the middle one of the planes to segment (a stack shares one
      scale); None for a model that records no training nucleus size;
    * a numeric threshold is checked (an "auto" threshold is per plane: ``label_plane``).

    ``keep_pass``: keep the last estimation pass's probabilities, which ``predict_plane``
    reuses when they cover the plane; only for one plane, estimated on itself.
    """
    params = params or SegmentParams()
    if params.stain not in STAINS:
        raise InputError(f"stain must be one of {', '.join(STAINS)}, got {params.stain!r}")
    if params.image_type not in IMAGE_TYPES:
        raise InputError(f"image type must be one of {', '.join(IMAGE_TYPES)}, got {params.image_type!r}")
    params = resolve_stain(checkpoint, _middle_plane(image, plane_indices), params)
    try:
        min_confidence = resolve_min_confidence(params.postprocess.min_confidence, checkpoint.min_confidence)
        if params.postprocess.threshold != AUTO:
            resolve_threshold(params.postprocess.threshold, np.zeros(0, np.float32))
    except ValueError as error:
        raise InputError(str(error)) from None
    estimate = _resolve_diameter(checkpoint, image, params, plane_indices, progress, cancel)
    if not keep_pass:
        estimate = DiameterEstimate(estimate.diameter, estimate.zoom)
    resolved = replace(
        params, diameter=estimate.diameter, postprocess=replace(params.postprocess, min_confidence=min_confidence)
    )
    return resolved, estimate


def _middle_plane(image, plane_indices: list[PlaneIndex] | None):
    """The plane that stands for the image or for the planes to segment of a stack (they share one scale and type)."""
    if is_single_plane(image):
        return image
    indices = plane_indices if plane_indices else list(range(image.shape[0]))
    return image[indices[len(indices) // 2]]


def _resolve_diameter(checkpoint, image, params, plane_indices, progress, cancel) -> DiameterEstimate:
    diameter = params.diameter
    if diameter != AUTO:
        if isinstance(diameter, str) or (diameter is not None and not float(diameter) > 0):
            raise InputError(f"nucleus diameter must be 'auto', a positive number of pixels or None, got {diameter!r}")
        estimate = DiameterEstimate(None if diameter is None else float(diameter))
        rescale_factor(checkpoint, estimate.diameter)  # a model without a training size can't use one
        return estimate
    if not checkpoint.nucleus_diameter:
        return DiameterEstimate(None)
    return estimate_diameter(checkpoint, _middle_plane(image, plane_indices), params, progress, cancel)


class _PlaneOf:
    """Plane ``index`` of a stacked (numpy or zarr) array, for slice reads and writes of 2D regions."""

    def __init__(self, array, index: int):
        self.array, self.index = array, index
        self.shape = tuple(array.shape[1:])

    def __getitem__(self, key):
        return self.array[(self.index, *key)]

    def __setitem__(self, key, value):
        self.array[(self.index, *key)] = value


def segment_planes(
    checkpoint: Checkpoint,
    image,
    params: SegmentParams | None = None,
    planes_to_do: list[int] | None = None,
    cached: dict[PlaneIndex, PlanePrediction] | None = None,
    labels_out=None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    workdir: str | None = None,
) -> Segmentation:
    """Segment a 2D image, or planes of a Z/T stack (all of them by default): the one dispatcher.

    Planes larger than ``params.blocks.large_plane`` go block by block (flat memory), the
    others whole. ``cached`` predictions (the widget's, for the same network settings) are
    re-labelled instead of running the network. ``labels_out`` (numpy or zarr, zeros, the
    image's spatial shape) receives the labels; without it they are returned in memory.
    ``progress(done, total)`` counts tiles (blocks for large planes), estimation passes first.
    """
    started = time.perf_counter()
    params = params or SegmentParams()
    cached = cached or {}
    single = is_single_plane(image)
    if single:
        indices: list[PlaneIndex] = [None]
    else:
        count = int(image.shape[0])
        indices = list(range(count)) if planes_to_do is None else [int(i) for i in planes_to_do]
        if not indices or any(not 0 <= i < count for i in indices):
            raise InputError(f"planes {planes_to_do} are not within the stack's {count} planes")
    todo = [i for i in indices if i not in cached]
    plane_shape = tuple(image.shape[:2] if single else image.shape[1:3])
    large = params.blocks.is_large(plane_shape)
    if todo:
        resolved, estimate = resolve(
            checkpoint, image, params, todo, keep_pass=len(todo) == 1 and not large, progress=progress, cancel=cancel
        )
    else:  # everything cached: the estimate was made when the network ran
        first = cached[indices[0]]
        resolved, _ = resolve(checkpoint, image, replace(params, diameter=first.diameter))
        estimate = DiameterEstimate(first.diameter)
    outputs = checkpoint.outputs
    results: dict[PlaneIndex, PlaneResult] = {}
    megapixels = 0.0
    for index in indices:
        plane = image if index is None else image[index]
        target = None if labels_out is None else (labels_out if index is None else _PlaneOf(labels_out, index))

        def plane_progress(done: int, total: int, offset: int = todo.index(index) if index in todo else 0) -> None:
            if progress is not None:
                progress(offset * total + done, total * len(todo))

        if index in cached:
            results[index] = _labelled(cached[index], label_plane(cached[index], outputs, resolved.postprocess), target)
            continue
        megapixels += plane_shape[0] * plane_shape[1] / 1e6
        if large:
            into = target if target is not None else np.zeros(plane_shape, np.int32)
            blocked = segment_large(checkpoint, plane, resolved, estimate, into, plane_progress, cancel, workdir)
            labels = into if isinstance(into, np.ndarray) else None
            results[index] = PlaneResult(labels, None, blocked.threshold, blocked.count, None)
            continue
        prediction = predict_plane(checkpoint, plane, resolved, estimate, plane_progress, cancel)
        labelled = label_plane(prediction, outputs, resolved.postprocess)
        if len(indices) > 1:
            # Labelled: drop the finer grid, up to 16x the plane's probabilities (zoom 4), so a
            # stack of small nuclei holds no more than its image-grid probabilities.
            prediction.network = None
        results[index] = _labelled(prediction, labelled, target)
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    factor = rescale_factor(checkpoint, estimate.diameter)
    shown = next(iter(results.values())).prediction
    if shown is not None:
        factor = shown.factor  # an estimation pass reused at its own zoom
    return Segmentation(
        results, resolved, estimate.diameter, factor, megapixels, time.perf_counter() - started, labels_out
    )


def _labelled(prediction: PlanePrediction, labelled: LabelledPlane, target) -> PlaneResult:
    if target is not None:
        target[(slice(None), slice(None))] = labelled.labels
    return PlaneResult(
        labelled.labels, labelled.mask, labelled.threshold, int(labelled.labels.max()), prediction, labelled.unsure
    )


def segment(
    checkpoint: Checkpoint,
    image,
    params: SegmentParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> Segmentation:
    """Segment a 2D image or every plane of a stack, in memory (:func:`segment_planes`)."""
    return segment_planes(checkpoint, image, params, progress=progress, cancel=cancel)
