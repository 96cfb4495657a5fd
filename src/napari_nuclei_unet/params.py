"""The parameter dataclasses: every default and help text lives here, once.

The CLI's options and the widgets' controls are built from these fields. This module
imports nothing heavy (no numpy, no torch), so ``nuclei-unet --help`` and parser
construction stay instant.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace

Threshold = float | str  # a value in (0, 1) or "auto"
Confidence = float | str  # a value in [0, 1), or "auto": the model's calibrated value


@dataclass(frozen=True)
class InputSizes:
    """The spatial input sizes a network accepts: ``minimum + n * step`` for any n >= 0, or
    only ``minimum`` when ``fixed`` (bioimage.io's parameterized and fixed sizes; ours: any
    multiple of 32). ``halo``: output pixels at each border the network declares unreliable;
    tiles then overlap by at least twice that."""

    minimum: int = 32
    step: int = 32
    fixed: bool = False
    halo: int = 0

    def fit(self, length: int) -> int:
        """The smallest accepted size that holds ``length`` pixels (for a fixed size: that size)."""
        if self.fixed or length <= self.minimum:
            return self.minimum
        return self.minimum + int(math.ceil((length - self.minimum) / self.step)) * self.step


@dataclass
class TilingParams:
    """How to cut the image and run the network."""

    tile_size: int = field(
        default=1024,
        metadata={"help": "tile edge in pixels (smaller tiles use less memory)", "min": 128, "max": 8192, "step": 32},
    )
    overlap: int = field(
        default=64, metadata={"help": "overlap between tiles in pixels", "min": 0, "max": 1024, "step": 16}
    )
    batch_size: int = field(default=1, metadata={"help": "tiles per network call"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"})
    tta: bool = field(default=False, metadata={"help": "test-time augmentation (the 4 flips: four network passes)"})
    amp: bool = True  # mixed precision on CUDA only
    # GPUs always use torch.
    backend: str = field(
        default="auto",
        metadata={
            "help": "CPU inference engine: auto = ONNX Runtime when installed (faster than torch), else PyTorch",
            "choices": ("auto", "torch", "onnx"),
        },
    )
    # PyTorch and GPUs always use float32 (GPUs with fp16 autocast when ``amp``).
    precision: str = field(
        default="int8",
        metadata={
            "help": "network precision with ONNX Runtime on the CPU: int8 (faster, as accurate: docs/performance.md) "
            "or float32 (as trained)",
            "choices": ("int8", "float32"),
        },
    )


@dataclass
class PostprocessParams:
    """Parameters users tune live; changing them never re-runs the network.

    ``threshold`` and ``min_confidence`` may be "auto" here; :func:`instances` takes them
    only as numbers. ``segment.resolve`` fills in the model's min confidence, and
    ``plane.label_plane`` the threshold of each plane (:func:`with_threshold`).
    """

    threshold: Threshold = field(
        default="auto",
        metadata={
            "help": "foreground probability threshold in (0, 1), or auto (Otsu's, kept within [0.3, 0.7])",
            "min": 0.05,
            "max": 0.95,
            "step": 0.01,
        },
    )
    min_size: int = field(
        default=15, metadata={"help": "remove nuclei smaller than this many image pixels", "min": 0, "max": 100000}
    )
    hole_size: int = field(
        default=64,
        metadata={
            "help": "fill holes up to this many pixels, at the scale the network runs at (they follow the nuclei when "
            "the image is rescaled)"
        },
    )
    markers: str = field(
        default="auto",
        metadata={
            "help": "watershed markers: distance-transform peaks of the mask (distance), of the mask cut along the "
            "model's predicted boundaries (boundary), or its predicted nucleus centres (centre; models with a centre "
            "output); auto: the model's choice for the image type",
            "choices": ("auto", "distance", "boundary", "centre"),
        },
    )
    # boundary markers: boundary probability at which the mask is cut; centre markers: centre probability of a
    # marker. "auto": the level chosen for the method (postprocess.MARKER_THRESHOLDS).
    marker_threshold: Threshold = "auto"
    h: float = field(
        default=0.5,
        metadata={
            "help": "h-maxima height for distance and boundary markers, in pixels at the scale the network runs at "
            "(higher splits fewer nuclei)",
            "min": 0.0,
            "max": 20.0,
            "step": 0.1,
        },
    )
    min_confidence: Confidence = field(
        default="auto",
        metadata={
            "help": "drop objects whose mean foreground probability is below this (folds, debris), at most 40% of an "
            "image's objects, the least sure first; auto: the level calibrated for the model, 0: keep all",
            "min": 0.0,
            "max": 0.95,
            "step": 0.01,
        },
    )


AUTO = "auto"
STAINS = (AUTO, "none", "hematoxylin", "brightest")
IMAGE_TYPES = (AUTO, "fluorescence", "brightfield", "tissue")
# How a stack's first axis is read: a Z-stack (one 3D labelling) or separate planes (a time-lapse,
# a set of fields; each plane its own labelling); "tz": a time-lapse of Z-stacks (T, Z, Y, X), each time point
# labelled in 3D on its own (segment.segment_time_points). "auto": the file's or layer's axes say, else planes.
STACKS = (AUTO, "z", "planes", "tz")


@dataclass
class BlockParams:
    """When and how a plane too large to hold whole is segmented block by block (``blocks``)."""

    block_size: int = field(
        default=2048, metadata={"help": "core of a network block, pixels, for planes segmented block by block"}
    )
    # Planes with more pixels than this go block by block (3 blocks of 2048 x 2048: 12.6 MP).
    large_plane: int = field(
        default=3 * 2048 * 2048,
        metadata={"help": "planes with more pixels than this are segmented block by block (flat memory)"},
    )

    # Z-stacks with more voxels than this are labelled in 3D block by block (60 x 1024 x 1024 fits whole).
    large_volume: int = field(
        default=64 * 2**20,
        metadata={"help": "Z-stacks with more voxels than this are labelled in 3D block by block (flat memory)"},
    )

    def is_large(self, shape: tuple[int, ...]) -> bool:
        """Whether a plane of ``(height, width, ...)`` goes block by block."""
        return int(shape[0]) * int(shape[1]) > self.large_plane

    def is_large_volume(self, shape: tuple[int, ...]) -> bool:
        """Whether a Z-stack of ``(depth, height, width, ...)`` is labelled block by block."""
        return int(shape[0]) * int(shape[1]) * int(shape[2]) > self.large_volume


def split_channel_axis(axes: str) -> tuple[str, int | None]:
    """``axes`` without a channel axis C that comes before Y and X (ImageJ's CYX and ZCYX, OME's CZYX), and
    where it was; C last (YXC) is colour and stays."""
    axes = axes.upper()
    position = axes.find("C")
    if position < 0 or position >= len(axes) - 2:
        return axes, None
    return axes[:position] + axes[position + 1 :], position


def stack_of_axes(axes: str) -> str:
    """``SegmentParams.stack`` for an axes string (ImageJ/OME letters, e.g. ZYX): "z" for a Z-stack, "planes" for a
    time-lapse or a plain sequence of planes, "tz" for a time-lapse of Z-stacks, "auto" for a single plane. A channel
    axis before Y and X (CYX, ZCYX) is left out: one channel is segmented (``SegmentParams.channel``)."""
    axes, _ = split_channel_axis(axes)
    if axes in ("YX", "YXC", "YXS"):
        return AUTO
    if axes == "TZYX":
        return "tz"
    if len(axes) in (3, 4) and axes[1:3] == "YX" and axes[3:] in ("", "C", "S"):
        if axes[0] == "Z":
            return "z"
        if axes[0] in "TIQ":  # time, or planes of no stated kind
            return "planes"
    raise ValueError(
        f"axes {axes!r} not understood: one of ZYX, TYX (each with C last for colour, or C before YX for channels), "
        "TZYX (a time-lapse of Z-stacks; TZCYX with channels), YX, YXC or CYX"
    )


@dataclass
class SegmentParams:
    """Everything that decides a segmentation, grouped as the user sees it.

    Defaults live here; the CLI's options and the widget's controls are built from them.
    """

    tiling: TilingParams = field(default_factory=TilingParams)
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    # Typical nucleus diameter in the image, pixels: "auto" estimates it, a number is taken as
    # given, None runs the network at the image's own scale.
    diameter: float | str | None = field(
        default=AUTO,
        metadata={
            "help": "typical nucleus diameter in pixels: auto (estimated per image), a number, or none (no rescaling); "
            "images are rescaled so nuclei match the model's training size",
            "min": 0.0,
            "max": 1000.0,
            "step": 1.0,
        },
    )
    # What the image shows: dark-field fluorescence, grey brightfield, or stained tissue (H&E,
    # IHC). "auto" detects it per image (data.image_type); it decides an "auto" stain.
    image_type: str = field(
        default=AUTO,
        metadata={
            "help": "fluorescence, brightfield or tissue (stained: H&E, IHC); auto: detected per image. Decides what "
            "an auto stain uses",
            "choices": IMAGE_TYPES,
        },
    )
    stain: str = field(
        default=AUTO,
        metadata={
            "help": "hematoxylin: segment the hematoxylin channel of RGB images (e.g. DAB immunohistochemistry); "
            "brightest: each pixel's brightest colour channel (pseudo-coloured fluorescence: Hoechst in blue, GFP in "
            "green); none: the image as is; auto: brightest for colour fluorescence, else what the model does best on "
            "for the image type",
            "choices": STAINS,
        },
    )
    blocks: BlockParams = field(default_factory=BlockParams)
    stack: str = field(
        default=AUTO,
        metadata={
            "help": "a stack's first axis: z (a Z-stack: nuclei labelled in 3D, one ID through the planes), planes "
            "(time-lapse or separate fields: each plane labelled on its own), tz (a time-lapse of Z-stacks: each "
            "time point labelled in 3D on its own), or auto (the file's axes, else planes)",
            "choices": STACKS,
        },
    )
    # Which channel holds the nuclei, in a file with channels (batch.segment_file): a number, or "auto"
    # (io.guess_nuclear_channel). In napari the Segment widget's channel control does this.
    channel: int | str = field(
        default=AUTO,
        metadata={
            "help": "the nuclear channel of an image with channels (a C axis in the file's or --axes' axes, e.g. an "
            "ImageJ hyperstack; or 2 channels last, e.g. grey + alpha): its number from 0, or auto: the channel "
            "that looks most like a nuclear stain"
        },
    )
    # Where a file's channel axis is when the user says so (--axes CYX: 0); None: the file's axes say.
    channel_axis: int | None = None
    # Z, Y, X voxel size of a Z-stack, in any one unit: only the z step over the pixel size is used.
    voxel_size: tuple[float, float, float] | None = field(
        default=None, metadata={"help": "a Z-stack's voxel size Z,Y,X in any one unit (e.g. 2.18,1,1); none: cubic"}
    )

    def network_key(self) -> NetworkKey:
        """The parameters that change the probabilities (post-processing does not)."""
        return NetworkKey(self.tiling, self.diameter, self.image_type, self.stain, self.stack)


@dataclass(frozen=True)
class NetworkKey:
    """What decides a network's output for an image: runs with equal keys share their probabilities."""

    tiling: TilingParams
    diameter: float | str | None
    image_type: str
    stain: str
    stack: str = AUTO  # a Z-stack's planes share one normaliser


