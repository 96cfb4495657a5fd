"""Per-nucleus measurements: one row per label, from scikit-image's ``regionprops_table``.

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

_PROPERTIES = ("label", "centroid", "area", "perimeter", "equivalent_diameter_area", "eccentricity", "solidity")
_RENAMED = {"centroid-0": "centroid_y", "centroid-1": "centroid_x", "equivalent_diameter_area": "equivalent_diameter"}
BLOCK_ROWS = 4096
_HALO_ROWS = 256  # first guess at how far below its strip a nucleus reaches


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
    from skimage.measure import regionprops_table

    properties = list(_PROPERTIES) + (["intensity_mean", "intensity_max"] if image is not None else [])
    raw = regionprops_table(labels.astype(np.int64, copy=False), intensity_image=image, properties=properties)
    table = {
        _RENAMED.get(key, key): np.asarray(values) for key, values in raw.items() if not key.startswith("intensity_")
    }
    if image is not None:
        channels = sorted({key.split("-")[1] for key in raw if key.startswith("intensity_mean-")})
        suffixes = [("", "")] if not channels else [(f"-{c}", f"_{c}") for c in channels]
        for source, target in suffixes:
            mean = np.asarray(raw[f"intensity_mean{source}"], dtype=np.float64)
            table[f"mean_intensity{target}"] = mean
            table[f"max_intensity{target}"] = np.asarray(raw[f"intensity_max{source}"], dtype=np.float64)
            table[f"integrated_intensity{target}"] = mean * table["area"]
    return table


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
