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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .devices import device_name, resolve_device
from .errors import InputError, ModelError, describe
from .forward import Forward, tta_forward
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


def _processing(path: Path, tensor, steps, what: str) -> tuple:
    """bioimage.io core's operators for a tensor's pre- or postprocessing steps (ensure_dtype to float only)."""
    from bioimageio.core.proc_ops import get_proc

    operators = []
    for step in steps:
        kwargs = getattr(step, "kwargs", None)
        if step.id == "ensure_dtype":
            if str(kwargs.dtype) not in ("float32", "float64"):
                raise ModelError(f"{path}: {what} ensure_dtype to {kwargs.dtype} is not supported (float32 only)")
            continue
        if getattr(kwargs, "reference_tensor", None) not in (None, tensor.id):
            raise ModelError(f"{path}: {what} {step.id} with another tensor's statistics is not supported")
        try:
            operators.append(get_proc(step, tensor))
        except (NotImplementedError, ValueError, TypeError) as error:
            raise ModelError(f"{path}: {what} {step.id!r} is not supported here ({first_line(error)})") from None
    return tuple(operators)


@dataclass(frozen=True)
class PackageNormalizer:
    """A package's preprocessing (bioimage.io core's operators) with its statistics taken from one whole image, so
    that every tile is normalised alike: crop ``(Y, X[, C])`` -> ``(C, Y, X)`` float32."""

    channels: int
    axes: tuple  # the input tensor's axis ids, in its order
    member: Any  # the input tensor's id
    operators: tuple
    stat: dict  # the image's statistics the operators read

    @classmethod
    def from_image(cls, sample, network: PackageNetwork) -> PackageNormalizer:
        from bioimageio.core.stat_calculators import compute_measures

        array = to_model_channels(channels_first(sample), network.in_channels)
        if not np.isfinite(array).all():
            raise InputError("image contains NaN or infinite values")
        member, operators = network.input_member, network.preprocessing
        measures = {m for operator in operators for m in operator.required_measures}
        stat = compute_measures(measures, [_sample(array[None], network.input_axes, member)])
        return cls(network.in_channels, network.input_axes, member, operators, dict(stat))

    def __call__(self, plane) -> np.ndarray:

        array = to_model_channels(channels_first(plane), self.channels)
        sample = _sample(array[None], self.axes, self.member, self.stat)
        for operator in self.operators:
            operator(sample)
        return _canonical(sample.members[self.member], self.axes)[0]


def _sample(batch: np.ndarray, axes: tuple, member, stat: dict | None = None):
    """``(N, C, Y, X)`` as a bioimage.io core sample of one tensor in ``axes``, with the statistics ``stat``."""
    from bioimageio.core import Sample

    return Sample(members={member: _tensor(batch, axes)}, stat=dict(stat or {}), id=None)


def _tensor(batch: np.ndarray, axes: tuple):
    """An ``(N, C, Y, X)`` array as a bioimage.io core tensor in ``axes`` (a missing batch or channel axis must be of
    size 1)."""
    from bioimageio.core import Tensor

    return Tensor.from_numpy(batch, dims=_bcyx(axes)).transpose(list(axes), extra_dims="squeeze")


def _canonical(tensor, axes: tuple) -> np.ndarray:
    """A bioimage.io core tensor (axes ``axes``, its package's) as float32 ``(N, C, Y, X)``."""
    array = tensor.transpose(list(_bcyx(axes)), missing_dims="expand").data.values
    return np.ascontiguousarray(array, dtype=np.float32)


def _bcyx(axes: tuple) -> tuple:
    """The package's ids of the batch, channel, y and x axes (its own where it has them)."""
    from bioimageio.core import AxisId

    batch = next((a for a in axes if str(a) == "batch"), AxisId("batch"))
    channel = next((a for a in axes if str(a) not in ("batch", "y", "x")), AxisId("channel"))
    return (batch, channel, AxisId("y"), AxisId("x"))


