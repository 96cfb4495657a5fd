"""U-Net checkpoints: build from a small config, save/load in segmentation-models-pytorch's format.

A checkpoint folder is what ``smp.Unet.save_pretrained`` writes (``config.json`` and
``model.safetensors``) plus our ``nuclei_unet.json``: what each output channel means, how
inputs are normalised, the reference nucleus diameter, and the training record.

Plain PyTorch ``state_dict`` files (``.pth``/``.pt``) of an ``smp.Unet`` load too, with
``torch.load(weights_only=True)`` (no arbitrary unpickling). The architecture is worked
out from the keys and shapes; when it can't be, the user names the encoder.

Nothing here downloads: encoders are built with ``encoder_weights=None`` unless a caller
explicitly asks for ``"imagenet"`` (which needs internet).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .devices import device_name, resolve_device
from .errors import ModelError, describe
from .forward import Forward, onnx_forward, torch_forward
from .io import Normalizer, default_mode
from .params import InputSizes, TilingParams

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METADATA_FILE = "nuclei_unet.json"
SMP_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
# Channel names the post-processing understands; "foreground" is required. "centre": each nucleus's
# distance to its edge over its largest (1 at its centre), for watershed markers that separate dense nuclei.
KNOWN_OUTPUTS = ("foreground", "boundary", "centre")
BUNDLED_MODEL_DIR = Path(__file__).parent / "models" / "default"
# What the network reads for each image type when the stain is "auto" (RGB images only), for
# models whose ``nuclei_unet.json`` records no ``stain_by_image_type`` (v1 was trained on
# DSB2018 alone: it segments H&E far better from the hematoxylin channel).
DEFAULT_STAIN_BY_IMAGE_TYPE = {"fluorescence": "none", "brightfield": "none", "tissue": "hematoxylin"}
# What smp.Unet takes when its arguments leave something out (a config.json or package written by others).
SMP_UNET_DEFAULTS = {
    "encoder_name": "resnet34",
    "encoder_depth": 5,
    "decoder_channels": (256, 128, 64, 32, 16),
    "in_channels": 3,
}
CANNOT_FINETUNE = "a bioimage.io package whose network is not an smp.Unet can segment, but cannot be fine-tuned here"


@dataclass
class ModelConfig:
    """What to build: a ``smp.Unet`` and the meaning of its output channels."""

    encoder_name: str = "resnet18"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    in_channels: int = 3
    outputs: tuple[str, ...] = ("foreground", "boundary")
    decoder_attention_type: str | None = None

    def __post_init__(self):
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        self.outputs = tuple(self.outputs)
        if "foreground" not in self.outputs:
            raise ModelError(f"model outputs {self.outputs} must include 'foreground'")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ModelError(
                f"decoder_channels {self.decoder_channels} must have encoder_depth={self.encoder_depth} entries"
            )

    @classmethod
    def from_smp(cls, arguments: dict, outputs: tuple[str, ...]) -> ModelConfig:
        """The config of an ``smp.Unet`` from its constructor arguments (a checkpoint's ``config.json``,
        a package's ``kwargs``); what they leave out takes smp.Unet's own defaults."""
        return cls(
            encoder_name=str(arguments.get("encoder_name", SMP_UNET_DEFAULTS["encoder_name"])),
            encoder_depth=int(arguments.get("encoder_depth", SMP_UNET_DEFAULTS["encoder_depth"])),
            decoder_channels=tuple(arguments.get("decoder_channels", SMP_UNET_DEFAULTS["decoder_channels"])),
            in_channels=int(arguments.get("in_channels", SMP_UNET_DEFAULTS["in_channels"])),
            outputs=outputs,
            decoder_attention_type=arguments.get("decoder_attention_type"),
        )

    def smp_arguments(self) -> dict:
        """The ``smp.Unet`` constructor arguments that build this network (no pretrained encoder)."""
        return {
            "encoder_name": self.encoder_name,
            "encoder_depth": self.encoder_depth,
            "encoder_weights": None,
            "decoder_channels": self.decoder_channels,
            "decoder_attention_type": self.decoder_attention_type,
            "in_channels": self.in_channels,
            "classes": len(self.outputs),
        }

    def build(self, encoder_weights: str | None = None) -> torch.nn.Module:
        import segmentation_models_pytorch as smp

        try:
            return smp.Unet(**{**self.smp_arguments(), "encoder_weights": encoder_weights})
        except (KeyError, ValueError, TypeError, AttributeError, AssertionError, RuntimeError) as error:
            raise ModelError(f"cannot build smp.Unet with encoder {self.encoder_name!r}: {describe(error)}") from None
        except OSError as error:  # weight download without internet
            raise ModelError(
                f"cannot download {encoder_weights} weights for {self.encoder_name!r} ({error}); use "
                "encoder_weights=None offline"
            ) from None


class Network(Protocol):
    """What segmenting needs of a network, whichever kind it is: our U-Net (:class:`UnetNetwork`) or a
    foreign bioimage.io package's (``model_zoo.PackageNetwork``). The pipeline asks these, never which kind."""

    outputs: tuple[str, ...]  # meaning of each output channel ("foreground", "boundary")
    in_channels: int
    input_sizes: InputSizes  # tile sizes it accepts
    can_finetune: bool  # ours can be trained and saved; a package runs as published
    config: ModelConfig | None  # the smp.Unet config (ours only)

    @property
    def module(self) -> torch.nn.Module: ...  # the torch module (built or loaded on first use)

    def normalizer(self, sample, percentiles: tuple[float, float]) -> Normalizer: ...

    def forward(self, params: TilingParams, channels: int) -> tuple[Forward, int]: ...

    def prepare(self, params: TilingParams) -> None: ...  # export / open sessions before the first tile

    def device_line(self, device, params: TilingParams) -> str: ...

    def describe(self) -> str: ...


class UnetNetwork:
    """Our smp.Unet. Its torch module is built when first asked for (:attr:`module`): building imports
    segmentation-models-pytorch (and timm and torchvision), which a CPU run whose export is cached on disk
    does not need. Until then the weights wait as they were read from their file."""

    can_finetune = True

    def __init__(self, config: ModelConfig, module=None, state: dict | None = None, path: Path | None = None):
        self.config = config
        self._module = module
        self._state = (state, path) if module is None else None  # weights (and their file) not yet in a module
        # Whether the module has been handed out: whoever took it may change its weights in place.
        self._lent = False
        self._digest: str | None = None

    outputs = property(lambda self: self.config.outputs)
    in_channels = property(lambda self: self.config.in_channels)
    input_sizes = InputSizes()  # any multiple of 32

    @property
    def built(self) -> bool:
        """Whether the torch module exists yet (a network whose export was on disk may never build it)."""
        return self._module is not None

    @property
    def module(self) -> torch.nn.Module:
        """The torch module, built on first use. Whoever takes it may change its weights, so from then on
        :meth:`weights_digest` reads them again each time."""
        self._lent = True
        return self._built_module()

    def build(self) -> None:
        """Build (and check) the torch module now, without handing it out."""
        self._built_module()

    def _built_module(self) -> torch.nn.Module:
        if self._module is None:
            (state, path), module = self._state, self.config.build()
            _load_strict(module, state, path, self.config)
            self._module, self._state = module.eval(), None
        return self._module

    def weights_digest(self) -> str:
        """Names the weights and architecture (``onnx_backend.weights_digest``): read once while the weights are
        this network's alone, at every call once the module has been handed out."""
        if self._digest is None or self._lent:
            from .onnx_backend import weights_digest

            state = self._module.state_dict() if self._module is not None else self._state[0]
            self._digest = weights_digest(state, json.dumps(asdict(self.config), sort_keys=True))
        return self._digest

    def copy(self, memo: dict | None = None) -> UnetNetwork:
        """A copy with its own built module, to train."""
        import copy

        return UnetNetwork(copy.deepcopy(self.config, memo), copy.deepcopy(self._built_module(), memo))

    def to(self, device) -> None:
        """Move the module to ``device``; on the CPU an unbuilt module stays unbuilt (its export may be on disk)."""
        if device_name(device) != "cpu" or self.built:
            self._built_module().to(device).eval()

    def normalizer(self, sample, percentiles: tuple[float, float]) -> Normalizer:
        return Normalizer.from_image(sample, self.in_channels, percentiles)

    def forward(self, params: TilingParams, channels: int) -> tuple[Forward, int]:
        """On the CPU its ONNX Runtime export (from the disk cache when there), else the torch module on the device."""
        if self.in_channels == channels and device_name(params.device) == "cpu":
            session = self._cpu_network(params)
            if session is not None:
                return onnx_forward(session, params.tta), session.out_channels
        return torch_forward(self.module, channels, params)

    def prepare(self, params: TilingParams) -> None:
        """Export (and quantise) the CPU network now, so that the first tile does not wait for it."""
        if device_name(params.device) == "cpu":
            self._cpu_network(params)

    def _cpu_network(self, params: TilingParams):
        """The ONNX Runtime network of the current weights, or None (PyTorch runs them)."""
        from .onnx_backend import onnx_network

        return onnx_network(self.weights_digest, self.in_channels, params.backend, params.precision, self._built_module)

    def device_line(self, device, params: TilingParams) -> str:
        from .onnx_backend import describe_device

        return describe_device(device, params.backend, params.precision)

    def describe(self) -> str:
        return f"Unet/{self.config.encoder_name}"


@dataclass
class Checkpoint:
    """A network plus everything needed to use it correctly: normalisation, nucleus size, provenance."""

    network: Network
    percentiles: tuple[float, float] = (1.0, 99.8)  # per-image normalisation of our U-Net's input
    # median equivalent diameter (px) of the nuclei it was trained on; None = unknown
    nucleus_diameter: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __deepcopy__(self, memo: dict) -> Checkpoint:
        """A copy to train: with its own built model; the runtime caches (exported networks) stay behind."""
        import copy

        if not self.can_finetune:
            raise ModelError(f"{self.name}: {CANNOT_FINETUNE}")
        return Checkpoint(
            network=self.network.copy(memo),
            percentiles=self.percentiles,
            nucleus_diameter=self.nucleus_diameter,
            metadata=copy.deepcopy(self.metadata, memo),
            source=self.source,
        )

    def with_outputs(self, outputs: tuple[str, ...]) -> Checkpoint:
        """A copy whose network has the output channels ``outputs``: the channels it had keep their weights (the
        same predictions), new ones start from a zero head (probability 0.5), to be trained. The rest is shared
        knowledge: every other weight is copied."""
        import copy

        import torch

        if not self.can_finetune:
            raise ModelError(f"{self.name}: {CANNOT_FINETUNE}")
        config = ModelConfig(**{**asdict(self.config), "outputs": tuple(outputs)})
        module = config.build()
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("segmentation_head.0.")}
        old = self.model.segmentation_head[0]
        weight, bias = torch.zeros_like(module.segmentation_head[0].weight), torch.zeros(len(config.outputs))
        with torch.no_grad():
            for row, name in enumerate(config.outputs):
                if name in self.outputs:
                    weight[row] = old.weight[self.outputs.index(name)].detach().cpu()
                    bias[row] = old.bias[self.outputs.index(name)].detach().cpu()
        state.update({"segmentation_head.0.weight": weight, "segmentation_head.0.bias": bias})
        module.load_state_dict(state)
        return Checkpoint(
            network=UnetNetwork(config, module.eval()),
            percentiles=self.percentiles,
            nucleus_diameter=self.nucleus_diameter,
            metadata=copy.deepcopy(self.metadata),
            source=self.source,
        )

    @classmethod
    def create(cls, config: ModelConfig | None = None, encoder_weights: str | None = None, **kwargs) -> Checkpoint:
        """A fresh, untrained checkpoint."""
        config = config or ModelConfig()
        return cls(network=UnetNetwork(config, config.build(encoder_weights)), **kwargs)

    @property
    def model(self) -> torch.nn.Module:
        """The network's torch module (see :attr:`UnetNetwork.module`)."""
        return self.network.module

    @property
    def config(self) -> ModelConfig | None:
        return self.network.config

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.network.outputs

    @property
    def can_finetune(self) -> bool:
        """Only our own smp.Unet can be trained; a foreign package's network is run as it is."""
        return self.network.can_finetune

    @property
    def input_sizes(self) -> InputSizes:
        """Tile sizes the network accepts (any multiple of 32 for ours; a package declares its own)."""
        return self.network.input_sizes

    def normalizer(self, sample) -> Normalizer:
        """How this network wants a plane normalised, with the statistics taken from ``sample`` (a strided view)."""
        return self.network.normalizer(sample, self.percentiles)

    def device_line(self, device, params: TilingParams) -> str:
        """The device as users see it, with the engine that runs this network there."""
        return self.network.device_line(device, params)

    @property
    def min_confidence(self) -> float:
        """Mean foreground probability below which this model's objects are dropped, as calibrated
        on its own data (``metadata["postprocess"]``); 0 (keep every object) when never calibrated."""
        return float((self.metadata.get("postprocess") or {}).get("min_confidence", 0.0))

    def stain_for(self, image_type: str) -> str:
        """The stain this model reads an RGB image of ``image_type`` in best (measured per model: model card)."""
        chosen = {**DEFAULT_STAIN_BY_IMAGE_TYPE, **(self.metadata.get("stain_by_image_type") or {})}
        return chosen.get(image_type, "none")

    def markers_for(self, image_type: str) -> str:
        """The watershed markers this model separates nuclei of ``image_type`` with best (chosen per model on the
        choosing sets: model card); distance markers for a model that records no choice."""
        return (self.metadata.get("markers_by_image_type") or {}).get(image_type, "distance")

    @property
    def name(self) -> str:
        return self.metadata.get("name") or (Path(self.source).name if self.source else "unsaved model")

    def summary(self) -> str:
        """One line for the user: name, architecture, training data and headline metric."""
        parts = [self.name, self.network.describe(), " + ".join(self.outputs)]
        training = self.metadata.get("training", {})
        if training.get("data"):
            parts.append(f"trained on {training['data']}")
        metrics = self.metadata.get("metrics", {})
        if "kaggle_score" in metrics:  # said with what it was measured on: a bare "val score" read as the README's
            images = (
                f" on its {metrics['n_images']} validation images"
                if metrics.get("n_images")
                else " on its validation images"
            )
            parts.append(f"DSB score {metrics['kaggle_score']:.3f}{images}")
        if self.nucleus_diameter:
            parts.append(f"nuclei ~{self.nucleus_diameter:.0f} px")
        if not self.can_finetune:
            parts.append("cannot be fine-tuned")
        return ", ".join(parts)

    # ---------------------------------------------------------------- saving
    def save(self, folder: str | os.PathLike, overwrite: bool = False, half: bool = False) -> Path:
        """Save as an SMP folder plus our metadata, atomically (a temp folder renamed into place).

        ``half`` stores fp16 weights (half the size); they load back as float32.
        """
        folder = Path(folder)
        if not self.can_finetune:
            raise ModelError(
                f"{self.name}: a bioimage.io package that is not an smp.Unet; it cannot be saved as a checkpoint folder"
            )
        if folder.exists() and not overwrite:
            raise ModelError(f"{folder}: already exists; choose another folder or allow overwriting")
        if folder.resolve() == BUNDLED_MODEL_DIR.resolve() and not os.environ.get("NUCLEI_UNET_WRITE_BUNDLED"):
            raise ModelError(f"{folder}: refusing to overwrite the bundled model")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            model = self.model
            if half:
                import copy

                model = copy.deepcopy(model).half()
            # The saved SMP config must never trigger a download when loaded elsewhere.
            hub_config = getattr(model, "_hub_mixin_config", None)
            saved_weights = hub_config.get("encoder_weights") if isinstance(hub_config, dict) else None
            if isinstance(hub_config, dict):
                hub_config["encoder_weights"] = None
            try:
                model.save_pretrained(tmp)
            finally:
                if isinstance(hub_config, dict):
                    hub_config["encoder_weights"] = saved_weights
            (tmp / METADATA_FILE).write_text(json.dumps(self._metadata_json(), indent=2) + "\n", encoding="utf-8")
            tmp.chmod(default_mode(directory=True))  # mkdtemp makes 0700
            for item in tmp.iterdir():
                item.chmod(default_mode())
            if folder.exists():
                # Replace file by file (each rename is atomic); other files in the folder,
                # such as a training log, stay.
                for item in tmp.iterdir():
                    os.replace(item, folder / item.name)
                tmp.rmdir()
            else:
                tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.source = str(folder)
        return folder

    def _metadata_json(self) -> dict:
        config = asdict(self.config)
        config["decoder_channels"] = list(config["decoder_channels"])
        config["outputs"] = list(config["outputs"])
        return {
            "format": "napari-nuclei-unet",
            "format_version": FORMAT_VERSION,
            "architecture": "Unet",
            "config": config,
            "normalization": {
                "method": "percentile",
                "percentiles": list(self.percentiles),
                "channels": self.config.in_channels,
            },
            "nucleus_diameter": self.nucleus_diameter,
            **self.metadata,
        }

    # --------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, path: str | os.PathLike, encoder: str | None = None, device: str | torch.device = "cpu"
    ) -> Checkpoint:
        """Load a checkpoint folder, a plain ``state_dict`` file (``encoder`` names its architecture) or a
        bioimage.io model package (a ``.zip``, or a folder or its ``bioimageio.yaml``/``rdf.yaml``)."""
        path = Path(path)
        if not path.exists():
            raise ModelError(f"{path}: no such model file or folder")
        from .model_zoo import is_package

        if is_package(path):
            return _load_package(path, device)
        if path.is_dir():
            checkpoint = _load_folder(path)
        elif path.suffix.lower() in (".pth", ".pt", ".ckpt", ".bin"):
            checkpoint = _load_state_dict_file(path, encoder)
        elif path.suffix.lower() == ".safetensors" or path.name == SMP_CONFIG_FILE:
            checkpoint = _load_folder(path.parent)
        else:
            raise ModelError(f"{path}: not a model (expected a checkpoint folder or a .pth state_dict)")
        checkpoint.network.to(device)  # a CPU network still as in its file stays unbuilt
        # A file picked inside a checkpoint folder stands for the folder.
        checkpoint.source = str(
            path.parent if path.is_file() and path.suffix.lower() in (".safetensors", ".json") else path
        )
        return checkpoint


