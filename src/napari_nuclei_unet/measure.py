"""Per-nucleus measurements: one row per label, as scikit-image's ``regionprops`` gives them.

Columns: ``label``, ``centroid_y``, ``centroid_x``, ``area``, ``perimeter``,
``equivalent_diameter``, ``eccentricity``, ``solidity`` (pixels), and with an image
``mean_intensity``, ``max_intensity`` and ``integrated_intensity`` (one set per channel,
suffixed ``_0``, ``_1``, … for colour images). With a pixel size, the lengths and areas are
also given in µm (``area_um2``, ``perimeter_um``, ``equivalent_diameter_um``,
``centroid_y_um``, ``centroid_x_um``).

Planes taller than ``block_rows`` are measured in strips of rows, so memory stays flat: a
nucleus belongs to the strip holding its top row and is measured whole, the strip being
read further down until none of its nuclei touches the strip's lower edge.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

BLOCK_ROWS = 4096
_HALO_ROWS = 256  # first guess at how far below its strip a nucleus reaches


def fingerprint(labels) -> str:
    """A fingerprint of a label image, to tell later whether anything changed it (an edit, a re-labelling), and so
    whether a table measured on it still describes it."""
    import hashlib

    array = np.ascontiguousarray(np.asarray(labels))
    return hashlib.blake2b(array.view(np.uint8).ravel(), digest_size=16).hexdigest() + f"|{array.dtype}|{array.shape}"


def measure(labels, image=None, pixel_size: float | None = None, block_rows: int = BLOCK_ROWS) -> dict[str, np.ndarray]:
    """The measurements of every nucleus of a 2D label image, as ``{column: array}`` sorted by label.

    ``image``: the plane that was segmented (grey ``(Y, X)`` or colour ``(Y, X, C)``), for the
    intensity columns; ``pixel_size``: µm per pixel, for the µm columns. Both may be numpy,
    dask or zarr arrays: only one strip is read at a time.
    """
    if len(labels.shape) != 2:
        raise InputError(f"measurements need a 2D label image, got shape {tuple(labels.shape)}")
    if image is not None and tuple(image.shape[:2]) != tuple(labels.shape):
        raise InputError(f"image shape {tuple(image.shape[:2])} does not match the labels' {tuple(labels.shape)}")
    if pixel_size is not None and not pixel_size > 0:
        raise InputError(f"pixel size must be a positive number of µm, got {pixel_size}")
    rows = labels.shape[0]
    tables = [
        _measure_strip(labels, image, start, min(rows, start + block_rows))
        for start in range(0, rows, max(1, block_rows))
    ]
    table = (
        {key: np.concatenate([t[key] for t in tables]) for key in tables[0]}
        if tables
        else _measure_rows(np.zeros((1, 1), np.int32), None)
    )
    order = np.argsort(table["label"], kind="stable")
    table = {key: values[order] for key, values in table.items()}
    if pixel_size is not None:
        size = float(pixel_size)
        table["area_um2"] = table["area"] * size * size
        table["perimeter_um"] = table["perimeter"] * size
        table["equivalent_diameter_um"] = table["equivalent_diameter"] * size
        table["centroid_y_um"] = table["centroid_y"] * size
        table["centroid_x_um"] = table["centroid_x"] * size
    return table


def _measure_strip(labels, image, start: int, stop: int) -> dict[str, np.ndarray]:
    """The nuclei whose top row lies in rows ``start:stop``, each measured whole."""
    rows = labels.shape[0]
    above = set(np.unique(np.asarray(labels[start - 1])).tolist()) if start > 0 else set()  # begun in an earlier strip
    halo = _HALO_ROWS
    while True:
        bottom = min(rows, stop + halo)
        block = np.asarray(labels[start:bottom])
        core = np.unique(block[: stop - start])
        owned = np.array([v for v in core.tolist() if v != 0 and v not in above], dtype=block.dtype)
        mine = np.where(np.isin(block, owned), block, 0)
        if bottom == rows or not mine[-1].any():  # every owned nucleus ends inside the window
            break
        halo *= 2
    table = _measure_rows(mine, None if image is None else np.asarray(image[start:bottom]))
    table["centroid_y"] = table["centroid_y"] + start
    return table


def _measure_rows(labels: np.ndarray, image: np.ndarray | None) -> dict[str, np.ndarray]:
    """The table of the labels in a 2D array: regionprops' numbers, from sums over every label's pixels at once
    instead of region by region (docs/performance.md); only the convex hull (solidity) is taken per nucleus."""
    pixels = _Pixels(labels)
    area = pixels.count.astype(np.float64)
    top, left = pixels.first(pixels.rows), pixels.first(pixels.cols)
    rows, cols = pixels.rows - pixels.spread(top), pixels.cols - pixels.spread(left)  # small: exact sums
    mean_row, mean_col = pixels.total(rows.astype(np.float64)) / area, pixels.total(cols.astype(np.float64)) / area
    table = {
        "label": pixels.label.astype(np.int64),
        "centroid_y": mean_row + top,
        "centroid_x": mean_col + left,
        "area": area,
        "perimeter": _perimeters(labels, pixels),
        "equivalent_diameter": np.sqrt(4.0 * area / np.pi),
        "eccentricity": _eccentricities(pixels, area, rows - pixels.spread(mean_row), cols - pixels.spread(mean_col)),
        "solidity": area / _convex_areas(labels, pixels, top, left),
    }
    if image is not None:
        planes = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[-1])]
        for channel, plane in enumerate(planes):
            suffix = "" if image.ndim == 2 else f"_{channel}"
            values = plane.ravel()[pixels.index]
            mean = pixels.total(values.astype(np.float64)) / area
            table[f"mean_intensity{suffix}"] = mean
            table[f"max_intensity{suffix}"] = pixels.reduce(np.maximum, values).astype(np.float64)
            table[f"integrated_intensity{suffix}"] = mean * area
    return table


class _Pixels:
    """The labelled pixels of a 2D array grouped by label (ascending): their flat index, row and column."""

    def __init__(self, labels: np.ndarray):
        flat = labels.ravel()
        index = np.flatnonzero(flat)
        values = flat[index]
        order = np.argsort(values, kind="stable")
        self.index, ids = index[order], values[order]
        self.starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else np.zeros(0, np.int64)
        self.label = ids[self.starts]
        self.count = np.diff(np.r_[self.starts, ids.size])
        self.rows, self.cols = np.divmod(self.index, labels.shape[1])

    def reduce(self, ufunc, values: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(values, self.starts) if self.starts.size else values[:0]

    def total(self, values: np.ndarray) -> np.ndarray:
        return self.reduce(np.add, values)

    def first(self, values: np.ndarray) -> np.ndarray:
        """Per label, the smallest of its pixels' ``values``."""
        return self.reduce(np.minimum, values)

    def spread(self, per_label: np.ndarray) -> np.ndarray:
        """One value per label, repeated for each of its pixels."""
        return np.repeat(per_label, self.count)


