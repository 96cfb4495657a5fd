"""Tiled, batched, blended U-Net inference on images of any size.

Tiles overlap and are blended with a raised-cosine ramp on the sides that have a
neighbour. Each tile's 1D ramps are divided by their per-axis sums beforehand, so the
weights of all tiles add up to exactly 1 at every pixel: no weight map, no final
division pass, and memory stays at the output map plus one batch of tiles.

Images no larger than a tile are run whole (padded to a multiple of 32), which is both
fastest and identical to untiled inference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import Cancelled
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


Forward = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) float32 batch -> (N, K, H, W) probabilities


def _tta_forward(network, batch, tta: bool, flip):
    """Logits of the batch, averaged over the four flips when ``tta`` is on (numpy arrays or tensors)."""
    if not tta:
        return network(batch)
    total = None
    for dims in ((), (-1,), (-2,), (-2, -1)):
        flipped = flip(batch, dims) if dims else batch
        logits = network(flipped)
        logits = flip(logits, dims) if dims else logits
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

    ``model`` is a torch module or a :class:`~.model.Checkpoint`, whose CPU network may then
    come from the disk cache: such a run never imports torch.
    ``plane`` may be numpy, dask or zarr: only one batch of tiles is read at a time.
    ``progress(done, total)`` is called after each batch; ``cancel()`` is checked before
    each batch and raises :class:`Cancelled`.
    """
    from .devices import device_name
    from .model import Checkpoint

    params = params or TilingParams()
    sizes = model.input_sizes if isinstance(model, Checkpoint) else InputSizes()
    tile_shape, tiles = plan_tiles(plane.shape[:2], params.tile_size, params.overlap, sizes)
    forward = None
    if isinstance(model, Checkpoint) and model.package is not None:  # a bioimage.io package's own weights
        forward = package_forward(model.package, params)
    elif isinstance(model, Checkpoint):
        if model.config.in_channels == normalizer.channels and device_name(params.device) == "cpu":
            from .onnx_backend import OnnxNetwork, checkpoint_network

            network = checkpoint_network(model, params.backend, params.precision)
            if isinstance(network, OnnxNetwork):
                forward = _onnx_forward(network, params.tta), network.out_channels
        if forward is None:
            model = model.model
    if forward is None:
        forward = _torch_forward(model, normalizer.channels, params)
    return _run_tiles(*forward, plane, normalizer, params.batch_size, tile_shape, tiles, progress, cancel, out)


def package_forward(package, params: TilingParams) -> tuple[Forward, int]:
    """A foreign bioimage.io network (``model_zoo.PackageNetwork``) as a :data:`Forward`: its ONNX
    weights under ONNX Runtime on the CPU, else its TorchScript module on the device (never
    re-exported or quantised: it runs as published)."""
    from dataclasses import replace

    from .devices import device_name
    from .errors import ModelError
    from .onnx_backend import available, cpu_threads

    on_cpu = device_name(params.device) == "cpu"
    if on_cpu and "onnx" in package.weights and params.backend != "torch" and available():
        return _onnx_forward(package.onnx_logits(cpu_threads()), params.tta), len(package.keep)
    if "torchscript" not in package.weights:
        why = "choose device cpu" if not on_cpu else "install onnxruntime, or use backend auto"
        raise ModelError(
            f"{package.source}: the package has only ONNX weights, which run here with ONNX Runtime on the CPU; {why}"
        )
    return _torch_forward(package.torch_module(), package.in_channels, replace(params, backend="torch"))


def _onnx_forward(network, tta: bool) -> Forward:
    from scipy.special import expit

    def forward(batch: np.ndarray) -> np.ndarray:
        logits = np.ascontiguousarray(_tta_forward(network, batch, tta, np.flip), dtype=np.float32)
        return expit(logits, out=logits)

    return forward


def _torch_forward(model, in_channels: int, params: TilingParams) -> tuple[Forward, int]:
    """The torch module on its device (or its ONNX Runtime export on the CPU) as a :data:`Forward`, and its output
    channels."""
    import torch

    from .devices import resolve_device

    device = resolve_device(params.device)
    if next(model.parameters()).device != device:  # .to() and .eval() walk every module: skip when
        model = model.to(device)  # there is nothing to do (they cost ~5 ms per call)
    if model.training:
        model.eval()
    if device.type == "cpu":
        from .onnx_backend import OnnxNetwork, cpu_network

        network = cpu_network(model, in_channels, params.backend, params.precision)
        if isinstance(network, OnnxNetwork):
            return _onnx_forward(network, params.tta), network.out_channels
        if not next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
            model.to(memory_format=torch.channels_last)  # once: converting walks every module
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if device.type == "cuda" and params.amp
        else contextlib.nullcontext()
    )

    def forward(batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(batch)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        elif device.type == "cpu":
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        else:
            tensor = tensor.to(device)
        with torch.inference_mode(), autocast:
            logits = _tta_forward(model, tensor, params.tta, lambda x, dims: x.flip(dims))
            return torch.sigmoid_(logits.float()).cpu().numpy()  # in place: no second copy of the batch

    return forward, _output_channels(model, in_channels, device)


def _run_tiles(
    forward: Forward, classes: int, plane, normalizer, batch_size, tile_shape, tiles, progress, cancel, out
) -> np.ndarray:
    height, width = plane.shape[:2]
    if out is None:
        out = np.zeros((classes, height, width), np.float32)
    done = 0
    for batch_tiles in _batches(tiles, max(1, batch_size)):
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
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
            progress(done, len(tiles))
    return out


def _output_channels(model, in_channels: int, device) -> int:
    import torch

    declared = getattr(model, "output_channels", None)  # a package's module says it (it may take one input size only)
    if isinstance(declared, int):
        return declared
    head = getattr(model, "segmentation_head", None)
    conv = head[0] if head is not None else None
    if isinstance(conv, torch.nn.Conv2d):
        return conv.out_channels
    with torch.inference_mode():
        return int(model(torch.zeros(1, in_channels, _ALIGN * 2, _ALIGN * 2, device=device)).shape[1])


def _pad_reflect(crop: np.ndarray, tile_shape: tuple[int, int]) -> np.ndarray:
    """Pad a ``(C, h, w)`` crop to the tile shape by mirroring (no dark borders for the network)."""
    pad_h, pad_w = tile_shape[0] - crop.shape[1], tile_shape[1] - crop.shape[2]
    if pad_h == 0 and pad_w == 0:
        return crop
    mode = "reflect" if crop.shape[1] > 1 and crop.shape[2] > 1 else "edge"
    return np.pad(crop, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)
