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


# The min confidence drops at most this share of an image's objects. The most it drops on any choosing image is
# 0.399 (a MoNuSeg tile; docs/model-card.md): an image where the model is unsure of more is unlike the images its
# level was calibrated on (a stain it never saw, such as DAB), and only its least sure objects go.
MAX_UNSURE_SHARE = 0.4


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
    return finished(labels, mask, foreground, params.min_size, float(params.min_confidence), report=report)


def finished(
    labels: np.ndarray,
    mask: np.ndarray,
    foreground: np.ndarray,
    min_size: int,
    min_confidence: float,
    max_share: float = MAX_UNSURE_SHARE,
    report: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)`` from a watershed's labels (2D or 3D): the parts of ``mask`` no marker reached (tiny or
    thin) count as nuclei; objects under ``min_size`` pixels and those the network is unsure of
    (:func:`unsure_objects`, at most ``max_share``) are dropped; the rest renumbered 1..N (int32).
    ``report["unsure"]``: the objects dropped by the min confidence alone."""
    orphans, count = ndi.label(mask & (labels == 0))
    if count:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    drop = sizes < min_size
    unsure = unsure_objects(labels, foreground, sizes, drop, min_confidence, max_share)
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
    """``labels`` without the objects under ``min_size`` pixels, renumbered 1..N in order (int32).

    For labels sampled from a finer grid onto image pixels, where an object can come out a few pixels smaller
    than it was on the grid it was measured on, or vanish between pixel centres."""
    return keep_renumbered(labels, np.bincount(labels.ravel()) >= max(min_size, 1))


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
    them at once. The maxima of objects with several are kept or dropped by their dynamics
    (``_dynamic_maxima``). The markers are those of ``h_maxima`` on each object alone,
    numbered object by object. Any number of dimensions (``smoothing``: one sigma, or one per axis).
    """
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
    if several.any():
        found, found_count = ndi.label(_dynamic_maxima(smooth, objects, several[objects], maxima, h))
        if found_count:
            # Numbered object by object, each object's markers in raster order (as ndi.label numbers them).
            object_of = np.zeros(found_count + 1, np.int64)
            object_of[found[found > 0]] = objects[found > 0]
            rank = np.zeros(found_count + 1, np.int32)
            rank[1 + np.argsort(object_of[1:], kind="stable")] = np.arange(next_label + 1, next_label + found_count + 1)
            markers = np.where(found > 0, rank[found], markers)
    return markers


# float32's resolution as ``h_maxima`` uses it: values closer than this share (relative) count as one level.
_RESOLUTION = 2 * float(np.finfo(np.float32).resolution)


def _dynamic_maxima(
    smooth: np.ndarray, objects: np.ndarray, region: np.ndarray, maxima: np.ndarray, h: float
) -> np.ndarray:
    """bool: the h-maxima of ``smooth`` in each object of ``objects`` within ``region``, from its local-maximum
    regions (``maxima``, labelled): those whose dynamics (height above the highest pass to a higher maximum of
    their object) is at least ``h``, and an object's highest.

    What ``skimage.morphology.h_maxima`` gives on each object alone (tests/test_postprocess.py), without its sort of
    every pixel of every object's bounding box, most of a dense 3D field's labelling (docs/performance.md). The
    passes come from a watershed of the maxima and the pixels where two basins of one object touch; the maxima
    merge from the highest pass down (union-find), and a maximum meets a higher one at its pass."""
    from skimage.segmentation import watershed

    box = _bounding_box(region)  # everything below works on the objects' box only
    found = np.zeros(region.shape, bool)
    smooth, objects, region, maxima = smooth[box], objects[box], region[box], maxima[box]
    seeds = np.where(region, maxima, 0).astype(np.int32, copy=False)
    count = int(maxima.max())
    basins = np.zeros(seeds.shape, np.int32)
    # A flood through diagonal neighbours would cross from one object into another that touches it at a corner:
    # objects that touch are flooded apart, in classes of objects no two of which touch.
    colour = _colours(objects, region)
    for shade in range(1, int(colour.max()) + 1):
        part = region & (colour[objects] == shade)
        basins += watershed(-smooth, np.where(part, seeds, 0), mask=part, connectivity=smooth.ndim)
    value = np.zeros(count + 1, np.float32)
    at_seed = seeds > 0
    value[seeds[at_seed]] = smooth[at_seed]
    low, high, level = _basin_passes(smooth, objects, basins, count)
    kept = _kept_by_dynamics(value, np.unique(seeds[at_seed]), low, high, level, h)
    found[box] = _with_near_ties(np.where(kept[seeds] & at_seed, seeds, 0), value, smooth, objects, region)
    return found


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The slices of the smallest box holding every true pixel of ``mask`` (which has some)."""
    box = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(along[0]), int(along[-1]) + 1))
    return tuple(box)


def _neighbours(shape: tuple[int, ...]):
    """``(here, there)`` slice pairs: each pixel and each of its neighbours (diagonals too), every pair once."""
    from itertools import product

    for offset in product((-1, 0, 1), repeat=len(shape)):
        if offset > (0,) * len(shape):
            here = tuple(slice(max(0, -o), n - max(0, o)) for n, o in zip(shape, offset))
            there = tuple(slice(max(0, o), n - max(0, -o)) for n, o in zip(shape, offset))
            yield here, there


def _colours(objects: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per object label, a class from 1 up such that no two objects of ``region`` that touch (diagonally: they
    are separate objects) share one (greedy colouring; 0 for the labels outside ``region``)."""
    touching = []
    for here, there in _neighbours(objects.shape):
        a, b = objects[here], objects[there]
        contact = (a != b) & region[here] & region[there]
        if contact.any():
            touching.append(np.stack([a[contact], b[contact]], axis=1))
    colour = np.zeros(int(objects.max()) + 1, np.int32)
    colour[np.unique(objects[region])] = 1
    if not touching:
        return colour
    neighbours: dict[int, set[int]] = {}
    for a, b in np.unique(np.concatenate(touching), axis=0).tolist():
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    for label in sorted(neighbours):
        taken = {int(colour[other]) for other in neighbours[label] if other < label}
        colour[label] = next(shade for shade in range(1, len(taken) + 2) if shade not in taken)
    return colour


