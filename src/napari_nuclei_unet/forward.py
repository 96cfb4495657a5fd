"""A network as a :data:`Forward`: a batch of normalised tiles in, probabilities out.

ONNX Runtime sessions (ours exported, or a package's own weights) and torch modules on any
device, with optional test-time augmentation (the four flips). The networks themselves
(``model.UnetNetwork``, ``model_zoo.PackageNetwork``) choose which of these they run as.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from .params import TilingParams

_ALIGN = 32  # probe size multiple for a module that does not say its output channels

Forward = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) float32 batch -> (N, K, H, W) probabilities


def tta_forward(network, batch, tta: bool, flip):
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


def onnx_forward(network, tta: bool) -> Forward:
    def forward(batch: np.ndarray) -> np.ndarray:
        logits = np.ascontiguousarray(tta_forward(network, batch, tta, np.flip), dtype=np.float32)
        return sigmoid_(logits)

    return forward


def sigmoid_(logits: np.ndarray) -> np.ndarray:
    """The logistic function in place, as ``0.5 * tanh(x / 2) + 0.5``: numpy's vectorised tanh makes it ~6x faster
    than ``scipy.special.expit`` on float32, within one rounding step of it."""
    logits *= 0.5
    np.tanh(logits, out=logits)
    logits *= 0.5
    logits += 0.5
    return logits


def torch_forward(model, in_channels: int, params: TilingParams) -> tuple[Forward, int]:
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
            return onnx_forward(network, params.tta), network.out_channels
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
            logits = tta_forward(model, tensor, params.tta, lambda x, dims: x.flip(dims))
            return torch.sigmoid_(logits.float()).cpu().numpy()  # in place: no second copy of the batch

    return forward, output_channels(model, in_channels, device)


def output_channels(model, in_channels: int, device) -> int:
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
