"""Read bioimage.io Model Zoo packages as models (writing them: :mod:`.bioimageio_export`).

:func:`read_package` takes a ``.zip``, or a folder with ``bioimageio.yaml``/``rdf.yaml``, parsed
with ``bioimageio.spec`` (format 0.4 packages are converted to 0.5 by it); ``Checkpoint.load``
turns the result into a checkpoint.

* A package whose ``pytorch_state_dict`` entry builds ``segmentation_models_pytorch.Unet``
  and carries our metadata (``config["napari-nuclei-unet"]``), or declares our percentile
  normalisation, loads as one of our checkpoints: it segments, calibrates and fine-tunes
  exactly as the checkpoint folder it was exported from.
* Any other 2D model with one image input and a foreground (optionally boundary) output
  runs through its own ONNX (CPU, ONNX Runtime) or TorchScript weights, with its own
  preprocessing, inside our tiling and post-processing (:class:`PackageNetwork`). It cannot be
  fine-tuned. Files a package names but does not hold (Zoo packages often point at remote
  weights) are treated as absent: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .devices import device_name
from .errors import InputError, ModelError, describe
from .forward import Forward, onnx_forward, torch_forward
from .io import channels_first, to_model_channels
from .onnx_backend import available as onnx_available
from .onnx_backend import cpu_threads
from .params import InputSizes, TilingParams

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
        self.zip: zipfile.ZipFile | None = None
        if path.is_file() and path.suffix.lower() == ".zip":
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise ModelError(f"{path}: not a readable zip file ({describe(error)})") from None
            names = [
                n
                for n in self.zip.namelist()
                if PurePosixPath(n).name in PACKAGE_FILES or n.endswith(".bioimageio.yaml")
            ]
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

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _description(path: Path, files: _PackageFiles):
    """The package's model description as bioimage.io format 0.5 (older packages are converted)."""
    from bioimageio.spec import load_model_description

    source = files.zip if files.zip is not None else Path(files.description)
    try:
        with quiet_spec_logging():
            return load_model_description(source, format_version="latest", perform_io_checks=False)
    except Exception as error:  # noqa: BLE001 (pydantic validation errors, YAML errors, unsupported types)
        raise ModelError(f"{path}: not a valid bioimage.io model description ({first_line(error)})") from None


def first_line(error: Exception) -> str:
    """One line for the user from a library's (often multi-line) error."""
    if callable(getattr(error, "errors", None)):  # pydantic's ValidationError: its first error, with where it is
        with contextlib.suppress(Exception):
            first = error.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            return f"{where + ': ' if where else ''}{first['msg']}"[:300]
    lines = [
        line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith("Invalid ")
    ]
    return (lines[0] if lines else describe(error))[:300]


@contextlib.contextmanager
def quiet_spec_logging():
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


@dataclass
class SmpPackage:
    """A package of an ``smp.Unet`` state_dict that loads as one of our checkpoints (``model.Checkpoint.load``)."""

    name: str
    kwargs: dict  # smp.Unet's arguments
    state: bytes  # the torch.save'd state_dict file
    state_file: str
    outputs: tuple[str, ...]
    metadata: dict  # ours (nuclei_unet.json) when the package carries it, else what the package says


def read_package(path: Path) -> SmpPackage | PackageNetwork:
    """What a bioimage.io package holds, as one of ours (:class:`SmpPackage`) or a foreign network (module
    docstring)."""
    path = Path(path)
    files = _PackageFiles(path)
    try:
        return _read(path, files)
    finally:
        files.close()  # every file needed has been read into memory


def _read(path: Path, files: _PackageFiles) -> SmpPackage | PackageNetwork:
    descr = _description(path, files)
    state_entry = descr.weights.pytorch_state_dict
    ours = _our_metadata(descr)
    percentiles = _percentiles(descr)
    if state_entry is not None and _builds_smp_unet(state_entry) and (ours or percentiles is not None):
        data = files.read(state_entry.source)
        if data is not None:
            metadata = ours or {
                "name": descr.name,
                "description": descr.description,
                "normalization": {"percentiles": list(percentiles)},
            }
            outputs = tuple((ours.get("config") or {}).get("outputs") or _output_names(descr.outputs[0]))
            return SmpPackage(
                descr.name, dict(state_entry.architecture.kwargs), data, str(state_entry.source), outputs, metadata
            )
    return PackageNetwork.from_description(path, descr, files)


def _our_metadata(descr) -> dict:
    extra = getattr(descr.config, "model_extra", None) or {}
    ours = extra.get(CONFIG_KEY)
    return dict(ours) if isinstance(ours, dict) else {}


