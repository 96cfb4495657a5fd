"""Training/evaluation data: image + instance-label pairs from folders, RLE CSVs or Kaggle layouts."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import (
    IMAGE_SUFFIXES,
    file_axes,
    find_images,
    nuclear_plane_of,
    open_zarr_array,
    read_image,
    sample_step,
    shown_pixels,
)
from .params import split_channel_axis

log = logging.getLogger(__name__)


@dataclass
class LabelledImage:
    """One training/evaluation example. ``roi`` (bool) marks where labels were checked; None = everywhere."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    roi: np.ndarray | None = None

    def __post_init__(self):
        spatial = self.image.shape[:2]
        if self.labels.shape != spatial:
            raise InputError(f"{self.name}: labels shape {self.labels.shape} does not match image shape {spatial}")
        if self.roi is not None and self.roi.shape != spatial:
            raise InputError(
                f"{self.name}: region-of-interest shape {self.roi.shape} does not match image shape {spatial}"
            )


_TYPE_SAMPLE = 2**18  # pixels that decide an image's type
# Pseudo-coloured fluorescence: the brightest tenth of its pixels (by mean of the channels) are vivid (a tint:
# saturation 1 for pure blue or green), where stained tissue's are pale (glass, eosin). Median saturation there: at
# most 0.44 on the 126 tissue images of DSB2018 and MoNuSeg, at least 0.7 on their fluorescence images tinted.
_TINT_SATURATION = 0.6
# Brightfield's background is bright and fills most of the field: the median sits near the top of the range (0.84-0.96
# of the way from the 0.5th to the 99.5th percentile on the 14 DSB2018 brightfield images). Dense fluorescence whose
# nuclei fill the field also has its median above its mean, but mid-range (0.41-0.50 on the 22 E2F train and val
# sections that were called brightfield before this rule).
_BACKGROUND_LEVEL = 0.7


def image_type(image: np.ndarray) -> str:
    """The DSB2018 image type: ``'fluorescence'`` (dark background), ``'tissue'`` (stained
    colour, H&E-like) or ``'brightfield'`` (grey on a bright background).

    These are the types the challenge's images fall into, and models fare very differently
    on each: benchmarks score them separately. Judged on every n-th pixel of large images
    (at most ``_TYPE_SAMPLE`` pixels; the same type on all 673 DSB2018, MoNuSeg, E2F and sample images).
    """
    step = sample_step(image.shape[0], image.shape[1], _TYPE_SAMPLE)
    array = shown_pixels(np.asarray(image[::step, ::step]))  # sliced first: a zarr plane is read only there
    colour = (array if len(image.shape) == 3 else array[..., None]).astype(np.float32)
    grey = colour.mean(axis=-1)
    saturated = float(np.abs(colour - grey[..., None]).mean()) > 0.02 * max(float(grey.max()), 1.0)
    if saturated:
        return "fluorescence" if _bright_part_vivid(colour) else "tissue"
    median = float(np.median(grey))
    low, high = np.percentile(grey, (0.5, 99.5))
    bright_background = (
        median > float(grey.mean())
        and median > 0.3 * float(grey.max())
        and median >= low + _BACKGROUND_LEVEL * (high - low)
    )
    return "brightfield" if bright_background else "fluorescence"


def _bright_part_vivid(colour: np.ndarray) -> bool:
    """Whether the brightest tenth of the pixels of ``(..., 3)`` float colours are vivid (a pseudo-colour).

    Brightest by the mean of the channels: a vivid purple nucleus can have a channel as high as pale glass."""
    grey = colour.mean(axis=-1)
    top = colour[grey >= np.percentile(grey, 90)]
    brightest = top.max(axis=-1)
    saturation = (brightest - top.min(axis=-1)) / np.maximum(brightest, 1e-6)
    return float(np.median(saturation)) >= _TINT_SATURATION


def image_kind(image: np.ndarray) -> str:
    """``'fluorescence'`` (dark background) or ``'brightfield'`` (bright background or stained colour)."""
    return "fluorescence" if image_type(image) == "fluorescence" else "brightfield"


