"""bioimage.io Model Zoo packages: read them as models, and write ours as one.

Reading (:func:`load_package`): a ``.zip``, or a folder with ``bioimageio.yaml``/``rdf.yaml``,
is parsed with ``bioimageio.spec`` (format 0.4 packages are converted to 0.5 by it).

* A package whose ``pytorch_state_dict`` entry builds ``segmentation_models_pytorch.Unet``
  and carries our metadata (``config["napari-nuclei-unet"]``), or declares our percentile
  normalisation, loads as one of our checkpoints: it segments, calibrates and fine-tunes
  exactly as the checkpoint folder it was exported from.
* Any other 2D model with one image input and a foreground (optionally boundary) output
  runs through its own ONNX (CPU, ONNX Runtime) or TorchScript weights, with its own
  preprocessing, inside our tiling and post-processing (:class:`PackageNetwork`). It cannot be
  fine-tuned. Files a package names but does not hold (Zoo packages often point at remote
  weights) are treated as absent: nothing is downloaded.

Writing (:func:`export_package`): ONNX, TorchScript and ``pytorch_state_dict`` weights, our
percentile normalisation as ``scale_range`` + ``clip``, sigmoid outputs, test tensors from a
real image, a cover, and a README that says how our post-processing turns the probabilities
into nuclei. The description is built with ``bioimageio.spec``'s classes (it validates as it is
built), and :func:`test_package` runs ``bioimageio.core``'s model test on the result.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, ModelError, describe
from .io import channels_first, to_model_channels
from .tiling import InputSizes

if TYPE_CHECKING:
    from .model import Checkpoint


PACKAGE_FILES = ("bioimageio.yaml", "rdf.yaml")
# Our metadata (nuclei_unet.json) inside the package's ``config``.
CONFIG_KEY = "napari-nuclei-unet"
SMP_LIBRARY = "segmentation_models_pytorch"
RUNNABLE_WEIGHTS = ("onnx", "torchscript")
# Output channel names read as the nuclei foreground / as the boundary between nuclei.
_FOREGROUND_WORDS = ("foreground", "nucle", "prob", "mask", "semantic", "cell", "object")
_BOUNDARY_WORDS = ("bound", "contour", "edge", "border")
_PROBABILITY_EPS = 1e-6


def is_package(path: Path) -> bool:
    """Whether ``path`` is (or names the description file of) a bioimage.io package."""
    if path.is_dir():
        return any((path / name).is_file() for name in PACKAGE_FILES)
    return path.suffix.lower() == ".zip" or path.name in PACKAGE_FILES or path.name.endswith(".bioimageio.yaml")


# ------------------------------------------------------------------------------------ reading
class _PackageFiles:
    """The files of a package folder or zip, read by the relative names its description uses."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_file() and path.suffix.lower() == ".zip":
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise ModelError(f"{path}: not a readable zip file ({describe(error)})") from None
            names = [n for n in self.zip.namelist() if PurePosixPath(n).name in PACKAGE_FILES or n.endswith(".bioimageio.yaml")]
            if not names:
                raise ModelError(f"{path}: not a bioimage.io package (no bioimageio.yaml or rdf.yaml inside)")
            self.description = min(names, key=len)
            self.root = str(PurePosixPath(self.description).parent)
        else:
            folder = path if path.is_dir() else path.parent
            found = [folder / n for n in PACKAGE_FILES if (folder / n).is_file()]
            self.description = str(path if path.is_file() else found[0])
            self.root = str(folder)

    def read(self, source) -> bytes | None:
        """The bytes of a file the description names, or None when it is remote or absent."""
        name = str(source)
        if "://" in name:  # a URL: never downloaded here
            return None
        try:
            if self.zip is not None:
                member = str(PurePosixPath(self.root) / name) if self.root not in ("", ".") else name
                return self.zip.read(member)
            return (Path(self.root) / name).read_bytes()
        except (KeyError, OSError):
            return None


def _description(path: Path, files: _PackageFiles):
    """The package's model description as bioimage.io format 0.5 (older packages are converted)."""
    from bioimageio.spec import load_model_description

    source = files.zip if files.zip is not None else Path(files.description)
    try:
        with _quiet_spec_logging():
            return load_model_description(source, format_version="latest", perform_io_checks=False)
    except Exception as error:  # noqa: BLE001 (pydantic validation errors, YAML errors, unsupported types)
        raise ModelError(f"{path}: not a valid bioimage.io model description ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    if callable(getattr(error, "errors", None)):  # pydantic's ValidationError: its first error, with where it is
        with contextlib.suppress(Exception):
            first = error.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            return f"{where + ': ' if where else ''}{first['msg']}"[:300]
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith("Invalid ")]
    return (lines[0] if lines else describe(error))[:300]


@contextlib.contextmanager
def _quiet_spec_logging():
    """bioimageio.spec logs through loguru at INFO (format conversions, hints); keep our output to errors."""
    try:
        from loguru import logger
    except ImportError:
        yield
        return
    logger.disable("bioimageio")
    try:
        yield
    finally:
        logger.enable("bioimageio")


