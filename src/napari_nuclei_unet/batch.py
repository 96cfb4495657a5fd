"""Segment image files into label files: one image per call, here or on dask workers.

:func:`segment_file` is the unit of work of ``nuclei-unet segment``, serially and on a
dask.distributed cluster alike, so both write exactly the same labels. Workers load each
model once (:func:`cached_checkpoint`) and write their own output files; the output
folder must therefore be reachable from every worker (a shared file system on a cluster).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError, NucleiUnetError, describe
from .io import (
    TIFF_READ_SUFFIXES,
    check_image_layout,
    file_axes,
    file_pixel_size,
    file_stack,
    is_single_plane,
    nuclear_plane_of,
    open_zarr_array,
    read_image,
    write_labels,
    zarr_axes,
)
from .model import Checkpoint
from .params import AUTO, BlockParams, SegmentParams, split_channel_axis
from .segment import RunProgress, estimate_share, resolve, segment_planes, segment_time_points
from .tiling import CancelCheck, ProgressCallback

# "geojson": the TIFF labels and, beside them, the nuclei as GeoJSON polygons (QuPath).
OUT_FORMATS = ("tif", "zarr", "geojson")
log = logging.getLogger(__name__)


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
    record: dict = field(default_factory=dict)  # the values every "auto" became (Segmentation.record)
    extra_outputs: list[str] = field(default_factory=list)  # files written beside the labels (measurements)
    rle_part: str | None = None  # its rows of the RLE CSV (a CSV of its own, for the CLI to join)


def open_image(path: str | os.PathLike, blocks: BlockParams | None = None, channel_axis: int | None = None):
    """An image file as numpy, or a lazy zarr array for a ``.zarr`` store (first array of a
    group, e.g. OME-Zarr level 0) and for a TIFF holding one plane too large to segment whole
    or a large grey stack (:func:`_lazy_tiff`). ``channel_axis``: channels the caller takes one of
    (``io.nuclear_plane_of``).
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_READ_SUFFIXES:
        lazy = _lazy_tiff(path, blocks or BlockParams(), channel_axis)
        if lazy is not None:
            return lazy
    if path.suffix.lower() != ".zarr":
        return read_image(path, channel_axis)
    node = open_zarr_array(path)
    check_image_layout(node, name=str(path))
    return node


def _lazy_tiff(path: Path, blocks: BlockParams, channel_axis: int | None = None):
    """A TIFF holding one large plane, or a grey stack (a Z-stack, a time-lapse of them, with or without channels
    at ``channel_axis``) of more voxels than a Z-stack labelled whole, as a zarr array read strip by strip, tile by
    tile or plane by plane; None otherwise. Of a pyramid (a whole-slide OME-TIFF or SVS), the full-resolution level
    of the first series.

    None also when tifffile can't parse the file: ``read_image`` then reports the problem
    with the file name.
    """
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:  # the first series' full resolution, as tifffile reads a file whole
            shape = tuple(tif.series[0].levels[0].shape)
        plane = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4))
        stack = len(shape) >= 3 and not plane and shape[-1] not in (3, 4)  # stacks of colour planes: read whole
        if not ((plane and blocks.is_large(shape)) or (stack and np.prod(shape, dtype=float) > blocks.large_volume)):
            return None
        array = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, TypeError) as error:
        log.info("%s: not opened lazily (%s); reading it whole", path, describe(error))
        return None
    check_image_layout(array, name=str(path), channel_axis=channel_axis)
    return array


