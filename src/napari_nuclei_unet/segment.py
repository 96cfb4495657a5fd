"""The segmentation pipeline shared by the CLI, the widgets and dask workers.

``predict_plane`` runs the network (slow, cached by callers); ``label_plane`` turns a
cached prediction into mask + instances (fast, re-run when the user tunes
post-processing). ``segment`` chains them over every plane of an image or stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage as ndi

from .errors import Cancelled, InputError
from .io import Normalizer, hematoxylin, is_single_plane, plane_count, planes, sample_step
from .model import Checkpoint
from .postprocess import PostprocessParams, instances
from .tiling import CancelCheck, ProgressCallback, TilingParams, plan_tiles, predict


AUTO = "auto"


@dataclass
class SegmentParams:
    """Everything that decides a segmentation, grouped as the user sees it."""

    tiling: TilingParams = field(default_factory=TilingParams)
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    # Typical nucleus diameter in the image, pixels: "auto" estimates it, a number is taken as
    # given, None runs the network at the image's own scale.
    diameter: float | str | None = AUTO
    # "hematoxylin": segment the hematoxylin channel of a brightfield RGB (colour deconvolution),
    # for stains the model has not seen, such as DAB immunohistochemistry. "none": the image as is.
    stain: str = "none"

    def network_key(self) -> tuple:
        """Parameters that change the probabilities (post-processing does not)."""
        return (asdict(self.tiling), self.diameter, self.stain)


@dataclass
class PlanePrediction:
    """Network output for one plane, on the plane's own pixel grid."""

    probabilities: np.ndarray  # (C, Y, X) float32
    diameter: float | None  # nucleus diameter in image pixels: estimated, given, or None
    factor: float = 1.0  # zoom the network ran at; post-processing lengths scale by 1 / factor
    # The network's own output when it ran on the plane zoomed in (factor > 1), on its finer
    # grid. Nuclei are separated there and sampled back (label_plane): the probabilities
    # zoomed back to the image lose the sub-pixel detail of small nuclei (model card).
    network: np.ndarray | None = None


@dataclass
class Segmentation:
    """Result for an image or stack; arrays have a leading plane axis only for stacks."""

    probabilities: np.ndarray | None  # (C, Y, X) or (N, C, Y, X), float32; None for planes done block by block
    mask: np.ndarray | None  # bool; None for planes done block by block
    labels: np.ndarray  # int32, 1..N per plane (numpy, or the zarr array it was written to)
    diameter: float | None = None  # nucleus diameter used, image pixels (estimated with "auto")
    factor: float = 1.0  # zoom the network ran at
    total: int | None = None  # nucleus count, when known without reading the labels back

    @property
    def count(self) -> int:
        """Number of nuclei (summed over planes)."""
        if self.total is not None:
            return self.total
        if self.labels.ndim == 2:
            return int(self.labels.max())
        return int(sum(int(plane.max()) for plane in self.labels))


# Nuclei this many times the model's training size (min, max) are segmented without rescaling;
# smaller ones are zoomed to the training size, larger ones to the band's top (model card).
SIZE_BAND = (0.7, 1.6)
# Zooms closer than this are the same for the network (an estimation pass is reused).
_RESCALE_TOLERANCE = 0.1
# The zoom applied for a diameter is kept within these limits (a wrong estimate stays affordable).
ZOOM_LIMITS = (0.125, 4.0)
# Estimation passes look at a centre crop of at most this many pixels (at the pass's zoom).
_ESTIMATE_PIXELS = 2048 * 2048
_MIN_PASS_SIDE = 48  # px: coarser passes than this see too little
# Zoomed-in network outputs up to this many pixels are kept for labelling on their grid.
_NETWORK_GRID_MAX_PIXELS = 32_000_000
# Diameters measured at two zooms that differ by less than this fraction are the same nuclei.
_SAME_SIZE = 0.15
# Fewer confidently detected nuclei than this give no estimate.
_MIN_OBJECTS = 3
_BOUNDARY_WIDTH = 2  # px: the boundary target's width (train.make_targets)


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
        raise InputError(f"model {checkpoint.name} does not record the nucleus size it was trained on; leave the diameter empty")
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