def load_package(path: Path, device="cpu") -> Checkpoint:
    """A bioimage.io package as a checkpoint: one of ours, or a foreign network (module docstring)."""
    path = Path(path)
    files = _PackageFiles(path)
    descr = _description(path, files)
    source = str(path if path.suffix.lower() == ".zip" or path.is_dir() else path.parent)
    state_entry = descr.weights.pytorch_state_dict
    ours = _our_metadata(descr)
    if state_entry is not None and _builds_smp_unet(state_entry) and (ours or _percentiles(descr) is not None):
        data = files.read(state_entry.source)
        if data is not None:
            checkpoint = _smp_checkpoint(path, descr, state_entry, data, ours)
            checkpoint.model.to(_device(device)).eval()
            checkpoint.source = source
            return checkpoint
    network = PackageNetwork.from_description(path, descr, files)
    from .model import Checkpoint, ModelConfig

    config = ModelConfig(encoder_name="bioimage.io package", in_channels=network.in_channels, outputs=network.outputs)
    metadata = {"name": descr.name, "description": descr.description, "license": str(descr.license or ""), "imported_from": source}
    metadata["stain_by_image_type"] = {"fluorescence": "none", "brightfield": "none", "tissue": "none"}
    checkpoint = Checkpoint(model=None, config=config, metadata=metadata, source=source, package=network)
    if str(device) not in ("cpu", "auto"):
        checkpoint.model.to(_device(device)).eval()
    return checkpoint


def _device(device):
    from .model import resolve_device

    return resolve_device(device)


def _our_metadata(descr) -> dict:
    extra = getattr(descr.config, "model_extra", None) or {}
    ours = extra.get(CONFIG_KEY)
    return dict(ours) if isinstance(ours, dict) else {}


def _builds_smp_unet(entry) -> bool:
    architecture = entry.architecture
    return getattr(architecture, "import_from", "").split(".")[0] == SMP_LIBRARY and str(architecture.callable) == "Unet"


def _percentiles(descr) -> tuple[float, float] | None:
    """Our normalisation, if that is what the package's input preprocessing is (scale_range pooled over channels, then clip)."""
    steps = [s for s in descr.inputs[0].preprocessing if s.id != "ensure_dtype"]
    if not steps or steps[0].id != "scale_range" or any(s.id not in ("clip",) for s in steps[1:]):
        return None
    kwargs = steps[0].kwargs
    return float(kwargs.min_percentile), float(kwargs.max_percentile)


def _smp_checkpoint(path: Path, descr, entry, data: bytes, ours: dict) -> Checkpoint:
    """One of our checkpoints from a package's smp.Unet state_dict and our metadata."""
    import torch

    from .model import Checkpoint, ModelConfig, _checked_metadata, _extra_metadata, _load_strict

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (pickle/zip errors of a truncated file)
        raise ModelError(f"{path}: {entry.source}: corrupt or not a weights-only state_dict ({describe(error)})") from None
    kwargs = dict(entry.architecture.kwargs)
    names = _output_names(descr.outputs[0])
    try:
        config = ModelConfig(
            encoder_name=str(kwargs.get("encoder_name", "resnet34")),
            encoder_depth=int(kwargs.get("encoder_depth", 5)),
            decoder_channels=tuple(kwargs.get("decoder_channels", (256, 128, 64, 32, 16))),
            in_channels=int(kwargs.get("in_channels", 3)),
            outputs=tuple((ours.get("config") or {}).get("outputs") or names),
            decoder_attention_type=kwargs.get("decoder_attention_type"),
        )
    except (TypeError, ValueError) as error:
        raise ModelError(f"{path}: invalid smp.Unet arguments in its pytorch_state_dict entry ({describe(error)})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: {entry.source}: not a state_dict")
    model = config.build()
    _load_strict(model, state, path, config)
    if not ours:
        ours = {"name": descr.name, "normalization": {"percentiles": list(_percentiles(descr))}}
    checked = _checked_metadata(path, ours)
    metadata = _extra_metadata(ours)
    metadata.setdefault("name", descr.name)
    return Checkpoint(model=model.eval(), config=config, metadata=metadata, **checked)


def _output_names(tensor) -> tuple[str, ...]:
    channel = next((a for a in tensor.axes if a.type == "channel"), None)
    return tuple(str(n) for n in channel.channel_names) if channel is not None else ("foreground",)


def _output_meanings(path: Path, names: tuple[str, ...]) -> tuple[str, ...]:
    """Our meaning of each output channel: 'foreground', 'boundary', or the package's own name (unused)."""
    if len(names) == 1:
        return ("foreground",)
    meanings = []
    for name in names:
        lowered = name.lower()
        if any(word in lowered for word in _BOUNDARY_WORDS) and "boundary" not in meanings:
            meanings.append("boundary")
        elif "background" not in lowered and any(word in lowered for word in _FOREGROUND_WORDS) and "foreground" not in meanings:
            meanings.append("foreground")
        else:
            meanings.append(f"unused:{name}")
    if "foreground" not in meanings:
        raise ModelError(f"{path}: cannot tell which output channel is the nuclei foreground (channels: {', '.join(names)})")
    return tuple(meanings)


@dataclass
class _Step:
    """One preprocessing operation of a package, with its statistics still to be taken from the image."""

    kind: str  # "zero_mean_unit_variance", "scale_range", "affine", "clip", "sigmoid"
    pooled: bool = True  # statistics over all channels together (the channel axis is among the reduced axes)
    low: float = 0.0  # scale_range percentiles / clip bounds
    high: float = 100.0
    eps: float = 1e-6
    gain: Any = 1.0  # affine: x * gain + offset (scalars or per channel)
    offset: Any = 0.0


