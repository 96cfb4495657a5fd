"""ONNX Runtime for inference on the CPU: the same network, faster than eager PyTorch.

In float32 its logits agree with PyTorch's to rounding. By default the network is also
quantised to 8 bits (``precision="int8"``), faster again at the same accuracy; speeds and
scores are in docs/performance.md. ONNX Runtime also has no slow first call at a new input
shape, which PyTorch's CPU kernels have.

The torch model stays the source of truth: it is exported (and quantised) the first time
it runs on the CPU, and again whenever its weights change (fine-tuning). Every export is
named by the digest of its weights, architecture and exporter versions (:func:`export_name`),
and kept under that one name in memory for this process and on disk (:func:`cache_folder`)
for the next: the same weights loaded again are neither exported nor quantised again, and a
changed weight is another name, so there is nothing to keep in step.
Without ``onnxruntime`` and ``onnx`` installed, ``backend="auto"`` quietly uses PyTorch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("int8", "float32")
_OPSET = 17
# The opened networks of this process by (export name, threads), or why their export failed (not retried);
# the least recently used beyond _SESSIONS_KEPT are closed.
_SESSIONS: collections.OrderedDict[tuple[str, int], OnnxNetwork | str] = collections.OrderedDict()
_SESSIONS_KEPT = 3  # the model in use, the one being fine-tuned, one more
_LOCK = threading.Lock()


class OnnxNetwork:
    """An ONNX Runtime session: ``(N, C, H, W)`` float32 array in, logits array out."""

    def __init__(self, session, out_channels: int, precision: str = "float32", serialized: bytes = b""):
        self.session = session
        self.out_channels = out_channels
        self.precision = precision  # "int8" only when quantisation worked
        self.serialized = serialized  # the ONNX graph the session runs
        self._input = session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


@functools.cache
def available() -> bool:
    """Whether ONNX Runtime and the exporter's ``onnx`` package are installed.

    Looked up, not imported: importing ``onnx`` is slow, and a network from the disk cache
    does not need it. A broken install fails at the export, which falls back to PyTorch.
    """
    return all(util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def cpu_threads() -> int:
    """Threads for CPU inference: torch's setting once torch is loaded (``--threads`` and dask
    workers set it there), else what torch would take: ``OMP_NUM_THREADS`` or the usable cores."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _torch_version() -> str:
    """From the package metadata (the disk cache's key must not need torch imported); read once, as that costs ~2 ms."""
    return metadata.version("torch")


def cpu_network(model: torch.nn.Module, in_channels: int, backend: str = "auto", precision: str = "int8"):
    """What to call for CPU inference of a torch module: an :class:`OnnxNetwork`, or ``model`` itself.

    ``backend``: "torch" always gives ``model``; "onnx" gives ONNX Runtime or raises
    :class:`ModelError`; "auto" gives ONNX Runtime when it is installed and the export
    works, else ``model`` (with a warning if the export failed). ``precision``: "int8"
    quantises the ONNX Runtime network (:func:`quantize`; float32 with a warning if that
    fails), "float32" keeps the model's own weights. PyTorch always runs float32. The
    weights are digested at every call: whoever holds ``model`` may have changed them.
    """
    network = onnx_network(
        lambda: weights_digest(model.state_dict(), repr(model)), in_channels, backend, precision, lambda: model
    )
    return model if network is None else network