def _load_package(path: Path, device) -> Checkpoint:
    """A bioimage.io package: one of our checkpoints when it holds an smp.Unet state_dict, else a foreign network."""
    from .model_zoo import SmpPackage, read_package

    package = read_package(path)
    source = str(path if path.suffix.lower() == ".zip" or path.is_dir() else path.parent)
    if isinstance(package, SmpPackage):
        checkpoint = _checkpoint_from_state(path, package)
        checkpoint.model.to(resolve_device(device)).eval()
    else:
        metadata = {
            "name": package.name,
            "imported_from": source,
            "stain_by_image_type": dict.fromkeys(DEFAULT_STAIN_BY_IMAGE_TYPE, "none"),
        }
        checkpoint = Checkpoint(network=package, metadata=metadata)
        if device_name(device) != "cpu":
            checkpoint.model.to(resolve_device(device)).eval()
    checkpoint.source = source
    return checkpoint


def _checkpoint_from_state(path: Path, package) -> Checkpoint:
    import io

    import torch

    try:
        state = torch.load(io.BytesIO(package.state), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (pickle/zip errors of a truncated file)
        raise ModelError(
            f"{path}: {package.state_file}: corrupt or not a weights-only state_dict ({describe(error)})"
        ) from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: {package.state_file}: not a state_dict")
    kwargs = package.kwargs
    try:
        config = ModelConfig.from_smp(kwargs, package.outputs)
    except (TypeError, ValueError, AttributeError) as error:
        raise ModelError(
            f"{path}: invalid smp.Unet arguments in its pytorch_state_dict entry ({describe(error)})"
        ) from None
    _check_declared_architecture(config, state, path)
    model = config.build()
    _load_strict(model, state, path, config)
    metadata = _extra_metadata(package.metadata)
    metadata.setdefault("name", package.name)
    network = UnetNetwork(config, model.eval())
    return Checkpoint(network=network, metadata=metadata, **_checked_metadata(path, package.metadata))


def bundled_model_path() -> Path | None:
    """The default model shipped in the package, or None if this build has none."""
    return BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / WEIGHTS_FILE).is_file() else None


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """``None``/``'default'`` -> the bundled model; anything else is taken as a path."""
    if model is None or str(model) == "default":
        bundled = bundled_model_path()
        if bundled is None:
            raise ModelError("no bundled default model in this installation; pass a model with --model PATH")
        return bundled
    return Path(model)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return data
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; not a segmentation-models-pytorch checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ModelError(f"{path}: corrupt JSON ({describe(error)})") from None
    except OSError as error:
        raise ModelError(f"{path}: cannot read ({error.strerror or describe(error)})") from None