def _basin_passes(smooth, objects, basins, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, level)``: each pair of basins of one object that touch (any neighbour, diagonals too) and the
    highest level at which they do (the lower of the two pixel values, over all touching pairs)."""
    pairs, levels = [], []
    for here, there in _neighbours(smooth.shape):
        a, b = basins[here], basins[there]
        touch = (a != b) & (a > 0) & (b > 0)
        touch &= objects[here] == objects[there]
        if touch.any():
            first, second = a[touch].astype(np.int64), b[touch].astype(np.int64)
            pairs.append(np.minimum(first, second) * (count + 1) + np.maximum(first, second))
            levels.append(np.minimum(smooth[here][touch], smooth[there][touch]))
    if not pairs:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    key, level = np.concatenate(pairs), np.concatenate(levels)
    order = np.lexsort((-level, key))  # by pair, the highest level first
    key, level = key[order], level[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, level = key[first], level[first]
    return key // (count + 1), key % (count + 1), level


def _kept_by_dynamics(value, seeds, low, high, level, h: float) -> np.ndarray:
    """Per maximum label: kept as an h-maximum (union-find over the passes, highest first)."""
    parent = np.arange(value.size)
    top = value.copy()  # the highest value of each merged group
    waiting = {int(seed): [int(seed)] for seed in seeds}  # maxima of each group not yet met by a higher one
    kept = np.zeros(value.size, bool)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for edge in np.argsort(-level, kind="stable"):
        first, second = root(low[edge]), root(high[edge])
        if first == second:
            continue
        if top[second] - top[first] > _RESOLUTION * top[second]:
            first, second = second, first  # ``first`` is the higher group
        if top[first] - top[second] > _RESOLUTION * top[first]:
            for label in waiting.pop(second):  # met a higher maximum at this pass
                kept[label] = value[label] - level[edge] >= h
        else:  # as high as each other: neither is a higher maximum for the other
            waiting[first] += waiting.pop(second)
            top[first] = max(top[first], top[second])
        parent[second] = first
    for labels in waiting.values():  # each object's highest
        kept[labels] = True
    return kept


def _with_near_ties(kept, value, smooth, objects, region) -> np.ndarray:
    """``kept`` (labelled maxima) grown over the neighbouring pixels of their object below them by less than float32's
    resolution, as ``h_maxima`` counts them in; bool."""
    floor = (value - np.float32(_RESOLUTION) * np.abs(value)).astype(np.float32)
    owner = np.zeros(value.size, np.int64)
    owner[kept[kept > 0]] = objects[kept > 0]
    while True:
        grown = ndi.maximum_filter(kept, size=3)
        new = (grown > 0) & (kept == 0) & region
        new &= (smooth >= floor[grown]) & (objects == owner[grown])
        if not new.any():
            return kept > 0
        kept = np.where(new, grown, kept)


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
