"""Segment image files into label files: one image per call, here or on dask workers.

:func:`segment_file` is the unit of work of ``nuclei-unet segment``, serially and on a
dask.distributed cluster alike, so both write exactly the same labels. Workers load each
model once (:func:`cached_checkpoint`) and write their own output files; the output
folder must therefore be reachable from every worker (a shared file system on a cluster).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import check_image_layout, is_single_plane, read_image, write_labels
from .model import Checkpoint
from .segment import SegmentParams, segment
from .tiling import CancelCheck, ProgressCallback

OUT_FORMATS = ("tif", "zarr")


@dataclass
class FileResult:
    """What one segmented file produced (small: it travels back from dask workers)."""

    source: str
    output: str
    nuclei: int
    pixels: int
    diameter: float | None
    factor: float
    seconds: float


def open_image(path: str | os.PathLike):
    """An image file as numpy, or a lazy zarr array for a ``.zarr`` store (first array of a
    group, e.g. OME-Zarr level 0) and for a TIFF holding one plane too large to segment whole.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        lazy = _lazy_tiff_plane(path)
        if lazy is not None:
            return lazy
    if path.suffix.lower() != ".zarr":
        return read_image(path)
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:
        raise InputError(f"{path}: cannot open zarr store ({type(error).__name__}: {error})") from None
    if not hasattr(node, "shape"):  # a group: take its first array, as OME-Zarr stores level 0 first
        keys = sorted(node.array_keys())
        if not keys:
            raise InputError(f"{path}: zarr group holds no array")
        node = node[keys[0]]
    check_image_layout(node, name=str(path))
    return node


def _lazy_tiff_plane(path: Path):
    """A large single-plane TIFF as a zarr array read strip by strip or tile by tile; None otherwise."""
    from .blocks import LARGE_PLANE

    try:
        import tifffile
        import zarr

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.levels) > 1 or len(tif.series) > 1:
                return None  # pyramids and multi-series files: read as before
            shape = tuple(series.shape)
        plane = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4))
        if not plane or shape[0] * shape[1] <= LARGE_PLANE:
            return None
        array = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except Exception:  # unreadable here: read_image reports the problem with the file name
        return None
    check_image_layout(array, name=str(path))
    return array


def output_path(out_dir: str | os.PathLike, source: str | os.PathLike, out_format: str) -> Path:
    if out_format not in OUT_FORMATS:
        raise InputError(f"output format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    return Path(out_dir) / f"{Path(source).stem}.{out_format}"


def segment_file(
    checkpoint: Checkpoint,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: SegmentParams | None = None,
    out_format: str = "tif",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> FileResult:
    """Segment one file into ``<out_dir>/<stem>.<out_format>``; the output appears only when complete."""
    from .blocks import LARGE_PLANE, segment_large

    started = time.perf_counter()
    image = open_image(source)
    target = output_path(out_dir, source, out_format)
    single = is_single_plane(image)
    shape = tuple(image.shape[:2]) if single else tuple(image.shape[:3])
    large = single and shape[0] * shape[1] > LARGE_PLANE
    if out_format == "zarr":
        import zarr

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        shutil.rmtree(partial, ignore_errors=True)
        labels_out = zarr.open_array(str(partial), mode="w", shape=shape, chunks=(1,) * (len(shape) - 2) + (1024, 1024), dtype="int32")
        try:
            if large:
                result = segment_large(checkpoint, image, params, labels_out=labels_out, progress=progress, cancel=cancel)
            else:
                result = segment(checkpoint, image, params, progress=progress, cancel=cancel)
                labels_out[...] = result.labels
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    elif large:  # labels on disk, then streamed into a tiled TIFF: memory stays flat
        import zarr

        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
            labels_out = zarr.open_array(str(Path(scratch) / "labels.zarr"), mode="w", shape=shape, chunks=(1024, 1024), dtype="int32")
            result = segment_large(checkpoint, image, params, labels_out=labels_out, progress=progress, cancel=cancel)
            write_labels(target, labels_out, max_label=result.count)
    else:
        result = segment(checkpoint, image, params, progress=progress, cancel=cancel)
        write_labels(target, np.asarray(result.labels))
    return FileResult(str(source), str(target), result.count, int(np.prod(shape)), result.diameter, result.factor, time.perf_counter() - started)


# Checkpoints already loaded in this process (a dask worker loads each model once).
_CHECKPOINTS: dict[tuple, Checkpoint] = {}


def cached_checkpoint(model: str, encoder: str | None = None) -> Checkpoint:
    """The checkpoint ``model`` (a path or 'default'), loaded once per process."""
    from .model import resolve_model_path

    key = (model, encoder)
    if key not in _CHECKPOINTS:
        _CHECKPOINTS[key] = Checkpoint.load(resolve_model_path(model), encoder=encoder)
    return _CHECKPOINTS[key]


def segment_file_task(model: str, encoder: str | None, source: str, out_dir: str, params: SegmentParams, out_format: str, threads: int | None) -> FileResult:
    """:func:`segment_file` as a dask task: plain arguments, the model cached in the worker."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return segment_file(cached_checkpoint(model, encoder), source, out_dir, params, out_format)