def _load_folder(folder: Path) -> Checkpoint:
    smp_config = _read_json(folder / SMP_CONFIG_FILE)
    meta = _read_json(folder / METADATA_FILE) if (folder / METADATA_FILE).exists() else {}
    model_class = smp_config.get("_model_class", "Unet")
    if model_class != "Unet":
        raise ModelError(f"{folder}: a {model_class} checkpoint; only smp.Unet is supported")
    try:
        outputs = (meta.get("config") or {}).get("outputs") or _default_outputs(int(smp_config.get("classes", 1)))
        config = ModelConfig.from_smp(smp_config, tuple(str(o) for o in outputs))
    except (TypeError, ValueError, AttributeError) as error:
        raise ModelError(f"{folder / SMP_CONFIG_FILE}: invalid model config ({describe(error)})") from None
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{weights}: missing weights file")
    state = _read_safetensors(weights)
    _check_declared_architecture(config, state, folder / SMP_CONFIG_FILE)
    checked = _checked_metadata(folder / METADATA_FILE, meta)
    from .onnx_backend import is_cached

    network = UnetNetwork(config, state=state, path=weights)
    if not is_cached(network.weights_digest()):  # not exported before: build (and check) the model now
        network.build()
    return Checkpoint(network=network, metadata=_extra_metadata(meta), **checked)