def estimate_diameter(
    checkpoint: Checkpoint,
    plane,
    params: SegmentParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> DiameterEstimate:
    """Nucleus diameter of a plane in its own pixels, from the model's own detections.

    The network runs on (a centre crop of) the plane at zoom 1, 1/2, 1/4 and 1/8, and the
    nuclei it finds are measured at each zoom. A model shown nuclei far larger than it was
    trained on finds fragments of them, with low confidence; shown nuclei too small, it
    merges or misses them. The zoom where it is most confident (mean foreground
    probability) gives the diameter. Confidence rises while the zoom brings nuclei
    towards the training size and falls past it, so the passes stop at the first fall:
    on the DSB2018 val split at x1 that is after the 1/2 pass for almost every image,
    and it picks the same zoom as trying them all in 265 of 268 image/scale cases (the
    other 3 were coarse passes that merged small nuclei). Such merges are caught when
    the zoom-1 nuclei are small enough to be zoomed up: one pass at zoom 2 checks whether
    they measure the same there, as real nuclei do (on the val split at x0.5 this fixed 3
    estimates that were 2-2.5x too large, and it ran at no native-scale image). The
    full-size pass is reused when no rescaling is needed. No nuclei found: ``diameter``
    is None.
    """
    params = params or SegmentParams()
    normalizer = plane_normalizer(checkpoint, plane, params.stain)
    return _estimate(checkpoint, _apply_stain(plane, params.stain), normalizer, params.tiling, progress, cancel)


def _estimate(checkpoint, plane, normalizer, tiling, progress, cancel) -> DiameterEstimate:
    best, best_confidence, first, native = None, -1.0, None, None
    zoom = 1.0
    while zoom >= ZOOM_LIMITS[0] and (zoom == 1.0 or min(plane.shape[:2]) * zoom >= _MIN_PASS_SIDE):
        crop, whole = _centre_crop(plane, int(np.sqrt(_ESTIMATE_PIXELS) / zoom))
        probabilities = _predict_zoomed(checkpoint, crop, normalizer, tiling, zoom, progress, cancel)
        kept = probabilities if whole else None
        first = first or DiameterEstimate(None, zoom, kept)
        measured = measure_nuclei(probabilities, checkpoint.outputs)
        if measured is not None and zoom == 1.0:
            native = DiameterEstimate(measured[0], zoom, kept)
        if measured is not None and measured[1] > best_confidence:
            best, best_confidence = DiameterEstimate(measured[0] / zoom, zoom, kept), measured[1]
        elif best is not None:  # past the most confident zoom: coarser passes only merge nuclei
            break
        zoom /= 2
    if best is not None and native is not None and best.zoom < 1.0 and native.diameter < SIZE_BAND[0] * checkpoint.nucleus_diameter:
        # Nuclei too small for the model can merge into larger blobs at a coarser zoom that
        # look more confident. Real nuclei measure the same in image pixels at zoom 2 as at
        # zoom 1; fragments of large nuclei measure smaller, so zoom 2 tells the two apart.
        crop, _ = _centre_crop(plane, int(np.sqrt(_ESTIMATE_PIXELS) / 2))
        finer = measure_nuclei(_predict_zoomed(checkpoint, crop, normalizer, tiling, 2.0, progress, cancel), checkpoint.outputs)
        if finer is not None and abs(finer[0] / 2.0 / native.diameter - 1.0) < _SAME_SIZE:
            best = native
    return best or first or DiameterEstimate(None)


def _centre_crop(plane, side: int):
    """The centre ``side`` x ``side`` part of the plane (all of it when it fits), and whether that is all."""
    height, width = plane.shape[:2]
    if height <= side and width <= side:
        return plane, True
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return plane[top:top + side, left:left + side], False


def plane_normalizer(checkpoint: Checkpoint, plane, stain: str = "none") -> Normalizer:
    """The checkpoint's normaliser for a whole (possibly lazy) plane after the stain conversion.

    Only a strided sample is read and converted, so a huge dask or zarr plane costs little.
    """
    step = sample_step(*plane.shape[:2])
    sample = _apply_stain(np.asarray(plane[::step, ::step]), stain)
    return Normalizer.from_image(sample, checkpoint.config.in_channels, checkpoint.percentiles)


def _apply_stain(plane, stain: str):
    if stain == "hematoxylin":
        return hematoxylin(plane)
    if stain != "none":
        raise InputError(f"stain must be 'none' or 'hematoxylin', got {stain!r}")
    return plane


def _predict_zoomed(checkpoint, plane, normalizer, tiling, zoom, progress, cancel) -> np.ndarray:
    """Probabilities of ``plane`` zoomed by ``zoom`` (on the zoomed grid)."""
    if zoom != 1.0:
        shape = tuple(max(1, int(round(side * zoom))) for side in plane.shape[:2])
        plane = _resize(np.asarray(plane), shape, channel_axis=-1 if plane.ndim == 3 else None)
    return predict(checkpoint.model, plane, normalizer, tiling, progress=progress, cancel=cancel)


def _resize(array: np.ndarray, shape: tuple[int, int], channel_axis: int | None) -> np.ndarray:
    """Bilinear resize of a 2D array (with channels at ``channel_axis``) to ``shape``, float32.

    Antialiased when shrinking, as the training's scale augmentation (torchvision) does;
    on two cores ~10x faster than scikit-image's resize with a Gaussian antialiasing filter.
    """
    import torch
    import torch.nn.functional as F

    spatial = array.shape[:2] if channel_axis == -1 else array.shape[-2:]
    if tuple(spatial) == tuple(shape):
        return array.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor.movedim(-1, 0) if channel_axis == -1 else tensor if channel_axis == 0 else tensor[None]
    shrinking = shape[0] < tensor.shape[-2] or shape[1] < tensor.shape[-1]
    with torch.inference_mode():
        resized = F.interpolate(tensor[None], size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrinking)[0]
    resized = resized.movedim(0, -1) if channel_axis == -1 else resized if channel_axis == 0 else resized[0]
    return np.ascontiguousarray(resized.numpy())


def _resize_probabilities(probabilities: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _resize(probabilities, shape, channel_axis=0)


def resolve_diameter(checkpoint: Checkpoint, image, params: SegmentParams, progress=None, cancel=None) -> DiameterEstimate:
    """The diameter to use for an image or stack: given, None, or estimated ("auto").

    Stacks are estimated once, on their middle plane, so all planes share one scale. A
    model that records no training nucleus size cannot be rescaled: "auto" then means None.
    """
    diameter = params.diameter
    if diameter != AUTO:
        if isinstance(diameter, str):
            raise InputError(f"nucleus diameter must be 'auto', a number of pixels or None, got {diameter!r}")
        return DiameterEstimate(None if diameter is None else float(diameter))
    if not checkpoint.nucleus_diameter:
        return DiameterEstimate(None)
    plane = image if is_single_plane(image) else image[image.shape[0] // 2]
    return estimate_diameter(checkpoint, plane, params, progress, cancel)


def predict_plane(
    checkpoint: Checkpoint,
    plane,
    params: SegmentParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    estimate: DiameterEstimate | None = None,
    normalizer: Normalizer | None = None,
) -> PlanePrediction:
    """Probabilities of one 2D plane at its own size, normalised as the checkpoint expects.

    The plane is zoomed so its nuclei match the model's training size (``params.diameter``:
    "auto", a number, or None for no zoom) and the probabilities are zoomed back, so
    post-processing works in the image's own pixels. ``estimate`` and ``normalizer`` pass
    what was already worked out for a whole stack or a whole large plane.
    """
    params = params or SegmentParams()
    normalizer = normalizer or plane_normalizer(checkpoint, plane, params.stain)
    plane = _apply_stain(plane, params.stain)
    if estimate is None:
        if params.diameter == AUTO and checkpoint.nucleus_diameter:  # estimate on this plane, reuse a pass
            estimate = _estimate(checkpoint, plane, normalizer, params.tiling, progress, cancel)
        else:
            estimate = resolve_diameter(checkpoint, plane, params)
    factor = rescale_factor(checkpoint, estimate.diameter)
    height, width = plane.shape[:2]
    if estimate.probabilities is not None and abs(estimate.zoom / factor - 1.0) < _RESCALE_TOLERANCE:
        factor, small = estimate.zoom, estimate.probabilities  # the last estimation pass ran at this zoom
    else:
        small = _predict_zoomed(checkpoint, plane, normalizer, params.tiling, factor, progress, cancel)
    network = small if factor > 1.0 and small[0].size <= _NETWORK_GRID_MAX_PIXELS else None
    return PlanePrediction(_resize_probabilities(small, (height, width)), estimate.diameter, factor, network)


def predict_probabilities(checkpoint: Checkpoint, plane, params: SegmentParams | None = None, progress=None, cancel=None) -> np.ndarray:
    """Just the probabilities ``(C, Y, X)`` of :func:`predict_plane`."""
    return predict_plane(checkpoint, plane, params, progress, cancel).probabilities


def model_postprocess(checkpoint: Checkpoint, postprocess: PostprocessParams | None) -> PostprocessParams:
    """``postprocess`` with its "auto" settings that belong to the model (``min_confidence``) filled in from ``checkpoint``."""
    postprocess = postprocess or PostprocessParams()
    if postprocess.min_confidence == AUTO:
        postprocess = replace(postprocess, min_confidence=checkpoint.min_confidence)
    return postprocess


def label_plane(
    prediction: PlanePrediction, outputs: tuple[str, ...], postprocess: PostprocessParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)`` of one plane, on its own grid, from its (cached) prediction.

    When the network ran on the plane zoomed in, nuclei are separated on the network's
    finer grid and every image pixel takes the label found at its centre. On the DSB2018
    val split at half magnification (small nuclei zoomed up to the training size) that
    scored 0.535 against 0.522 for labelling the probabilities zoomed back (model card).
    """
    if prediction.network is None:
        return instances(prediction.probabilities, outputs, postprocess, scale=1.0 / prediction.factor)
    from skimage.segmentation import relabel_sequential

    _mask, fine = instances(prediction.network, outputs, postprocess)
    rows, cols = (pixel_centres(f, c) for f, c in zip(fine.shape, prediction.probabilities.shape[1:]))
    labels = relabel_sequential(fine[np.ix_(rows, cols)])[0]  # a nucleus smaller than a pixel can fall between centres
    return labels > 0, labels


def pixel_centres(fine: int, coarse: int) -> np.ndarray:
    """Index on a grid of ``fine`` pixels nearest to each centre of ``coarse`` pixels spanning the same extent."""
    return np.minimum(((np.arange(coarse) + 0.5) * (fine / coarse)).astype(np.int64), fine - 1)


def _large_plane() -> int:
    from .blocks import LARGE_PLANE

    return LARGE_PLANE


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
    """Segment a 2D image or a stack plane by plane; ``progress(done, total)`` counts tiles.

    With ``diameter="auto"`` the estimation passes report their own tile counts first.
    Planes larger than ``blocks.LARGE_PLANE`` go block by block (:func:`blocks.segment_large`).
    """
    params = params or SegmentParams()
    params = replace(params, postprocess=model_postprocess(checkpoint, params.postprocess))
    tiling = params.tiling
    single = is_single_plane(image)
    if single and image.shape[0] * image.shape[1] > _large_plane():
        from .blocks import segment_large

        return segment_large(checkpoint, image, params, progress=progress, cancel=cancel)
    if single:  # the estimate's last pass can be reused as the prediction
        prediction = predict_plane(checkpoint, image, params, progress, cancel)
        predictions, labelled = [prediction], [label_plane(prediction, checkpoint.outputs, params.postprocess)]
    else:
        estimate = resolve_diameter(checkpoint, image, params, progress, cancel)
        estimate.probabilities = None  # computed on one plane; every plane runs at the shared zoom
        per_plane = _tiles_per_plane(image, tiling.tile_size, tiling.overlap, rescale_factor(checkpoint, estimate.diameter))
        total = plane_count(image) * per_plane
        predictions, labelled = [], []
        for index, plane in enumerate(planes(image)):

            def plane_progress(done: int, _total: int, offset: int = index * per_plane) -> None:
                if progress is not None:
                    progress(offset + done, total)

            prediction = predict_plane(checkpoint, plane, params, plane_progress, cancel, estimate=estimate)
            labelled.append(label_plane(prediction, checkpoint.outputs, params.postprocess))
            # Labelled: drop the finer grid, up to 16x the plane's probabilities (zoom 4), so a
            # stack of small nuclei holds no more than its image-grid probabilities.
            prediction.network = None
            predictions.append(prediction)
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    first = predictions[0]
    if single:
        return Segmentation(first.probabilities, *labelled[0], first.diameter, first.factor)
    stacked = np.stack([p.probabilities for p in predictions])
    mask, labels = np.stack([m for m, _ in labelled]), np.stack([lab for _, lab in labelled])
    return Segmentation(stacked, mask, labels, first.diameter, first.factor)