def output_path(out_dir: str | os.PathLike, source: str | os.PathLike, out_format: str) -> Path:
    if out_format not in OUT_FORMATS:
        raise InputError(f"output format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    return Path(out_dir) / f"{Path(source).stem}.{'tif' if out_format == 'geojson' else out_format}"


def segment_file(
    checkpoint: Checkpoint,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: SegmentParams | None = None,
    out_format: str = "tif",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    extras: tuple[str, ...] = (),
) -> FileResult:
    """Segment one file into ``<out_dir>/<stem>.<out_format>``; the output appears only when complete.

    ``extras`` are written beside it from the labels in hand (:data:`EXTRA_OUTPUTS`); the
    ``geojson`` format is the TIFF with ``polygons``.

    Any failure caused by the file (unreadable, degenerate, too large for memory) becomes
    one :class:`InputError` naming it.
    """
    try:
        return _segment_file(
            checkpoint, Path(source), out_dir, params or SegmentParams(), out_format, progress, cancel, extras
        )
    except (Cancelled, KeyboardInterrupt):
        raise
    except NucleiUnetError as error:
        message = str(error)  # our own errors are one line already
        raise type(error)(message if message.startswith(str(source)) else f"{source}: {message}") from None
    except MemoryError:
        raise InputError(f"{source}: not enough memory to segment this image") from None
    except OSError as error:
        where = error.filename or source
        raise InputError(f"{where}: {error.strerror or describe(error)}") from None
    except Exception as error:  # noqa: BLE001 (readers and arrays raise many types for a broken file)
        log.debug("segmenting %s failed", source, exc_info=True)
        raise InputError(f"{source}: cannot segment ({describe(error)})") from None


def _segment_file(
    checkpoint, source: Path, out_dir, params: SegmentParams, out_format, progress, cancel, extras=()
) -> FileResult:
    started = time.perf_counter()
    unknown = sorted(set(extras) - set(EXTRA_OUTPUTS))
    if unknown:  # before any work
        raise ValueError(f"unknown extra outputs {unknown}; choose from {', '.join(EXTRA_OUTPUTS)}")
    extras = tuple(extras) + (("polygons",) if out_format == "geojson" and "polygons" not in extras else ())
    axes = file_axes(source)  # read once: channels, then the stack
    given = params.channel_axis
    image = open_image(source, params.blocks, given if given is not None else split_channel_axis(axes)[1])
    image, channel = nuclear_plane_of(image, axes, source, params.channel, given, params.stack != AUTO)
    target = output_path(out_dir, source, out_format)
    single = is_single_plane(image)
    params = _with_file_stack(params, source, single, axes)
    target.parent.mkdir(parents=True, exist_ok=True)
    if params.stack == "tz":
        return _segment_time_lapse(
            checkpoint, source, image, params, target, out_format, progress, cancel, extras, channel
        )
    shape = tuple(image.shape[:2]) if single else tuple(image.shape[:3])
    stages = RunProgress(progress, estimate_share(checkpoint, params))  # one bar: the size estimate, then the rest
    resolved = resolve(checkpoint, image, params, progress=stages.estimating, cancel=cancel)
    progress = stages.segmenting
    if out_format == "zarr":
        stack = resolved.params.stack if not single else AUTO
        attrs = zarr_axes(stack, resolved.params.voxel_size if stack == "z" else None)
        with _zarr_labels(target, shape, attrs) as labels_out:
            result = segment_planes(
                checkpoint, image, resolved, labels_out=labels_out, progress=progress, cancel=cancel
            )
            extra = _write_extra_outputs(image, labels_out, out_dir, source, extras, result)
    elif resolved.large:  # labels on disk, then streamed into a tiled TIFF: memory stays flat
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
            labels_out = _labels_array(Path(scratch) / "labels.zarr", shape)
            result = segment_planes(
                checkpoint, image, resolved, labels_out=labels_out, progress=progress, cancel=cancel
            )
            write_labels(target, labels_out, max_label=result.max_label)
            extra = _write_extra_outputs(image, labels_out, out_dir, source, extras, result)
    else:
        result = segment_planes(checkpoint, image, resolved, progress=progress, cancel=cancel)
        write_labels(target, np.asarray(result.labels), max_label=result.max_label)
        extra = _write_extra_outputs(image, np.asarray(result.labels), out_dir, source, extras, result)
    return _file_result(source, target, result, shape, started, extra, channel)


def _file_result(source: Path, target: Path, result, shape: tuple, started: float, extra: list[str], channel: dict):
    """The :class:`FileResult` of a :class:`~.segment.Segmentation` or a :class:`~.segment.TimeLapse`."""
    return FileResult(
        str(source),
        str(target),
        result.count,
        int(np.prod(shape)),
        result.diameter,
        result.factor,
        time.perf_counter() - started,
        {**result.record(), **channel},
        [path for path in extra if not path.endswith(RLE_PART_SUFFIX)],
        next((path for path in extra if path.endswith(RLE_PART_SUFFIX)), None),
    )


@contextlib.contextmanager
def _zarr_labels(target: Path, shape: tuple[int, ...], attrs: dict):
    """An int32 zarr array written as ``.<name>.part`` beside ``target`` and moved to it only when the block ends
    without an error; removed otherwise."""
    partial = target.with_name(f".{target.name}.part")
    shutil.rmtree(partial, ignore_errors=True)
    labels_out = _labels_array(partial, shape)
    labels_out.attrs.update(attrs)
    try:
        yield labels_out
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _labels_array(path: Path, shape: tuple[int, ...]):
    """An empty int32 zarr array for labels, in 1024 x 1024 chunks of one plane."""
    import zarr

    chunks = (1,) * (len(shape) - 2) + (1024, 1024)
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype="int32")


