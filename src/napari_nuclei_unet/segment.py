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
from .errors import InputError, stop_if_cancelled
from .io import Normalizer, check_stack_layout, is_single_plane, sample_step
from .model import Checkpoint
from .params import AUTO, IMAGE_TYPES, STACKS, STAINS, SegmentParams
from .plane import (
    LabelledPlane,
    PlaneIndex,
    PlanePrediction,
    Resolved,
    apply_stain,
    label_plane,
    plane_normalizer,
    predict_plane,
    resolve_stain,
    stack_normalizer,
)
from .postprocess import resolve_markers, resolve_min_confidence, resolve_threshold, with_threshold
from .scale import DiameterEstimate, estimate_on_plane, rescale_factor
from .tiling import CancelCheck, ProgressCallback
from .volume import volume_instances, volume_instances_blocked, z_ratio

__all__ = [
    "AUTO",
    "PlaneResult",
    "Resolved",
    "SegmentParams",
    "Segmentation",
    "estimate_diameter",
    "resolve",
    "segment",
    "segment_planes",
]


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
    # A Z-stack labelled in 3D: its nuclei (IDs 1..N through the planes) and the objects dropped as unsure.
    volume_count: int | None = None
    volume_unsure: int = 0

    @property
    def volume(self) -> bool:
        return self.volume_count is not None

    @property
    def count(self) -> int:
        """Number of nuclei: in 3D for a Z-stack, else summed over planes."""
        if self.volume:
            return self.volume_count
        return sum(plane.count for plane in self.planes.values())

    @property
    def unsure(self) -> int:
        """Objects dropped because the network was unsure of them (min confidence), summed over planes."""
        if self.volume:
            return self.volume_unsure
        return sum(plane.unsure for plane in self.planes.values())

    @property
    def max_label(self) -> int:
        if self.volume:
            return self.volume_count
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
            "markers": self.params.postprocess.markers,
            "threshold": recorded_thresholds(self.thresholds.values()),
            "min_confidence": self.min_confidence,
            **({"stack": "z", "voxel_size": self.params.voxel_size} if self.volume else {}),
        }


