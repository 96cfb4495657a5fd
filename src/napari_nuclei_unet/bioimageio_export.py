"""Write our models as bioimage.io Model Zoo packages, checked by the format's own tools.

The package holds ONNX, TorchScript and ``pytorch_state_dict`` weights (the last builds
``segmentation_models_pytorch.Unet`` with its arguments), our percentile normalisation as
``scale_range`` + ``clip``, sigmoid outputs, test tensors and a cover cut from a real image,
our metadata under ``config["napari-nuclei-unet"]`` (so :mod:`.model_zoo` reads it back as
the same checkpoint), and a README that says how our post-processing turns the probabilities
into nuclei. The description is built with ``bioimageio.spec``'s classes (validated as it is
built); :func:`validate_package` then runs the spec's file checks and ``bioimageio.core``'s
model test on the written package.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError, ModelError
from .io import channels_first, to_model_channels
from .model_zoo import CONFIG_KEY, PACKAGE_FILES, SMP_LIBRARY, first_line, quiet_spec_logging

if TYPE_CHECKING:
    from collections.abc import Callable

    from .model import Checkpoint
    from .params import ExportParams

TEST_SIDE = 256  # px: the test tensors' crop (a multiple of 32, quick for every consumer's test)
_INPUT_ID, _OUTPUT_ID = "image", "probabilities"
_OUTPUT_HALO = 16  # px: the U-Net's border pixels see reflected padding; consumers that tile should crop them
_CITATIONS = (
    (
        "Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for biomedical image segmentation. MICCAI "
        "2015.",
        "10.1007/978-3-319-24574-4_28",
    ),
    (
        "Caicedo JC et al. Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. Nature "
        "Methods 16, 1247-1253 (2019).",
        "10.1038/s41592-019-0612-7",
    ),
    ("Iakubovskii P. Segmentation Models Pytorch (2019).", "https://github.com/qubvel-org/segmentation_models.pytorch"),
)
_MONUSEG_CITATION = (
    "Kumar N et al. A dataset and a technique for generalized nuclear segmentation for computational pathology. IEEE "
    "TMI 36, 1550-1560 (2017).",
    "10.1109/TMI.2017.2677499",
)


def export_package(
    checkpoint: Checkpoint,
    out: str | os.PathLike,
    params: ExportParams | None = None,
    progress: Callable[[str], None] | None = None,
    image: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``checkpoint`` as a bioimage.io model package: ``out`` ending in ``.zip`` is a zip, anything else a folder.

    The test tensors and cover come from ``image`` (a grey or RGB plane, e.g. the image the
    model was fine-tuned on) when given, else from ``params.test_image``. The package is built and checked in a
    temporary place (``bioimageio.spec`` validation with
    file checks, then ``bioimageio.core``'s model test unless ``params.run_test`` is off) and
    moved to ``out`` only when it passes, so a failed export leaves nothing behind.
    ``progress(message)`` is told each stage. ``overwrite`` replaces an existing ``out`` file
    (atomically, once the new package has passed).
    """
    from .params import ExportParams

    params = params or ExportParams()
    say = progress or (lambda message: None)
    out = Path(out)
    if not checkpoint.can_finetune:
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

        with quiet_spec_logging():
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
    with quiet_spec_logging():
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
    crop = np.asarray(image[top : top + side, left : left + side])
    return crop[..., 0] if crop.ndim == 3 and crop.shape[-1] == 1 else crop[..., :3] if crop.ndim == 3 else crop


def _people(checkpoint: Checkpoint, params) -> dict:
    """The package's authors, citations and licence as ``ModelDescr`` fields, checked (a bad one is a one-line
    InputError)."""
    from bioimageio.spec.model.v0_5 import Author, CiteEntry, ModelDescr
    from pydantic import TypeAdapter

    citations = _citations(checkpoint, params.cite)
    try:
        cite = [CiteEntry(text=text, **_doi_or_url(ref)) for text, ref in citations]
    except Exception as error:  # noqa: BLE001 (pydantic's ValidationError)
        raise InputError(f"citation: {first_line(error)}") from None
    try:
        license_id = TypeAdapter(ModelDescr.model_fields["license"].annotation).validate_python(params.license)
    except Exception:  # noqa: BLE001 (pydantic's ValidationError)
        raise InputError(
            f"licence {params.license!r}: not an SPDX licence identifier (e.g. MIT, BSD-3-Clause, CC-BY-4.0)"
        ) from None
    return {"authors": _authors(checkpoint, params.authors, Author), "cite": cite, "license": license_id}