def _parse_preprocessing(path: Path, tensor) -> list[_Step]:
    steps = []
    for step in tensor.preprocessing:
        kind, kwargs = step.id, getattr(step, "kwargs", None)
        axes = [str(a) for a in (getattr(kwargs, "axes", None) or ["channel"])]
        if kind == "ensure_dtype":
            if str(kwargs.dtype) not in ("float32", "float64"):
                raise ModelError(f"{path}: preprocessing ensure_dtype to {kwargs.dtype} is not supported (float32 only)")
        elif kind == "zero_mean_unit_variance":
            steps.append(_Step("zero_mean_unit_variance", pooled="channel" in axes, eps=float(kwargs.eps)))
        elif kind == "scale_range":
            if getattr(kwargs, "reference_tensor", None) not in (None, tensor.id):
                raise ModelError(f"{path}: preprocessing scale_range with another tensor's statistics is not supported")
            steps.append(_Step("scale_range", pooled="channel" in axes, low=float(kwargs.min_percentile), high=float(kwargs.max_percentile), eps=float(kwargs.eps)))
        elif kind == "fixed_zero_mean_unit_variance":
            mean, std = np.asarray(kwargs.mean, np.float32), np.asarray(kwargs.std, np.float32)
            steps.append(_Step("affine", gain=1.0 / std, offset=-mean / std))
        elif kind == "scale_linear":
            gain, offset = np.asarray(kwargs.gain, np.float32), np.asarray(kwargs.offset, np.float32)
            steps.append(_Step("affine", gain=gain, offset=offset))
        elif kind == "clip":
            low = -np.inf if kwargs.min is None else float(kwargs.min)
            high = np.inf if kwargs.max is None else float(kwargs.max)
            steps.append(_Step("clip", low=low, high=high))
        elif kind == "sigmoid":
            steps.append(_Step("sigmoid"))
        else:
            raise ModelError(f"{path}: input preprocessing {kind!r} is not supported here")
    return steps


@dataclass(frozen=True)
class PackageNormalizer:
    """A package's preprocessing with its statistics taken from one image: crop ``(Y, X[, C])`` -> ``(C, Y, X)`` float32."""

    channels: int
    operations: tuple  # ("affine", gain, offset) with arrays broadcasting over (C, 1, 1), or ("clip", low, high), ("sigmoid",)

    def __call__(self, plane) -> np.ndarray:
        return _apply(self.operations, to_model_channels(channels_first(plane), self.channels))

    @classmethod
    def from_image(cls, sample, channels: int, steps: list[_Step]) -> "PackageNormalizer":
        array = to_model_channels(channels_first(sample), channels)
        if not np.isfinite(array).all():
            raise InputError("image contains NaN or infinite values")
        operations = []
        for step in steps:
            operation = _operation(step, array)
            array = _apply((operation,), array)
            operations.append(operation)
        return cls(channels, tuple(operations))


def _operation(step: _Step, array: np.ndarray) -> tuple:
    reduce = (0, 1, 2) if step.pooled else (1, 2)
    if step.kind == "zero_mean_unit_variance":
        mean = array.mean(axis=reduce, keepdims=True, dtype=np.float64)
        std = array.std(axis=reduce, keepdims=True, dtype=np.float64)
        gain = 1.0 / (std + step.eps)
        return ("affine", gain.astype(np.float32), (-mean * gain).astype(np.float32))
    if step.kind == "scale_range":
        low, high = np.percentile(array, [step.low, step.high], axis=reduce, keepdims=True)
        gain = 1.0 / (high - low + step.eps)
        return ("affine", gain.astype(np.float32), (-low * gain).astype(np.float32))
    if step.kind == "affine":
        shape = (-1, 1, 1)
        return ("affine", np.asarray(step.gain, np.float32).reshape(shape), np.asarray(step.offset, np.float32).reshape(shape))
    if step.kind == "clip":
        return ("clip", step.low, step.high)
    return ("sigmoid",)


def _apply(operations, array: np.ndarray) -> np.ndarray:
    for operation in operations:
        if operation[0] == "affine":
            array *= operation[1]
            array += operation[2]
        elif operation[0] == "clip":
            np.clip(array, operation[1], operation[2], out=array)
        else:
            from scipy.special import expit

            expit(array, out=array)
    return array


def _spatial_axes(path: Path, tensor, what: str) -> list[str]:
    """The tensor's axis letters (b, c, y, x); anything else is a one-line error."""
    letters = []
    for axis in tensor.axes:
        if axis.type == "batch":
            letters.append("b")
        elif axis.type == "channel":
            letters.append("c")
        elif axis.type == "space" and str(axis.id) in ("y", "x"):
            letters.append(str(axis.id))
        else:
            raise ModelError(f"{path}: its {what} has a {axis.type} axis {str(axis.id)!r}; only 2D (y, x) models run here")
    if sorted(letters).count("y") != 1 or letters.count("x") != 1:
        raise ModelError(f"{path}: its {what} does not have one y and one x axis")
    return letters


def _input_sizes(path: Path, tensor, halo: int) -> InputSizes:
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    rules = set()
    for axis in tensor.axes:
        if axis.type != "space":
            continue
        size = axis.size
        if isinstance(size, int):
            rules.add((size, size, True))
        elif isinstance(size, ParameterizedSize):
            rules.add((int(size.min), int(size.step), False))
        else:
            raise ModelError(f"{path}: its input's {axis.id} size depends on another tensor; not supported")
    if len(rules) != 1:
        raise ModelError(f"{path}: its input's y and x sizes follow different rules; not supported")
    minimum, step, fixed = rules.pop()
    return InputSizes(minimum=minimum, step=step, fixed=fixed, halo=halo)


