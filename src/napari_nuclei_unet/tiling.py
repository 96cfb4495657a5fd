"""Tiled, batched, blended U-Net inference on images of any size.

Tiles overlap and are blended with a raised-cosine ramp on the sides that have a
neighbour. Each tile's 1D ramps are divided by their per-axis sums beforehand, so the
weights of all tiles add up to exactly 1 at every pixel: no weight map, no final
division pass, and memory stays at the output map plus one batch of tiles.

Images no larger than a tile are run whole (padded to a multiple of 32), which is both
fastest and identical to untiled inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import stop_if_cancelled
from .forward import Forward, torch_forward
from .io import Normalizer
from .params import InputSizes, TilingParams

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
_ALIGN = 32  # U-Net with 5 poolings needs sizes divisible by 32
_ANY_SIZE = InputSizes()  # a network that takes any multiple of 32 (ours)


def axis_tiles(length: int, tile: int, overlap: int, sizes: InputSizes = _ANY_SIZE) -> tuple[int, list[int]]:
    """The tile length and start positions along one axis.

    One padded tile when the axis fits; otherwise the fewest tiles with at least
    ``overlap`` shared pixels, shrunk evenly so no tile is mostly padding.
    """
    tile = sizes.fit(tile)
    if length <= tile:
        return sizes.fit(length), [0]
    overlap = min(overlap, tile // 2)
    count = math.ceil((length - overlap) / (tile - overlap))
    tile = min(tile, sizes.fit(math.ceil((length + (count - 1) * overlap) / count)))
    starts = np.linspace(0, length - tile, count).round().astype(int).tolist()
    return tile, starts


def _axis_weights(length: int, tile: int, starts: list[int]) -> list[np.ndarray]:
    """Per-tile 1D weights that sum to 1 at every position along the axis."""
    ramps = []
    for index, start in enumerate(starts):
        weight = np.ones(tile, np.float64)
        if index > 0:  # ramp up across the overlap with the previous tile
            shared = starts[index - 1] + tile - start
            weight[:shared] = np.sin(0.5 * np.pi * (np.arange(shared) + 0.5) / shared) ** 2
        if index < len(starts) - 1:
            shared = start + tile - starts[index + 1]
            weight[tile - shared :] = np.cos(0.5 * np.pi * (np.arange(shared) + 0.5) / shared) ** 2
        ramps.append(weight)
    total = np.zeros(max(length, tile), np.float64)
    for start, weight in zip(starts, ramps):
        total[start : start + tile] += weight
    return [(weight / total[start : start + tile]).astype(np.float32) for start, weight in zip(starts, ramps)]


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    height: int  # valid (unpadded) extent inside the image
    width: int
    weight_y: np.ndarray
    weight_x: np.ndarray


def plan_tiles(
    shape: tuple[int, int], tile_size: int, overlap: int, sizes: InputSizes = _ANY_SIZE
) -> tuple[tuple[int, int], list[Tile]]:
    """The network input shape and the tiles covering a ``(height, width)`` image."""
    overlap = max(overlap, 2 * sizes.halo)
    tile_h, starts_y = axis_tiles(shape[0], tile_size, overlap, sizes)
    tile_w, starts_x = axis_tiles(shape[1], tile_size, overlap, sizes)
    weights_y = _axis_weights(shape[0], tile_h, starts_y)
    weights_x = _axis_weights(shape[1], tile_w, starts_x)
    tiles = [
        Tile(y, x, min(tile_h, shape[0] - y), min(tile_w, shape[1] - x), wy[: shape[0] - y], wx[: shape[1] - x])
        for y, wy in zip(starts_y, weights_y)
        for x, wx in zip(starts_x, weights_x)
    ]
    return (tile_h, tile_w), tiles


def _batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def predict(
    model,
    plane,
    normalizer: Normalizer,
    params: TilingParams | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Per-pixel probabilities ``(C, Y, X)`` float32 of one 2D plane (grey or ``(Y, X, C)``).

    ``model`` is a torch module or a :class:`~.model.Checkpoint`, whose CPU network may then
    come from the disk cache: such a run never imports torch.
    ``plane`` may be numpy, dask or zarr: only one batch of tiles is read at a time.
    ``progress(done, total)`` is called after each batch; ``cancel()`` is checked before
    each batch and raises :class:`Cancelled`.
    """
    from .model import Checkpoint

    params = params or TilingParams()
    if isinstance(model, Checkpoint):
        sizes, (forward, classes) = model.input_sizes, model.network.forward(params, normalizer.channels)
    else:
        sizes, (forward, classes) = _ANY_SIZE, torch_forward(model, normalizer.channels, params)
    tile_shape, tiles = plan_tiles(plane.shape[:2], params.tile_size, params.overlap, sizes)
    batches = list(_batches(tiles, max(1, params.batch_size)))
    out = np.zeros((classes, *plane.shape[:2]), np.float32) if out is None else out
    return _run_tiles(forward, plane, normalizer, tile_shape, batches, out, progress=progress, cancel=cancel)


def _run_tiles(
    forward: Forward,
    plane,
    normalizer: Normalizer,
    tile_shape: tuple[int, int],
    batches: list[list[Tile]],
    out: np.ndarray,
    *,
    progress: ProgressCallback | None,
    cancel: CancelCheck | None,
) -> np.ndarray:
    """Run ``forward`` on each batch of tiles and blend the results into ``out``."""
    done, total = 0, sum(len(batch) for batch in batches)
    for batch_tiles in batches:
        stop_if_cancelled(cancel)
        batch = np.zeros((len(batch_tiles), normalizer.channels, *tile_shape), np.float32)
        for slot, tile in enumerate(batch_tiles):
            crop = normalizer(plane[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width])
            batch[slot] = _pad_reflect(crop, tile_shape)
        probs = forward(batch)
        for slot, tile in enumerate(batch_tiles):
            weight = tile.weight_y[:, None] * tile.weight_x[None, :]
            region = (slice(None), slice(tile.y, tile.y + tile.height), slice(tile.x, tile.x + tile.width))
            out[region] += probs[slot, :, : tile.height, : tile.width] * weight
        done += len(batch_tiles)
        if progress is not None:
            progress(done, total)
    return out


def _pad_reflect(crop: np.ndarray, tile_shape: tuple[int, int]) -> np.ndarray:
    """Pad a ``(C, h, w)`` crop to the tile shape by mirroring (no dark borders for the network)."""
    pad_h, pad_w = tile_shape[0] - crop.shape[1], tile_shape[1] - crop.shape[2]
    if pad_h == 0 and pad_w == 0:
        return crop
    mode = "reflect" if crop.shape[1] > 1 and crop.shape[2] > 1 else "edge"
    return np.pad(crop, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)
