"""The nucleus size: estimate it from the model's own detections, and zoom planes to the model's size.

The model was trained on nuclei of one size (``Checkpoint.nucleus_diameter``). A plane
whose nuclei are much smaller or larger is zoomed before the network runs
(:func:`rescale_factor`); "auto" measures them first (:func:`estimate_on_plane`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .io import Normalizer
from .model import Checkpoint
from .tiling import CancelCheck, ProgressCallback, TilingParams, predict

# Nuclei this many times the model's training size (min, max) are segmented without rescaling;
# smaller ones are zoomed to the training size, larger ones to the band's top (model card).
SIZE_BAND = (0.7, 1.6)
# Zooms closer than this are the same for the network (an estimation pass is reused).
RESCALE_TOLERANCE = 0.1
# The zoom applied for a diameter is kept within these limits (a wrong estimate stays affordable).
ZOOM_LIMITS = (0.125, 4.0)
# Estimation passes look at a centre crop of at most this many pixels (at the pass's zoom).
_ESTIMATE_PIXELS = 2048 * 2048
_MIN_PASS_SIDE = 48  # px: coarser passes than this see too little
# Zoomed-in network outputs up to this many pixels are kept for labelling on their grid.
NETWORK_GRID_MAX_PIXELS = 32_000_000
# Diameters measured at two zooms that differ by less than this fraction are the same nuclei.
_SAME_SIZE = 0.15
# Fewer confidently detected nuclei than this give no estimate.
_MIN_OBJECTS = 3
_BOUNDARY_WIDTH = 2  # px: the boundary target's width (train.make_targets)
_PROGRESS_STEPS = 1000  # the estimate's progress is reported as a share of this


def rescale_factor(checkpoint: Checkpoint, diameter: float | None) -> float:
    """Zoom that brings nuclei of ``diameter`` px into the size range the model handles (1.0: none).

    The model was trained with scale augmentation, so nuclei from ``SIZE_BAND[0]`` to
    ``SIZE_BAND[1]`` times its training size are segmented as they are: interpolating
    them costs more accuracy than it buys (measured on the DSB2018 val split, see the
    model card). Smaller nuclei are zoomed up to the training size (their detail is
    what limits them), larger ones down to the band's top.
    """
    if diameter is None:
        return 1.0
    if not diameter > 0:
        raise InputError(f"nucleus diameter must be a positive number of pixels, got {diameter}")
    if not checkpoint.nucleus_diameter:
        raise InputError(
            f"model {checkpoint.name} does not record the nucleus size it was trained on; leave the diameter empty"
        )
    ratio = float(diameter) / float(checkpoint.nucleus_diameter)
    low, high = SIZE_BAND
    if low <= ratio <= high:
        return 1.0
    return float(np.clip((high if ratio > high else 1.0) / ratio, *ZOOM_LIMITS))


def measure_nuclei(probabilities: np.ndarray, outputs: tuple[str, ...]) -> tuple[float, float] | None:
    """``(diameter, confidence)`` of the nuclei found in probabilities, or None if too few.

    ``diameter``: median equivalent diameter in px on the probabilities' grid. Cheap on
    purpose (threshold + connected components, no watershed); nuclei are cut apart by
    the predicted boundary when the model has one, and the ring this removes (2 px at the
    network's scale, as in training) is added back. ``confidence``: mean foreground
    probability over the detected foreground; highest where the model sees nuclei at a
    size it knows.
    """
    foreground = probabilities[outputs.index("foreground")]
    detected = foreground > 0.5
    cores, ring = detected, 0.0
    if "boundary" in outputs:
        cores = detected & (probabilities[outputs.index("boundary")] < 0.5)
        ring = 2.0 * _BOUNDARY_WIDTH
    objects, count = ndi.label(cores)
    if count == 0:
        return None
    areas = np.bincount(objects.ravel())[1:]
    areas = areas[areas >= 4]  # single pixels and specks say nothing about size
    if areas.size < _MIN_OBJECTS:
        return None
    diameter = float(np.median(2.0 * np.sqrt(areas / np.pi))) + ring
    return diameter, float(foreground[detected].mean())


@dataclass
class DiameterEstimate:
    """An estimated nucleus diameter, with the probabilities of the last pass when they cover the plane."""

    diameter: float | None
    zoom: float = 1.0
    probabilities: np.ndarray | None = None  # (C, y, x) at ``zoom``, only for an uncropped pass


def estimate_on_plane(
    checkpoint: Checkpoint,
    plane,
    normalizer: Normalizer,
    tiling: TilingParams,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> DiameterEstimate:
    """The nucleus diameter of a plane (stain-converted already), in its own pixels: ``segment.estimate_diameter``."""
    passes: dict[float, tuple[DiameterEstimate, float]] = {}
    zooms = _estimation_zooms(plane.shape)
    bar = _PassProgress(progress, sum(_pass_pixels(plane.shape, zoom) for zoom in zooms[:2]))

    def measured_at(zoom: float) -> tuple[DiameterEstimate, float]:
        """``(estimate, confidence)`` of one pass, run once (probabilities kept when it covers the plane;
        confidence -1 when it found too few nuclei to measure)."""
        if zoom not in passes:
            crop, whole = _centre_crop(plane, _crop_side(zoom))
            pass_progress = bar.of_pass(_pass_pixels(plane.shape, zoom))
            probabilities = predict_zoomed(checkpoint, crop, normalizer, tiling, zoom, pass_progress, cancel)
            measured = measure_nuclei(probabilities, checkpoint.outputs)
            kept = probabilities if whole else None
            passes[zoom] = (
                (DiameterEstimate(None, zoom, kept), -1.0)
                if measured is None
                else (DiameterEstimate(measured[0] / zoom, zoom, kept), measured[1])
            )
        return passes[zoom]

    if len(zooms) > 1 and _too_large_for_zoom_one(checkpoint, measured_at(zooms[1])[0]):  # zoom 1/2 runs first
        zooms = zooms[1:]
    best, best_confidence = None, -1.0
    for zoom in zooms:
        estimate, confidence = measured_at(zoom)
        if estimate.diameter is not None and confidence > best_confidence:
            best, best_confidence = estimate, confidence
        elif best is not None:  # past the most confident zoom: coarser passes only merge nuclei
            break
    native = passes.get(1.0, (DiameterEstimate(None), -1.0))[0]
    if best is not None and native.diameter is not None and best.zoom < 1.0:
        best = _checked_at_zoom_two(checkpoint, plane, normalizer, tiling, bar, native, best, best_confidence, cancel)
    return best or passes[zooms[0]][0]  # nothing measured: the first pass, for its probabilities


def _checked_at_zoom_two(
    checkpoint, plane, normalizer, tiling, bar, native: DiameterEstimate, best: DiameterEstimate, confidence, cancel
) -> DiameterEstimate:
    """``native`` (the zoom-1 estimate) instead of the coarser ``best`` when its nuclei are real small ones.

    Nuclei too small for the model can merge into larger blobs at a coarser zoom that look
    more confident; zoom 2 is then one more candidate. The small size wins only if zoom 2
    sees the same nuclei (real ones measure the same in image pixels) and is more confident
    than the coarse zoom: fragments of large nuclei can measure the same too.
    """
    if native.diameter >= SIZE_BAND[0] * checkpoint.nucleus_diameter:
        return best
    crop, _ = _centre_crop(plane, _crop_side(2.0))
    check = bar.of_pass(_pass_pixels(plane.shape, 2.0))
    finer = measure_nuclei(predict_zoomed(checkpoint, crop, normalizer, tiling, 2.0, check, cancel), checkpoint.outputs)
    same = finer is not None and abs(finer[0] / 2.0 / native.diameter - 1.0) < _SAME_SIZE
    return native if same and finer[1] > confidence else best


def _crop_side(zoom: float) -> int:
    """Side, in plane pixels, of the centre crop an estimation pass at ``zoom`` looks at."""
    return int(np.sqrt(_ESTIMATE_PIXELS) / zoom)


def _pass_pixels(shape: tuple[int, ...], zoom: float) -> float:
    """Network pixels of the estimation pass at ``zoom`` (on its centre crop)."""
    side = _crop_side(zoom)
    return min(shape[0], side) * min(shape[1], side) * zoom * zoom


class _PassProgress:
    """The size estimate's progress over its passes, each counted by its network pixels: the zoom-1/2 and zoom-1
    passes, its usual work, fill it (``planned`` pixels); any further pass, or a skipped one, only moves the end."""

    def __init__(self, progress: ProgressCallback | None, planned: float):
        self.progress, self.planned, self.done = progress, max(planned, 1.0), 0.0

    def of_pass(self, pixels: float) -> ProgressCallback | None:
        """The ``progress(done, total)`` of the next pass, as a share of the estimate's."""
        if self.progress is None:
            return None
        start, self.done = self.done, self.done + pixels

        def report(done: int, total: int) -> None:
            share = min(1.0, (start + pixels * done / max(total, 1)) / self.planned)
            self.progress(int(share * _PROGRESS_STEPS), _PROGRESS_STEPS)

        return report


def _estimation_zooms(shape: tuple[int, ...]) -> list[float]:
    """The zooms the size estimate may look at, finest first: 1, 1/2, 1/4, ... while the pass sees enough."""
    zooms, zoom = [], 1.0
    while zoom >= ZOOM_LIMITS[0] and (zoom == 1.0 or min(shape[:2]) * zoom >= _MIN_PASS_SIDE):
        zooms.append(zoom)
        zoom /= 2
    return zooms


def _too_large_for_zoom_one(checkpoint: Checkpoint, half: DiameterEstimate) -> bool:
    """Whether the zoom-1/2 pass shows nuclei so large that the zoom-1 pass can be skipped.

    At zoom 1/2 they measure at least the top of the model's size band: at zoom 1 they would be twice
    that, to be zoomed down whatever that pass says, so it is not run (it costs 4x the zoom-1/2 pass).
    Small nuclei merged into blobs at zoom 1/2 measure at most half of that on the choosing sets'
    x0.5 copies (model card).
    """
    return half.diameter is not None and half.diameter * half.zoom >= SIZE_BAND[1] * checkpoint.nucleus_diameter


def _centre_crop(plane, side: int):
    """The centre ``side`` x ``side`` part of the plane (all of it when it fits), and whether that is all."""
    height, width = plane.shape[:2]
    if height <= side and width <= side:
        return plane, True
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return plane[top : top + side, left : left + side], False


def predict_zoomed(
    checkpoint: Checkpoint,
    plane,
    normalizer: Normalizer,
    tiling: TilingParams,
    zoom: float,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Probabilities of ``plane`` zoomed by ``zoom`` (on the zoomed grid)."""
    if zoom != 1.0:
        shape = tuple(max(1, int(round(side * zoom))) for side in plane.shape[:2])
        plane = _resize(np.asarray(plane), shape, channel_axis=-1 if plane.ndim == 3 else None)
    return predict(checkpoint, plane, normalizer, tiling, progress=progress, cancel=cancel)


def _resize(array: np.ndarray, shape: tuple[int, int], channel_axis: int | None) -> np.ndarray:
    """Bilinear resize of a 2D array (with channels at ``channel_axis``) to ``shape``, float32.

    Antialiased when shrinking, as the training's scale augmentation (torchvision) does: Pillow's
    bilinear filter is the one torchvision's antialiased resize was ported from (they agree to
    ~1e-7), and it needs no torch, which a CPU run from the network cache never imports.
    """
    from PIL import Image

    spatial = array.shape[:2] if channel_axis == -1 else array.shape[-2:]
    if tuple(spatial) == tuple(shape):
        return array.astype(np.float32, copy=False)
    array = np.asarray(array, dtype=np.float32)
    planes = np.moveaxis(array, -1, 0) if channel_axis == -1 else array if channel_axis == 0 else array[None]
    resized = np.empty((len(planes), *shape), np.float32)
    for index, plane in enumerate(planes):
        image = Image.fromarray(np.ascontiguousarray(plane))
        resized[index] = np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    resized = np.moveaxis(resized, 0, -1) if channel_axis == -1 else resized if channel_axis == 0 else resized[0]
    return np.ascontiguousarray(resized)


def resize_probabilities(probabilities: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(C, y, x)`` probabilities zoomed to ``shape``."""
    return _resize(probabilities, shape, channel_axis=0)
