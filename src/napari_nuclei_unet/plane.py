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
from .io import Normalizer, brightest_channel, hematoxylin, sample_step
from .model import Checkpoint
from .params import AUTO, STAINS, PostprocessParams, SegmentParams
from .postprocess import drop_small_labels, instances, with_threshold
from .scale import (
    NETWORK_GRID_MAX_PIXELS,
    RESCALE_TOLERANCE,
    DiameterEstimate,
    predict_zoomed,
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


PlaneIndex = int | None  # None: a single 2D image; i: plane i of a Z/T stack


@dataclass(frozen=True, eq=False)
class Resolved:
    """Every decision a segmentation takes before the network runs, made once by ``segment.resolve``
    and passed down to each plane and block."""

    params: SegmentParams  # image type, stain, diameter and min confidence as values ("auto" threshold: per plane)
    estimate: DiameterEstimate  # the nucleus size, with the last estimation pass when it covers the plane
    factor: float  # the zoom the network runs at (scale.rescale_factor)
    large: bool  # the planes go block by block, or a Z-stack is labelled so (BlockParams.is_large, is_large_volume)
    reference: PlaneIndex  # the plane that stood for the image: its type, stain and nucleus size
    normalizer: Normalizer | None = None  # the reference plane's (a Z-stack's: every plane's), once built
    volume: bool = False  # a Z-stack: one normaliser for its planes, and nuclei labelled in 3D

    @property
    def diameter(self) -> float | None:
        return self.estimate.diameter

    def normalizer_for(self, checkpoint: Checkpoint, plane, index: PlaneIndex) -> Normalizer:
        """The normaliser of plane ``index`` (the reference plane's, or the Z-stack's, is built once)."""
        if (self.volume or index == self.reference) and self.normalizer is not None:
            return self.normalizer
        return plane_normalizer(checkpoint, plane, self.params.stain)


class LabelledPlane(NamedTuple):
    """Mask and instances of one plane, and the threshold they were cut at."""

    mask: np.ndarray  # bool
    labels: np.ndarray  # int32, 1..N
    threshold: float
    unsure: int = 0  # objects dropped by the min confidence alone


def apply_stain(plane, stain: str):
    """The plane the network sees: the hematoxylin or brightest channel of an RGB plane, or the plane as is.

    A lazy (dask, zarr) plane stays lazy: the channel is computed on what is read from it."""
    conversions = {"hematoxylin": hematoxylin, "brightest": brightest_channel}
    if stain == "none":
        return plane
    if stain not in conversions:
        raise InputError(f"stain must be one of {', '.join(STAINS)}, got {stain!r}")
    if isinstance(plane, np.ndarray) or len(plane.shape) != 3:
        return conversions[stain](plane)
    return _Converted(plane, conversions[stain])


class _Converted:
    """A lazy RGB plane seen through a per-pixel colour conversion: each read converts only what it reads."""

    ndim = 2

    def __init__(self, plane, convert):
        self.plane, self.convert = plane, convert
        self.shape = tuple(plane.shape[:2])

    def __getitem__(self, key):
        return self.convert(np.asarray(self.plane[key]))

    def __array__(self, dtype=None, copy=None):
        converted = self[:, :]
        return converted if dtype is None else converted.astype(dtype)


def resolve_stain(checkpoint: Checkpoint, plane, params: SegmentParams) -> SegmentParams:
    """``params`` with the image type detected (when "auto") and the stain chosen for it (when "auto")."""
    from .data import image_type

    kind = params.image_type
    if kind == AUTO:
        kind = image_type(plane)  # reads a sample of the plane
    stain = params.stain
    if stain == AUTO:
        colour = len(plane.shape) == 3 and plane.shape[-1] in (3, 4)
        stain = auto_stain(kind, checkpoint.stain_for(kind)) if colour else "none"
    return replace(params, image_type=kind, stain=stain)


def auto_stain(kind: str, model_choice: str = "none") -> str:
    """What an RGB plane of image type ``kind`` is read through when the stain is "auto": the model's choice, but
    colour fluorescence as its brightest channel (models learn fluorescence grey; its colour is a rendering, and for
    a grey image saved as RGB the two are the same). Training asks without a model choice: RGB as it is, but colour
    fluorescence as segmentation reads it."""
    return "brightest" if kind == "fluorescence" and model_choice == "none" else model_choice


def plane_normalizer(checkpoint: Checkpoint, plane, stain: str = "none") -> Normalizer:
    """The checkpoint's normaliser for a whole (possibly lazy) plane after the stain conversion.

    Only a strided sample is read and converted, so a huge dask or zarr plane costs little.
    """
    step = sample_step(*plane.shape[:2])
    sample = apply_stain(np.asarray(plane[::step, ::step]), stain)
    return checkpoint.normalizer(sample)


def stack_normalizer(checkpoint: Checkpoint, stack, stain: str = "none") -> Normalizer:
    """One normaliser for every plane of a Z-stack, from a strided sample of up to 16 of its planes.

    Planes above and below the nuclei then stay as dark as they are, instead of having their
    noise stretched to the full range as a plane of its own would (docs/zstacks.md)."""
    count = int(stack.shape[0])
    picks = np.unique(np.linspace(0, count - 1, min(count, 16)).round().astype(int))
    step = sample_step(*stack.shape[1:3])
    sample = np.concatenate([apply_stain(np.asarray(stack[int(i)][::step, ::step]), stain) for i in picks], axis=0)
    return checkpoint.normalizer(sample)


def predict_plane(
    checkpoint: Checkpoint,
    plane,
    resolved: Resolved,
    normalizer: Normalizer,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> PlanePrediction:
    """Probabilities of one 2D plane (or block) at its own size, normalised by ``normalizer`` (the whole plane's).

    The plane is zoomed by ``resolved.factor`` so its nuclei match the model's training size,
    and the probabilities are zoomed back, so post-processing works in the image's own pixels.
    An estimate whose last pass covered this whole plane at that zoom is reused instead of
    running the network again.
    """
    plane = apply_stain(plane, resolved.params.stain)
    estimate, factor = resolved.estimate, resolved.factor
    height, width = plane.shape[:2]
    reusable = estimate.probabilities is not None and estimate.probabilities.shape[1:] == _zoomed_shape(
        plane.shape, estimate.zoom
    )
    if reusable and abs(estimate.zoom / factor - 1.0) < RESCALE_TOLERANCE:
        factor, small = estimate.zoom, estimate.probabilities  # the last estimation pass ran at this zoom
    else:
        small = predict_zoomed(checkpoint, plane, normalizer, resolved.params.tiling, factor, progress, cancel)
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
    params = with_threshold(postprocess, prediction.network[outputs.index("foreground")])
    report = {}
    _mask, fine = instances(
        prediction.network, outputs, params, grid_zoom=prediction.factor, network_zoom=prediction.factor, report=report
    )
    rows, cols = (pixel_centres(f, c) for f, c in zip(fine.shape, prediction.probabilities.shape[1:]))
    labels = drop_small_labels(fine[np.ix_(rows, cols)], postprocess.min_size)  # min size in image pixels, as sampled
    return LabelledPlane(labels > 0, labels, float(params.threshold), report["unsure"])


def pixel_centres(fine: int, coarse: int) -> np.ndarray:
    """Index on a grid of ``fine`` pixels nearest to each centre of ``coarse`` pixels spanning the same extent."""
    return np.minimum(((np.arange(coarse) + 0.5) * (fine / coarse)).astype(np.int64), fine - 1)
