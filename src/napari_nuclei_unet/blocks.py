"""Segment planes too large to handle whole: block by block, with flat memory.

Two passes over a grid of blocks:

1. **Network.** Each block is predicted with a margin of context around it (at least the
   tile overlap) and only its core is kept, so the stitched probabilities match
   whole-image prediction. They go into a probability store: numpy for moderate planes,
   a temporary zarr array on disk for huge ones.
2. **Instances.** Each block (half the network's block size) is post-processed with a
   halo wider than a nucleus. A nucleus belongs to the block holding its centre and is written whole, so
   nuclei crossing block borders keep one label and labels are unique over the plane.

When small nuclei are zoomed up, both passes work on the network's finer grid, as
``plane.label_plane`` does for whole planes, and each image pixel takes the label at its
centre.

The input may be numpy, dask or zarr (only a block is read at a time); the labels go
into any array supporting slice assignment (numpy, zarr). ``segment.segment_planes``
decides which planes come here (``BlockParams``) and resolves every "auto" first.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace

import numpy as np

from .errors import stop_if_cancelled
from .io import Normalizer, sample_step
from .model import Checkpoint
from .plane import Resolved, pixel_centres, predict_plane
from .postprocess import block_grid, drop_small_labels, grow, instances, resolve_threshold, write_owned
from .tiling import CancelCheck, ProgressCallback

# Probability stores larger than this many pixels are kept on disk.
_IN_MEMORY_PIXELS = 16 * 2**20
# Network pixels of context around a block beyond the tile overlap: with less, the network's wide
# field of view makes probabilities near a block border differ from the whole plane's enough
# to merge a nucleus with its neighbour there (docs/scale.md).
_EXTRA_CONTEXT = 96


@dataclass
class BlockResult:
    """What a plane segmented block by block produced (its labels are in ``labels_out``)."""

    count: int
    threshold: float
    factor: float


def _probability_store(shape: tuple[int, int, int], workdir: str | None):
    if shape[1] * shape[2] <= _IN_MEMORY_PIXELS:
        return np.zeros(shape, np.float32), None
    import zarr

    folder = tempfile.TemporaryDirectory(prefix="nuclei-unet-", dir=workdir)
    store = zarr.open_array(
        f"{folder.name}/probabilities.zarr", mode="w", shape=shape, chunks=(shape[0], 1024, 1024), dtype="float32"
    )
    return store, folder


@dataclass(frozen=True)
class _Grid:
    """The grid both passes work on: the image's, or the network's finer one when small nuclei are zoomed up."""

    shape: tuple[int, int]  # image pixels
    factor: float  # the network's zoom
    block_size: int  # network blocks, image pixels

    @property
    def fine(self) -> bool:
        return self.factor > 1.0

    @property
    def grid(self) -> tuple[int, int]:
        height, width = self.shape
        return (round(height * self.factor), round(width * self.factor)) if self.fine else self.shape

    @property
    def scale(self) -> tuple[float, float]:
        """Grid pixels per image pixel."""
        return self.grid[0] / self.shape[0], self.grid[1] / self.shape[1]


def segment_large(
    checkpoint: Checkpoint,
    plane,
    resolved: Resolved,
    normalizer: Normalizer,
    labels_out,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    workdir: str | None = None,
) -> BlockResult:
    """Segment one 2D plane block by block into ``labels_out`` (numpy or zarr, zeros).

    ``resolved`` holds every decision (``segment.resolve``); ``normalizer`` is the whole
    plane's. ``progress(done, total)`` counts blocks over both passes.
    """
    params, factor = resolved.params, resolved.factor
    # Small nuclei are zoomed up and, as for whole planes (plane.label_plane), separated on
    # the network's finer grid: the probability store then holds that grid, and blocks are
    # smaller in image pixels so that they stay as large on it.
    block_size = max(128, int(params.blocks.block_size / factor)) if factor > 1.0 else params.blocks.block_size
    grid = _Grid(tuple(plane.shape[:2]), factor, block_size)
    cores = block_grid(*grid.shape, block_size)
    total = 2 * len(cores)

    def step(done: int) -> None:
        stop_if_cancelled(cancel)
        if progress is not None:
            progress(done, total)

    store, folder = _probability_store((len(checkpoint.outputs), *grid.grid), workdir)
    try:
        _predict_blocks(checkpoint, plane, resolved, normalizer, grid, cores, store, step, cancel)
        # One threshold for the whole plane, so that blocks agree at their borders.
        stride = sample_step(*grid.grid)
        sample = np.asarray(store[checkpoint.outputs.index("foreground"), ::stride, ::stride])
        postprocess = replace(params.postprocess, threshold=resolve_threshold(params.postprocess.threshold, sample))
        nucleus = resolved.diameter or (checkpoint.nucleus_diameter or 20.0) / factor
        halo = int(math.ceil(max(64.0 / (factor if grid.fine else 1.0), 3.0 * nucleus)))

        def label_step(index: int, blocks: int) -> None:  # the second half of the progress
            step(len(cores) + index * len(cores) // blocks)

        count = _label_blocks(store, checkpoint.outputs, postprocess, grid, halo, labels_out, label_step)
        step(total)
    finally:
        if folder is not None:
            folder.cleanup()
    return BlockResult(count, postprocess.threshold, factor)


def _predict_blocks(checkpoint, plane, resolved: Resolved, normalizer, grid: _Grid, cores, store, step, cancel) -> None:
    """Pass 1: probabilities into ``store``, each block with context beyond the tile overlap (in image
    pixels), as much as the network's field of view needs for its core to match the whole plane."""
    context = int(math.ceil((resolved.params.tiling.overlap + _EXTRA_CONTEXT) / grid.factor))
    scale = grid.scale
    for index, core in enumerate(cores):
        step(index)
        grown = grow(core, context, *grid.shape)
        prediction = predict_plane(checkpoint, plane[grown], resolved, normalizer, cancel=cancel)
        if grid.fine:  # the block's zoomed output (its probabilities if that was too big to keep)
            block = prediction.network if prediction.network is not None else prediction.probabilities
            region = (_span(core[0], scale[0]), _span(core[1], scale[1]))
            rows, cols = (_on_block(r, s, g, n) for r, s, g, n in zip(region, scale, grown, block.shape[1:]))
            store[(slice(None), *region)] = block[:, rows][:, :, cols]
        else:
            inner = (slice(None), *(slice(c.start - g.start, c.stop - g.start) for c, g in zip(core, grown)))
            store[(slice(None), *core)] = prediction.probabilities[inner]