def read_split(path: str | os.PathLike) -> dict[str, str]:
    """``ImageId,split`` (or ``stem,split``) CSV -> ``{image_id: split}``."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        key = next((name for name in ("ImageId", "stem") if name in fields), None)
        if key is None or "split" not in fields:
            raise InputError(f"{path}: expected columns ImageId,split (or stem,split)")
        return {row[key]: row["split"] for row in reader}


def load_pairs(
    images: str | os.PathLike, labels: str | os.PathLike, names: set[str] | None = None
) -> list[LabelledImage]:
    """Pair images with labels by file stem.

    ``labels`` is a folder of label images, an RLE CSV (shapes from the images), or a
    Kaggle DSB folder (``<id>/images/<id>.png`` + ``<id>/masks/*.png``; then ``images`` may be the same folder).
    """
    images, labels = Path(images), Path(labels)
    if labels.is_dir() and _is_kaggle_layout(labels):
        return _load_kaggle_layout(labels, names)
    image_paths = find_images([str(images)])
    pairs = []
    if labels.is_file() and labels.suffix.lower() == ".csv":
        from .rle import read_csv

        entries = read_csv(labels)
        for stem, path in sorted(_named(image_paths, names).items()):
            if stem not in entries:
                continue
            image = _read_nuclear(path)
            pairs.append(LabelledImage(stem, image, entries[stem].to_labels(image.shape[:2], source=str(labels))))
    elif labels.is_dir():
        image_paths, label_files = _label_files(image_paths, labels)
        for stem, path in sorted(_named(image_paths, names).items()):
            if stem in label_files:
                pairs.append(LabelledImage(stem, _read_nuclear(path), read_labels(label_files[stem])))
    else:
        raise InputError(f"{labels}: labels must be a folder of label images, an RLE CSV or a Kaggle DSB folder")
    if not pairs:
        raise InputError(
            f"{labels}: no labels match the images in {images} by file name (a label image has its image's name, in "
            f"another folder, or that name with one of {', '.join(LABEL_SUFFIXES)}, as cellpose and napari save them)"
        )
    return pairs


def _named(paths: list[Path], names: set[str] | None) -> dict[str, Path]:
    return {p.stem: p for p in paths if names is None or p.stem in names}


# How other tools name a label image kept beside its image: cellpose's "_masks" ("_cp_masks" for those it writes),
# "_labels" and "_label" (napari, StarDist's examples), "_mask".
LABEL_SUFFIXES = ("_cp_masks", "_masks", "_mask", "_labels", "_label")
# Files that hold label images: image files, and zarr stores (what `segment --out-format zarr` writes).
LABEL_FILE_SUFFIXES = (*IMAGE_SUFFIXES, ".zarr")


def _without_label_suffix(stem: str) -> str:
    lowered = stem.lower()
    return next((stem[: -len(suffix)] for suffix in LABEL_SUFFIXES if lowered.endswith(suffix)), stem)


def label_names(paths: list[Path]) -> dict[str, Path]:
    """Label images keyed by the stem of the image each labels: their stem without a suffix of ``LABEL_SUFFIXES``
    (cellpose's ``x_masks.tif`` labels ``x``). A file whose label file lies beside it is an image, not a label."""
    stems = {p.stem for p in paths}
    imaged = {base for p in paths if (base := _without_label_suffix(p.stem)) != p.stem and base in stems}
    named: dict[str, Path] = {}
    for path in paths:
        if path.stem in imaged:
            continue
        key = _without_label_suffix(path.stem)
        if key in named:
            raise InputError(f"{named[key]} and {path.name} both label the image {key!r}: keep one")
        named[key] = path
    return named


def _label_files(image_paths: list[Path], folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """The images left once label files are set apart, and the label files of ``folder`` keyed by the stem of the
    image each labels (``label_names``). In the images' own folder (cellpose's layout) only a file named after
    another image is a label: it is then no image, and no image labels itself."""
    named = label_names([p for p in find_images([str(folder)]) if p.suffix.lower() in LABEL_FILE_SUFFIXES])
    if folder.resolve() in {p.parent for p in image_paths}:
        named = {key: path for key, path in named.items() if path.stem != key}
        image_paths = [p for p in image_paths if p not in named.values()]
    return image_paths, named


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """A label image (or stack) to train on or score against, as int32 IDs, one per nucleus.

    A binary mask (one value over several separate regions: what many tools export) has its regions
    numbered, with a warning: nuclei that touch in it stay one. Colour pictures of labels, fractions
    and negative values are refused, naming the file."""
    labels = np.asarray(open_zarr_array(path) if Path(path).suffix.lower() == ".zarr" else read_image(path))
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and labels.shape[0] > 4:
        raise InputError(
            f"{path}: labels are a colour picture (shape {labels.shape}); save them as one plane of nucleus IDs "
            "(a napari Labels layer saved as .tif, or `nuclei-unet rle decode`)"
        )
    if labels.dtype.kind not in "biuf" or (
        labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))  # NaN fails this too
    ):
        raise InputError(f"{path}: labels must be whole numbers, one ID per nucleus (got {labels.dtype} values)")
    if labels.size and labels.min() < 0:
        raise InputError(f"{path}: labels must not be negative (found {labels.min()})")
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        raise InputError(f"{path}: label IDs above {np.iinfo(np.int32).max} are not supported")
    labels = labels.astype(np.int32)
    if np.unique(labels).size == 2:  # background and one value
        from scipy import ndimage as ndi

        regions, count = ndi.label(labels > 0)
        if count > 1:
            log.warning(
                "%s: a mask (one value over %d separate regions): each region is taken as one nucleus, and nuclei "
                "that touch in it stay one",
                path,
                count,
            )
            return regions.astype(np.int32)
    return labels


def _read_nuclear(path: Path) -> np.ndarray:
    """A training image as segmentation reads it: its nuclear channel when it has channels (``io.nuclear_plane_of``)."""
    axes = file_axes(path)
    image, picked = nuclear_plane_of(read_image(path, split_channel_axis(axes)[1]), axes, path)
    if picked:
        log.info("%s: channel %d of %d (looks most like a nuclear stain)", path, picked["channel"], picked["channels"])
    return np.asarray(image)


def _is_kaggle_layout(folder: Path) -> bool:
    first = next((p for p in folder.iterdir() if p.is_dir()), None)
    return first is not None and (first / "images").is_dir() and (first / "masks").is_dir()


def _load_kaggle_layout(folder: Path, names: set[str] | None) -> list[LabelledImage]:
    pairs = []
    for sample in sorted(p for p in folder.iterdir() if p.is_dir()):
        if names is not None and sample.name not in names:
            continue
        image = read_image(sample / "images" / f"{sample.name}.png")
        labels = np.zeros(image.shape[:2], np.int32)
        for index, mask_file in enumerate(sorted((sample / "masks").glob("*.png")), start=1):
            labels[np.asarray(read_image(mask_file)) > 0] = index
        pairs.append(LabelledImage(sample.name, image, labels))
    return pairs


def median_diameter(label_images: list[np.ndarray]) -> float | None:
    """Median equivalent diameter (px) of all nuclei: the model's reference scale."""
    areas = np.concatenate([np.bincount(np.asarray(lab).ravel())[1:] for lab in label_images] or [np.zeros(0)])
    areas = areas[areas > 0]
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else None