def _spatial_axes(path: Path, tensor, what: str) -> tuple:
    """The tensor's axis ids (batch, channel, y, x, in its order); anything else is a one-line error."""
    kinds = []
    for axis in tensor.axes:
        if axis.type == "space" and str(axis.id) in ("y", "x"):
            kinds.append(str(axis.id))
        elif axis.type in ("batch", "channel"):
            kinds.append(axis.type)
        else:
            raise ModelError(
                f"{path}: its {what} has a {axis.type} axis {str(axis.id)!r}; only 2D (y, x) models run here"
            )
    if kinds.count("y") != 1 or kinds.count("x") != 1:
        raise ModelError(f"{path}: its {what} does not have one y and one x axis")
    return tuple(axis.id for axis in tensor.axes)


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
    """A foreign package's network as our pipeline needs it: its preprocessing, tile sizes, and a forward
    pass that returns probabilities of the channels we use (foreground[, boundary]). What the package's
    pre- and postprocessing do, bioimage.io core's operators do."""

    name: str
    source: str
    weights: dict[str, bytes]  # "onnx" / "torchscript": the files present in the package
    input_axes: tuple  # axis ids, in the input tensor's order
    output_axes: tuple
    input_member: Any  # the tensors' ids
    output_member: Any
    in_channels: int
    outputs: tuple[str, ...]  # meanings of the channels we keep, in order
    keep: tuple[int, ...]  # their indices in the output tensor
    preprocessing: tuple  # bioimage.io core operators
    postprocessing: tuple  # sigmoid or softmax (raw outputs to probabilities), or nothing
    input_sizes: InputSizes
    output_index: int = 0  # which of the model's outputs
    one_at_a_time: bool = False  # the input has no batch axis, or one fixed at 1: batches are run image by image
    _sessions: dict = field(default_factory=dict, repr=False)
    _scripted: dict = field(default_factory=dict, repr=False)  # TorchScript modules by device
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_description(cls, path: Path, descr, files: _PackageFiles) -> PackageNetwork:
        if len(descr.inputs) != 1:
            raise ModelError(f"{path}: the model takes {len(descr.inputs)} inputs; only single-image models run here")
        tensor = descr.inputs[0]
        input_axes = _spatial_axes(path, tensor, "input")
        channel = next((a for a in tensor.axes if a.type == "channel"), None)
        batch = next((a for a in tensor.axes if a.type == "batch"), None)
        index, output = _choose_output(path, descr.outputs)
        meanings = _output_meanings(path, _output_names(output))
        keep = tuple(i for i, m in enumerate(meanings) if not m.startswith("unused:"))
        _check_probabilities(path, output)
        return cls(
            name=descr.name,
            source=str(path),
            weights=_runnable_weights(path, descr, files),
            input_axes=input_axes,
            output_axes=_spatial_axes(path, output, "output"),
            input_member=tensor.id,
            output_member=output.id,
            in_channels=len(channel.channel_names) if channel is not None else 1,
            outputs=tuple(meanings[i] for i in keep),
            keep=keep,
            preprocessing=_processing(path, tensor, tensor.preprocessing, "input preprocessing"),
            postprocessing=_processing(path, output, output.postprocessing, "output postprocessing"),
            input_sizes=_input_sizes(path, tensor, _output_halo(path, tensor, output)),
            output_index=index,
            one_at_a_time=batch is None or getattr(batch, "size", None) == 1,
        )

    # The network interface (``model.Network``), as our U-Net has it.
    can_finetune = False  # run as published: not an smp.Unet we can train or save
    config = None  # no smp.Unet config

    def describe(self) -> str:
        formats = " and ".join({"onnx": "ONNX", "torchscript": "TorchScript"}[k] for k in self.weights)
        return f"bioimage.io package ({formats} weights)"

    @property
    def module(self):
        """Its TorchScript weights as a torch module (on the CPU)."""
        return self._torchscript("cpu")

    def forward(self, params: TilingParams, channels: int) -> tuple[Forward, int]:
        """Its ONNX weights under ONNX Runtime on the CPU, else its TorchScript module on the device
        (never re-exported or quantised: it runs as published)."""
        on_cpu = device_name(params.device) == "cpu"
        if on_cpu and self._runs_onnx(params.backend):
            run = self._onnx_runner(cpu_threads())
        elif "torchscript" in self.weights:
            run = self._torchscript_runner(resolve_device(params.device))
        else:
            why = "choose device cpu" if not on_cpu else "install onnxruntime, or use backend auto"
            raise ModelError(
                f"{self.source}: the package has only ONNX weights, which run here with ONNX Runtime on the CPU; {why}"
            )
        probabilities = self._probabilities(run)
        return (lambda batch: tta_forward(probabilities, batch, params.tta, np.flip)), len(self.keep)

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
        return PackageNormalizer.from_image(sample, self)

    # ------------------------------------------------------------------- running
    def _probabilities(self, run):
        """``run`` (the package's array in, its raw output out) as ``(N, C, H, W)`` in, probabilities of the kept
        channels out, through the package's postprocessing."""

        def probabilities(batch: np.ndarray) -> np.ndarray:
            if self.one_at_a_time and len(batch) > 1:
                return np.concatenate([probabilities(batch[i : i + 1]) for i in range(len(batch))])
            raw = run(np.ascontiguousarray(_tensor(batch, self.input_axes).data.values, dtype=np.float32))
            if isinstance(raw, (tuple, list)):
                raw = raw[self.output_index]
            from bioimageio.core import Sample, Tensor

            output = Tensor.from_numpy(np.asarray(raw, np.float32), dims=self.output_axes)
            sample = Sample(members={self.output_member: output}, stat={}, id=None)
            for operator in self.postprocessing:
                operator(sample)
            return _canonical(sample.members[self.output_member], self.output_axes)[:, list(self.keep)]

        return probabilities

    def _onnx_runner(self, threads: int):
        """The ONNX weights under ONNX Runtime: the package's input array in, its outputs out."""
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
        return lambda array: session.run(None, {name: array})

    def _torchscript_runner(self, device):
        """The TorchScript weights on ``device``: the package's input array in, its outputs out."""
        import torch

        scripted = self._torchscript(device)

        def run(array: np.ndarray):
            with torch.inference_mode():
                raw = scripted(torch.from_numpy(array).to(device))
            return (
                [r.float().cpu().numpy() for r in raw] if isinstance(raw, (tuple, list)) else raw.float().cpu().numpy()
            )

        return run

    def _torchscript(self, device):
        with self._lock:
            key = str(device)
            if key not in self._scripted:
                if "torchscript" not in self.weights:
                    raise ModelError(
                        f"{self.source}: the package has no TorchScript weights; it runs on the CPU with ONNX Runtime "
                        "only"
                    )
                self._scripted[key] = _load_torchscript(self, device)
            return self._scripted[key]