def _build_description(checkpoint: Checkpoint, image: np.ndarray, work: Path, people: dict, say):
    """The package's files in ``work`` and its ``bioimageio.spec`` model description (validated as it is built)."""
    from bioimageio.spec.model.v0_5 import FileDescr, ModelDescr
    from pydantic import ValidationError

    torch_version = _write_package_files(checkpoint, image, work, say)
    config = checkpoint.config
    try:
        return ModelDescr(
            name=_package_name(checkpoint.name),
            description=str(
                checkpoint.metadata.get("description")
                or f"Nuclei U-Net ({config.encoder_name} encoder) from napari-nuclei-unet."
            )[:1000],
            **people,
            covers=[FileDescr(source=work / "cover.png")],
            documentation=FileDescr(source=work / "README.md"),
            tags=list(_TAGS),
            inputs=[_input_description(checkpoint, work)],
            outputs=[_output_description(checkpoint, work)],
            weights=_weights_description(checkpoint, work, torch_version),
            training_data=_training_data(checkpoint),
            config={CONFIG_KEY: json_safe(checkpoint._metadata_json())},
        )
    except ValidationError as error:
        raise ModelError(f"cannot describe {checkpoint.name} as a bioimage.io model: {first_line(error)}") from None


_TAGS = (
    "nuclei",
    "nucleus-segmentation",
    "instance-segmentation",
    "unet",
    "2d",
    "fluorescence",
    "brightfield",
    "histology",
    "pytorch",
    "onnx",
    "napari-nuclei-unet",
)


def _write_package_files(checkpoint: Checkpoint, image: np.ndarray, work: Path, say) -> str:
    """Weights (state_dict, TorchScript, ONNX), test tensors from ``image``, cover and README into ``work``;
    returns the torch version the weights were written with."""
    import copy

    import torch

    from .io import Normalizer
    from .onnx_backend import to_onnx

    model = copy.deepcopy(checkpoint.model).float().eval().cpu()  # the caller's model may be on a GPU, or in use
    channels = checkpoint.config.in_channels
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, work / "weights.pt")
    raw = to_model_channels(channels_first(image), channels)[None]  # (1, C, Y, X): what a consumer feeds
    normalized = torch.from_numpy(Normalizer.from_image(image, channels, checkpoint.percentiles)(image)[None])
    with torch.inference_mode():
        expected = torch.sigmoid(model(normalized)).numpy().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about shape-dependent branches in timm/smp
        traced = torch.jit.trace(model, normalized, check_trace=False)
    traced.save(str(work / "weights.torchscript.pt"))
    (work / "weights.onnx").write_bytes(to_onnx(model, channels)[0])
    np.save(work / "test_input.npy", raw.astype(np.float32))
    np.save(work / "test_output.npy", expected)
    say("drawing the cover")
    _write_cover(checkpoint, image, work / "cover.png")
    (work / "README.md").write_text(_readme(checkpoint), encoding="utf-8")
    return torch.__version__.split("+")[0]


def _input_description(checkpoint: Checkpoint, work: Path):
    """The input tensor: any size from 64 px in steps of 32, our percentile normalisation as preprocessing."""
    from bioimageio.spec.model.v0_5 import (
        BatchAxis,
        ChannelAxis,
        ClipDescr,
        ClipKwargs,
        EnsureDtypeDescr,
        EnsureDtypeKwargs,
        FileDescr,
        InputTensorDescr,
        ParameterizedSize,
        ScaleRangeDescr,
        ScaleRangeKwargs,
        SpaceInputAxis,
    )

    channels = checkpoint.config.in_channels
    names = (
        ["intensity"]
        if channels == 1
        else ["red", "green", "blue"][:channels] + [f"channel{i}" for i in range(3, channels)]
    )
    size = ParameterizedSize(min=64, step=32)
    low, high = checkpoint.percentiles
    return InputTensorDescr(
        id=_INPUT_ID,
        description="2D image: grey images are repeated into each channel, colour ones as RGB",
        axes=[
            BatchAxis(),
            ChannelAxis(channel_names=names),
            SpaceInputAxis(id="y", size=size),
            SpaceInputAxis(id="x", size=size),
        ],
        test_tensor=FileDescr(source=work / "test_input.npy"),
        preprocessing=[
            EnsureDtypeDescr(kwargs=EnsureDtypeKwargs(dtype="float32")),
            ScaleRangeDescr(
                kwargs=ScaleRangeKwargs(axes=["channel", "y", "x"], min_percentile=low, max_percentile=high)
            ),
            ClipDescr(kwargs=ClipKwargs(min=0.0, max=1.0)),
        ],
    )


