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
import torch

from .errors import Cancelled
from .io import Normalizer
from .params import TilingParams

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
_ALIGN = 32  # U-Net with 5 poolings needs sizes divisible by 32


def _ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def axis_tiles(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """The tile length and start positions along one axis.

    One padded tile when the axis fits; otherwise the fewest tiles with at least
    ``overlap`` shared pixels, shrunk evenly so no tile is mostly padding.
    """
    tile = max(_ALIGN, _ceil_to(tile, _ALIGN))
    if length <= tile:
        return _ceil_to(length, _ALIGN), [0]
    overlap = min(overlap, tile // 2)
    count = math.ceil((length - overlap) / (tile - overlap))
    tile = min(tile, _ceil_to(math.ceil((length + (count - 1) * overlap) / count), _ALIGN))
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
            weight[tile - shared:] = np.cos(0.5 * np.pi * (np.arange(shared) + 0.5) / shared) ** 2
        ramps.append(weight)
    total = np.zeros(max(length, tile), np.float64)
    for start, weight in zip(starts, ramps):
        total[start:start + tile] += weight
    return [(weight / total[start:start + tile]).astype(np.float32) for start, weight in zip(starts, ramps)]


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    height: int  # valid (unpadded) extent inside the image
    width: int
    weight_y: np.ndarray
    weight_x: np.ndarray


def plan_tiles(shape: tuple[int, int], tile_size: int, overlap: int) -> tuple[tuple[int, int], list[Tile]]:
    """The network input shape and the tiles covering a ``(height, width)`` image."""
    tile_h, starts_y = axis_tiles(shape[0], tile_size, overlap)
    tile_w, starts_x = axis_tiles(shape[1], tile_size, overlap)
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
        yield tiles[start:start + size]


def _tta_forward(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, tta: bool) -> torch.Tensor:
    """Logits of the batch, averaged over the four flips when ``tta`` is on."""
    if not tta:
        return model(batch)
    total = None
    for dims in ((), (-1,), (-2,), (-2, -1)):
        flipped = batch.flip(dims) if dims else batch
        logits = model(flipped)
        logits = logits.flip(dims) if dims else logits
        total = logits if total is None else total + logits
    return total / 4


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

    ``model`` is a torch module or a :class:`~.model.Checkpoint` (whose CPU network may then
    come from the disk cache without building the torch model).
    ``plane`` may be numpy, dask or zarr: only one batch of tiles is read at a time.
    ``progress(done, total)`` is called after each batch; ``cancel()`` is checked before
    each batch and raises :class:`Cancelled`.
    """
    from .model import Checkpoint, resolve_device

    params = params or TilingParams()
    device = resolve_device(params.device)
    height, width = plane.shape[:2]
    tile_shape, tiles = plan_tiles((height, width), params.tile_size, params.overlap)
    if isinstance(model, Checkpoint):
        if device.type == "cpu" and model.config.in_channels == normalizer.channels:
            from .onnx_backend import OnnxNetwork, checkpoint_network

            network = checkpoint_network(model, params.backend, params.precision)
            if isinstance(network, OnnxNetwork):
                return _run_tiles(network, plane, normalizer, params, tile_shape, tiles, device, False, progress, cancel, out)
        model = model.model
    if next(model.parameters()).device != device:  # .to() and .eval() walk every module: skip when
        model = model.to(device)  # there is nothing to do (they cost ~5 ms per call)
    if model.training:
        model.eval()
    cpu = device.type == "cpu"
    network = model
    if cpu:
        from .onnx_backend import cpu_network

        network = cpu_network(model, normalizer.channels, params.backend, params.precision)
    channels_last = cpu and network is model  # PyTorch on the CPU
    if channels_last and not next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        model.to(memory_format=torch.channels_last)  # once: converting walks every module
    return _run_tiles(network, plane, normalizer, params, tile_shape, tiles, device, channels_last, progress, cancel, out)


def _run_tiles(network, plane, normalizer, params, tile_shape, tiles, device, channels_last, progress, cancel, out) -> np.ndarray:
    height, width = plane.shape[:2]
    cpu = device.type == "cpu"
    with torch.inference_mode():
        classes = _output_channels(network, normalizer.channels, device)
        if out is None:
            out = np.zeros((classes, height, width), np.float32)
        autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" and params.amp else _no_autocast()
        done = 0
        for batch_tiles in _batches(tiles, max(1, params.batch_size)):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            batch = np.zeros((len(batch_tiles), normalizer.channels, *tile_shape), np.float32)
            for slot, tile in enumerate(batch_tiles):
                crop = normalizer(plane[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width])
                batch[slot] = _pad_reflect(crop, tile_shape)
            tensor = torch.from_numpy(batch)
            if device.type == "cuda":
                tensor = tensor.pin_memory().to(device, non_blocking=True)
            elif channels_last:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            elif not cpu:
                tensor = tensor.to(device)
            with autocast:
                logits = _tta_forward(network, tensor, params.tta)
            probs = torch.sigmoid_(logits.float()).cpu().numpy()  # in place: no second copy of the batch
            for slot, tile in enumerate(batch_tiles):
                weight = tile.weight_y[:, None] * tile.weight_x[None, :]
                region = (slice(None), slice(tile.y, tile.y + tile.height), slice(tile.x, tile.x + tile.width))
                out[region] += probs[slot, :, : tile.height, : tile.width] * weight
            done += len(batch_tiles)
            if progress is not None:
                progress(done, len(tiles))
    return out


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _output_channels(model, in_channels: int, device: torch.device) -> int:
    if getattr(model, "out_channels", None):  # an OnnxNetwork
        return int(model.out_channels)
    head = getattr(model, "segmentation_head", None)
    conv = head[0] if head is not None else None
    if isinstance(conv, torch.nn.Conv2d):
        return conv.out_channels
    return int(model(torch.zeros(1, in_channels, _ALIGN * 2, _ALIGN * 2, device=device)).shape[1])


def _pad_reflect(crop: np.ndarray, tile_shape: tuple[int, int]) -> np.ndarray:
    """Pad a ``(C, h, w)`` crop to the tile shape by mirroring (no dark borders for the network)."""
    pad_h, pad_w = tile_shape[0] - crop.shape[1], tile_shape[1] - crop.shape[2]
    if pad_h == 0 and pad_w == 0:
        return crop
    mode = "reflect" if crop.shape[1] > 1 and crop.shape[2] > 1 else "edge"
    return np.pad(crop, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)
