"""From probabilities to a semantic mask and watershed-separated instances.

Markers are h-maxima of a distance transform, one per convex blob: of the mask (``distance``), or of
the mask cut along the model's predicted boundaries (``boundary``: touching nuclei fall apart where the
network sees their border, and a gap in that border leaves a neck the h-maxima still split). Models
with a ``centre`` output can take markers from the predicted centres. Each model says which it
uses for each image type (``Checkpoint.markers_for``, chosen on the choosing sets: docs/model-card.md).
Objects the network is unsure of (mean foreground probability below ``min_confidence``:
cell folds, debris, out-of-focus blobs) are dropped last; each model carries the level calibrated on its own data
(``training.calibrate``), and it drops at most ``MAX_UNSURE_SHARE`` of an image's objects.
Everything stays in float32/int32.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage as ndi

from .params import AUTO, Confidence, PostprocessParams, Threshold

MARKERS = ("distance", "boundary", "centre")
# The level an "auto" marker threshold takes per method, chosen on the choosing sets (docs/model-card.md):
# boundary markers cut the mask where the boundary probability exceeds it; centre markers are the
# pixels whose centre probability does.
MARKER_THRESHOLDS = {"distance": 0.5, "boundary": 0.7, "centre": 0.4}  # distance markers use none


def auto_threshold(probability: np.ndarray) -> float:
    """Otsu's threshold of the probability map, kept within [0.3, 0.7].

    The clamp keeps an image without nuclei from being split at its noise level.
    """
    from skimage.filters import threshold_otsu

    step = max(1, int(np.sqrt(probability.size / 1_000_000)))
    sample = probability[::step, ::step]
    if float(sample.max()) - float(sample.min()) < 1e-3:
        return 0.5
    return float(np.clip(threshold_otsu(sample), 0.3, 0.7))


def resolve_threshold(threshold: Threshold, probability: np.ndarray) -> float:
    """``threshold`` as a number: Otsu's on ``probability`` for "auto"; ValueError if out of range."""
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold must be 'auto' or a number in (0, 1), got {threshold!r}")
        return auto_threshold(probability)
    value = float(threshold)
    if not 0.0 < value < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {value}")
    return value


def with_threshold(params: PostprocessParams, foreground: np.ndarray) -> PostprocessParams:
    """``params`` with an "auto" threshold replaced by Otsu's on ``foreground``."""
    return replace(params, threshold=resolve_threshold(params.threshold, foreground))


def resolve_markers(params: PostprocessParams, model_choice: str, outputs: tuple[str, ...]) -> PostprocessParams:
    """``params`` with "auto" markers as ``model_choice`` (the model's for the image type) and an "auto" marker
    threshold as the method's level; ValueError for markers the model's ``outputs`` cannot give."""
    markers = model_choice if params.markers == AUTO else params.markers
    if markers not in MARKERS:
        raise ValueError(f"markers must be auto, {', '.join(MARKERS)}; got {markers!r}")
    _check_outputs(markers, outputs)
    level = MARKER_THRESHOLDS[markers] if params.marker_threshold == AUTO else float(params.marker_threshold)
    if not 0.0 < level < 1.0:
        raise ValueError(f"marker threshold must be in (0, 1), got {params.marker_threshold!r}")
    return replace(params, markers=markers, marker_threshold=level)


def _check_outputs(markers: str, outputs: tuple[str, ...]) -> None:
    if markers != "distance" and markers not in outputs:
        raise ValueError(f"{markers} markers need a model with a '{markers}' output")


def check_resolved(params: PostprocessParams) -> None:
    """ValueError unless the threshold and min confidence are numbers in range (no "auto" left)."""
    for name in ("threshold", "min_confidence"):
        if isinstance(getattr(params, name), str):
            raise ValueError(
                f"{name} {getattr(params, name)!r} reached post-processing unresolved; resolve it first "
                "(segment.resolve, postprocess.with_threshold)"
            )
    resolve_threshold(params.threshold, np.zeros(0))
    resolve_min_confidence(params.min_confidence, 0.0)


