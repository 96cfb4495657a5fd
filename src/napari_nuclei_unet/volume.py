"""Nuclei in 3D from the 2D network: the planes' probabilities stacked into a volume and labelled in 3D.

The 2D network predicts every plane of a Z-stack (``segment.segment_planes``); the volume of
foreground probabilities is thresholded once, and touching nuclei are separated by a 3D
watershed on the anisotropic distance transform (the z step counts as many pixels as it is
long), so that one nucleus is one ID from its first plane to its last. Which rule, and why
(against stitching 2D labels plane to plane): docs/zstacks.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from .errors import stop_if_cancelled
from .params import PostprocessParams
from .postprocess import (
    block_grid,
    check_resolved,
    distance_markers,
    finished,
    grow,
    write_owned,
)

# z step over xy pixel size when nothing says otherwise: cubic voxels.
DEFAULT_Z_RATIO = 1.0
# Voxels of one block (with its halo) of a volume labelled block by block: its watershed's working
# arrays, about 40 bytes a voxel, are the peak memory.
BLOCK_VOXELS = 16 * 2**20
# The axial stretch is measured on the middle of a volume, all planes and at most this many voxels.
STRETCH_VOXELS = 16 * 2**20


def z_ratio(voxel_size: tuple[float, float, float] | None) -> float:
    """The z step in xy pixels (``voxel_size`` is Z, Y, X in any one unit); 1 when unknown."""
    if voxel_size is None:
        return DEFAULT_Z_RATIO
    z, y, x = (float(v) for v in voxel_size)
    if not (z > 0 and y > 0 and x > 0):
        raise ValueError(f"voxel size must be three positive numbers (Z, Y, X), got {voxel_size}")
    return z / math.sqrt(y * x)


def min_voxels(min_area: int, ratio: float) -> int:
    """The volume, in voxels, of a ball whose largest section has ``min_area`` pixels."""
    diameter = 2.0 * math.sqrt(max(min_area, 0) / math.pi)
    return int(round(math.pi / 6.0 * diameter**3 / ratio))


def axial_stretch(foreground, threshold: float, ratio: float, smallest: int) -> float:
    """How many times longer than wide along z the objects of ``foreground > threshold`` look (z in xy pixels by
    ``ratio``; the median voxel's object, objects of at least ``smallest`` voxels), at least 1.

    A microscope's axial blur stretches nuclei along z (docs/zstacks.md), so the distance map of one nucleus has a
    long ridge along z with several maxima. Measured on the middle of the volume
    (all planes, at most ``STRETCH_VOXELS``), so a volume labelled block by block gets what it gets whole."""
    depth, height, width = foreground.shape
    side = max(1, int(math.sqrt(STRETCH_VOXELS / max(depth, 1))))
    rows, cols = ((slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + side)) for n in (height, width))
    objects, count = ndi.label(np.asarray(foreground[:, rows, cols]) > threshold)
    if count == 0:
        return 1.0
    planes_of = np.arange(objects.shape[0]).reshape(-1, 1, 1)
    areas = np.bincount((objects * objects.shape[0] + planes_of).ravel(), minlength=(count + 1) * objects.shape[0])
    areas = areas.reshape(count + 1, objects.shape[0])[1:]  # (object, plane): pixels of each section
    voxels = areas.sum(axis=1)
    kept = voxels >= max(smallest, 1)
    if not kept.any():
        return 1.0
    widest = 2.0 * np.sqrt(areas[kept].max(axis=1) / math.pi)
    stretch = np.count_nonzero(areas[kept], axis=1) * ratio / widest
    order = np.argsort(stretch, kind="stable")
    weight = np.cumsum(voxels[kept][order])
    median = stretch[order][np.searchsorted(weight, weight[-1] / 2.0)]
    return max(1.0, float(median))


def volume_instances(
    probabilities: np.ndarray,
    outputs: tuple[str, ...],
    params: PostprocessParams,
    voxel_size: tuple[float, float, float] | None = None,
    network_zoom: float = 1.0,
    report: dict | None = None,
    stretch: float | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)`` of a Z-stack from its planes' probabilities ``(Z, C, Y, X)``: 3D instances 1..N (int32).

    ``params`` come resolved (numbers): the threshold is one for the whole volume. Holes are
    filled plane by plane (``hole_size`` is an area); ``min_size`` is the area of the smallest
    nucleus's largest section, so the smallest object kept is the ball it spans. ``h`` is in
    xy pixels at the scale the network ran at, as in 2D. Nuclei that look ``stretch`` times
    longer along z than wide (``axial_stretch`` when None) are split along z as if the z step
    were ``sqrt(stretch)`` times shorter: half the stretch, in log terms, is taken for blur
    (docs/zstacks.md). ``cancel()`` is asked between the steps (each a few seconds for tens of
    millions of voxels) and raises ``Cancelled``.
    """
    from skimage.morphology import remove_small_holes
    from skimage.segmentation import watershed

    check_resolved(params)
    ratio = z_ratio(voxel_size)
    foreground = probabilities[:, outputs.index("foreground")]
    if stretch is None:
        stretch = axial_stretch(foreground, float(params.threshold), ratio, min_voxels(params.min_size, ratio))
    shortened = ratio / math.sqrt(stretch)  # the z step the distance map and its smoothing count
    mask = foreground > params.threshold
    hole_size = int(round(params.hole_size / network_zoom**2))
    if hole_size > 0:
        for plane in mask:
            plane[...] = remove_small_holes(plane, max_size=hole_size)
    if report is not None:
        report["unsure"] = 0
    if not mask.any():
        return mask, np.zeros(mask.shape, np.int32)
    stop_if_cancelled(cancel)
    distance = ndi.distance_transform_edt(mask, sampling=(shortened, 1.0, 1.0)).astype(np.float32)
    stop_if_cancelled(cancel)
    smoothing = 1.0 / network_zoom
    markers = distance_markers(
        distance, mask, params.h / network_zoom, smoothing=(smoothing / shortened, smoothing, smoothing)
    )
    stop_if_cancelled(cancel)
    labels = watershed(-distance, markers, mask=mask)
    stop_if_cancelled(cancel)
    # No cap on the share dropped in 3D: volumes hold few nuclei (docs/model-card.md).
    smallest = min_voxels(params.min_size, ratio)
    return finished(labels, mask, foreground, smallest, float(params.min_confidence), max_share=1.0, report=report)


def volume_instances_blocked(
    foreground,
    params: PostprocessParams,
    voxel_size: tuple[float, float, float] | None,
    network_zoom: float,
    nucleus: float,
    labels_out,
    step=None,
) -> int:
    """:func:`volume_instances` of a volume too large to label whole, block by block into ``labels_out``; returns the
    nucleus count.

    ``foreground`` ``(Z, Y, X)`` (numpy or zarr; any float dtype) is read a block at a time: every
    block spans all planes and a ``(Y, X)`` region with a halo of three nuclei (``nucleus`` px
    across) or 64 px. A nucleus belongs to the block holding its centre and is written whole, so
    one crossing a block border keeps one ID. ``params`` come resolved (one threshold for the
    volume). ``step(index, blocks)`` is told before each block. The min confidence's dropped
    objects are not counted here.
    """
    depth, height, width = foreground.shape
    ratio = z_ratio(voxel_size)
    stretch = axial_stretch(foreground, float(params.threshold), ratio, min_voxels(params.min_size, ratio))
    halo = int(math.ceil(max(64.0, 3.0 * nucleus)))
    side = max(128, int(math.sqrt(BLOCK_VOXELS / max(depth, 1))) - 2 * halo)
    cores = block_grid(height, width, side)
    count = 0
    for index, core in enumerate(cores):
        if step is not None:
            step(index, len(cores))
        grown = grow(core, halo, height, width)
        block = np.asarray(foreground[(slice(None), *grown)], dtype=np.float32)
        _mask, labels = volume_instances(
            block[:, None], ("foreground",), params, voxel_size, network_zoom, stretch=stretch
        )
        count = write_owned(labels, core, grown, labels_out, count)
    return count


def stitch_planes(labels: np.ndarray, min_iou: float = 0.25) -> np.ndarray:
    """2D labels of consecutive planes ``(Z, Y, X)`` joined into 3D objects: a nucleus takes the ID of the
    object of the plane above it that it overlaps best, when their IoU is at least ``min_iou`` (cellpose's
    ``stitch_threshold``). Returns new labels 1..N, int32."""
    from .metrics import iou_matrix

    out = np.zeros(labels.shape, np.int32)
    next_id = 1
    previous = None
    for z, plane in enumerate(labels):
        ids = np.unique(plane)
        ids = ids[ids > 0]
        lookup = np.zeros(int(plane.max()) + 1, np.int32)
        if previous is not None and ids.size and previous.any():
            iou = iou_matrix(plane, previous)  # rows: this plane's objects, columns: those above
            above = np.unique(previous)
            above = above[above > 0]
            if iou.size:
                best = iou.argmax(axis=1)
                for row, label in enumerate(ids):
                    if iou[row, best[row]] >= min_iou:
                        lookup[label] = above[best[row]]
        for label in ids:
            if lookup[label] == 0:
                lookup[label], next_id = next_id, next_id + 1
        out[z] = lookup[plane]
        previous = out[z]
    return out