def _segment_time_lapse(
    checkpoint, source: Path, image, params: SegmentParams, target: Path, out_format, progress, cancel, extras, channel
) -> FileResult:
    """A time-lapse of Z-stacks ``(T, Z, Y, X)``: each time point labelled in 3D on its own
    (``segment.segment_time_points``) into one ``(T, Z, Y, X)`` label image. Measurements carry a ``time`` column;
    RLE rows and GeoJSON files name each plane ``<stem>_<t>_<z>``."""
    started = time.perf_counter()
    shape = tuple(int(n) for n in image.shape[:4])
    if params.blocks.is_large_volume(shape[1:]) and out_format != "zarr":
        raise InputError(
            "a time-lapse of Z-stacks this large (each labelled block by block) is written as zarr: --out-format zarr"
        )
    if out_format == "zarr":
        with _zarr_labels(target, shape, zarr_axes("tz", params.voxel_size)) as labels:
            result = segment_time_points(checkpoint, image, params, labels, progress, cancel)
            extra = _write_time_lapse_extras(image, labels, target.parent, source, extras, result.time_points)
    else:
        labels = np.zeros(shape, np.int32)
        result = segment_time_points(checkpoint, image, params, labels, progress, cancel)
        write_labels(target, labels, max_label=result.max_label)
        extra = _write_time_lapse_extras(image, labels, target.parent, source, extras, result.time_points)
    return _file_result(source, target, result, shape, started, extra, channel)


def _write_time_lapse_extras(image, labels, out_dir: Path, source: Path, extras, results) -> list[str]:
    """The extra outputs of a time-lapse of Z-stacks: one measurements table (each time point's nuclei in 3D, with
    its ``time``), and the RLE rows and GeoJSON polygons of its planes, named ``<stem>_<t>_<z>``."""
    from .geojson import write_geojson
    from .measure import measure_volume, write_measurements_csv
    from .rle import plane_ids, write_csv

    count = int(labels.shape[0])
    names = [
        (*index, name) for index, name in zip(np.ndindex(*labels.shape[:2]), plane_ids(source.stem, labels.shape[:2]))
    ]
    written = []
    if "measurements" in extras:
        grey = len(image.shape) == 4
        tables = [
            measure_volume(
                np.asarray(labels[t]),
                np.asarray(image[t]) if grey else None,
                micrometre_voxel(source, results[t].params.voxel_size),
            )
            for t in range(count)
        ]
        table = {"time": np.concatenate([np.full(t["label"].shape, i) for i, t in enumerate(tables)])}
        table.update({key: np.concatenate([t[key] for t in tables]) for key in tables[0]})
        path = measurements_path(out_dir, source)
        write_measurements_csv(path, table)
        written.append(str(path))
    if "polygons" in extras:
        written += [str(write_geojson(out_dir / f"{name}.geojson", np.asarray(labels[t][z]))) for t, z, name in names]
    if "rle" in extras:
        items = ((name, np.asarray(labels[t][z])) for t, z, name in names)
        written.append(str(write_csv(out_dir / f".{source.stem}{RLE_PART_SUFFIX}", items)))
    return written