def semantic_mask(foreground: np.ndarray, threshold: float, min_size: int = 15, hole_size: int = 64) -> np.ndarray:
    """Boolean nuclei mask: threshold, fill small holes, drop small specks."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    mask = foreground > threshold
    if hole_size > 0:
        mask = remove_small_holes(mask, max_size=hole_size)
    if min_size > 0:
        mask = remove_small_objects(mask, max_size=min_size - 1)
    return mask


def instances(
    probabilities: np.ndarray,
    outputs: tuple[str, ...] = ("foreground",),
    params: PostprocessParams | None = None,
    grid_zoom: float = 1.0,
    network_zoom: float = 1.0,
    report: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)``: semantic mask (bool) and instance labels numbered 1..N (int32).

    ``probabilities`` is ``(C, Y, X)`` with channel meanings in ``outputs``, on a grid of
    ``grid_zoom`` pixels per image pixel (more than 1: the network's finer grid of a zoomed-in
    image). ``min_size`` is an area in image pixels, what the user sees and sets. The hole size
    and the splitting height ``h`` describe a nucleus's shape: they are meant at the scale the
    network ran at (``network_zoom``), so they follow the nuclei when the image is rescaled for
    the network (large nuclei shrunk for the network keep their holes filled).
    ``report``, when given, receives ``"unsure"``: the objects dropped by the min confidence
    alone (many of them say the image is unlike what the model knows).
    """
    from skimage.segmentation import watershed

    if params is None:
        raise ValueError("instances needs resolved PostprocessParams (numbers, no 'auto')")
    check_resolved(params)
    if report is not None:
        report["unsure"] = 0
    scale = grid_zoom / network_zoom  # grid pixels per network pixel
    if grid_zoom != 1.0 or scale != 1.0:
        params = replace(
            params,
            min_size=int(round(params.min_size * grid_zoom**2)),
            hole_size=int(round(params.hole_size * scale**2)),
        )
    foreground = probabilities[outputs.index("foreground")]
    mask = semantic_mask(foreground, params.threshold, params.min_size, params.hole_size)
    if not mask.any():
        return mask, np.zeros(mask.shape, np.int32)
    markers, surface = _markers_and_surface(probabilities, outputs, params, mask, scale)
    labels = watershed(surface, markers, mask=mask)
    # Mask components that got no marker (tiny or thin) still count as nuclei.
    orphans, count = ndi.label(mask & (labels == 0))
    if count:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    drop = sizes < params.min_size
    unsure = unsure_objects(labels, foreground, sizes, drop, float(params.min_confidence))
    drop |= unsure
    drop[0] = False
    if report is not None:
        report["unsure"] = int(unsure.sum())
    labels = keep_renumbered(labels, (sizes > 0) & ~drop)
    return labels > 0, labels


def keep_renumbered(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """int32 ``labels`` with only the labels where ``keep`` (one flag per label, false for labels no pixel has) is
    true, renumbered 1..N in order.

    What ``relabel_sequential`` gives after the others are set to 0, from a lookup table instead of sorting."""
    lookup = np.zeros(keep.size, np.int32)
    keep = keep.copy()
    keep[0] = False
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels]