def _read_safetensors(weights: Path) -> dict:
    """The tensors of a safetensors file, as numpy arrays when numpy has their dtype: reading them
    needs no torch, which a CPU run from the network cache then never imports (seconds of start-up)."""
    try:
        from safetensors.numpy import load_file

        return load_file(str(weights))
    except Exception:  # noqa: BLE001 (bfloat16 has no numpy dtype; a broken file fails below too)
        pass
    try:
        from safetensors.torch import load_file

        return load_file(str(weights))
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error types for truncated files)
        raise ModelError(f"{weights}: corrupt or truncated weights ({describe(error)})") from None


def _check_declared_architecture(config: ModelConfig, state: dict, path: Path) -> None:
    """The layer widths ``config.json`` declares must be those of the weights, checked before the
    model is built: a hostile or broken config could otherwise ask for a huge network."""
    declared = {f"decoder.blocks.{i}.conv1.0.weight": width for i, width in enumerate(config.decoder_channels)}
    declared["segmentation_head.0.weight"] = len(config.outputs)
    if not 1 <= config.in_channels <= 16 or not 1 <= config.encoder_depth <= 5:
        raise ModelError(
            f"{path}: in_channels {config.in_channels} / encoder_depth {config.encoder_depth} out of range (1-16 / 1-5)"
        )
    for key, width in declared.items():
        tensor = state.get(key)
        if tensor is None or tensor.ndim < 1 or int(tensor.shape[0]) != int(width):
            found = "absent" if tensor is None else tuple(tensor.shape)
            raise ModelError(
                f"{path}: weights do not match the config ({key}: {width} channels declared, the weights have {found})"
            )