def _label_blocks(store, outputs, postprocess, grid: _Grid, halo: int, labels_out, step) -> int:
    """Pass 2: instances into ``labels_out``; a nucleus belongs to the block holding its centre. Smaller
    blocks than for the network: the watershed's working arrays are the peak memory. Returns the count.

    ``step(index, blocks)`` is told before each of the ``blocks`` blocks."""
    count, scale, factor = 0, grid.scale, grid.factor
    post_cores = block_grid(*grid.shape, max(128 if grid.fine else 256, grid.block_size // 2))
    if grid.fine:  # grid index at each image pixel's centre
        centres = (pixel_centres(grid.grid[0], grid.shape[0]), pixel_centres(grid.grid[1], grid.shape[1]))
    for index, core in enumerate(post_cores):
        step(index, len(post_cores))
        grown = grow(core, halo, *grid.shape)
        if grid.fine:  # on the finer grid, then each image pixel takes the label at its centre
            region = (_span(grown[0], scale[0]), _span(grown[1], scale[1]))
            probabilities = np.asarray(store[(slice(None), *region)])
            _mask, found = instances(probabilities, outputs, postprocess, grid_zoom=factor, network_zoom=factor)
            rows, cols = (np.clip(c[g] - r.start, 0, r.stop - r.start - 1) for c, g, r in zip(centres, grown, region))
            labels = drop_small_labels(found[np.ix_(rows, cols)], postprocess.min_size)
        else:
            probabilities = np.asarray(store[(slice(None), *grown)])
            _mask, labels = instances(probabilities, outputs, postprocess, network_zoom=factor)
        count = write_owned(labels, core, grown, labels_out, count)
    return count


def _span(image_span: slice, scale: float) -> slice:
    """The rows (or columns) of the finer grid that belong to a span of image pixels; adjacent spans share no row."""
    return slice(round(image_span.start * scale), round(image_span.stop * scale))


def _on_block(grid_span: slice, scale: float, block: slice, block_length: int) -> np.ndarray:
    """Indices into a block's own zoomed output (``block_length`` rows for image rows ``block``)
    for rows ``grid_span`` of the plane's finer grid, matched by their centres.

    The block was zoomed to a whole number of rows, so its scale can differ slightly from
    the plane's ``scale``.
    """
    centres = (
        np.arange(grid_span.start, grid_span.stop) + 0.5
    ) / scale - block.start  # image pixels from the block start
    block_scale = block_length / (block.stop - block.start)
    return np.clip((centres * block_scale).astype(np.int64), 0, block_length - 1)