def _markers_and_surface(
    probabilities: np.ndarray, outputs: tuple[str, ...], params: PostprocessParams, mask: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The watershed's seeds and the surface it floods, by ``params.markers`` (resolved)."""
    if params.markers not in MARKERS or isinstance(params.marker_threshold, str):
        raise ValueError(f"markers {params.markers!r} reached post-processing unresolved; resolve_markers first")
    _check_outputs(params.markers, outputs)
    foreground = probabilities[outputs.index("foreground")]
    if params.markers == "centre":
        centre = probabilities[outputs.index("centre")]
        markers, _ = ndi.label((centre > params.marker_threshold) & mask)
        return markers, -centre  # flood from each centre down to the nucleus's edge
    if params.markers == "boundary":
        boundary = probabilities[outputs.index("boundary")]
        cut = mask & (boundary < params.marker_threshold)
        distance = ndi.distance_transform_edt(cut).astype(np.float32)
        return distance_markers(distance, cut, params.h * scale, smoothing=scale), boundary - foreground
    distance = ndi.distance_transform_edt(mask).astype(np.float32)
    return distance_markers(distance, mask, params.h * scale, smoothing=scale), -distance


def drop_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` with the objects under ``min_size`` pixels set to 0 (in place; not renumbered).

    For labels sampled from a finer grid onto image pixels, where an object can come out a
    few pixels smaller than it was on the grid it was measured on."""
    if min_size > 0 and labels.size:
        small = np.bincount(labels.ravel()) < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels


# The min confidence drops at most this share of an image's objects. The most it drops on any choosing image is
# 0.399 (a MoNuSeg tile; docs/model-card.md): an image where the model is unsure of more is unlike the images its
# level was calibrated on (a stain it never saw, such as DAB), and only its least sure objects go.
MAX_UNSURE_SHARE = 0.4


def unsure_objects(
    labels: np.ndarray,
    foreground: np.ndarray,
    sizes: np.ndarray,
    drop: np.ndarray,
    min_confidence: float,
    max_share: float = MAX_UNSURE_SHARE,
) -> np.ndarray:
    """Per label (index 0, the background, never): the objects not in ``drop`` whose mean foreground probability is
    below ``min_confidence``, at most ``max_share`` of those objects, the least sure first. Any dimensions."""
    unsure = np.zeros(sizes.size, bool)
    if min_confidence <= 0:
        return unsure
    confidence = np.bincount(labels.ravel(), weights=foreground.ravel(), minlength=sizes.size) / np.maximum(sizes, 1)
    candidates = ~drop
    candidates[0] = False
    unsure = candidates & (confidence < min_confidence)
    allowed = int(max_share * candidates.sum())
    if unsure.sum() > allowed:
        least_sure = np.flatnonzero(unsure)[np.argsort(confidence[unsure], kind="stable")]
        unsure[:] = False
        unsure[least_sure[:allowed]] = True
    return unsure


def resolve_min_confidence(value: Confidence, model_level: float) -> float:
    """``min_confidence`` as a number: "auto" is ``model_level`` (the model's calibrated level)."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"min_confidence must be 'auto' or a number in [0, 1), got {value!r}")
        value = model_level
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"min_confidence must be in [0, 1), got {value}")
    return value


def distance_markers(
    distance: np.ndarray, mask: np.ndarray, h: float, smoothing: float | tuple[float, ...] = 1.0
) -> np.ndarray:
    """One marker per h-maximum of the (lightly smoothed) distance map, found object by object.

    Most objects are single nuclei with one regional maximum, which is their only
    h-maximum: their markers (the pixels at the object's maximum) are found for all of
    them at once. Only objects with several maxima go through the h-maxima
    reconstruction, on their bounding box. The markers are those of ``h_maxima`` on each
    object alone, and much faster than ``h_maxima`` on the whole image. Any number of
    dimensions (``smoothing``: one sigma, or one per axis).
    """
    from skimage.morphology import h_maxima

    smooth = ndi.gaussian_filter(distance, smoothing)
    objects, count = ndi.label(mask)
    if count == 0:
        return np.zeros(mask.shape, np.int32)
    peak = np.zeros(count + 1, np.float32)
    np.maximum.at(peak, objects[mask], smooth[mask])  # each object's highest value (ndi.maximum sorts: ~20x slower)
    local_maxima = (smooth == ndi.maximum_filter(smooth, size=3)) & mask
    maxima, maxima_count = ndi.label(local_maxima)
    # Number of separate local-maximum regions in each object.
    owner = np.zeros(maxima_count + 1, np.int64)
    owner[maxima[local_maxima]] = objects[local_maxima]
    regions = np.bincount(owner[1:], minlength=count + 1)
    several = (regions > 1) & (peak > h)  # index 0, the background, has neither
    # Single-maximum objects: the pixels at the object's peak.
    top = mask & ~several[objects] & (smooth == peak[objects])
    markers, next_label = ndi.label(top)
    markers = markers.astype(np.int32, copy=False)
    boxes = ndi.find_objects(objects)
    for label in np.flatnonzero(several):
        box = boxes[label - 1]
        inside = objects[box] == label
        values = np.where(inside, smooth[box], 0.0).astype(np.float32)
        found, found_count = ndi.label(h_maxima(values, h).astype(bool) & inside)
        markers[box][found > 0] = found[found > 0] + next_label
        next_label += found_count
    return markers


def block_grid(height: int, width: int, size: int) -> list[tuple[slice, slice]]:
    """Core regions ``(rows, cols)`` tiling a plane without overlap."""
    return [
        (slice(top, min(top + size, height)), slice(left, min(left + size, width)))
        for top in range(0, height, size)
        for left in range(0, width, size)
    ]


def grow(core: tuple[slice, slice], margin: int, height: int, width: int) -> tuple[slice, slice]:
    """``core`` with ``margin`` more pixels on every side, within the plane."""
    rows, cols = core
    return (
        slice(max(0, rows.start - margin), min(height, rows.stop + margin)),
        slice(max(0, cols.start - margin), min(width, cols.stop + margin)),
    )


def write_owned(labels: np.ndarray, core: tuple, grown: tuple, labels_out, count: int) -> int:
    """Write the objects of ``labels`` (a block read at ``grown``) whose centre lies in ``core`` into
    ``labels_out``, numbered from ``count + 1``; returns the new count. ``core`` and ``grown`` are slices of
    the last axes of ``labels_out`` (leading axes, e.g. a Z-stack's planes, are taken whole). A pixel already
    given to a neighbouring block's object keeps it, so an object crossing a block border stays whole."""
    objects = int(labels.max())
    if objects == 0:
        return count
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=objects + 1).astype(np.float64)
    owned = sizes > 0
    lead = labels.ndim - len(core)
    for axis, (inner, outer) in enumerate(zip(core, grown), start=lead):
        shape = [1] * labels.ndim
        shape[axis] = labels.shape[axis]
        position = np.broadcast_to(np.arange(labels.shape[axis], dtype=np.float32).reshape(shape), labels.shape)
        centre = np.bincount(flat, weights=position.ravel(), minlength=objects + 1) / np.maximum(sizes, 1)
        centre += outer.start
        owned &= (centre >= inner.start) & (centre < inner.stop)
    owned[0] = False
    lookup = np.zeros(objects + 1, np.int32)
    lookup[owned] = count + np.arange(1, int(owned.sum()) + 1, dtype=np.int32)
    new = lookup[labels]
    where = (slice(None),) * lead + tuple(grown)
    region = np.asarray(labels_out[where]).copy()
    free = (new > 0) & (region == 0)
    region[free] = new[free]
    labels_out[where] = region
    return count + int(owned.sum())