def _checked_metadata(path: Path, meta: dict) -> dict:
    """The normalisation and nucleus size of ``nuclei_unet.json``, checked: a bad value is a one-line ModelError."""
    normalization = meta.get("normalization") or {}
    try:
        percentiles = tuple(float(p) for p in (normalization.get("percentiles") or (1.0, 99.8)))
        diameter = meta.get("nucleus_diameter")
        diameter = None if diameter is None else float(diameter)
        level = float((meta.get("postprocess") or {}).get("min_confidence", 0.0))
    except (TypeError, ValueError, AttributeError) as error:
        raise ModelError(f"{path}: invalid value ({describe(error)})") from None
    if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ModelError(
            f"{path}: normalization percentiles must be two numbers 0 <= low < high <= 100, got {list(percentiles)}"
        )
    if diameter is not None and not 0 < diameter < 1e4:
        raise ModelError(f"{path}: nucleus_diameter must be a positive number of pixels, got {diameter}")
    if not 0 <= level < 1:
        raise ModelError(f"{path}: postprocess.min_confidence must be in [0, 1), got {level}")
    stains = meta.get("stain_by_image_type") or {}
    if not isinstance(stains, dict) or not set(stains.values()) <= {"none", "hematoxylin", "brightest"}:
        raise ModelError(
            f"{path}: stain_by_image_type must map image types to none, hematoxylin or brightest, got {stains!r}"
        )
    markers = meta.get("markers_by_image_type") or {}
    outputs = set((meta.get("config") or {}).get("outputs") or ()) | {"distance"}
    if not isinstance(markers, dict) or not set(markers.values()) <= outputs & {"distance", "boundary", "centre"}:
        raise ModelError(
            f"{path}: markers_by_image_type must map image types to distance or one of the model's outputs boundary, "
            f"centre; got {markers!r}"
        )
    return {"percentiles": percentiles, "nucleus_diameter": diameter}