def _builds_smp_unet(entry) -> bool:
    architecture = entry.architecture
    return (
        getattr(architecture, "import_from", "").split(".")[0] == SMP_LIBRARY and str(architecture.callable) == "Unet"
    )


def _percentiles(descr) -> tuple[float, float] | None:
    """Our normalisation, if that is what the package's input preprocessing is (scale_range pooled over channels, then
    clip)."""
    steps = [s for s in descr.inputs[0].preprocessing if s.id != "ensure_dtype"]
    if not steps or steps[0].id != "scale_range" or any(s.id != "clip" for s in steps[1:]):
        return None
    kwargs = steps[0].kwargs
    if kwargs.axes is not None and "channel" not in [str(a) for a in kwargs.axes]:
        return None  # per-channel percentiles: not ours (we pool the colour channels)
    return float(kwargs.min_percentile), float(kwargs.max_percentile)


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
        elif (
            "background" not in lowered
            and any(word in lowered for word in _FOREGROUND_WORDS)
            and "foreground" not in meanings
        ):
            meanings.append("foreground")
        else:
            meanings.append(f"unused:{name}")
    if "foreground" not in meanings:
        raise ModelError(
            f"{path}: cannot tell which output channel is the nuclei foreground (channels: {', '.join(names)})"
        )
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
                raise ModelError(
                    f"{path}: preprocessing ensure_dtype to {kwargs.dtype} is not supported (float32 only)"
                )
        elif kind == "zero_mean_unit_variance":
            steps.append(_Step("zero_mean_unit_variance", pooled="channel" in axes, eps=float(kwargs.eps)))
        elif kind == "scale_range":
            if getattr(kwargs, "reference_tensor", None) not in (None, tensor.id):
                raise ModelError(f"{path}: preprocessing scale_range with another tensor's statistics is not supported")
            steps.append(
                _Step(
                    "scale_range",
                    pooled="channel" in axes,
                    low=float(kwargs.min_percentile),
                    high=float(kwargs.max_percentile),
                    eps=float(kwargs.eps),
                )
            )
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
    """A package's preprocessing with its statistics taken from one image: crop ``(Y, X[, C])`` -> ``(C, Y, X)``
    float32."""

    channels: int
    operations: (
        tuple  # ("affine", gain, offset) with arrays broadcasting over (C, 1, 1), or ("clip", low, high), ("sigmoid",)
    )

    def __call__(self, plane) -> np.ndarray:
        return _apply(self.operations, to_model_channels(channels_first(plane), self.channels))

    @classmethod
    def from_image(cls, sample, channels: int, steps: list[_Step]) -> PackageNormalizer:
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
        return (
            "affine",
            np.asarray(step.gain, np.float32).reshape(shape),
            np.asarray(step.offset, np.float32).reshape(shape),
        )
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
            raise ModelError(
                f"{path}: its {what} has a {axis.type} axis {str(axis.id)!r}; only 2D (y, x) models run here"
            )
    if letters.count("y") != 1 or letters.count("x") != 1:
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
    one_at_a_time: bool = False  # the input has no batch axis, or one fixed at 1: batches are run image by image
    _sessions: dict = field(default_factory=dict, repr=False)
    _module: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_description(cls, path: Path, descr, files: _PackageFiles) -> PackageNetwork:
        if len(descr.inputs) != 1:
            raise ModelError(f"{path}: the model takes {len(descr.inputs)} inputs; only single-image models run here")
        tensor = descr.inputs[0]
        input_axes = _spatial_axes(path, tensor, "input")
        channel = next((a for a in tensor.axes if a.type == "channel"), None)
        in_channels = len(channel.channel_names) if channel is not None else 1
        batch = next((a for a in tensor.axes if a.type == "batch"), None)
        one_at_a_time = batch is None or getattr(batch, "size", None) == 1
        steps = _parse_preprocessing(path, tensor)
        index, output = _choose_output(path, descr.outputs)
        output_axes = _spatial_axes(path, output, "output")
        halo = 0
        for axis in output.axes:
            if axis.type != "space":
                continue
            size = axis.size
            if not (
                getattr(size, "tensor_id", None) == tensor.id
                and getattr(size, "axis_id", None) == axis.id
                and size.offset == 0
                and axis.scale == 1.0
            ):
                raise ModelError(
                    f"{path}: its output's {axis.id} axis is not the input's size and resolution; not supported"
                )
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
            present = (
                ", ".join(k for k in type(descr.weights).model_fields if getattr(descr.weights, k, None) is not None)
                or "none"
            )
            raise ModelError(
                f"{path}: no ONNX or TorchScript weights file in the package (its weights: {present}); nothing is "
                "downloaded"
            )
        return cls(
            name=descr.name,
            source=str(path),
            weights=weights,
            input_axes="".join(input_axes),
            output_axes="".join(output_axes),
            in_channels=in_channels,
            outputs=tuple(meanings[i] for i in keep),
            keep=keep,
            activation=activation,
            steps=steps,
            input_sizes=_input_sizes(path, tensor, halo),
            output_index=index,
            one_at_a_time=one_at_a_time,
        )

    # The network interface (``model.Network``), as our U-Net has it.
    can_finetune = False  # run as published: not an smp.Unet we can train or save
    config = None  # no smp.Unet config

    def describe(self) -> str:
        formats = " and ".join({"onnx": "ONNX", "torchscript": "TorchScript"}[k] for k in self.weights)
        return f"bioimage.io package ({formats} weights)"

    @property
    def module(self):
        """Its TorchScript weights as a torch module (:meth:`torch_module`)."""
        return self.torch_module()

    def forward(self, params: TilingParams, channels: int) -> tuple[Forward, int]:
        """Its ONNX weights under ONNX Runtime on the CPU, else its TorchScript module on the device
        (never re-exported or quantised: it runs as published)."""
        on_cpu = device_name(params.device) == "cpu"
        if on_cpu and self._runs_onnx(params.backend):
            return onnx_forward(self.onnx_logits(cpu_threads()), params.tta), len(self.keep)
        if "torchscript" not in self.weights:
            why = "choose device cpu" if not on_cpu else "install onnxruntime, or use backend auto"
            raise ModelError(
                f"{self.source}: the package has only ONNX weights, which run here with ONNX Runtime on the CPU; {why}"
            )
        return torch_forward(self.torch_module(), self.in_channels, replace(params, backend="torch"))

    def prepare(self, params: TilingParams) -> None:
        """Open what :meth:`forward` will run (its ONNX Runtime session, or its TorchScript) before the first tile."""
        self.forward(params, self.in_channels)

    def device_line(self, device, params: TilingParams) -> str:
        """What users see: the device, and on the CPU that the package's own weights run."""
        if str(device).split(":")[0] != "cpu":
            return str(device)
        if self._runs_onnx(params.backend):
            return "cpu (ONNX Runtime, the package's weights)"
        return "cpu (the package's TorchScript)"

    def _runs_onnx(self, backend: str) -> bool:
        return "onnx" in self.weights and backend != "torch" and onnx_available()

    def normalizer(self, sample, percentiles=None) -> PackageNormalizer:
        """Its own preprocessing, with the statistics taken from ``sample`` (``percentiles``: ours, not used)."""
        return PackageNormalizer.from_image(sample, self.in_channels, self.steps)

    # ------------------------------------------------------------------- running
    def onnx_logits(self, threads: int):
        """The ONNX weights under ONNX Runtime as a numpy forward pass: ``(N, C, H, W)`` in, logits of the kept channels
        out."""
        with self._lock:
            session = self._sessions.get(threads)
            if session is None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = max(1, threads)
                options.log_severity_level = 3
                try:
                    session = onnxruntime.InferenceSession(
                        self.weights["onnx"], options, providers=["CPUExecutionProvider"]
                    )
                except Exception as error:  # noqa: BLE001 (ONNX Runtime's own error types)
                    raise ModelError(
                        f"{self.source}: ONNX Runtime cannot load its ONNX weights ({first_line(error)})"
                    ) from None
                self._sessions[threads] = session
        name = session.get_inputs()[0].name

        def logits(batch: np.ndarray) -> np.ndarray:
            if self.one_at_a_time and len(batch) > 1:
                return np.concatenate([logits(batch[i : i + 1]) for i in range(len(batch))])
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
                    raise ModelError(
                        f"{self.source}: the package has no TorchScript weights; it runs on the CPU with ONNX Runtime "
                        "only"
                    )
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
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # torch.jit.load's deprecation notice: the format is the Zoo's
            scripted = torch.jit.load(io.BytesIO(network.weights["torchscript"]), map_location="cpu")
    except Exception as error:  # noqa: BLE001 (TorchScript's own errors for corrupt archives)
        raise ModelError(f"{network.source}: cannot load its TorchScript weights ({first_line(error)})") from None

    class PackageLogits(torch.nn.Module):
        """(N, C, H, W) in; logits of the kept channels out, as :meth:`PackageNetwork._logits`."""

        def __init__(self):
            super().__init__()
            self.scripted = scripted
            self.output_channels = len(network.keep)

        def forward(self, batch):
            if network.one_at_a_time and batch.shape[0] > 1:
                return torch.cat([self(batch[i : i + 1]) for i in range(batch.shape[0])])
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