def onnx_network(weights, in_channels: int, backend: str, precision: str, build) -> OnnxNetwork | None:
    """The ONNX Runtime network of the weights ``weights()`` names (:func:`weights_digest`; asked only when ONNX
    Runtime runs them), or None for PyTorch.

    Taken from this process's networks, else from the disk cache, else exported from the
    module ``build()`` returns (called only then: building may take seconds). See :func:`cpu_network`
    for ``backend`` and ``precision``.
    """
    if backend not in BACKENDS:
        raise ModelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend == "torch":
        return None
    if not available():
        if backend == "onnx":
            raise ModelError("backend 'onnx' needs the onnxruntime and onnx packages: pip install onnxruntime onnx")
        return None
    key = (export_name(weights(), in_channels, precision), cpu_threads())
    with _LOCK:  # one export per weights and precision, also when several threads segment at once
        network = _SESSIONS.get(key)
        if network is None:
            network = _open_or_export(key, in_channels, precision, build, warn=backend == "auto")
        _SESSIONS[key] = network
        _SESSIONS.move_to_end(key)
        while len(_SESSIONS) > _SESSIONS_KEPT:
            _SESSIONS.popitem(last=False)
    if isinstance(network, str):
        if backend == "onnx":
            raise ModelError(f"cannot run this model with ONNX Runtime: {network}")
        return None
    return network


def _open_or_export(key: tuple[str, int], in_channels: int, precision: str, build, warn: bool) -> OnnxNetwork | str:
    """The network stored on disk under ``key``'s name, else a new export (stored there); or why the export failed."""
    name, threads = key
    path = cache_folder() / f"{name}.onnx"
    cached = _read_cached(path)
    if cached is not None:
        try:
            network = _session(*cached, threads)
        except Exception:  # damaged by something else than us: export again
            path.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept longest
            return network
    try:
        network = _export(build(), in_channels, threads, precision)
    except Exception as error:  # an encoder with an op the exporter lacks, etc.; not retried
        if warn:
            warnings.warn(f"ONNX export failed, using PyTorch on the CPU ({error})", RuntimeWarning, stacklevel=4)
        return str(error)
    _write_cached(path, network.serialized, network.out_channels, network.precision == "int8")
    return network


def is_cached(weights: str) -> bool:
    """Whether an export of the weights ``weights`` names is on disk (in any precision)."""
    try:
        return any(cache_folder().glob(f"{weights}-*.onnx"))
    except OSError:
        return False


def export_name(weights: str, in_channels: int, precision: str) -> str:
    """Names one export: the weights' digest and what else shapes the exported graph."""
    import onnxruntime

    bits = f"|{weight_bits()}-bit weights" if precision == "int8" else ""
    versions = f"{_EXPORT_FORMAT}|{_OPSET}|{_torch_version()}|{onnxruntime.__version__}|{in_channels}|{precision}{bits}"
    return f"{weights}-{hashlib.blake2b(versions.encode(), digest_size=8).hexdigest()}"