def _train(default, help: str, flag: str | None = None, **metadata):
    """A :class:`TrainConfig` field shown as a ``nuclei-unet train`` option (``flag``, else ``--name``; a
    setting that is on by default gets ``--no-name``), with ``min``/``max``/``step`` for widget controls."""
    return field(default=default, metadata={"help": help, "flag": flag, **metadata})


@dataclass
class TrainConfig:
    """Training parameters (training from scratch); :data:`FINETUNE_DEFAULTS` has those for fine-tuning."""

    epochs: int = _train(20, "epochs", min=1, max=1000)
    iterations_per_epoch: int = _train(50, "iterations per epoch", flag="--iterations", min=1, max=10000)
    max_minutes: float | None = _train(None, "stop after this much wall-clock time (validates and saves)", type=float)
    patch_size: int = _train(256, "training patch edge, pixels", min=64, max=1024, step=32)
    batch_size: int = _train(8, "patches per step", min=1, max=64)
    learning_rate: float = _train(1e-3, "peak learning rate (AdamW)", flag="--lr", min=1e-6, max=1e-1, step=1e-4)
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    augment: bool = _train(True, "joint image/label augmentation (flips, rotations, scale, colour)")
    scale_range: tuple[float, float] = _train((0.5, 2.0), "zoom range of the scale augmentation, as LOW,HIGH")
    # Show each image's nuclei at the zoom segmentation will run them at (their median size
    # against the model's reference, segment.rescale_factor); scale_range then jitters around it.
    zoom_to_reference: bool = _train(False, "show each image's nuclei at the zoom segmentation will use (fine-tuning)")
    # What the network sees when an image taken at low magnification is zoomed up to its
    # nuclei's training size. Off by default (model card: what it gained and cost).
    low_resolution: float = _train(
        0.0, "share of patches blurred as if taken at up to 2.5x lower magnification (experimental; model card)"
    )
    # Stained-tissue colour variation between labs: each RGB patch's hematoxylin, eosin and DAB
    # concentrations (HED space) are scaled and shifted a little (Tellez et al., MedIA 2019).
    hed_jitter: float = _train(
        0.25, "stain colour augmentation of RGB tissue: HED concentrations scaled by up to +-this (0: off)"
    )
    # Touching nuclei merge where the network misses the line between them; the U-Net paper's weight map
    # (Ronneberger et al. 2015) weighs the pixels between touching cells up for the same reason.
    touch_weight: float = _train(
        0.0, "extra loss weight of the boundary pixels where two nuclei touch (0: off)", min=0.0, max=50.0, step=0.5
    )
    blur_noise: float = _train(0.2, "share of patches blurred, and of patches with added noise")
    noise_sigma: float = _train(
        0.08, "strongest added noise (standard deviation, in normalised intensity)", min=0.0, max=0.5, step=0.01
    )
    # Widefield fields are rarely lit evenly: vignetting, uneven excitation, out-of-focus haze.
    uneven_illumination: float = _train(
        0.0, "share of patches lit unevenly: a smooth ramp of brightness or background across the patch (0: off)"
    )
    invert_grey: float = _train(0.15, "share of grey patches shown inverted (fluorescence as brightfield and back)")
    # Fluorescence is often saved pseudo-coloured (Hoechst as blue on black, GFP as green).
    tint_grey: float = _train(0.0, "share of grey patches shown tinted blue, green, red or magenta (pseudo-colour)")
    # Without it, a few tissue tiles would be drowned by hundreds of fluorescence images.
    balance_image_types: bool = _train(
        True,
        "give every image type (fluorescence, brightfield, stained tissue) an equal share of the patches, and pick "
        "the best epoch by the mean of the per-type scores",
        flag="--no-balance-types",
    )
    val_every: int = _train(1, "validate every N epochs", min=1)
    val_fraction: float = _train(
        0.15, "share of the images held out for validation when none are given", min=0.0, max=0.9, step=0.05
    )
    device: str = _train("auto", "device: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, mps")
    seed: int = _train(0, "random seed (the same seed repeats a run)")
    threads: int | None = _train(None, "CPU threads for torch", type=int)
    # For fine-tuning on a few images of one kind: re-estimating the statistics from those
    # images alone breaks the model on every other kind.
    freeze_batchnorm: bool = _train(
        False, "keep the starting model's BatchNorm statistics (fine-tuning on a few images)"
    )
    # The encoder's general features stay as they were.
    freeze_encoder: bool = _train(False, "train only the decoder and head (fine-tuning)")
    # L2-SP (Li et al., ICML 2018): a few corrected images adapt the model without it forgetting the rest.
    anchor_weight: float = _train(0.0, "L2-SP pull towards the starting weights (fine-tuning; 0: off)")
    # Learning without forgetting across image types: every patch is also shown restyled as the
    # other types, where the model is held to the starting model's output.
    distill_weight: float = _train(
        0.0,
        "hold the other image types to the starting model's output, seen on restyled patches (fine-tuning; 0: off)",
    )
    # Weight-space ensembling (WiSE-FT, Wortsman et al., CVPR 2022): fine-tuning fits a few images'
    # outlines and also learns their quirks; mixing the start back in keeps more of the first.
    start_weight_share: float = _train(
        0.0,
        "share of the starting weights mixed into the saved model, WiSE-FT (fine-tuning; 0: the trained weights)",
        min=0.0,
        max=0.9,
        step=0.05,
    )
    # Weights and optimiser state stay float32 either way (speed: docs/performance.md).
    precision: str = _train(
        "auto",
        "training arithmetic: auto = bfloat16 autocast on CPUs with native bfloat16, float32 elsewhere",
        choices=("auto", "float32", "bfloat16"),
    )
    calibrate: bool = _train(
        True,
        "calibrate the model's min confidence on the validation images (with the training images when there are "
        "few) after training",
    )