@dataclass
class TimeLapse:
    """A time-lapse of Z-stacks: each time point's :class:`Segmentation`, a Z-stack labelled in 3D on its own."""

    time_points: list[Segmentation]

    @property
    def planes(self) -> dict[int, PlaneResult]:
        """Each time point as one entry of the ``(T, Z, Y, X)`` result: its 3D labels and mask (no probabilities)."""
        return {
            index: PlaneResult(np.asarray(point.labels), point.mask, min(point.thresholds.values()), point.count, None,
                               point.unsure)
            for index, point in enumerate(self.time_points)
        }  # fmt: skip

    @property
    def count(self) -> int:
        return sum(point.count for point in self.time_points)

    @property
    def unsure(self) -> int:
        return sum(point.unsure for point in self.time_points)

    @property
    def max_label(self) -> int:
        return max(point.max_label for point in self.time_points)

    @property
    def megapixels(self) -> float:
        return sum(point.megapixels for point in self.time_points)

    @property
    def diameter(self) -> float | None:
        return self.time_points[0].diameter

    @property
    def factor(self) -> float:
        return self.time_points[0].factor

    @property
    def min_confidence(self) -> float:
        return self.time_points[0].min_confidence

    @property
    def volume(self) -> bool:
        return False  # several 3D labellings, each numbered from 1

    def record(self) -> dict:
        """The first time point's record (each has its own estimate, normaliser and threshold), every threshold."""
        thresholds = [t for point in self.time_points for t in point.thresholds.values()]
        return {
            **self.time_points[0].record(),
            "stack": "tz",
            "time_points": len(self.time_points),
            "threshold": recorded_thresholds(thresholds),
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
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> Resolved:
    """Every decision the image and the model make for a segmentation, taken once.

    * min confidence: the model's calibrated level (0 for a model never calibrated);
    * markers: the model's for the image type (``Checkpoint.markers_for``), and their level;
    * image type: detected on the middle one of the planes to segment (``data.image_type``);
    * stain: what the model reads best for that image type (``Checkpoint.stain_for``), for RGB
      images; grey images are read as they are;
    * diameter: estimated on the middle one of the planes to segment (a stack shares one
      scale); None for a model that records no training nucleus size; and the zoom it asks for;
    * whether the planes go block by block;
    * a numeric threshold is checked (an "auto" threshold is per plane: ``label_plane``).

    The last estimation pass's probabilities are kept when they can stand for the one whole
    plane to segment (``predict_plane`` reuses them).
    """
    params = params or SegmentParams()
    if params.stain not in STAINS:
        raise InputError(f"stain must be one of {', '.join(STAINS)}, got {params.stain!r}")
    if params.image_type not in IMAGE_TYPES:
        raise InputError(f"image type must be one of {', '.join(IMAGE_TYPES)}, got {params.image_type!r}")
    _check_finite(image)
    volume = _is_volume(image, params)
    indices = _plane_indices(image, None if volume else plane_indices)
    reference = indices[len(indices) // 2]
    plane = image if reference is None else image[reference]
    large = params.blocks.is_large(plane.shape[:2])
    if volume and large:
        raise InputError(
            f"planes of {plane.shape[0]} x {plane.shape[1]} px are too large to label in 3D in memory; "
            "segment them as separate planes (stack 'planes', --axes TYX)"
        )
    large = large or (volume and params.blocks.is_large_volume(image.shape))
    params = resolve_stain(checkpoint, plane, params)
    try:
        post = resolve_markers(params.postprocess, _markers_for(checkpoint, params, volume), checkpoint.outputs)
        min_confidence = resolve_min_confidence(post.min_confidence, checkpoint.min_confidence)
        if params.postprocess.threshold != AUTO:
            resolve_threshold(params.postprocess.threshold, np.zeros(0, np.float32))
    except ValueError as error:
        raise InputError(str(error)) from None
    normalizer = stack_normalizer(checkpoint, image, params.stain) if volume else None
    estimate, normalizer = _resolve_diameter(checkpoint, plane, params, normalizer, progress, cancel)
    if len(indices) > 1 or large:
        estimate = DiameterEstimate(estimate.diameter, estimate.zoom)
    resolved = replace(params, diameter=estimate.diameter, postprocess=replace(post, min_confidence=min_confidence))
    factor = rescale_factor(checkpoint, estimate.diameter)  # a model without a training size can't use one
    resolved = replace(resolved, stack="z" if volume else "planes" if indices != [None] else params.stack)
    return Resolved(resolved, estimate, factor, large, reference, normalizer, volume)


def _check_finite(image, budget: int = 1 << 24) -> None:
    """Refuse float pixels that are NaN or infinite (a flat-field division by zero): they have no intensity to
    segment, and one in a tile spoils its neighbours' probabilities. In-memory images are checked ``budget``
    values at a time; lazy ones (zarr, dask) by the normaliser's sample only."""
    if not isinstance(image, np.ndarray) or image.dtype.kind != "f" or image.size == 0:
        return
    step = max(1, budget // max(1, image[0].size))
    bad = sum(
        int(image[i : i + step].size - np.count_nonzero(np.isfinite(image[i : i + step])))
        for i in range(0, len(image), step)
    )
    if bad:
        raise InputError(f"image contains {bad} NaN or infinite pixel(s): replace them (e.g. with 0) first")


def _markers_for(checkpoint: Checkpoint, params: SegmentParams, volume: bool) -> str:
    """The model's markers for the image type; a Z-stack's 3D labelling takes distance markers only (boundary
    markers cost 3D AP@0.5 0.06 on the 3D choosing set: docs/zstacks.md)."""
    if not volume:
        return checkpoint.markers_for(params.image_type)
    if params.postprocess.markers not in (AUTO, "distance"):
        raise InputError(f"a Z-stack is labelled in 3D with distance markers only, not {params.postprocess.markers}")
    return "distance"


def _is_volume(image, params: SegmentParams) -> bool:
    """Whether the image is a Z-stack labelled in 3D (``stack`` "z"; "auto" is separate planes here: only a
    file's or a layer's axes can say Z, and the CLI and the widget read them)."""
    if params.stack not in STACKS:
        raise InputError(f"stack must be one of {', '.join(STACKS)}, got {params.stack!r}")
    if params.voxel_size is not None:
        try:
            z_ratio(params.voxel_size)
        except (TypeError, ValueError) as error:
            raise InputError(str(error)) from None
    if params.stack == "tz":
        raise InputError("a time-lapse of Z-stacks is segmented one time point at a time: segment_time_points")
    check_stack_layout(image, params.stack)
    return params.stack == "z" and not is_single_plane(image)


def _plane_indices(image, plane_indices: list[PlaneIndex] | None) -> list[PlaneIndex]:
    """The planes to segment: ``[None]`` for a 2D image, the given ones (all by default) of a stack."""
    if is_single_plane(image):
        return [None]
    count = int(image.shape[0])
    indices = list(range(count)) if plane_indices is None else [int(i) for i in plane_indices]
    if not indices or any(not 0 <= i < count for i in indices):
        raise InputError(f"planes {plane_indices} are not within the stack's {count} planes")
    return indices


def _resolve_diameter(
    checkpoint, plane, params, normalizer, progress, cancel
) -> tuple[DiameterEstimate, Normalizer | None]:
    """The nucleus size, and the plane's normaliser (``normalizer``, or the one built to estimate the size)."""
    diameter = params.diameter
    if diameter != AUTO:
        if isinstance(diameter, str) or (diameter is not None and not float(diameter) > 0):
            raise InputError(f"nucleus diameter must be 'auto', a positive number of pixels or None, got {diameter!r}")
        return DiameterEstimate(None if diameter is None else float(diameter)), normalizer
    if not checkpoint.nucleus_diameter:
        return DiameterEstimate(None), normalizer
    normalizer = normalizer or plane_normalizer(checkpoint, plane, params.stain)
    stained = apply_stain(plane, params.stain)
    return estimate_on_plane(checkpoint, stained, normalizer, params.tiling, progress, cancel), normalizer


def estimate_diameter(
    checkpoint: Checkpoint,
    plane,
    params: SegmentParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> DiameterEstimate:
    """Nucleus diameter of a plane in its own pixels, from the model's own detections (as ``resolve`` estimates it).

    The network runs on (a centre crop of) the plane at zoom 1, 1/2, 1/4 and 1/8, and the
    nuclei it finds are measured at each zoom. A model shown nuclei far larger than it was
    trained on finds fragments of them, with low confidence; shown nuclei too small, it
    merges or misses them. The zoom where it is most confident (mean foreground
    probability) gives the diameter. Confidence rises while the zoom brings nuclei
    towards the training size and falls past it, so the passes stop at the first fall.
    Such merges are caught when the zoom-1 nuclei are small enough to be zoomed up: one
    pass at zoom 2 checks whether they measure the same there, as real nuclei do. The zoom-1/2
    pass runs first: nuclei that measure above the model's size band there are zoomed down
    whatever zoom 1 would say, so that pass is skipped (4x the pixels). No nuclei found:
    ``diameter`` is None. (Measurements: docs/model-card.md.)
    """
    params = replace(params or SegmentParams(), diameter=AUTO)
    return resolve(checkpoint, plane, params, progress=progress, cancel=cancel).estimate


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
    params: SegmentParams | Resolved | None = None,
    planes_to_do: list[int] | None = None,
    cached: dict[PlaneIndex, PlanePrediction] | None = None,
    labels_out=None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    workdir: str | None = None,
) -> Segmentation:
    """Segment a 2D image, or planes of a Z/T stack (all of them by default): the one dispatcher.

    ``params`` are resolved first (:func:`resolve`), unless they come resolved for this image.
    Planes larger than ``params.blocks.large_plane`` go block by block (flat memory), the
    others whole. ``cached`` predictions (the widget's, for the same network settings) are
    re-labelled instead of running the network. ``labels_out`` (numpy or zarr, zeros, the
    image's spatial shape) receives the labels; without it they are returned in memory.
    ``progress(done, total)`` runs once from 0 to ``PROGRESS_STEPS`` over the whole run: the size
    estimate's passes, then every plane's network tiles (or blocks) and its labelling.
    """
    started = time.perf_counter()
    cached = cached or {}
    indices = _plane_indices(image, planes_to_do)  # a Z-stack's are all its planes: resolve decides, below
    todo = [i for i in indices if i not in cached]
    share = 0.0 if isinstance(params, Resolved) or not todo else estimate_share(checkpoint, params)
    stages = RunProgress(progress, share)
    progress = stages.segmenting
    if isinstance(params, Resolved):
        resolved = params
    elif todo:
        resolved = resolve(checkpoint, image, params, todo, stages.estimating, cancel)
    else:  # everything cached: the estimate was made when the network ran
        resolved = resolve(checkpoint, image, replace(params or SegmentParams(), diameter=cached[indices[0]].diameter))
    if resolved.volume:
        return _segment_volume(checkpoint, image, resolved, cached, labels_out, progress, cancel, started)
    results: dict[PlaneIndex, PlaneResult] = {}
    megapixels = 0.0
    for index in indices:
        plane = image if index is None else image[index]
        target = None if labels_out is None else (labels_out if index is None else _PlaneOf(labels_out, index))
        if index in cached:
            labelled = label_plane(cached[index], checkpoint.outputs, resolved.params.postprocess)
            results[index] = _labelled(cached[index], labelled, target)
            continue
        megapixels += plane.shape[0] * plane.shape[1] / 1e6
        plane_progress = _plane_progress(progress, todo.index(index), len(todo))
        results[index] = _segment_plane(checkpoint, plane, index, resolved, target, plane_progress, cancel, workdir)
        if len(indices) > 1 and results[index].prediction is not None:
            # Labelled: drop the finer grid, up to 16x the plane's probabilities (zoom 4), so a
            # stack of small nuclei holds no more than its image-grid probabilities.
            results[index].prediction.network = None
    stop_if_cancelled(cancel)
    shown = next(iter(results.values())).prediction
    factor = resolved.factor if shown is None else shown.factor  # an estimation pass reused at its own zoom
    seconds = time.perf_counter() - started
    return Segmentation(results, resolved.params, resolved.diameter, factor, megapixels, seconds, labels_out)


def _segment_volume(
    checkpoint, image, resolved: Resolved, cached, labels_out, progress, cancel, started
) -> Segmentation:
    """A Z-stack: every plane through the network (or from ``cached``), then its nuclei labelled in 3D: whole, or
    block by block for a large one (``Resolved.large``: only its foreground is kept, and no plane's prediction)."""
    count = int(image.shape[0])
    large = resolved.large
    foreground = np.zeros(image.shape[:3], _foreground_dtype(image.shape)) if large else None
    predictions, megapixels = dict(cached), 0.0
    steps = count + 1  # the planes, then the 3D labelling
    for z in range(count):
        if z not in cached:
            plane = image[z]
            normalizer = resolved.normalizer_for(checkpoint, plane, z)
            plane_progress = _plane_progress(progress, z, steps)
            prediction = predict_plane(checkpoint, plane, resolved, normalizer, plane_progress, cancel)
            prediction.network = None  # labelled on the image grid: the volume holds no finer one
            predictions[z] = prediction
            megapixels += plane.shape[0] * plane.shape[1] / 1e6
        stop_if_cancelled(cancel)
        if large:
            foreground[z] = predictions.pop(z).probabilities[checkpoint.outputs.index("foreground")]
    if large:
        return _label_volume_blocks(checkpoint, resolved, foreground, labels_out, progress, cancel, megapixels, started)
    probabilities = np.stack([predictions[z].probabilities for z in range(count)])
    outputs, post = checkpoint.outputs, resolved.params.postprocess
    post = with_threshold(post, probabilities[:, outputs.index("foreground")])
    report: dict = {}
    voxel_size, factor = resolved.params.voxel_size, predictions[0].factor
    mask, labels = volume_instances(probabilities, outputs, post, voxel_size, factor, report, cancel=cancel)
    progress(steps, steps)
    results = {}
    for z in range(count):
        if labels_out is not None:
            _PlaneOf(labels_out, z)[(slice(None), slice(None))] = labels[z]
        found = int(np.unique(labels[z]).size - (labels[z] == 0).any())
        results[z] = PlaneResult(labels[z], mask[z], float(post.threshold), found, predictions[z])
    seconds = time.perf_counter() - started
    return Segmentation(
        results,
        resolved.params,
        resolved.diameter,
        factor,
        megapixels,
        seconds,
        labels_out,
        int(labels.max()),
        report["unsure"],
    )


# A large Z-stack's foreground probabilities are kept at half precision beyond this many voxels (2 bytes a
# voxel instead of 4); single voxels at the threshold may then fall the other way.
_FULL_PRECISION_VOXELS = 128 * 2**20


def _foreground_dtype(shape: tuple[int, ...]) -> type:
    return np.float32 if int(np.prod(shape[:3])) <= _FULL_PRECISION_VOXELS else np.float16


def _label_volume_blocks(
    checkpoint, resolved: Resolved, foreground, labels_out, progress, cancel, megapixels, started
) -> Segmentation:
    """The 3D labelling of a large Z-stack's foreground ``(Z, Y, X)``, block by block into ``labels_out``."""
    count = int(foreground.shape[0])
    stride = sample_step(*foreground.shape[1:])
    post = with_threshold(resolved.params.postprocess, np.asarray(foreground[:, ::stride, ::stride], np.float32))
    into = labels_out if labels_out is not None else np.zeros(foreground.shape, np.int32)
    nucleus = resolved.diameter or (checkpoint.nucleus_diameter or 20.0) / resolved.factor

    def step(index: int, blocks: int) -> None:
        stop_if_cancelled(cancel)
        if progress is not None:
            progress(count * blocks + index, (count + 1) * blocks)

    found = volume_instances_blocked(foreground, post, resolved.params.voxel_size, resolved.factor, nucleus, into, step)
    labels = into if isinstance(into, np.ndarray) else None
    results = {
        z: PlaneResult(None if labels is None else labels[z], None, float(post.threshold), 0, None)
        for z in range(count)
    }
    seconds = time.perf_counter() - started
    return Segmentation(
        results, resolved.params, resolved.diameter, resolved.factor, megapixels, seconds, labels_out, found, 0
    )


# The run's progress goes from 0 to this; the size estimate takes ESTIMATE_SHARE of it when it runs.
PROGRESS_STEPS = 1000
ESTIMATE_SHARE = 0.25
# Of a whole plane's share, the part its network tiles take (its labelling, the rest).
_NETWORK_SHARE = 0.85


def estimate_share(checkpoint: Checkpoint, params: SegmentParams | None) -> float:
    """The share of a run's progress the size estimate takes: ESTIMATE_SHARE when it runs, else 0."""
    return ESTIMATE_SHARE if (params or SegmentParams()).diameter == AUTO and checkpoint.nucleus_diameter else 0.0


class RunProgress:
    """One progress for a run made of stages that each count ``(done, total)`` their own way: the size
    estimate (:meth:`estimating`), then the segmentation (:meth:`segmenting`), each mapped into its share
    of ``PROGRESS_STEPS``; it never goes back."""

    def __init__(self, progress: ProgressCallback | None, estimate_share: float):
        self.progress, self.share, self.reached = progress, estimate_share, 0

    def _report(self, fraction: float) -> None:
        value = min(PROGRESS_STEPS, int(fraction * PROGRESS_STEPS))
        if self.progress is not None and value >= self.reached:
            self.reached = value
            self.progress(value, PROGRESS_STEPS)

    def estimating(self, done: int, total: int) -> None:
        self._report(self.share * done / max(total, 1))

    def segmenting(self, done: int, total: int) -> None:
        self._report(self.share + (1.0 - self.share) * done / max(total, 1))


def _plane_progress(progress: ProgressCallback | None, offset: int, planes: int) -> ProgressCallback:
    """A plane's ``progress(done, total)`` as a part of the whole run's."""

    def plane_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(offset * total + done, total * planes)

    return plane_progress


def _segment_plane(checkpoint, plane, index, resolved: Resolved, target, progress, cancel, workdir) -> PlaneResult:
    """One plane through the network: whole, or block by block into ``target`` for a large one."""
    normalizer = resolved.normalizer_for(checkpoint, plane, index)
    if resolved.large:
        into = target if target is not None else np.zeros(plane.shape[:2], np.int32)
        blocked = segment_large(checkpoint, plane, resolved, normalizer, into, progress, cancel, workdir)
        labels = into if isinstance(into, np.ndarray) else None
        return PlaneResult(labels, None, blocked.threshold, blocked.count, None)
    network = None if progress is None else (lambda done, total: progress(_NETWORK_SHARE * done / max(total, 1), 1.0))
    prediction = predict_plane(checkpoint, plane, resolved, normalizer, network, cancel)
    labelled = label_plane(prediction, checkpoint.outputs, resolved.params.postprocess)
    if progress is not None:
        progress(1, 1)  # labelled
    return _labelled(prediction, labelled, target)


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


def segment_time_points(
    checkpoint: Checkpoint,
    image,
    params: SegmentParams | None = None,
    labels_out=None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> TimeLapse:
    """Segment a time-lapse of Z-stacks ``(T, Z, Y, X)``: each time point a Z-stack labelled in 3D on its own
    (:func:`segment_planes` with ``stack`` "z": its own size estimate, normaliser and threshold; its nuclei numbered
    from 1; no tracking). ``labels_out`` (numpy or zarr, ``(T, Z, Y, X)``) receives the labels, else each result
    holds its own. ``progress(done, total)`` runs once over all time points."""
    check_stack_layout(image, "tz")
    params = replace(params or SegmentParams(), stack="z")
    count = int(image.shape[0])
    results = []
    for index in range(count):
        stop_if_cancelled(cancel)
        step = None if progress is None else _plane_progress(progress, index, count)
        target = None if labels_out is None else _PlaneOf(labels_out, index)
        results.append(
            segment_planes(checkpoint, image[index], params, labels_out=target, progress=step, cancel=cancel)
        )
    return TimeLapse(results)