def _output_description(checkpoint: Checkpoint, work: Path):
    """The output tensor: one probability channel per output, the input's size, with a halo."""
    from bioimageio.spec.model.v0_5 import (
        BatchAxis,
        ChannelAxis,
        FileDescr,
        IntervalOrRatioDataDescr,
        OutputTensorDescr,
        SigmoidDescr,
        SizeReference,
        SpaceOutputAxisWithHalo,
    )

    outputs = list(checkpoint.outputs)
    return OutputTensorDescr(
        id=_OUTPUT_ID,
        description="per-pixel probabilities: " + ", ".join(outputs) + " (see README for turning them into nuclei)",
        axes=[
            BatchAxis(),
            ChannelAxis(channel_names=outputs),
            *(
                SpaceOutputAxisWithHalo(
                    id=axis, size=SizeReference(tensor_id=_INPUT_ID, axis_id=axis), halo=_OUTPUT_HALO
                )
                for axis in ("y", "x")
            ),
        ],
        test_tensor=FileDescr(source=work / "test_output.npy"),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[SigmoidDescr()],
    )


def _weights_description(checkpoint: Checkpoint, work: Path, torch_version: str):
    """The three weight formats: the smp.Unet state_dict (the parent), TorchScript and ONNX."""
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromLibraryDescr,
        OnnxWeightsDescr,
        PytorchStateDictWeightsDescr,
        TorchscriptWeightsDescr,
        WeightsDescr,
    )

    from .onnx_backend import _OPSET

    architecture = ArchitectureFromLibraryDescr(
        callable="Unet",
        import_from=SMP_LIBRARY,
        kwargs={**checkpoint.config.smp_arguments(), "decoder_channels": list(checkpoint.config.decoder_channels)},
    )
    return WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=work / "weights.pt", pytorch_version=torch_version, architecture=architecture
        ),
        torchscript=TorchscriptWeightsDescr(
            source=work / "weights.torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict"
        ),
        onnx=OnnxWeightsDescr(source=work / "weights.onnx", opset_version=_OPSET, parent="pytorch_state_dict"),
    )