def _with_file_stack(params: SegmentParams, source: Path, single: bool, axes: str) -> SegmentParams:
    """``params`` with an "auto" stack (and no voxel size) taken from the file's own axes (ImageJ, OME)."""
    if single or params.stack != AUTO:
        return params
    stack, voxel_size = file_stack(source, axes)
    if stack == AUTO:
        log.warning(
            "%s: a stack whose file does not say Z, T or C: segmented as separate planes (--axes ZYX: a Z-stack; CYX: "
            "channels, the nuclear one segmented)",
            source,
        )
    return replace(params, stack=stack, voxel_size=params.voxel_size or voxel_size)


SUMMARY_FILE = "nuclei-unet-summary.csv"
SUMMARY_COLUMNS = (
    "image", "labels", "nuclei", "megapixels", "diameter_px", "zoom", "image_type", "stain", "channel", "stack",
    "markers", "threshold", "min_confidence", "seconds", "model",
)  # fmt: skip


def write_run_summary(out_dir: str | os.PathLike, results: list[FileResult], model: str) -> Path:
    """``<out_dir>/nuclei-unet-summary.csv``: one row per segmented image (its nucleus count and what every "auto"
    became), for a plate's counts and to reproduce the run. Rows of earlier runs into the same folder are kept,
    unless this run wrote the same label file again."""
    import csv

    from .io import atomic_write

    path = Path(out_dir) / SUMMARY_FILE
    written = {Path(result.output).name for result in results}
    rows = [row for row in _summary_rows(path) if row.get("labels") not in written]
    rows += [_summary_row(result, model) for result in results]
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _summary_rows(path: Path) -> list[dict]:
    """The rows of an earlier summary; none when there is none, or it is not one (another file of that name)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            return list(reader) if tuple(reader.fieldnames or ()) == SUMMARY_COLUMNS else []
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _summary_row(result: FileResult, model: str) -> dict:
    record = result.record
    threshold = record.get("threshold")
    if isinstance(threshold, list):  # a stack's planes, each its own: their range
        low, high = (f"{min(threshold):.4g}", f"{max(threshold):.4g}") if threshold else ("", "")
        threshold = low if low == high else f"{low}-{high}"
    channel = record.get("channel")
    return {
        "image": result.source,
        "labels": Path(result.output).name,
        "nuclei": result.nuclei,
        "megapixels": f"{result.pixels / 1e6:.4g}",
        "diameter_px": "" if result.diameter is None else f"{result.diameter:.4g}",
        "zoom": f"{result.factor:.4g}",
        "image_type": record.get("image_type", ""),
        "stain": record.get("stain", ""),
        "channel": "" if channel is None else f"{channel} of {record.get('channels')}",
        "stack": record.get("stack", ""),
        "markers": record.get("markers", ""),
        "threshold": threshold,
        "min_confidence": record.get("min_confidence", ""),
        "seconds": f"{result.seconds:.3g}",
        "model": model,
    }


def measurements_path(out_dir: str | os.PathLike, source: str | os.PathLike) -> Path:
    return Path(out_dir) / f"{Path(source).stem}_nuclei.csv"


def _write_extra_outputs(image, labels, out_dir, source: Path, extras: tuple[str, ...], result=None) -> list[str]:
    """The :data:`EXTRA_OUTPUTS` named in ``extras``, from the labels in hand: measured once, for
    the measurements table and the polygons alike. Returns the files written. A Z-stack
    labelled in 3D (``result.volume``) is measured in 3D."""
    from .measure import measure

    single = is_single_plane(image)
    planes = [labels] if single else [labels[i] for i in range(labels.shape[0])]  # zarr stays lazy: measured in strips
    written = []
    if result is not None and result.volume and "measurements" in extras:  # one row per nucleus in 3D
        written.append(_write_volume_measurements(Path(out_dir), source, image, labels, result.params.voxel_size))
        extras = tuple(name for name in extras if name != "measurements")
    if "measurements" in extras:
        images = [image] if single else [image[i] for i in range(len(planes))]
        pixel_size = file_pixel_size(source)  # µm columns when the file states its pixel size
        tables = [measure(plane, picture, pixel_size) for plane, picture in zip(planes, images)]
    else:
        tables = [None] * len(planes)
    for name in EXTRA_OUTPUTS:  # in this order, whatever the order asked for
        if name in extras:
            written += EXTRA_OUTPUTS[name](Path(out_dir), source, planes, tables, single)
    return written


def _write_volume_measurements(out_dir: Path, source: Path, image, labels, voxel_size) -> str:
    """``<stem>_nuclei.csv`` of a Z-stack labelled in 3D (``measure.measure_volume``)."""
    from .measure import measure_volume, write_measurements_csv

    grey = np.asarray(image) if len(image.shape) == 3 else None
    path = measurements_path(out_dir, source)
    write_measurements_csv(path, measure_volume(labels, grey, micrometre_voxel(source, voxel_size)))
    return str(path)


def micrometre_voxel(source, voxel_size) -> tuple[float, float, float] | None:
    """A Z-stack's voxel size in µm, for the measurements' µm columns: ``voxel_size`` (any one unit: it gives the
    z step's ratio) scaled by the pixel size the file states in µm, or taken as µm when its pixel is not 1 (as
    ``--voxel-size 2,0.65,0.65`` is); None when nothing says µm (``--voxel-size 2.18,1,1`` is a ratio only)."""
    from .measure import voxel_in_micrometres

    if voxel_size is None:
        return None
    pixel = float(voxel_size[-1])
    return voxel_in_micrometres(voxel_size, file_pixel_size(source) or (pixel if pixel != 1.0 else None))


def _write_measurements(out_dir: Path, source: Path, planes, tables, single: bool) -> list[str]:
    """``<stem>_nuclei.csv``: one row per nucleus (``measure.measure``; a stack's rows carry their plane).
    With µm columns when the file states its pixel size (``io.file_pixel_size``: ImageJ, OME-TIFF)."""
    from .measure import write_measurements_csv

    if single:
        table = tables[0]
    else:
        table = {"plane": np.concatenate([np.full(t["label"].shape, i) for i, t in enumerate(tables)])}
        table.update({key: np.concatenate([t[key] for t in tables]) for key in tables[0]})
    path = measurements_path(out_dir, source)
    write_measurements_csv(path, table)
    return [str(path)]


def _write_polygons(out_dir: Path, source: Path, planes, tables, single: bool) -> list[str]:
    """``<stem>.geojson`` (``<stem>_<plane>.geojson`` for a stack's planes), with the measurements when asked for."""
    from .geojson import write_geojson

    written = []
    for index, (plane, table) in enumerate(zip(planes, tables)):
        name = f"{source.stem}.geojson" if single else f"{source.stem}_{index}.geojson"
        written.append(str(write_geojson(out_dir / name, np.asarray(plane), table)))
    return written


def _write_rle_part(out_dir: Path, source: Path, planes, tables, single: bool) -> list[str]:
    """This file's rows of the RLE CSV (``ImageId`` the stem, ``<stem>_<plane>`` for a stack), as a CSV of its own."""
    from .rle import plane_ids, write_csv

    stems = [source.stem] if single else plane_ids(source.stem, len(planes))
    items = ((stem, np.asarray(plane)) for stem, plane in zip(stems, planes))  # one plane in memory at a time
    return [str(write_csv(out_dir / f".{source.stem}{RLE_PART_SUFFIX}", items))]


RLE_PART_SUFFIX = ".rle-part.csv"
# What can be written beside a label image, by name (``segment_file(extras=...)``).
EXTRA_OUTPUTS = {"measurements": _write_measurements, "polygons": _write_polygons, "rle": _write_rle_part}


@functools.lru_cache(maxsize=4)
def cached_checkpoint(model: str, encoder: str | None = None) -> Checkpoint:
    """The checkpoint ``model`` (a path or 'default'), loaded once per process (a dask worker
    loads each model once; a few models at most are kept)."""
    from .model import resolve_model_path

    return Checkpoint.load(resolve_model_path(model), encoder=encoder)


def segment_file_task(
    model: str,
    encoder: str | None,
    source: str,
    out_dir: str,
    params: SegmentParams,
    out_format: str,
    threads: int | None,
    extras: tuple[str, ...] = (),
) -> FileResult:
    """:func:`segment_file` as a dask task: plain arguments, the model cached in the worker."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return segment_file(cached_checkpoint(model, encoder), source, out_dir, params, out_format, extras=extras)