def _extra_metadata(meta: dict) -> dict:
    return {
        k: v
        for k, v in meta.items()
        if k not in ("format", "format_version", "architecture", "config", "normalization", "nucleus_diameter")
    }


def _default_outputs(classes: int) -> tuple[str, ...]:
    # Without our metadata, channel 0 is taken as foreground (as in the DSB2018 notebooks).
    return (
        ("foreground", "boundary", *[f"channel{i}" for i in range(2, classes)])[:classes]
        if classes > 1
        else ("foreground",)
    )


def _load_strict(model: torch.nn.Module, state: dict, path: Path, config: ModelConfig) -> None:
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise ModelError(
            f"{path}: weights do not match smp.Unet(encoder={config.encoder_name!r}, classes={len(config.outputs)}): "
            f"{detail}"
        )
    model.load_state_dict({k: torch.as_tensor(v).to(expected[k].dtype) for k, v in state.items()})


def _load_state_dict_file(path: Path, encoder: str | None) -> Checkpoint:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (pickle/zip errors for truncated or non-weights files)
        raise ModelError(f"{path}: corrupt, truncated or not a weights-only state_dict ({describe(error)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state_dict of tensors")
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    if "segmentation_head.0.weight" not in state:
        raise ModelError(f"{path}: not the weights of an smp.Unet (no segmentation_head)")
    try:
        blocks = sorted(
            {int(k.split(".")[2]) for k in state if k.startswith("decoder.blocks.") and ".conv1.0.weight" in k}
        )
        decoder_channels = tuple(int(state[f"decoder.blocks.{i}.conv1.0.weight"].shape[0]) for i in blocks)
        first_conv = next(v for k, v in state.items() if k.startswith("encoder.") and v.ndim == 4)
        classes = int(state["segmentation_head.0.weight"].shape[0])
    except (ValueError, IndexError, KeyError, StopIteration):
        raise ModelError(
            f"{path}: not the weights of an smp.Unet (its decoder or encoder layers are not where smp puts them)"
        ) from None
    if not decoder_channels or classes < 1:
        raise ModelError(f"{path}: not the weights of an smp.Unet (no decoder blocks)")
    attention = "scse" if any(".attention1.attention." in k for k in state) else None
    base = dict(
        encoder_depth=len(decoder_channels),
        decoder_channels=decoder_channels,
        in_channels=int(first_conv.shape[1]),
        outputs=_default_outputs(classes),
        decoder_attention_type=attention,
    )
    candidates = [encoder] if encoder else _encoder_candidates(state)
    if not candidates:
        raise ModelError(
            f"{path}: cannot tell the encoder from the weights; name it (CLI: --encoder, e.g. efficientnet-b3)"
        )
    for name in candidates:
        config = ModelConfig(encoder_name=name, **base)
        if encoder is None and not _encoder_matches(config, state):
            continue
        model = config.build()
        _load_strict(model, state, path, config)
        return Checkpoint(network=UnetNetwork(config, model), metadata={"name": path.stem, "imported_from": str(path)})
    raise ModelError(
        f"{path}: cannot tell the encoder from the weights; name it (CLI: --encoder, e.g. efficientnet-b3)"
    )