def _training_data(checkpoint: Checkpoint):
    """What the model was trained on, as the spec's inline dataset description (None when unrecorded)."""
    from bioimageio.spec.dataset.v0_3 import CiteEntry, DatasetDescr

    data = str((checkpoint.metadata.get("training") or {}).get("data") or "")
    if not data:
        return None
    licence = str(checkpoint.metadata.get("license") or "")
    lowered = data.lower()
    cite = [
        CiteEntry(text=text, doi=doi)
        for key, (text, doi) in (("dsb2018", _CITATIONS[1]), ("monuseg", _MONUSEG_CITATION))
        if key in lowered
    ]
    source = "https://bbbc.broadinstitute.org/BBBC038" if "dsb2018" in lowered else None
    return DatasetDescr(
        name=f"Training data of {_package_name(checkpoint.name)}",
        description=f"{data}. {licence}".strip()[:1000],
        cite=cite,
        source=source,
    )


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
        entries = (
            ["napari-nuclei-unet developers"]
            if checkpoint.metadata.get("name") == "nuclei-unet-default"
            else [_login_name()]
        )
    authors = []
    for entry in entries:
        name, affiliation, orcid = (list(part.strip() for part in entry.split(";")) + ["", ""])[:3]
        if not name:
            raise InputError(f"author {entry!r}: give a name first, as 'Name;Affiliation;ORCID'")
        fields = {
            "name": name,
            **({"affiliation": affiliation} if affiliation else {}),
            **({"orcid": orcid} if orcid else {}),
        }
        try:
            authors.append(author_class(**fields))
        except Exception as error:  # noqa: BLE001 (pydantic's ValidationError: a malformed ORCID)
            raise InputError(f"author {entry!r}: {first_line(error)}") from None
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
    """The package's documentation: what the model is, what it was trained on, and how our post-processing makes
    nuclei."""
    from .params import PostprocessParams
    from .postprocess import MARKER_THRESHOLDS

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
        + ", ".join(f"`{o}`" for o in checkpoint.outputs)
        + " (sigmoid probabilities).",
        "",
        "## Input",
        "Any 2D image, grey or RGB, of any size of at least 64 px (multiples of 32 run without padding). Normalised "
        "per image: "
        f"its {checkpoint.percentiles[0]:g} and {checkpoint.percentiles[1]:g} percentiles, pooled over the colour "
        "channels, map to 0 and 1, then clipped. "
        + (
            "Grey images are repeated into the three channels."
            if checkpoint.config.in_channels == 3
            else "Colour images are averaged to grey."
        ),
    ]
    if checkpoint.nucleus_diameter:
        lines += [
            "",
            f"Nuclei of about {checkpoint.nucleus_diameter:.0f} px diameter segment best (0.7-1.6x that without "
            "rescaling). "
            "napari-nuclei-unet measures the nuclei and zooms the image to this size automatically.",
        ]
    lines += [
        "",
        "## From probabilities to nuclei (napari-nuclei-unet's post-processing)",
        "1. Foreground: `foreground > t`, with `t` Otsu's threshold of the image's foreground probabilities (or a "
        "fixed value); "
        f"holes up to {post.hole_size} px are filled.",
        "2. Touching nuclei are split by a watershed from the h-maxima "
        f"(h = {post.h:g} px) of a distance transform: of the foreground (distance markers), or of the foreground cut "
        f"where the boundary probability exceeds {MARKER_THRESHOLDS['boundary']:g} (boundary markers). This model "
        f"uses {_markers_by_type(checkpoint)}.",
        f"3. Objects whose mean foreground probability is below the model's calibrated minimum confidence ({level:g}) "
        "are dropped, "
        f"as are objects smaller than {post.min_size} image pixels.",
        "",
        "The same steps run with `nuclei-unet segment IMAGE --model THIS.zip` (pip install napari-nuclei-unet), which "
        "also accepts "
        "the napari plugin's model picker.",
    ]
    if training:
        lines += [
            "",
            "## Training",
            f"Data: {training.get('data', 'not recorded')}.",
            f"Licences: {checkpoint.metadata.get('license', 'not recorded')}",
        ]
    return "\n".join(lines + _readme_metrics(metrics)) + "\n"


def _markers_by_type(checkpoint: Checkpoint) -> str:
    """Which markers the model takes for each image type, in words (``Checkpoint.markers_for``)."""
    from .params import IMAGE_TYPES

    chosen = {kind: checkpoint.markers_for(kind) for kind in IMAGE_TYPES[1:]}
    if len(set(chosen.values())) == 1:
        return f"{next(iter(chosen.values()))} markers"
    return ", ".join(f"{markers} markers for {kind}" for kind, markers in chosen.items())


def _readme_metrics(metrics: dict) -> list[str]:
    """The README's validation table (nothing for a model without recorded metrics)."""
    lines = []
    if metrics:
        lines += [
            "",
            "## Validation",
            f"Measured on {metrics.get('measured_on', 'validation images')} ({metrics.get('n_images', '?')} images):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        names = {
            "kaggle_score": "DSB2018 score (mean AP over IoU 0.5-0.95)",
            "ap50": "AP@0.5",
            "f1_50": "F1@0.5",
            "dice": "Dice (pixels)",
        }
        lines += [
            f"| {label} | {metrics[key]:.3f} |"
            for key, label in names.items()
            if isinstance(metrics.get(key), (int, float))
        ]
    return lines