@dataclass
class PackageNetwork:
    """A foreign package's network as our pipeline needs it: preprocessing, tile sizes, and a
    forward pass that returns logits of the channels we use (foreground[, boundary])."""

    name: str
    source: str
    weights: dict[str, bytes]  # "onnx" / "torchscript": the files present in the package
    input_axes: str  # e.g. "bcyx"
    output_axes: str
    in_channels: int
    outputs: tuple[str, ...]  # meanings of the channels we keep, in order
    keep: tuple[int, ...]  # their indices in the output tensor
    activation: str  # what turns raw outputs into probabilities: "sigmoid", "softmax" or "none"
    steps: list[_Step]
    input_sizes: InputSizes
    output_index: int = 0  # which of the model's outputs
    _sessions: dict = field(default_factory=dict, repr=False)
    _module: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_description(cls, path: Path, descr, files: _PackageFiles) -> "PackageNetwork":
        if len(descr.inputs) != 1:
            raise ModelError(f"{path}: the model takes {len(descr.inputs)} inputs; only single-image models run here")
        tensor = descr.inputs[0]
        input_axes = _spatial_axes(path, tensor, "input")
        channel = next((a for a in tensor.axes if a.type == "channel"), None)
        in_channels = len(channel.channel_names) if channel is not None else 1
        steps = _parse_preprocessing(path, tensor)
        index, output = _choose_output(path, descr.outputs)
        output_axes = _spatial_axes(path, output, "output")
        halo = 0
        for axis in output.axes:
            if axis.type != "space":
                continue
            size = axis.size
            if not (getattr(size, "tensor_id", None) == tensor.id and getattr(size, "axis_id", None) == axis.id and size.offset == 0 and axis.scale == 1.0):
                raise ModelError(f"{path}: its output's {axis.id} axis is not the input's size and resolution; not supported")
            halo = max(halo, int(getattr(axis, "halo", 0) or 0))
        meanings = _output_meanings(path, _output_names(output))
        keep = tuple(i for i, m in enumerate(meanings) if not m.startswith("unused:"))
        activation = _activation(path, output)
        weights = {}
        for kind in RUNNABLE_WEIGHTS:
            entry = getattr(descr.weights, kind, None)
            data = files.read(entry.source) if entry is not None else None
            if data is not None:
                weights[kind] = data
        if not weights:
            present = ", ".join(k for k in type(descr.weights).model_fields if getattr(descr.weights, k, None) is not None) or "none"
            raise ModelError(f"{path}: no ONNX or TorchScript weights file in the package (its weights: {present}); nothing is downloaded")
        return cls(
            name=descr.name, source=str(path), weights=weights, input_axes="".join(input_axes), output_axes="".join(output_axes),
            in_channels=in_channels, outputs=tuple(meanings[i] for i in keep), keep=keep, activation=activation, steps=steps,
            input_sizes=_input_sizes(path, tensor, halo), output_index=index,
        )  # fmt: skip

    def describe(self) -> str:
        formats = " and ".join({"onnx": "ONNX", "torchscript": "TorchScript"}[k] for k in self.weights)
        return f"bioimage.io package ({formats} weights)"

    def normalizer(self, sample) -> PackageNormalizer:
        return PackageNormalizer.from_image(sample, self.in_channels, self.steps)

    # ------------------------------------------------------------------- running
    def forward(self, params):
        """``(forward, channels)`` for :func:`tiling.predict`: ONNX Runtime on the CPU when the
        package has ONNX weights, else its TorchScript module on the device."""
        from dataclasses import replace

        from .model import device_name
        from .onnx_backend import available, cpu_threads
        from .tiling import _onnx_forward, _torch_forward

        on_cpu = device_name(params.device) == "cpu"
        if on_cpu and "onnx" in self.weights and params.backend != "torch" and available():
            return _onnx_forward(self._onnx_logits(cpu_threads()), params.tta), len(self.keep)
        if "torchscript" not in self.weights:
            why = "choose device cpu" if not on_cpu else "install onnxruntime, or use backend auto"
            raise ModelError(f"{self.source}: the package has only ONNX weights, which run here with ONNX Runtime on the CPU; {why}")
        return _torch_forward(self.torch_module(), self.in_channels, replace(params, backend="torch"))

    def _onnx_logits(self, threads: int):
        with self._lock:
            session = self._sessions.get(threads)
            if session is None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = max(1, threads)
                options.log_severity_level = 3
                try:
                    session = onnxruntime.InferenceSession(self.weights["onnx"], options, providers=["CPUExecutionProvider"])
                except Exception as error:  # noqa: BLE001 (ONNX Runtime's own error types)
                    raise ModelError(f"{self.source}: ONNX Runtime cannot load its ONNX weights ({_first_line(error)})") from None
                self._sessions[threads] = session
        name = session.get_inputs()[0].name

        def logits(batch: np.ndarray) -> np.ndarray:
            raw = session.run(None, {name: _to_axes(batch, "bcyx", self.input_axes)})[self.output_index]
            return self._logits(_from_axes(np.asarray(raw, np.float32), self.output_axes))

        return logits

    def _logits(self, raw: np.ndarray) -> np.ndarray:
        """Logits of the kept channels from the raw ``(N, K, H, W)`` outputs (our tiling applies the sigmoid)."""
        if self.activation == "sigmoid":
            return np.ascontiguousarray(raw[:, list(self.keep)])
        if self.activation == "softmax":
            shifted = raw - raw.max(axis=1, keepdims=True)
            raw = np.exp(shifted)
            raw /= raw.sum(axis=1, keepdims=True)
        probabilities = np.clip(raw[:, list(self.keep)], _PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
        return np.log(probabilities / (1 - probabilities))

    def torch_module(self):
        """The TorchScript weights wrapped to take ``(N, C, H, W)`` and return logits of the kept channels."""
        with self._lock:
            if self._module is None:
                if "torchscript" not in self.weights:
                    raise ModelError(f"{self.source}: the package has no TorchScript weights; it runs on the CPU with ONNX Runtime only")
                self._module = _torch_logits_module(self)
            return self._module


def _choose_output(path: Path, outputs) -> tuple[int, Any]:
    if len(outputs) == 1:
        return 0, outputs[0]
    for index, tensor in enumerate(outputs):
        with contextlib.suppress(ModelError):
            _output_meanings(path, _output_names(tensor))
            return index, tensor
    raise ModelError(f"{path}: none of its {len(outputs)} outputs is recognisably a nuclei foreground")


def _activation(path: Path, output) -> str:
    kinds = [s.id for s in output.postprocessing if s.id != "ensure_dtype"]
    if not kinds:
        data_range = getattr(getattr(output, "data", None), "range", None)
        if data_range is not None and tuple(data_range) not in ((0.0, 1.0), (None, None)):
            raise ModelError(f"{path}: its output's range {tuple(data_range)} is not a probability; not supported")
        return "none"
    if kinds in (["sigmoid"], ["softmax"]):
        return kinds[0]
    raise ModelError(f"{path}: output postprocessing {', '.join(kinds)} is not supported (sigmoid or softmax only)")


def _to_axes(batch: np.ndarray, have: str, want: str) -> np.ndarray:
    """``batch`` in axis order ``have`` (all of b, c, y, x) rearranged to ``want`` (a missing b/c must be of size 1)."""
    array = batch
    for letter in "bc":
        if letter not in want:
            array = array.take(0, axis=have.index(letter))
            have = have.replace(letter, "")
    return np.ascontiguousarray(np.transpose(array, [have.index(letter) for letter in want]), dtype=np.float32)


def _from_axes(array: np.ndarray, have: str) -> np.ndarray:
    """An output in axis order ``have`` as ``(N, K, H, W)`` (a missing batch or channel axis becomes one of size 1)."""
    for letter in "bc":
        if letter not in have:
            array, have = array[None], letter + have
    return np.transpose(array, [have.index(letter) for letter in "bcyx"])


def _torch_logits_module(network: PackageNetwork):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice: the format is the Zoo's
            scripted = torch.jit.load(io.BytesIO(network.weights["torchscript"]), map_location="cpu")
    except Exception as error:  # noqa: BLE001 (TorchScript's own errors for corrupt archives)
        raise ModelError(f"{network.source}: cannot load its TorchScript weights ({_first_line(error)})") from None

    class PackageLogits(torch.nn.Module):
        """(N, C, H, W) in; logits of the kept channels out, as :meth:`PackageNetwork._logits`."""

        def __init__(self):
            super().__init__()
            self.scripted = scripted
            self.output_channels = len(network.keep)

        def forward(self, batch):
            array = batch
            have = "bcyx"
            for letter in "bc":
                if letter not in network.input_axes:
                    array = array.select(have.index(letter), 0)
                    have = have.replace(letter, "")
            raw = self.scripted(array.permute(*[have.index(letter) for letter in network.input_axes]).contiguous())
            if isinstance(raw, (tuple, list)):
                raw = raw[network.output_index]
            have = network.output_axes
            for letter in "bc":
                if letter not in have:
                    raw, have = raw.unsqueeze(0), letter + have
            raw = raw.permute(*[have.index(letter) for letter in "bcyx"]).float()
            if network.activation == "sigmoid":
                return raw[:, list(network.keep)]
            if network.activation == "softmax":
                raw = torch.softmax(raw, dim=1)
            return torch.logit(raw[:, list(network.keep)], eps=_PROBABILITY_EPS)

    return PackageLogits().eval()


# ------------------------------------------------------------------------------------ writing
TEST_SIDE = 256  # px: the test tensors' crop (a multiple of 32, quick for every consumer's test)
_INPUT_ID, _OUTPUT_ID = "image", "probabilities"
_OUTPUT_HALO = 16  # px: the U-Net's border pixels see reflected padding; consumers that tile should crop them
_CITATIONS = (
    ("Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for biomedical image segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28"),
    ("Caicedo JC et al. Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. Nature Methods 16, 1247-1253 (2019).", "10.1038/s41592-019-0612-7"),
    ("Iakubovskii P. Segmentation Models Pytorch (2019).", "https://github.com/qubvel-org/segmentation_models.pytorch"),
)
_MONUSEG_CITATION = ("Kumar N et al. A dataset and a technique for generalized nuclear segmentation for computational pathology. IEEE TMI 36, 1550-1560 (2017).", "10.1109/TMI.2017.2677499")


def export_package(
    checkpoint: Checkpoint, out: str | os.PathLike, params=None, progress=None, image: np.ndarray | None = None, overwrite: bool = False
) -> Path:
    """Write ``checkpoint`` as a bioimage.io model package: ``out`` ending in ``.zip`` is a zip, anything else a folder.

    The test tensors and cover come from ``image`` (a grey or RGB plane, e.g. the image the
    model was fine-tuned on) when given, else from ``params.test_image``.
    The package is built and checked in a temporary place (``bioimageio.spec`` validation with
    file checks, then ``bioimageio.core``'s model test unless ``params.run_test`` is off) and
    moved to ``out`` only when it passes, so a failed export leaves nothing behind.
    ``progress(message)`` is told each stage. ``overwrite`` replaces an existing ``out`` file
    (atomically, once the new package has passed).
    """
    from .params import ExportParams

    params = params or ExportParams()
    say = progress or (lambda message: None)
    out = Path(out)
    if checkpoint.package is not None:
        raise ModelError(f"{checkpoint.name}: already a foreign bioimage.io package; export only models of ours")
    if out.is_dir() and any(out.iterdir()):
        raise ModelError(f"{out}: a folder that is not empty; choose another name")
    if out.is_file() and not overwrite:
        raise ModelError(f"{out}: already exists; choose another name")
    people = _people(checkpoint, params)  # the user's fields are checked before minutes of work
    image = _test_crop(image, "the test image") if image is not None else _test_image(params.test_image)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bioimageio-", dir=out.parent) as work:
        work = Path(work)
        say("writing the weights (state_dict, TorchScript, ONNX)")
        descr = _build_description(checkpoint, image, work, people, say)
        staged = work / ("package.zip" if out.suffix.lower() == ".zip" else "package")
        say("packaging")
        from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

        with _quiet_spec_logging():
            if out.suffix.lower() == ".zip":
                save_bioimageio_package(descr, output_path=staged)
            else:
                save_bioimageio_package_as_folder(descr, output_path=staged)
        say("validating the package")
        problems = validate_package(staged, run_test=params.run_test)
        if problems:
            raise ModelError(f"{out}: the exported package does not pass bioimage.io's checks: {problems[0]}")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(staged, out)
    return out


def validate_package(path: Path, run_test: bool = True) -> list[str]:
    """Problems found by ``bioimageio.spec`` (format and files) and, with ``run_test``, by
    ``bioimageio.core``'s model test (each weight format reproduces the test output); [] when it passes."""
    from bioimageio.spec import load_description

    source = path if path.suffix.lower() == ".zip" else next(path / n for n in PACKAGE_FILES if (path / n).is_file())
    with _quiet_spec_logging():
        descr = load_description(source, perform_io_checks=True)
        summary = descr.validation_summary
        if summary.status == "failed" or not run_test:
            return _summary_errors(summary)
        from bioimageio.core import test_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            tested = test_model(source)
    return _summary_errors(tested)


def _summary_errors(summary) -> list[str]:
    """Every failed check of a validation summary, one line each. (A failed model test leaves the
    summary's overall status at "valid-format", so the details are what count.)"""
    found = []
    for detail in summary.details:
        if detail.status != "failed":
            continue
        for error in detail.errors or [None]:
            message = (str(error.msg).strip().splitlines() or [""])[0] if error is not None else "failed"
            where = ".".join(str(part) for part in error.loc) if error is not None and error.loc else ""
            found.append(f"{detail.name}: {where + ': ' if where else ''}{message}"[:400])
    if not found and summary.status == "failed":
        found.append("failed")
    return found


def _test_image(path: str | None) -> np.ndarray:
    """A crop of a real image for the test tensors: the user's, or scikit-image's immunohistochemistry sample."""
    if not path:
        from skimage import data

        return _test_crop(data.immunohistochemistry(), "scikit-image's immunohistochemistry sample")
    from .io import read_image

    return _test_crop(np.asarray(read_image(path)), str(path))


def _test_crop(image: np.ndarray, name: str) -> np.ndarray:
    """The centre ``TEST_SIDE`` square (or the largest multiple of 32 that fits) of a grey or RGB plane."""
    shape = tuple(image.shape)  # numpy, dask or zarr: only the crop is read
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3, 4)):
        raise InputError(f"{name}: a test image must be one 2D plane, grey or RGB; got shape {shape}")
    height, width = shape[:2]
    side = min(TEST_SIDE, height // 32 * 32, width // 32 * 32)
    if side < 64:
        raise InputError(f"{name}: a test image must be at least 64 x 64 pixels, got {height} x {width}")
    top, left = (height - side) // 2, (width - side) // 2
    crop = np.asarray(image[top:top + side, left:left + side])
    return crop[..., 0] if crop.ndim == 3 and crop.shape[-1] == 1 else crop[..., :3] if crop.ndim == 3 else crop


def _people(checkpoint: Checkpoint, params) -> dict:
    """The package's authors, citations and licence as ``ModelDescr`` fields, checked (a bad one is a one-line InputError)."""
    from bioimageio.spec.model.v0_5 import Author, CiteEntry, ModelDescr
    from pydantic import TypeAdapter

    try:
        cite = [CiteEntry(text=text, **_doi_or_url(ref)) for text, ref in _citations(checkpoint, params.cite)]
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 (pydantic's ValidationError)
        raise InputError(f"citation: {_first_line(error)}") from None
    try:
        license_id = TypeAdapter(ModelDescr.model_fields["license"].annotation).validate_python(params.license)
    except Exception:  # noqa: BLE001 (pydantic's ValidationError)
        raise InputError(f"licence {params.license!r}: not an SPDX licence identifier (e.g. MIT, BSD-3-Clause, CC-BY-4.0)") from None
    return {"authors": _authors(checkpoint, params.authors, Author), "cite": cite, "license": license_id}


def _build_description(checkpoint: Checkpoint, image: np.ndarray, work: Path, people: dict, say):
    """The package's files in ``work`` and its ``bioimageio.spec`` model description (validated as it is built)."""
    import torch
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromLibraryDescr, BatchAxis, ChannelAxis, ClipDescr, ClipKwargs, EnsureDtypeDescr, EnsureDtypeKwargs,
        FileDescr, InputTensorDescr, IntervalOrRatioDataDescr, ModelDescr, OnnxWeightsDescr, OutputTensorDescr, ParameterizedSize,
        PytorchStateDictWeightsDescr, ScaleRangeDescr, ScaleRangeKwargs, SigmoidDescr, SizeReference, SpaceInputAxis,
        SpaceOutputAxisWithHalo, TorchscriptWeightsDescr, WeightsDescr,
    )  # fmt: skip
    from pydantic import ValidationError

    from .io import Normalizer
    from .onnx_backend import _OPSET, to_onnx

    import copy

    model = copy.deepcopy(checkpoint.model).float().eval().cpu()  # the caller's model may be on a GPU, or in use
    config = checkpoint.config
    channels = config.in_channels
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, work / "weights.pt")
    raw = to_model_channels(channels_first(image), channels)[None]  # (1, C, Y, X): what a consumer feeds, before preprocessing
    normalizer = Normalizer.from_image(image, channels, checkpoint.percentiles)
    with torch.inference_mode():
        logits = model(torch.from_numpy(normalizer(image)[None]))
    expected = torch.sigmoid(logits).numpy().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape-dependent branches in timm/smp
        traced = torch.jit.trace(model, torch.from_numpy(normalizer(image)[None]), check_trace=False)
    traced.save(str(work / "weights.torchscript.pt"))
    (work / "weights.onnx").write_bytes(to_onnx(model, channels)[0])
    np.save(work / "test_input.npy", raw.astype(np.float32))
    np.save(work / "test_output.npy", expected)
    say("drawing the cover")
    _write_cover(checkpoint, image, work / "cover.png")
    (work / "README.md").write_text(_readme(checkpoint), encoding="utf-8")

    channel_names = ["intensity"] if channels == 1 else ["red", "green", "blue"][:channels] + [f"channel{i}" for i in range(3, channels)]
    size = ParameterizedSize(min=64, step=32)
    low, high = checkpoint.percentiles
    smp_kwargs = {
        "encoder_name": config.encoder_name, "encoder_depth": config.encoder_depth, "encoder_weights": None,
        "decoder_channels": list(config.decoder_channels), "decoder_attention_type": config.decoder_attention_type,
        "in_channels": channels, "classes": len(config.outputs),
    }  # fmt: skip
    torch_version = torch.__version__.split("+")[0]
    metadata = json_safe(checkpoint._metadata_json())
    try:
        return ModelDescr(
            name=_package_name(checkpoint.name),
            description=str(checkpoint.metadata.get("description") or f"Nuclei U-Net ({config.encoder_name} encoder) from napari-nuclei-unet.")[:1000],
            **people,
            covers=[FileDescr(source=work / "cover.png")],
            documentation=FileDescr(source=work / "README.md"),
            tags=["nuclei", "nucleus-segmentation", "instance-segmentation", "unet", "2d", "fluorescence", "brightfield", "histology", "pytorch", "onnx", "napari-nuclei-unet"],
            inputs=[InputTensorDescr(
                id=_INPUT_ID,
                description="2D image: grey images are repeated into each channel, colour ones as RGB",
                axes=[BatchAxis(), ChannelAxis(channel_names=channel_names), SpaceInputAxis(id="y", size=size), SpaceInputAxis(id="x", size=size)],
                test_tensor=FileDescr(source=work / "test_input.npy"),
                preprocessing=[
                    EnsureDtypeDescr(kwargs=EnsureDtypeKwargs(dtype="float32")),
                    ScaleRangeDescr(kwargs=ScaleRangeKwargs(axes=["channel", "y", "x"], min_percentile=low, max_percentile=high)),
                    ClipDescr(kwargs=ClipKwargs(min=0.0, max=1.0)),
                ],
            )],
            outputs=[OutputTensorDescr(
                id=_OUTPUT_ID,
                description="per-pixel probabilities: " + ", ".join(config.outputs) + " (see README for turning them into nuclei)",
                axes=[
                    BatchAxis(), ChannelAxis(channel_names=list(config.outputs)),
                    SpaceOutputAxisWithHalo(id="y", size=SizeReference(tensor_id=_INPUT_ID, axis_id="y"), halo=_OUTPUT_HALO),
                    SpaceOutputAxisWithHalo(id="x", size=SizeReference(tensor_id=_INPUT_ID, axis_id="x"), halo=_OUTPUT_HALO),
                ],
                test_tensor=FileDescr(source=work / "test_output.npy"),
                data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
                postprocessing=[SigmoidDescr()],
            )],
            weights=WeightsDescr(
                pytorch_state_dict=PytorchStateDictWeightsDescr(
                    source=work / "weights.pt", pytorch_version=torch_version,
                    architecture=ArchitectureFromLibraryDescr(callable="Unet", import_from=SMP_LIBRARY, kwargs=smp_kwargs),
                ),
                torchscript=TorchscriptWeightsDescr(source=work / "weights.torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict"),
                onnx=OnnxWeightsDescr(source=work / "weights.onnx", opset_version=_OPSET, parent="pytorch_state_dict"),
            ),
            config={CONFIG_KEY: metadata},
        )  # fmt: skip
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ModelError(f"cannot describe {checkpoint.name} as a bioimage.io model: {where}: {first['msg']}") from None