def _runnable_weights(path: Path, descr, files: _PackageFiles) -> dict[str, bytes]:
    """The package's ONNX and TorchScript weights files that it holds (none is downloaded)."""
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
    return weights


def _output_halo(path: Path, tensor, output) -> int:
    """The output's halo; its y and x must be the input's size and resolution."""
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
    return halo


def _choose_output(path: Path, outputs) -> tuple[int, Any]:
    if len(outputs) == 1:
        return 0, outputs[0]
    for index, tensor in enumerate(outputs):
        with contextlib.suppress(ModelError):
            _output_meanings(path, _output_names(tensor))
            return index, tensor
    raise ModelError(f"{path}: none of its {len(outputs)} outputs is recognisably a nuclei foreground")


def _check_probabilities(path: Path, output) -> None:
    """The output must be probabilities: as it is (range 0-1 or unstated), or after a sigmoid or softmax."""
    kinds = [s.id for s in output.postprocessing if s.id != "ensure_dtype"]
    if not kinds:
        data_range = getattr(getattr(output, "data", None), "range", None)
        if data_range is not None and tuple(data_range) not in ((0.0, 1.0), (None, None)):
            raise ModelError(f"{path}: its output's range {tuple(data_range)} is not a probability; not supported")
    elif kinds not in (["sigmoid"], ["softmax"]):
        raise ModelError(f"{path}: output postprocessing {', '.join(kinds)} is not supported (sigmoid or softmax only)")


def _load_torchscript(network: PackageNetwork, device):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # torch.jit.load's deprecation notice: the format is the Zoo's
            return torch.jit.load(io.BytesIO(network.weights["torchscript"]), map_location=device).eval()
    except Exception as error:  # noqa: BLE001 (TorchScript's own errors for corrupt archives)
        raise ModelError(f"{network.source}: cannot load its TorchScript weights ({first_line(error)})") from None
