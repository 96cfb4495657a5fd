"""One 2D plane: predict its probabilities (slow, cached by callers) and label them (fast).

``predict_plane`` runs the network at the zoom that suits the plane's nuclei;
``label_plane`` turns a (cached) prediction into mask + instances, so the widget can
re-label live without the network. Both whole planes (``segment``) and blocks of large
planes (``blocks``) use these; this module imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .errors import InputError
from .io import Normalizer, hematoxylin, sample_step
from .model import Checkpoint
from .params import AUTO, STAINS, PostprocessParams, SegmentParams
from .postprocess import drop_small_labels, instances, with_threshold
from .scale import (
    NETWORK_GRID_MAX_PIXELS,
    RESCALE_TOLERANCE,
    DiameterEstimate,
    estimate_on_plane,
    predict_zoomed,
    rescale_factor,
    resize_probabilities,
)
from .tiling import CancelCheck, ProgressCallback


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


class LabelledPlane(NamedTuple):
    """Mask and instances of one plane, and the threshold they were cut at."""

    mask: np.ndarray  # bool
    labels: np.ndarray  # int32, 1..N
    threshold: float
    unsure: int = 0  # objects dropped by the min confidence alone


def apply_stain(plane, stain: str):
    """The plane the network sees: the hematoxylin channel of an RGB plane, or the plane as is."""
    if stain == "hematoxylin":
        return hematoxylin(plane)
    if stain != "none":
        raise InputError(f"stain must be one of {', '.join(STAINS)}, got {stain!r}")
    return plane


def resolve_stain(checkpoint: Checkpoint, plane, params: SegmentParams) -> SegmentParams:
    """``params`` with the image type detected (when "auto") and the stain chosen for it (when "auto")."""
    from .data import image_type

    kind = params.image_type
    if kind == AUTO:
        step = sample_step(*plane.shape[:2])
        kind = image_type(np.asarray(plane[::step, ::step]))
    stain = params.stain
    if stain == AUTO:
        stain = checkpoint.stain_for(kind) if len(plane.shape) == 3 and plane.shape[-1] in (3, 4) else "none"
    return replace(params, image_type=kind, stain=stain)


def plane_normalizer(checkpoint: Checkpoint, plane, stain: str = "none") -> Normalizer:
    """The checkpoint's normaliser for a whole (possibly lazy) plane after the stain conversion.

    Only a strided sample is read and converted, so a huge dask or zarr plane costs little.
    """
    step = sample_step(*plane.shape[:2])
    sample = apply_stain(np.asarray(plane[::step, ::step]), stain)
    return checkpoint.normalizer(sample)


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
    towards the training size and falls past it, so the passes stop at the first fall.
    Such merges are caught when the zoom-1 nuclei are small enough to be zoomed up: one
    pass at zoom 2 checks whether they measure the same there, as real nuclei do. The
    full-size pass is reused when no rescaling is needed. No nuclei found: ``diameter``
    is None. (Measurements: docs/model-card.md.)
    """
    params = resolve_stain(checkpoint, plane, params or SegmentParams())
    normalizer = plane_normalizer(checkpoint, plane, params.stain)
    return estimate_on_plane(checkpoint, apply_stain(plane, params.stain), normalizer, params.tiling, progress, cancel)


def predict_plane(
    checkpoint: Checkpoint,
    plane,
    params: SegmentParams,
    estimate: DiameterEstimate,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    normalizer: Normalizer | None = None,
) -> PlanePrediction:
    """Probabilities of one 2D plane at its own size, normalised as the checkpoint expects.

    The plane is zoomed so its nuclei (``estimate``, resolved by ``segment.resolve``) match
    the model's training size, and the probabilities are zoomed back, so post-processing
    works in the image's own pixels. An estimate whose last pass covered this whole plane
    at the right zoom is reused instead of running the network again. ``normalizer``
    passes what was already worked out for a whole large plane.
    """
    params = resolve_stain(checkpoint, plane, params)  # as segment.resolve does (idempotent) when called directly
    normalizer = normalizer or plane_normalizer(checkpoint, plane, params.stain)
    plane = apply_stain(plane, params.stain)
    factor = rescale_factor(checkpoint, estimate.diameter)
    height, width = plane.shape[:2]
    reusable = estimate.probabilities is not None and estimate.probabilities.shape[1:] == _zoomed_shape(
        plane.shape, estimate.zoom
    )
    if reusable and abs(estimate.zoom / factor - 1.0) < RESCALE_TOLERANCE:
        factor, small = estimate.zoom, estimate.probabilities  # the last estimation pass ran at this zoom
    else:
        small = predict_zoomed(checkpoint, plane, normalizer, params.tiling, factor, progress, cancel)
    network = small if factor > 1.0 and small[0].size <= NETWORK_GRID_MAX_PIXELS else None
    return PlanePrediction(resize_probabilities(small, (height, width)), estimate.diameter, factor, network)


def _zoomed_shape(shape: tuple[int, ...], zoom: float) -> tuple[int, int]:
    return tuple(max(1, int(round(side * zoom))) for side in shape[:2])


def label_plane(prediction: PlanePrediction, outputs: tuple[str, ...], postprocess: PostprocessParams) -> LabelledPlane:
    """Mask and instances of one plane, on its own grid, from its (cached) prediction.

    ``postprocess.min_confidence`` must be a number (``segment.resolve``); an "auto"
    threshold is Otsu's on this plane's foreground. When the network ran on the plane
    zoomed in, nuclei are separated on the network's finer grid and every image pixel
    takes the label found at its centre (better for small nuclei: docs/model-card.md).
    """
    if prediction.network is None:
        params = with_threshold(postprocess, prediction.probabilities[outputs.index("foreground")])
        report: dict = {}
        mask, labels = instances(
            prediction.probabilities, outputs, params, network_zoom=prediction.factor, report=report
        )
        return LabelledPlane(mask, labels, float(params.threshold), report["unsure"])
    from skimage.segmentation import relabel_sequential

    params = with_threshold(postprocess, prediction.network[outputs.index("foreground")])
    report = {}
    _mask, fine = instances(
        prediction.network, outputs, params, grid_zoom=prediction.factor, network_zoom=prediction.factor, report=report
    )
    rows, cols = (pixel_centres(f, c) for f, c in zip(fine.shape, prediction.probabilities.shape[1:]))
    labels = drop_small_labels(fine[np.ix_(rows, cols)], postprocess.min_size)  # min size in image pixels, as sampled
    labels = relabel_sequential(labels)[0]  # a nucleus smaller than a pixel can fall between centres
    return LabelledPlane(labels > 0, labels, float(params.threshold), report["unsure"])


def pixel_centres(fine: int, coarse: int) -> np.ndarray:
    """Index on a grid of ``fine`` pixels nearest to each centre of ``coarse`` pixels spanning the same extent."""
    return np.minimum(((np.arange(coarse) + 0.5) * (fine / coarse)).astype(np.int64), fine - 1)