def json_safe(value):
    """``value`` with tuples as lists and numpy scalars as Python numbers (what YAML can hold)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _package_name(name: str) -> str:
    """bioimage.io names: 5 to 128 letters, digits, spaces and ``_-()``."""
    cleaned = " ".join("".join(c if c.isalnum() or c in " _-()" else " " for c in name).split())[:110]
    return cleaned if len(cleaned) >= 5 else f"{cleaned} (nuclei U-Net)".strip()


def _authors(checkpoint: Checkpoint, given: tuple[str, ...], author_class) -> list:
    entries = list(given) or [str(a) for a in checkpoint.metadata.get("authors") or []]
    if not entries:
        entries = ["napari-nuclei-unet developers"] if checkpoint.metadata.get("name") == "nuclei-unet-default" else [_login_name()]
    authors = []
    for entry in entries:
        name, affiliation, orcid = (list(part.strip() for part in entry.split(";")) + ["", ""])[:3]
        if not name:
            raise InputError(f"author {entry!r}: give a name first, as 'Name;Affiliation;ORCID'")
        fields = {"name": name, **({"affiliation": affiliation} if affiliation else {}), **({"orcid": orcid} if orcid else {})}
        try:
            authors.append(author_class(**fields))
        except Exception as error:  # noqa: BLE001 (pydantic's ValidationError: a malformed ORCID)
            raise InputError(f"author {entry!r}: {_first_line(error)}") from None
    return authors


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 (no login name in some containers)
        return "napari-nuclei-unet user"


def _citations(checkpoint: Checkpoint, extra: tuple[str, ...]) -> list[tuple[str, str]]:
    found = list(_CITATIONS)
    if "monuseg" in str((checkpoint.metadata.get("training") or {}).get("data", "")).lower():
        found.append(_MONUSEG_CITATION)
    for entry in extra:
        text, _, ref = entry.rpartition(";")
        if not text.strip() or not ref.strip():
            raise InputError(f"citation {entry!r}: give it as 'text;DOI or URL'")
        found.append((text.strip(), ref.strip()))
    return found


def _doi_or_url(ref: str) -> dict:
    return {"url": ref} if "://" in ref else {"doi": ref.removeprefix("doi:").removeprefix("https://doi.org/")}


def _write_cover(checkpoint: Checkpoint, image: np.ndarray, path: Path) -> None:
    """The test image beside the model's view of it (2:1, as the Zoo's gallery shows covers): the
    foreground probability in magenta and the nuclei kept by the default post-processing outlined."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from .segment import segment

    result = segment(checkpoint, image)
    grey = image.astype(np.float32)
    low, high = np.percentile(grey, (0.5, 99.5))
    scaled = np.clip((grey - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(scaled[..., None], 3, axis=-1) if scaled.ndim == 2 else scaled[..., :3]
    alpha = 0.6 * result.probabilities[checkpoint.outputs.index("foreground")][..., None]
    seen = rgb * (1 - alpha) + np.array([1.0, 0.0, 1.0]) * alpha
    seen[find_boundaries(result.labels, mode="inner")] = (1.0, 0.86, 0.0)
    Image.fromarray((np.concatenate([rgb, seen], axis=1) * 255).round().astype(np.uint8)).save(path)


def _readme(checkpoint: Checkpoint) -> str:
    """The package's documentation: what the model is, what it was trained on, and how our post-processing makes nuclei."""
    from .params import PostprocessParams

    metrics = checkpoint.metadata.get("metrics") or {}
    training = checkpoint.metadata.get("training") or {}
    level = checkpoint.min_confidence
    post = PostprocessParams()
    lines = [
        f"# {checkpoint.name}",
        "",
        str(checkpoint.metadata.get("description") or "A nuclei U-Net from napari-nuclei-unet."),
        "",
        f"Architecture: `segmentation_models_pytorch.Unet` ({checkpoint.config.encoder_name} encoder), outputs "
        + ", ".join(f"`{o}`" for o in checkpoint.outputs) + " (sigmoid probabilities).",
        "",
        "## Input",
        f"Any 2D image, grey or RGB, of any size of at least 64 px (multiples of 32 run without padding). Normalised per image: "
        f"its {checkpoint.percentiles[0]:g} and {checkpoint.percentiles[1]:g} percentiles, pooled over the colour channels, map to 0 and 1, then clipped. "
        "Grey images are repeated into the three channels." if checkpoint.config.in_channels == 3 else "",
    ]
    if checkpoint.nucleus_diameter:
        lines += ["", f"Nuclei of about {checkpoint.nucleus_diameter:.0f} px diameter segment best (0.7-1.6x that without rescaling). "
                  "napari-nuclei-unet measures the nuclei and zooms the image to this size automatically."]  # fmt: skip
    lines += [
        "",
        "## From probabilities to nuclei (napari-nuclei-unet's post-processing)",
        f"1. Foreground: `foreground > t`, with `t` Otsu's threshold of the image's foreground probabilities (or a fixed value); "
        f"holes up to {post.hole_size} px are filled.",
        "2. Touching nuclei are split by a watershed of the distance transform of the foreground, from its h-maxima "
        f"(h = {post.h:g} px). With `--markers boundary` the seeds are the predicted interiors, `foreground - boundary`, instead.",
        f"3. Objects whose mean foreground probability is below the model's calibrated minimum confidence ({level:g}) are dropped, "
        f"as are objects smaller than {post.min_size} image pixels.",
        "",
        "The same steps run with `nuclei-unet segment IMAGE --model THIS.zip` (pip install napari-nuclei-unet), which also accepts "
        "the napari plugin's model picker.",
    ]
    if training:
        lines += ["", "## Training", f"Data: {training.get('data', 'not recorded')}.", f"Licences: {checkpoint.metadata.get('license', 'not recorded')}"]
    if metrics:
        lines += ["", "## Validation", f"Measured on {metrics.get('measured_on', 'validation images')} ({metrics.get('n_images', '?')} images):", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        names = {"kaggle_score": "DSB2018 score (mean AP over IoU 0.5-0.95)", "ap50": "AP@0.5", "f1_50": "F1@0.5", "dice": "Dice (pixels)"}
        lines += [f"| {label} | {metrics[key]:.3f} |" for key, label in names.items() if isinstance(metrics.get(key), (int, float))]
    return "\n".join(lines) + "\n"