def weights_digest(state, architecture: str) -> str:
    """Names a network's weights: every tensor of ``state`` (torch or numpy; floats as float32, so that fp16 weights
    in a file and the float32 module they load into agree) and ``architecture``, what builds the network."""
    digest = hashlib.blake2b(architecture.encode(), digest_size=16)
    for name in sorted(state):  # a file's order is not the module's
        array = np.ascontiguousarray(_float32_numpy(state[name]))
        digest.update(f"{name}|{array.shape}|{array.dtype.str}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _float32_numpy(tensor) -> np.ndarray:
    """A torch tensor or numpy array as numpy, floats as float32."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False) if tensor.dtype.kind == "f" else tensor
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


# Exported networks kept on disk; the least recently used beyond this many are removed.
_DISK_CACHE_KEPT = 8
# Bump when what is exported changes for the same weights (quantisation settings, graph options).
_EXPORT_FORMAT = 3  # 2: the last three convolutions quantised too, the output head widened; 3: weight_bits()


def cache_folder() -> Path:
    """Where exported networks are kept: ``$NUCLEI_UNET_CACHE`` or the user's cache folder (XDG)."""
    configured = os.environ.get("NUCLEI_UNET_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-nuclei-unet" / "onnx"


def _read_cached(path: Path) -> tuple[bytes, int, bool] | None:
    """``(network, output channels, quantised)`` stored at ``path``, or None when absent or unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 2:
        return None
    return data[2:], data[0], bool(data[1])


def _write_cached(path: Path, network: bytes, out_channels: int, quantised: bool) -> None:
    """Atomically (a reader never sees half a file); a read-only or full disk only costs the next process the export."""
    part = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as handle:
            part = handle.name
            handle.write(bytes([out_channels, int(quantised)]) + network)
        os.replace(part, path)
        kept = sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[_DISK_CACHE_KEPT:]:
            old.unlink(missing_ok=True)
    except OSError:
        if part is not None:
            with contextlib.suppress(OSError):
                os.unlink(part)


def _export(model: torch.nn.Module, in_channels: int, threads: int, precision: str = "float32") -> OnnxNetwork:
    exported, out_channels = to_onnx(head_widened(model) if precision == "int8" else model, in_channels)
    quantised = False
    if precision == "int8":
        try:
            exported, quantised = quantize(exported, in_channels, weight_bits()), True
        except Exception as error:  # an op the quantiser cannot handle: float32 still works
            warnings.warn(f"8-bit quantisation failed, running float32 ({error})", RuntimeWarning, stacklevel=5)
    return _session(exported, out_channels, quantised, threads)


def _session(exported: bytes, out_channels: int, quantised: bool, threads: int) -> OnnxNetwork:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # The memory arena keeps the largest tile's activations (~140 MB more peak RSS at 1024 px
    # tiles) but saves ~30% of the time of 1024 px tiles (measured: 2.3 s vs 3.3 s at 4 MP).
    options.enable_cpu_mem_arena = True
    # Worker threads sleep between runs instead of spinning: the post-processing that follows
    # each run needs the cores (the val split ran ~6% faster end to end on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(exported, options, providers=["CPUExecutionProvider"])
    return OnnxNetwork(session, out_channels, "int8" if quantised else "float32", exported)


# ONNX Runtime's 8-bit convolution computes output channels in blocks of 16 (AVX-512): a 3-channel output head
# costs it more than a 16-channel one (18% of the network's time against 6%, 544 x 704 tiles).
_HEAD_CHANNELS_MULTIPLE = 16


def head_widened(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its output convolution widened by zero filters to a multiple of 16 channels and the extra
    channels sliced off again: the same logits, faster in 8 bits. Models without a ``segmentation_head`` convolution
    (or already that wide) are returned as they are; ``model`` itself is not changed."""
    import copy

    import torch

    head = getattr(model, "segmentation_head", None)
    conv = head[0] if isinstance(head, torch.nn.Sequential) and len(head) else None
    if not isinstance(conv, torch.nn.Conv2d) or conv.groups != 1 or conv.out_channels % _HEAD_CHANNELS_MULTIPLE == 0:
        return model
    width = -(-conv.out_channels // _HEAD_CHANNELS_MULTIPLE) * _HEAD_CHANNELS_MULTIPLE
    weight = conv.weight.new_zeros((width, *conv.weight.shape[1:]))
    bias = conv.weight.new_zeros(width)
    with torch.no_grad():
        weight[: conv.out_channels] = conv.weight
        if conv.bias is not None:
            bias[: conv.out_channels] = conv.bias
    widened = copy.deepcopy(model)
    wide = widened.segmentation_head[0]
    wide.out_channels = width
    wide.weight, wide.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)

    class FirstChannels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.widened, self.channels = widened, conv.out_channels

        def forward(self, batch):
            return self.widened(batch)[:, : self.channels]

    return FirstChannels()


def to_onnx(model: torch.nn.Module, in_channels: int) -> tuple[bytes, int]:
    """The model in eval mode as a float32 ONNX graph with free batch, height and width, and its output channels."""
    import torch

    was_training = model.training
    model.eval()
    try:
        sample = torch.zeros(1, in_channels, 64, 64, device=next(model.parameters()).device)
        with torch.inference_mode():
            out_channels = int(model(sample).shape[1])
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                (sample,),
                buffer,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={
                    "image": {0: "batch", 2: "height", 3: "width"},
                    "logits": {0: "batch", 2: "height", 3: "width"},
                },
                opset_version=_OPSET,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return buffer.getvalue(), out_channels


@functools.cache
def weight_bits() -> int:
    """Bits of the 8-bit network's weights on this CPU: 7 on x86 CPUs without VNNI, 8 elsewhere.

    Without VNNI (AVX2, AVX-512 before Cascade Lake) x86 CPUs add pairs of 8-bit products in 16 bits, which
    saturate with full-range weights on 8-bit activations; 7-bit weights cannot. VNNI and ARM sum in 32 bits,
    where 8 bits are the more precise (docs/performance.md)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 8
    return 8 if _has_vnni() else 7


def _has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI as numpy sees it, or AVX-VNNI as Linux lists it)."""
    features = {}
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy 2, numpy 1
        with contextlib.suppress(ImportError, AttributeError):
            features = importlib.import_module(module).__cpu_features__
            break
    if features.get("AVX512VNNI"):
        return True
    try:
        return " avx_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def quantize(exported: bytes, in_channels: int, bits: int = 8) -> bytes:
    """The float32 ONNX network with 8-bit weights and activations (static, QDQ, per-channel weights).

    Activation ranges come from generated nuclei images (:func:`calibration_images`), so
    any checkpoint, fine-tuned ones included, can be quantised without its training data.
    The first convolution (raw pixels in) stays float32. The full-resolution decoder block and
    the output head are quantised too: they take a third of the network's time in float32, and
    quantising them left the choosing sets' scores where they were (docs/performance.md).

    ``bits``: 8, or 7 (ONNX Runtime's ``reduce_range``) for CPUs that would saturate (:func:`weight_bits`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            self._batches = ({"image": image[None]} for image in calibration_images(in_channels))

        def get_next(self):
            return next(self._batches, None)

    convolutions = [node.name for node in onnx.load_from_string(exported).graph.node if node.op_type == "Conv"]
    with tempfile.TemporaryDirectory() as folder:  # the quantiser reads and writes files
        source, target = Path(folder) / "float32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(exported)
        advice = _DropMessages("Please consider")  # to run its pre-processing first: no measurable gain here
        logging.getLogger().addFilter(advice)
        try:
            quantize_static(
                source,
                target,
                Images(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=bits == 7,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=convolutions[:1],
            )
        finally:
            logging.getLogger().removeFilter(advice)
        return target.read_bytes()


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def calibration_images(in_channels: int, count: int = 12, side: int = 256) -> list[np.ndarray]:
    """Normalised ``(C, side, side)`` float32 inputs in the three DSB2018 looks, for quantisation.

    Generated nuclei fields (:mod:`.synthetic`) of 10-35 px nuclei, as fluorescence
    (bright on dark), brightfield (dark on bright) and a stain (purple on pink),
    normalised as segmentation normalises images. Deterministic.
    """
    from .io import Normalizer
    from .synthetic import nuclei_field

    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        field, _ = nuclei_field(
            (side, side), count=int(rng.integers(5, 40)), diameter=float(rng.uniform(10, 35)), seed=index
        )
        grey = field.astype(np.float32)
        inverted = grey.max() - grey
        look = (grey, inverted, np.stack([inverted * 0.8, inverted * 0.6, inverted * 0.9 + 200], axis=-1))[index % 3]
        normalizer = Normalizer.from_image(look, in_channels)
        images.append(np.ascontiguousarray(normalizer(look), dtype=np.float32))
    return images


def describe_device(device: torch.device | str, backend: str = "auto", precision: str = "int8") -> str:
    """What users see for our U-Net: the device, and on the CPU which engine runs it (and in what precision)."""
    if str(device).split(":")[0] != "cpu":
        return str(device)
    if backend == "torch" or (backend == "auto" and not available()):
        return "cpu (PyTorch)"
    return "cpu (ONNX Runtime, 8-bit)" if precision == "int8" else "cpu (ONNX Runtime)"