def _eccentricities(pixels: _Pixels, area: np.ndarray, dr: np.ndarray, dc: np.ndarray) -> np.ndarray:
    """regionprops' eccentricity: from the eigenvalues of each label's inertia tensor (the second moments of its
    pixels' offsets ``dr``, ``dc`` from its centroid)."""
    a, c, b = pixels.total(dc * dc) / area, pixels.total(dr * dr) / area, -pixels.total(dr * dc) / area
    half_sum, spread = (a + c) / 2.0, np.sqrt(((a - c) / 2.0) ** 2 + b * b)
    large, small = np.maximum(half_sum + spread, 0.0), np.maximum(half_sum - spread, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(large > 0, np.sqrt(np.clip(1.0 - small / large, 0.0, None)), 0.0)


# skimage.measure.perimeter's weights (4-connected border, Benkrid & Crookes), per neighbourhood code.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2.0)
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0


def _perimeters(labels: np.ndarray, pixels: _Pixels) -> np.ndarray:
    """regionprops' perimeter of every label at once: its border pixels (a 4-neighbour outside it) coded by which of
    their neighbours are border pixels of the same label (2 per side, 10 per corner), and weighted by the code."""
    padded = np.pad(labels, 1)
    width = padded.shape[1]
    flat = padded.ravel()
    index = (pixels.rows + 1) * width + pixels.cols + 1
    own = flat[index]
    sides, corners = (-width, width, -1, 1), (-width - 1, -width + 1, width - 1, width + 1)
    border = np.zeros(flat.size, bool)
    border[index] = np.any([flat[index + step] != own for step in sides], axis=0)
    edge = border[index]
    index, own = index[edge], own[edge]
    code = np.ones(index.size, np.int64)
    for weight, steps in ((2, sides), (10, corners)):
        for step in steps:
            code += weight * (border[index + step] & (flat[index + step] == own))
    lengths = _PERIMETER_WEIGHTS[code]
    per_pixel = np.zeros(pixels.index.size)
    per_pixel[edge] = lengths
    return pixels.total(per_pixel)


def _convex_areas(labels: np.ndarray, pixels: _Pixels, top: np.ndarray, left: np.ndarray) -> np.ndarray:
    """The pixels of each label's convex hull image (``skimage.morphology.convex_hull_image``, as regionprops);
    ``top``, ``left``: each label's first row and column."""
    from skimage.morphology import convex_hull_image

    bottom, right = pixels.reduce(np.maximum, pixels.rows), pixels.reduce(np.maximum, pixels.cols)
    areas = np.empty(pixels.label.size)
    for i, (label, y0, x0, y1, x1) in enumerate(zip(pixels.label.tolist(), top, left, bottom, right)):
        areas[i] = np.count_nonzero(convex_hull_image(labels[y0 : y1 + 1, x0 : x1 + 1] == label))
    return areas


def write_measurements_csv(path, table: dict[str, np.ndarray]) -> None:
    """The table as a CSV, one row per nucleus, written atomically."""
    import csv

    from .io import atomic_write

    columns = list(table)
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in zip(*(table[c] for c in columns)):
            writer.writerow([int(v) if c in ("label", "plane") else f"{float(v):.6g}" for c, v in zip(columns, row)])


def voxel_in_micrometres(
    voxel_size: tuple[float, float, float] | None, x_micrometres: float | None
) -> tuple[float, float, float] | None:
    """``voxel_size`` (Z, Y, X in any one unit: it gives the z step's ratio) in µm, from the µm of one x pixel;
    None when either is unknown."""
    if voxel_size is None or x_micrometres is None:
        return None
    return tuple(float(v) * x_micrometres / float(voxel_size[-1]) for v in voxel_size)


def measure_volume(labels, image=None, voxel_size: tuple[float, float, float] | None = None) -> dict[str, np.ndarray]:
    """The measurements of every nucleus of a 3D label image ``(Z, Y, X)``, sorted by label.

    Columns: ``label``, ``centroid_z``/``_y``/``_x`` and ``first_plane``/``last_plane`` (voxels),
    ``volume`` (voxels), ``equivalent_diameter`` (of the ball of that volume, xy pixels), and
    ``mean_intensity``/``integrated_intensity`` with a grey ``image``. With ``voxel_size``
    (Z, Y, X in µm): ``volume_um3`` and the centroid in µm.
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"3D measurements need a (Z, Y, X) label image, got shape {labels.shape}")
    intensity = None if image is None else np.asarray(image)
    if intensity is not None and intensity.shape != labels.shape:
        raise InputError(f"image shape {intensity.shape} does not match the labels' {labels.shape}")
    properties = ["label", "centroid", "area", "bbox"] + (["intensity_mean"] if intensity is not None else [])
    raw = regionprops_table(labels.astype(np.int64, copy=False), intensity_image=intensity, properties=properties)
    ratio = 1.0 if voxel_size is None else voxel_size[0] / math.sqrt(voxel_size[1] * voxel_size[2])
    table = {
        "label": raw["label"],
        "centroid_z": raw["centroid-0"],
        "centroid_y": raw["centroid-1"],
        "centroid_x": raw["centroid-2"],
        "first_plane": raw["bbox-0"],
        "last_plane": raw["bbox-3"] - 1,
        "volume": raw["area"],
        "equivalent_diameter": np.cbrt(6.0 * raw["area"] * ratio / np.pi),
    }
    if intensity is not None:
        table["mean_intensity"] = raw["intensity_mean"]
        table["integrated_intensity"] = raw["intensity_mean"] * raw["area"]
    if voxel_size is not None:
        z, y, x = (float(v) for v in voxel_size)
        table["volume_um3"] = raw["area"] * z * y * x
        for axis, size in zip("zyx", (z, y, x)):
            table[f"centroid_{axis}_um"] = table[f"centroid_{axis}"] * size
    return table