def _encoder_candidates(state: dict) -> list[str]:
    """Encoders whose key layout fits the state_dict, most common DSB2018 choices first."""
    keys = set(state)
    if any(k.startswith("encoder._blocks.") for k in keys):
        return [f"efficientnet-b{i}" for i in (3, 0, 1, 2, 4, 5, 6, 7)]
    if any(k.startswith("encoder.blocks.") for k in keys):
        return [f"timm-efficientnet-b{i}" for i in (3, 0, 1, 2, 4, 5, 6, 7)]
    if "encoder.layer1.0.conv1.weight" in keys:
        return [
            "resnet34",
            "resnet18",
            "resnet50",
            "resnet101",
            "resnet152",
            "resnext50_32x4d",
            "se_resnext50_32x4d",
            "se_resnet50",
        ]
    if any(k.startswith("encoder.features.") for k in keys):
        return ["mobilenet_v2", "vgg16_bn", "vgg16", "densenet121", "vgg11", "vgg13", "vgg19", "densenet169"]
    return []


def _encoder_matches(config: ModelConfig, state: dict) -> bool:
    """Compare only the encoder's keys and shapes (cheap: no decoder build, no weights)."""
    from segmentation_models_pytorch.encoders import get_encoder

    try:
        encoder = get_encoder(
            config.encoder_name, in_channels=config.in_channels, depth=config.encoder_depth, weights=None
        )
    except (
        KeyError,
        ValueError,
        TypeError,
        RuntimeError,
        AssertionError,
    ) as error:  # this encoder can't take that depth or input
        log.info("encoder %s does not fit (%s)", config.encoder_name, describe(error))
        return False
    expected = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items() if k.startswith("encoder.")}
    return expected == given
