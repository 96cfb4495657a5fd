"""The parameter dataclasses: every default and help text lives here, once.

The CLI's options and the widgets' controls are built from these fields. This module
imports nothing heavy (no numpy, no torch), so ``nuclei-unet --help`` and parser
construction stay instant.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

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

    tile_size: int = field(default=1024, metadata={"help": "tile edge in pixels (smaller tiles use less memory)"})
    overlap: int = field(default=64, metadata={"help": "overlap between tiles in pixels"})
    batch_size: int = field(default=1, metadata={"help": "tiles per network call"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"})
    tta: bool = field(default=False, metadata={"help": "test-time augmentation (4 flips; ~4x slower)"})
    amp: bool = True  # mixed precision on CUDA only
    # GPUs always use torch.
    backend: str = field(
        default="auto",
        metadata={
            "help": "CPU inference engine: auto = ONNX Runtime when installed (~2x faster than torch), else PyTorch",
            "choices": ("auto", "torch", "onnx"),
        },
    )
    # PyTorch and GPUs always use float32 (GPUs with fp16 autocast when ``amp``).
    precision: str = field(
        default="int8",
        metadata={
            "help": "network precision with ONNX Runtime on the CPU: int8 (network ~1.7x faster, same val DSB2018 "
            "score within 0.001) or float32 (as trained)",
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
        metadata={"help": "foreground probability threshold in (0, 1), or auto (Otsu's, kept within [0.3, 0.7])"},
    )
    min_size: int = field(default=15, metadata={"help": "remove nuclei smaller than this many image pixels"})
    hole_size: int = field(
        default=64,
        metadata={
            "help": "fill holes up to this many pixels, at the scale the network runs at (they follow the nuclei when "
            "the image is rescaled)"
        },
    )
    markers: str = field(
        default="distance",
        metadata={
            "help": "watershed markers: distance-transform peaks, or the model's predicted interiors",
            "choices": ("distance", "boundary"),
        },
    )
    marker_threshold: float = 0.5  # interior probability (foreground - boundary) for a marker
    h: float = field(
        default=0.5,
        metadata={
            "help": "h-maxima height for distance markers, in pixels at the scale the network runs at (higher splits "
            "fewer nuclei)"
        },
    )
    min_confidence: Confidence = field(
        default="auto",
        metadata={
            "help": "drop objects whose mean foreground probability is below this (folds, debris); auto: the level "
            "calibrated for the model, 0: keep all"
        },
    )


AUTO = "auto"
STAINS = (AUTO, "none", "hematoxylin")
IMAGE_TYPES = (AUTO, "fluorescence", "brightfield", "tissue")


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

    def is_large(self, shape: tuple[int, ...]) -> bool:
        """Whether a plane of ``(height, width, ...)`` goes block by block."""
        return int(shape[0]) * int(shape[1]) > self.large_plane


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
            "images are rescaled so nuclei match the model's training size"
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
            "help": "hematoxylin: segment the hematoxylin channel of RGB images (e.g. DAB immunohistochemistry); none: "
            "the image as is; auto: what the model does best on for the image type",
            "choices": STAINS,
        },
    )
    blocks: BlockParams = field(default_factory=BlockParams)

    def network_key(self) -> tuple:
        """Parameters that change the probabilities (post-processing does not)."""
        return (asdict(self.tiling), self.diameter, self.image_type, self.stain)


@dataclass
class TrainConfig:
    """Training parameters; defaults suit fine-tuning on a CPU laptop."""

    epochs: int = 20
    iterations_per_epoch: int = 50
    max_minutes: float | None = None
    patch_size: int = 256
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    augment: bool = True
    scale_range: tuple[float, float] = (0.5, 2.0)  # zoom factors of the scale augmentation
    # Show each image's nuclei at the zoom segmentation will run them at (their median size
    # against the model's reference, segment.rescale_factor); scale_range then jitters around it.
    zoom_to_reference: bool = False
    # Share of patches shown at up to 2.5x lower resolution, zoomed back up: what the network
    # sees when an image taken at low magnification is zoomed up to its nuclei's training size.
    # Off by default: 0.25 gained only 0.015 at x0.5 and made the size estimate overshoot (model card).
    low_resolution: float = 0.0
    # Stained-tissue colour variation between labs: each RGB patch's hematoxylin, eosin and DAB
    # concentrations (HED space) are scaled by up to +-this and shifted a little (Tellez et al.,
    # Medical Image Analysis 2019). 0: off.
    hed_jitter: float = 0.25
    # Share of patches blurred (Gaussian) and, independently, of patches with added noise.
    blur_noise: float = 0.2
    # Share of grey patches shown inverted: fluorescence as brightfield and back.
    invert_grey: float = 0.15
    # Draw patches so each image type (fluorescence, brightfield, stained tissue) gets an equal
    # share, and choose the best epoch by the mean of the per-type validation scores; without
    # it, 30 tissue tiles would be drowned by 500 fluorescence images.
    balance_image_types: bool = True
    val_every: int = 1
    val_fraction: float = 0.15  # used when no validation images are given
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    # Keep BatchNorm statistics of the starting model. For fine-tuning on a few images of one
    # kind: re-estimating them from those images alone breaks the model on every other kind.
    freeze_batchnorm: bool = False
    # Train only the decoder and head: the encoder's general features stay as they were.
    freeze_encoder: bool = False
    # L2-SP (Li et al., ICML 2018): pulls the weights towards the starting model's, so a few
    # corrected images adapt it without making it forget the rest. 0: off.
    anchor_weight: float = 0.0
    # Learning without forgetting across image types: every patch is also shown restyled as
    # the other types (fluorescence, brightfield, stained tissue), where the model is held to
    # the starting model's output with this weight. 0: off.
    distill_weight: float = 0.0
    # Weight-space ensembling (WiSE-FT, Wortsman et al., CVPR 2022): the model validated and
    # saved is (1 - share) x the trained weights + share x the starting weights. Fine-tuning
    # fits a few images' outlines and also learns their quirks; mixing the start back in keeps
    # more of the first and less of the second. 0: the trained weights as they are.
    start_weight_share: float = 0.0
    # "auto": bfloat16 autocast on CPUs with native bfloat16 (AVX512-BF16 or AMX; a step ~1.5x
    # faster, measured in docs/performance.md), float32 elsewhere. "float32" | "bfloat16" force it.
    # Weights and optimiser state stay float32 either way.
    precision: str = "auto"
    # After training, measure the model's min_confidence (calibrate_min_confidence) on the
    # validation images (with the training images when there are few) and save it with the model.
    calibrate: bool = True


# Settings for fine-tuning a trained model on a few corrected images: the Fine-tune
# widget's defaults, measured with benchmarks/finetune.py (docs/user-guide.md, section 8).
FINETUNE_DEFAULTS = dict(
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


def finetune_config(**overrides) -> TrainConfig:
    """A :class:`TrainConfig` with the fine-tuning defaults, ``overrides`` applied."""
    return TrainConfig(**{**FINETUNE_DEFAULTS, **overrides})


def field_default(owner: type, name: str):
    """The default of field ``name`` of parameter dataclass ``owner``."""
    spec = {f.name: f for f in fields(owner)}[name]
    return spec.default_factory() if spec.default is MISSING else spec.default


def field_metadata(owner: type, name: str) -> dict:
    """The ``help`` (and ``choices``) of field ``name``: shared by ``--help`` and the widgets' tooltips."""
    return dict({f.name: f for f in fields(owner)}[name].metadata)