# Fine-tuning a trained model on a few corrected images: the Fine-tune widget's defaults, measured
# with benchmarks/finetune.py (docs/user-guide.md, section 8). A held-out quarter picks the epoch.
FINETUNE_DEFAULTS = TrainConfig(
    epochs=10,
    iterations_per_epoch=20,
    learning_rate=3e-4,
    batch_size=4,
    patch_size=256,
    warmup_iterations=20,
    freeze_batchnorm=True,
    freeze_encoder=False,
    anchor_weight=0.0,
    distill_weight=1.0,
    zoom_to_reference=True,
    scale_range=(0.8, 1.25),
    start_weight_share=0.25,
    val_fraction=0.25,
)


@dataclass
class ExportParams:
    """What goes into an exported bioimage.io package beyond the model itself."""

    authors: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "package author as 'Name;Affiliation;ORCID' (affiliation and ORCID optional); repeat for several "
            "(default: the model's authors, else your login name)"
        },
    )
    cite: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "extra citation as 'text;DOI or URL'; repeat for several (U-Net, DSB2018 and smp are always cited)"
        },
    )
    license: str = field(
        default="BSD-3-Clause",
        metadata={"help": "SPDX licence of the weights (mind the training data's licences: see the model card)"},
    )
    test_image: str | None = field(
        default=None,
        metadata={
            "help": "image the test tensors and cover are made from (a 256x256 crop; default: scikit-image's "
            "immunohistochemistry sample)"
        },
    )
    run_test: bool = field(
        default=True, metadata={"help": "run bioimageio.core's model test on the package before writing it"}
    )


# ``nuclei-unet train --recipe``: whose defaults the options take. "auto" fine-tunes a given model on up to
# FINETUNE_MAX_IMAGES images (a user's corrections) and trains on larger sets.
TRAIN_RECIPES = ("auto", "scratch", "finetune")
FINETUNE_MAX_IMAGES = 20


def finetune_config(**overrides) -> TrainConfig:
    """A :class:`TrainConfig` with the fine-tuning defaults, ``overrides`` applied."""
    return replace(FINETUNE_DEFAULTS, **overrides)


def cli_fields(owner: type) -> list:
    """The fields of a parameter dataclass that the CLI shows as options (those with a help text)."""
    return [spec for spec in fields(owner) if spec.metadata.get("help")]


def field_default(owner: type, name: str):
    """The default of field ``name`` of parameter dataclass ``owner``."""
    spec = {f.name: f for f in fields(owner)}[name]
    return spec.default_factory() if spec.default is MISSING else spec.default


def field_metadata(owner: type, name: str) -> dict:
    """The ``help`` (and ``choices``, ``min``/``max``/``step``) of field ``name``: shared by ``--help`` and the
    widgets' tooltips and control ranges."""
    return dict({f.name: f for f in fields(owner)}[name].metadata)
