"""``nuclei-unet``: segment, train, evaluate and convert RLE from the command line.

Expected failures (bad files, bad weights) print one line naming the file and the
problem and exit with status 2; nothing partial is written.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__
from .errors import Cancelled, InputError, NucleiUnetError, describe, nuclei_text
from .params import (
    AUTO,
    FINETUNE_DEFAULTS,
    FINETUNE_MAX_IMAGES,
    TRAIN_RECIPES,
    BlockParams,
    ExportParams,
    PostprocessParams,
    SegmentParams,
    TilingParams,
    TrainConfig,
    cli_fields,
    field_default,
    field_metadata,
    split_channel_axis,
    stack_of_axes,
)


def _auto_or_fraction(zero_allowed: bool):
    """An argparse type: "auto", or a number below 1 and above 0 (or from 0 when ``zero_allowed``)."""
    interval = "[0, 1)" if zero_allowed else "(0, 1)"

    def parse(value: str):
        if value == "auto":
            return value
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be 'auto' or a number in {interval}") from None
        if not (0 <= number < 1 if zero_allowed else 0 < number < 1):
            raise argparse.ArgumentTypeError(f"must be in {interval}")
        return number

    return parse


def _diameter(value: str):
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 'auto', 'none' or a number of pixels") from None
    if not number > 0:
        raise argparse.ArgumentTypeError("must be a positive number of pixels")
    return number


def _option(parser: argparse.ArgumentParser, flag: str, owner: type, name: str, **kwargs) -> None:
    """An option whose default, help and choices come from a parameter dataclass's field."""
    metadata = field_metadata(owner, name)
    if "choices" in metadata:
        kwargs.setdefault("choices", list(metadata["choices"]))
    kwargs.setdefault("help", _literal(metadata.get("help")))
    parser.add_argument(flag, dest=kwargs.pop("dest", name), default=field_default(owner, name), **kwargs)


def _literal(help: str | None) -> str | None:
    """A parameter's help text as argparse prints it: ``%`` is argparse's format character."""
    return None if help is None else help.replace("%", "%%")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="checkpoint folder, .pth state_dict, or bioimage.io package (.zip, or a folder with "
        "bioimageio.yaml/rdf.yaml) (default: the bundled model)",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder of a plain .pth state_dict when it can't be inferred (e.g. efficientnet-b3)",
    )
    _option(parser, "--device", TilingParams, "device")


_TILING_OPTIONS = ("tile_size", "overlap", "batch_size", "tta", "backend", "precision")
_POSTPROCESS_OPTIONS = ("threshold", "min_size", "hole_size", "markers", "h", "min_confidence")


def _add_segment_args(parser: argparse.ArgumentParser) -> None:
    types = {
        "tile_size": _positive_int,
        "overlap": _non_negative_int,
        "batch_size": _positive_int,
        "min_size": _non_negative_int,
        "hole_size": _non_negative_int,
        "h": _non_negative_float,
        "threshold": _auto_or_fraction(zero_allowed=False),
        "min_confidence": _auto_or_fraction(zero_allowed=True),
    }
    for name in _TILING_OPTIONS:
        if name == "tta":
            _option(parser, "--tta", TilingParams, name, action="store_true")
        else:
            _option(parser, f"--{name.replace('_', '-')}", TilingParams, name, type=types.get(name, str))
    for name in _POSTPROCESS_OPTIONS:
        _option(parser, f"--{name.replace('_', '-')}", PostprocessParams, name, type=types.get(name, str))
    _option(parser, "--image-type", SegmentParams, "image_type")
    _option(parser, "--stain", SegmentParams, "stain")
    _option(parser, "--diameter", SegmentParams, "diameter", type=_diameter)
    parser.add_argument(
        "--axes",
        type=_axes,
        default=None,
        help="what a stack's axes are, e.g. ZYX (a Z-stack: nuclei labelled in 3D), TYX (time-lapse or separate "
        "planes: each labelled on its own), TZYX (a time-lapse of Z-stacks: each time point labelled in 3D), YX, "
        "YXC, CYX, ZCYX or TZCYX (C before YX: channels, --channel picks one); default: the file's own axes "
        "(ImageJ/OME), else separate planes",
    )
    _option(parser, "--channel", SegmentParams, "channel", type=_channel)
    _option(parser, "--voxel-size", SegmentParams, "voxel_size", type=_voxel_size)
    _option(parser, "--block-size", BlockParams, "block_size", type=_positive_int)
    _option(parser, "--large-plane", BlockParams, "large_plane", type=_positive_int)
    _option(parser, "--large-volume", BlockParams, "large_volume", type=_positive_int)


def segment_params(args: argparse.Namespace, device: str) -> SegmentParams:
    """The parameter dataclasses filled from parsed ``segment`` options."""
    return SegmentParams(
        TilingParams(device=device, **{name: getattr(args, name) for name in _TILING_OPTIONS}),
        PostprocessParams(**{name: getattr(args, name) for name in _POSTPROCESS_OPTIONS}),
        diameter=args.diameter,
        image_type=args.image_type,
        stain=args.stain,
        blocks=BlockParams(block_size=args.block_size, large_plane=args.large_plane, large_volume=args.large_volume),
        stack=stack_of_axes(args.axes) if args.axes else AUTO,
        channel=args.channel,
        channel_axis=split_channel_axis(args.axes)[1] if args.axes else None,
        voxel_size=args.voxel_size,
    )


def _channel(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError("must be 'auto' or a channel number from 0")
    return int(value)


def _axes(value: str) -> str:
    axes = value.strip().upper()
    try:
        stack_of_axes(axes)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return axes


def _voxel_size(value: str) -> tuple[float, float, float]:
    try:
        size = tuple(float(part) for part in value.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or not all(0 < v < float("inf") for v in size):
        raise argparse.ArgumentTypeError("must be three positive numbers Z,Y,X, e.g. 2.18,1,1")
    return size


def _number(kind, check, wording: str):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wording}") from None
        if not check(number):
            raise argparse.ArgumentTypeError(f"must be {wording}")
        return number

    return parse


_positive_int = _number(int, lambda n: n > 0, "a positive whole number")
_non_negative_int = _number(int, lambda n: n >= 0, "a whole number, 0 or more")
_non_negative_float = _number(float, lambda n: n >= 0 and n < float("inf"), "a number, 0 or more")


def _train_flag(spec) -> str:
    """``nuclei-unet train``'s option for a :class:`TrainConfig` field: its ``flag``, ``--no-name`` for one on
    by default, else ``--name``."""
    if spec.metadata.get("flag"):
        return spec.metadata["flag"]
    name = spec.name.replace("_", "-")
    return f"--no-{name}" if spec.default is True else f"--{name}"


def _add_train_config_args(parser: argparse.ArgumentParser) -> None:
    """An option for every :class:`TrainConfig` field with a help text, its help from the field. Options left out
    take the chosen recipe's value (``--recipe``): :class:`TrainConfig`'s, or the fine-tuning defaults."""
    parser.add_argument(
        "--recipe",
        default="auto",
        choices=TRAIN_RECIPES,
        help="the defaults of the options below: 'scratch' (training on a data set), 'finetune' (a few corrected "
        f"images, as the Fine-tune widget); auto: finetune when --model is given and there are at most "
        f"{FINETUNE_MAX_IMAGES} training images",
    )
    for spec in cli_fields(TrainConfig):
        meta, flag = {**spec.metadata, "help": _literal(spec.metadata["help"])}, _train_flag(spec)
        tuned = getattr(FINETUNE_DEFAULTS, spec.name)
        if isinstance(spec.default, bool):  # on/off switches: their help says what they do, no default shown
            action, help = (
                ("store_false", f"turn off: {meta['help']}") if spec.default else ("store_true", meta["help"])
            )
            parser.add_argument(flag, dest=spec.name, action=action, help=help, default=argparse.SUPPRESS)
            continue
        shown = f"{meta['help']} (default {_shown(spec.default)}; fine-tuning {_shown(tuned)})"
        if isinstance(spec.default, tuple):
            parser.add_argument(flag, dest=spec.name, type=_number_pair, default=argparse.SUPPRESS, help=shown)
        else:
            kind = meta.get("type") or type(spec.default)
            choices = list(meta["choices"]) if "choices" in meta else None
            parser.add_argument(flag, dest=spec.name, type=kind, default=argparse.SUPPRESS, choices=choices, help=shown)


def _shown(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def train_recipe(args: argparse.Namespace, images: int) -> str:
    """'scratch' or 'finetune': ``--recipe``, or for auto, fine-tuning a given model on at most
    :data:`FINETUNE_MAX_IMAGES` images."""
    if args.recipe != "auto":
        return args.recipe
    return "finetune" if args.model and images <= FINETUNE_MAX_IMAGES else "scratch"


def train_config(args: argparse.Namespace, recipe: str = "scratch") -> TrainConfig:
    """The :class:`TrainConfig` of ``recipe`` with the ``train`` options given on the command line applied."""
    base = FINETUNE_DEFAULTS if recipe == "finetune" else TrainConfig()
    return replace(
        base, **{spec.name: getattr(args, spec.name) for spec in cli_fields(TrainConfig) if hasattr(args, spec.name)}
    )


def _number_pair(value: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("must be two numbers, LOW,HIGH") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError("must be two numbers 0 < LOW <= HIGH")
    return low, high


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Says an option's default after its help, unless the help says it already, the option is required, or it
    has none to say (None, or off for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        if "(default:" in help or action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nuclei-unet", description="Nuclei segmentation with a tiled U-Net and watershed."
    )
    defaults = {"formatter_class": _HelpFormatter}
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_segment_command(commands, defaults)
    _add_train_command(commands, defaults)
    _add_evaluate_command(commands, defaults)
    _add_rle_command(commands, defaults)
    _add_export_bioimageio_command(commands, defaults)
    return parser


def _add_segment_command(commands, defaults: dict) -> None:
    """The ``segment`` command: inputs, outputs, scale-out, model and segmentation options."""
    seg = commands.add_parser("segment", help="segment images into instance label images", **defaults)
    seg.add_argument("inputs", nargs="+", help="image files, .zarr stores, folders or glob patterns")
    seg.add_argument("--out", required=True, help="output folder for <stem>.tif (or .zarr) label images")
    seg.add_argument("--rle-csv", default=None, help="also write one RLE CSV for all inputs (ImageId = file stem)")
    seg.add_argument(
        "--out-format",
        default="tif",
        choices=["tif", "zarr", "geojson"],
        help="label images as TIFF; zarr stores (written block by block, for images larger than memory); or geojson: "
        "the TIFF and, beside it, <stem>.geojson polygons for QuPath",
    )
    seg.add_argument(
        "--measurements",
        action="store_true",
        help="also write <stem>_nuclei.csv beside each label image: one row per nucleus (centroid, area, perimeter, "
        "shape, intensities)",
    )
    seg.add_argument(
        "--workers", type=int, default=None, help="run on a dask LocalCluster of this many worker processes"
    )
    seg.add_argument(
        "--dask-scheduler",
        default=None,
        help="run on an existing dask.distributed cluster, e.g. tcp://HOST:8786 (the --out folder must be shared with "
        "the workers)",
    )
    _add_model_args(seg)
    _add_segment_args(seg)


def _add_train_command(commands, defaults: dict) -> None:
    """The ``train`` command: data, starting model, and an option per :class:`TrainConfig` field."""
    train = commands.add_parser("train", help="train or fine-tune a model", **defaults)
    train.add_argument(
        "--images",
        required=True,
        action="append",
        help="folder of images; repeat --images/--labels (and --split) to train on several data sets",
    )
    train.add_argument(
        "--labels",
        required=True,
        action="append",
        help="folder of label images, an RLE CSV, or a Kaggle DSB folder (one per --images)",
    )
    train.add_argument("--out", required=True, help="output model folder (resumes if it holds a training state)")
    train.add_argument(
        "--model", default=None, help="starting weights: 'default' (bundled), a checkpoint, or none for a fresh U-Net"
    )
    train.add_argument("--encoder", default="mobilenet_v2", help="encoder of a fresh U-Net")
    train.add_argument("--decoder-channels", default="128,64,32,16,16", help="decoder widths of a fresh U-Net")
    train.add_argument(
        "--encoder-weights",
        default=None,
        choices=[None, "imagenet"],
        help="pretrained encoder for a fresh U-Net (needs internet)",
    )
    train.add_argument(
        "--split",
        default=None,
        action="append",
        help="CSV ImageId,split: train on 'train', validate on 'val' (one per --images, or none: --val-fraction)",
    )
    train.add_argument(
        "--outputs",
        default=None,
        help="the network's output channels, e.g. foreground,boundary,centre (default: the starting model's; "
        "foreground,boundary for a fresh U-Net): channels the starting model lacks start from zero and are trained",
    )
    train.add_argument("--no-resume", action="store_true", help="start over even if --out holds a training state")
    train.add_argument("--overwrite", action="store_true", help="allow writing into an existing model folder")
    _add_train_config_args(train)


def _add_evaluate_command(commands, defaults: dict) -> None:
    """The ``evaluate`` command: predictions scored against ground truth."""
    ev = commands.add_parser("evaluate", help="score predictions against ground truth")
    ev.add_argument("--truth", required=True, help="folder of label images or an RLE CSV")
    ev.add_argument("--pred", required=True, help="folder of label images or an RLE CSV")
    ev.add_argument("--images", default=None, help="image folder giving shapes for RLE CSVs without Height/Width")
    ev.add_argument("--json", default=None, help="also write the metrics as JSON")
    ev.add_argument(
        "--per-image",
        default=None,
        help="also write a CSV with each image's scores (nuclei true and predicted, matched, DSB score, AP@0.5, "
        "precision, recall, pixel Dice): where a set's score is lost",
    )
    ev.add_argument(
        "--only-predicted", action="store_true", help="score only the ground-truth images that have a prediction"
    )


def _add_rle_command(commands, defaults: dict) -> None:
    """The ``rle`` commands: RLE CSV to label images and back."""
    rle = commands.add_parser("rle", help="convert between RLE CSV and label images")
    rle_commands = rle.add_subparsers(dest="rle_command", required=True)
    dec = rle_commands.add_parser("decode", help="RLE CSV -> <ImageId>.tif label images")
    dec.add_argument("csv")
    dec.add_argument("--out", required=True)
    dec.add_argument("--images", default=None, help="folder with <ImageId>.<ext> images, for shapes")
    dec.add_argument("--format", default="tif", choices=["tif", "png"])
    enc = rle_commands.add_parser("encode", help="label images -> one RLE CSV")
    enc.add_argument("labels", nargs="+", help="label image files, folders or globs")
    enc.add_argument("--out", required=True)
    enc.add_argument("--no-shape", action="store_true", help="omit the Height/Width columns")


def _add_export_bioimageio_command(commands, defaults: dict) -> None:
    """The ``export-bioimageio`` command: a model as a bioimage.io package."""
    export = commands.add_parser(
        "export-bioimageio", help="write a model as a bioimage.io Model Zoo package (validated and tested)", **defaults
    )
    export.add_argument("model", help="'default' (bundled) or a checkpoint folder")
    export.add_argument("--out", required=True, help="package to write: NAME.zip, or a new folder")
    export.add_argument(
        "--author", dest="authors", action="append", default=None, help=field_metadata(ExportParams, "authors")["help"]
    )
    export.add_argument("--cite", action="append", default=None, help=field_metadata(ExportParams, "cite")["help"])
    _option(export, "--license", ExportParams, "license")
    _option(export, "--test-image", ExportParams, "test_image")
    export.add_argument(
        "--no-test",
        dest="run_test",
        action="store_false",
        help="skip bioimageio.core's model test (the format is still validated) [default: the test runs]",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = {
            "segment": cmd_segment,
            "train": cmd_train,
            "evaluate": cmd_evaluate,
            "rle": cmd_rle,
            "export-bioimageio": cmd_export_bioimageio,
        }[args.command]
        return handler(args) or 0
    except Cancelled as error:
        print(f"nuclei-unet: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("nuclei-unet: interrupted", file=sys.stderr)
        return 130
    except NucleiUnetError as error:
        print(f"nuclei-unet: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an output (or input) the system refused: full disk, permissions, a folder in the way
        print(f"nuclei-unet: error: {error.filename or ''}: {error.strerror or describe(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("nuclei-unet: error: out of memory (try smaller --tile-size / --block-size)", file=sys.stderr)
        return 2


def writable_folder(path: str | Path) -> Path:
    """``path`` as an output folder (made if missing); InputError if it is a file or can't be written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; --out needs a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the output folder ({error.strerror or describe(error)})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: output folder is not writable")
    return folder


def writable_file(path: str | Path) -> Path:
    """``path`` as an output file: InputError if it is a folder or its folder can't be written."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target}: is a folder; expected a file name")
    writable_folder(target.parent if str(target.parent) else ".")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"{target}: exists and is not writable")
    return target


def _load_checkpoint(args):
    from .model import Checkpoint, resolve_model_path

    return Checkpoint.load(resolve_model_path(args.model), encoder=args.encoder)


def cmd_segment(args) -> int:
    from .batch import output_path, write_run_summary
    from .devices import device_name
    from .io import find_images
    from .rle import join_csv_parts

    files = find_images(args.inputs)
    out = Path(args.out)
    targets = [output_path(out, path, args.out_format) for path in files]
    clashes = sorted({t.name for t in targets if targets.count(t) > 1})
    if clashes:
        raise InputError(
            f"{out}: several inputs would write {', '.join(clashes[:3])}; segment them into separate --out folders"
        )
    _refuse_overwriting_images(targets, files)
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    writable_folder(out)  # outputs are checked before any work, so a fault there costs nothing
    if args.rle_csv:
        writable_file(args.rle_csv)
    distributed = args.workers or args.dask_scheduler
    device = device_name("cpu" if distributed and args.device == "auto" else args.device)
    checkpoint = _load_checkpoint(args)  # fails early, here, on bad weights
    params = segment_params(args, device)
    print(
        f"model: {checkpoint.summary()} | device: {checkpoint.device_line(device, params.tiling)}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    # Every output is written into a staging folder inside --out and moved into place only when
    # all inputs succeeded: a bad input leaves no partial output and overwrites nothing.
    staging = Path(tempfile.mkdtemp(prefix=".nuclei-unet-", dir=out))
    try:
        if distributed:
            results = _segment_distributed(args, files, params, staging, _extras(args))
        else:
            results = _segment_local(checkpoint, files, staging, params, args.out_format, _extras(args))
        if args.rle_csv:  # each file's rows were written from its labels in hand: joined here, in input order
            join_csv_parts(args.rle_csv, [result.rle_part for result in results])
        for result in results:
            final = out / Path(result.output).name
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(result.output, final)
            result.output = str(final)
            for extra in result.extra_outputs:
                os.replace(extra, out / Path(extra).name)
        write_run_summary(out, results, f"{checkpoint.name} ({args.model}), napari-nuclei-unet {__version__}")
    except KeyboardInterrupt:
        done = sum(1 for target in targets if (staging / target.name).exists())
        raise Cancelled(
            f"interrupted after {done} of {len(files)} image(s): nothing written to {out} (a run's outputs appear "
            "when all its images are done)"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    pixels = sum(r.pixels for r in results)
    print(
        f"segmented {len(results)} image(s): {nuclei_text(sum(r.nuclei for r in results))} in {seconds:.1f} s, "
        f"{pixels / 1e6 / max(seconds, 1e-9):.2f} MP/s on {device}; "
        f"{_diameter_summary(args.diameter, [r.diameter for r in results if r.diameter is not None])}; "
        f"{_used_summary(results)} -> {out}"
    )
    return 0


def _used_summary(results) -> str:
    """The image types, stains, markers, threshold and min confidence actually used (what "auto" became), for
    reproducing a run."""
    seen = collections.Counter(
        (r.record["image_type"], r.record["stain"], r.record.get("markers"))
        for r in results
        if "image_type" in r.record
    )
    kinds = ", ".join(
        f"{count} {kind}"
        + (f" (stain {stain})" if stain != "none" else "")
        + (f" ({markers} markers)" if markers else "")
        for (kind, stain, markers), count in sorted(seen.items(), key=lambda item: tuple(map(str, item[0])))
    )
    thresholds = [t for r in results for t in np.atleast_1d(r.record.get("threshold", []))]
    levels = sorted({r.record.get("min_confidence") for r in results if "min_confidence" in r.record})
    threshold = (
        ""
        if not thresholds
        else (
            f"threshold {thresholds[0]:.3f}"
            if len(set(thresholds)) == 1
            else f"threshold {min(thresholds):.3f}-{max(thresholds):.3f}"
        )
    )
    level = "" if not levels else f"min confidence {', '.join(f'{v:g}' for v in levels)}"
    channels = sorted({r.record["channel"] for r in results if "channel" in r.record})
    channel = "" if not channels else f"nuclear channel {', '.join(map(str, channels))}"
    return ", ".join(part for part in (kinds, channel, threshold, level) if part)


def _channel_text(record: dict) -> str:
    """The per-image line's 'channel 1 of 2, ' for an image whose nuclear channel was segmented; '' without."""
    return f"channel {record['channel']} of {record['channels']}, " if "channel" in record else ""


def _extras(args) -> tuple[str, ...]:
    """What ``segment`` writes beside each label image (``batch.EXTRA_OUTPUTS``)."""
    return (("measurements",) if args.measurements else ()) + (("rle",) if args.rle_csv else ())


# Images segmented at once in one process: the network of one runs (ONNX Runtime releases the GIL) while the
# other is post-processed, so both cores stay busy (DSB2018 val: 9.7 -> 7.0 s in process; docs/performance.md).
IMAGES_IN_FLIGHT = 2
# Images declaring more pixel bytes than this (or whose header can't say) run alone: two large ones at once would
# double the peak memory that block-by-block segmentation keeps flat.
SHARED_IMAGE_BYTES = 64 * 2**20


def _segment_local(checkpoint, files, out, params, out_format, extras=()):
    """Segment ``files`` in this process, two small images at a time; results, progress and the first error come
    in input order, and an error stops the images not yet started (the others stop at their next tile)."""
    from concurrent.futures import ThreadPoolExecutor

    from .batch import segment_file
    from .io import declared_bytes

    stop = threading.Event()
    slots = _Slots(IMAGES_IN_FLIGHT)
    results = []
    with _ImageProgress(len(files)) as progress:

        def run(path):
            size = declared_bytes(Path(path))
            with slots.hold(1 if 0 < size <= SHARED_IMAGE_BYTES else IMAGES_IN_FLIGHT):
                if stop.is_set():
                    raise Cancelled("segmentation cancelled")
                return segment_file(
                    checkpoint,
                    path,
                    out,
                    params,
                    out_format,
                    progress=progress.steps(path),
                    cancel=stop.is_set,
                    extras=extras,
                )

        if files:  # the first alone: the network is loaded (or exported) once, before any other image starts
            results.append(run(files[0]))
            progress.image_done(files[0], results[0])
        pool = ThreadPoolExecutor(IMAGES_IN_FLIGHT, thread_name_prefix="nuclei-unet-segment")
        try:
            for path, result in zip(files[1:], pool.map(run, files[1:])):
                results.append(result)
                progress.image_done(path, result)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    return results


class _Slots:
    """Up to ``count`` slots shared by the images in flight; a large image holds them all."""

    def __init__(self, count: int):
        self.free, self.changed = count, threading.Condition()

    @contextlib.contextmanager
    def hold(self, count: int):
        with self.changed:
            self.changed.wait_for(lambda: self.free >= count)
            self.free -= count
        try:
            yield
        finally:
            with self.changed:
                self.free += count
                self.changed.notify_all()


class _ImageProgress:
    """One bar over the images on a terminal, with the current image's steps in it; a plain
    line per image when stderr is a log or a pipe (a redrawn bar is noise there)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.total, self.done = total, 0
        self.bar = tqdm(total=total, unit="image", desc="segment", file=sys.stderr) if sys.stderr.isatty() else None

    def __enter__(self) -> _ImageProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def steps(self, path: Path):
        def progress(done: int, total: int) -> None:
            if self.bar is not None:
                self.bar.set_postfix_str(f"{Path(path).name[:40]}: {100 * done // max(total, 1)}%")

        return progress

    def image_done(self, path: Path, result) -> None:
        from .errors import nuclei_text

        self.done += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(nuclei=result.nuclei, diameter=_format_diameter(result))
        else:
            print(
                f"[{self.done}/{self.total}] {Path(path).name}: {_channel_text(result.record)}"
                f"{nuclei_text(result.nuclei)}{_time_points_text(result.record)}, diameter "
                f"{_format_diameter(result)}",
                file=sys.stderr,
                flush=True,
            )


def _time_points_text(record: dict) -> str:
    count = record.get("time_points")
    return f" in {count} time points (each a Z-stack labelled in 3D, numbered from 1; no tracking)" if count else ""


def _segment_distributed(args, files, params, out: Path, extras=()):
    """One task per image on a dask.distributed cluster: an existing one, or a LocalCluster of --workers."""
    import os

    from dask.distributed import Client, LocalCluster, as_completed

    from .batch import segment_file_task

    cluster = None
    if args.dask_scheduler:
        client = Client(args.dask_scheduler)
        threads = None
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        print(
            f"dask: {len(client.scheduler_info()['workers'])} worker(s) at {client.scheduler.address}", file=sys.stderr
        )
        futures = [
            client.submit(
                segment_file_task,
                args.model,
                args.encoder,
                str(path),
                str(out.resolve()),
                params,
                args.out_format,
                threads,
                extras,
                pure=False,
            )
            for path in files
        ]
        order = {future.key: index for index, future in enumerate(futures)}
        results = [None] * len(futures)
        with _ImageProgress(len(futures)) as progress:
            for future in as_completed(futures):
                result = future.result()  # re-raises a worker's error (e.g. a bad file) here
                results[order[future.key]] = result
                progress.image_done(files[order[future.key]], result)
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _format_diameter(result) -> str:
    if result.diameter is None:
        return "-"
    return f"{result.diameter:.0f}px" + (f" (x{result.factor:.2f})" if result.factor != 1.0 else "")


def _diameter_summary(requested, diameters: list[float]) -> str:
    if requested is None:
        return "nucleus diameter: not used (no rescaling)"
    if requested != "auto":
        return f"nucleus diameter: {requested:g} px (given)"
    if not diameters:
        return "nucleus diameter: not estimated (no nuclei found, or the model records no training size)"
    low, median, high = np.percentile(diameters, [0, 50, 100])
    spread = f" (range {low:.1f}-{high:.1f})" if len(diameters) > 1 else ""
    return f"nucleus diameter: {median:.1f} px estimated{' median' if len(diameters) > 1 else ''}{spread}"


def cmd_train(args) -> int:
    from tqdm import tqdm

    from .data import load_pairs, read_split
    from .model import Checkpoint, ModelConfig, resolve_model_path
    from .training import STATE_FILE, fit

    out = Path(args.out)
    resuming = (out / STATE_FILE).exists() and not args.no_resume
    if out.exists() and any(out.iterdir()) and not resuming and not args.overwrite:
        raise InputError(f"{out}: folder exists and is not empty; pass --overwrite or choose another --out")
    if len(args.labels) != len(args.images) or (args.split and len(args.split) != len(args.images)):
        raise InputError(f"give one --labels for each --images ({len(args.images)}), and one --split for each or none")
    train, val = [], []
    for index, (images, labels) in enumerate(zip(args.images, args.labels)):
        if args.split:
            split = read_split(args.split[index])
            train += load_pairs(images, labels, {k for k, v in split.items() if v == "train"})
            val += load_pairs(images, labels, {k for k, v in split.items() if v == "val"})
        else:
            train += load_pairs(images, labels)
    val = val if args.split else None
    outputs = tuple(name.strip() for name in args.outputs.split(",")) if args.outputs else None
    if args.model:
        checkpoint = Checkpoint.load(resolve_model_path(args.model))
        if outputs and outputs != checkpoint.outputs:
            checkpoint = checkpoint.with_outputs(outputs)
    else:
        decoder = tuple(int(c) for c in args.decoder_channels.split(","))
        config = ModelConfig(
            encoder_name=args.encoder,
            encoder_depth=len(decoder),
            decoder_channels=decoder,
            **({"outputs": outputs} if outputs else {}),
        )
        checkpoint = Checkpoint.create(config, encoder_weights=args.encoder_weights)
    recipe = train_recipe(args, len(train))
    config = train_config(args, recipe)
    print(
        f"recipe: {'fine-tuning (a few images, a trained model)' if recipe == 'finetune' else 'training'} defaults"
        + (" (--recipe to choose)" if args.recipe == "auto" else ""),
        file=sys.stderr,
    )
    # The bar only on a terminal; the epoch lines below are written either way.
    bar = tqdm(
        total=config.epochs * config.iterations_per_epoch,
        unit="it",
        desc="train",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )

    seen = {}

    def progress(event) -> None:
        seen["event"] = event
        bar.n = event.iteration
        bar.set_postfix(epoch=event.epoch, loss=f"{event.loss:.3f}", best=event.best_score)
        if event.kind == "calibrating":
            bar.write("calibrating the model's min confidence (post-processing)")
        if event.kind == "epoch":
            scores = event.scores
            line = f"epoch {event.epoch}: loss {event.loss:.4f}"
            if scores is not None:
                line += f", val DSB {scores.kaggle_score:.4f}, AP@0.5 {scores.ap50:.4f}, Dice {scores.dice:.4f}"
            bar.write(line + (" (best, saved)" if event.improved else ""))

    try:
        with bar:
            result = fit(
                checkpoint, train, out, val, config, progress=progress, data_description=_describe(args, train)
            )
    except KeyboardInterrupt:
        raise Cancelled(_interrupted_training(out, seen.get("event"))) from None
    best = f"{result.best_score:.4f}" if result.best_score is not None else "n/a"
    calibration = checkpoint.metadata.get("postprocess", {}) if config.calibrate and not result.cancelled else {}
    calibrated = (
        f"; min confidence {calibration['min_confidence']:g} (calibrated on {calibration['calibrated_on']})"
        if calibration
        else ""
    )
    print(
        f"trained {result.iteration} iterations in {result.elapsed / 60:.1f} min on {result.device}; best val DSB "
        f"score {best}{calibrated} -> {out}"
    )
    if args.model and not result.cancelled:  # a fine-tune: is it worth using?
        verdict, better = result.gain()
        worse = f"; keep segmenting with {args.model}, or use {out} at your own risk" if better is False else ""
        print(verdict + worse)
    return 0


def _describe(args, train) -> str:
    return f"{len(train)} images from " + " and ".join(
        f"{Path(images).resolve().parent.name}/{Path(images).name}" for images in args.images
    )


def _read_label_source(path: str, images: str | None) -> dict[str, np.ndarray]:
    from .data import LABEL_FILE_SUFFIXES, label_names, read_labels
    from .io import find_images
    from .rle import decode_csv

    source = Path(path)
    if source.is_file() and source.suffix.lower() == ".csv":
        return decode_csv(source, _shape_lookup(images))
    if source.is_dir():
        files = [p for p in find_images([str(source)]) if p.suffix.lower() in LABEL_FILE_SUFFIXES]
        return {name: read_labels(p) for name, p in label_names(files).items()}
    raise InputError(f"{path}: expected a folder of label images or an RLE CSV")


def _is_csv(path: str) -> bool:
    return Path(path).suffix.lower() == ".csv"


def _as_planes(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Label images with each stack split into its planes, named as RLE CSVs name them (``rle.rle_items``)."""
    from .rle import rle_items

    return dict(item for name, image in labels.items() for item in rle_items(name, image))


def _shape_lookup(images: str | None):
    from .io import image_shape_lookup

    return image_shape_lookup(images) if images is not None else None


def _refuse_overwriting_images(targets, images) -> None:
    """Labels are never written over the images they come from (``--out`` the images' own folder, same suffix)."""
    inputs = {Path(image).resolve() for image in images}
    hit = next((target for target in targets if Path(target).resolve() in inputs), None)
    if hit is not None:
        raise InputError(f"{hit}: the labels would overwrite this input image; choose another --out folder")


def _interrupted_training(out: Path, event) -> str:
    """What Ctrl-C left of a training run: the best model and the state to resume from, saved at each epoch's end."""
    from .training import STATE_FILE

    where = "interrupted" if event is None else f"interrupted at iteration {event.iteration} (epoch {event.epoch})"
    if not (out / STATE_FILE).exists():
        return f"{where}, before the first epoch ended: nothing was saved"
    best = f" (val DSB {event.best_score:.4f})" if event is not None and event.best_score is not None else ""
    return f"{where}: the best model so far{best} is in {out}; the same command resumes from its last saved epoch"


def cmd_evaluate(args) -> int:
    from .io import atomic_write
    from .metrics import format_table, image_row, match_image, summarize

    truth = _read_label_source(args.truth, args.images)
    pred = _read_label_source(args.pred, args.images)
    if _is_csv(args.truth) != _is_csv(args.pred):  # an RLE CSV holds a stack's planes: compare plane by plane
        truth, pred = _as_planes(truth), _as_planes(pred)
    if not set(truth) & set(pred):
        example = next(iter(pred), "none")
        raise InputError(
            f"{args.pred}: no image in common with {args.truth} (e.g. prediction {example!r} has no ground truth); "
            "ImageIds must be the image file stems"
        )
    if args.only_predicted:
        truth = {key: labels for key, labels in truth.items() if key in pred}
    missing = sorted(set(truth) - set(pred))
    if missing:
        print(
            f"note: {len(missing)} of {len(truth)} ground-truth images have no prediction and count as all-missed "
            f"(--only-predicted scores the {len(truth) - len(missing)} predicted ones)",
            file=sys.stderr,
        )
    extra = sorted(set(pred) - set(truth))
    if extra:
        print(f"note: {len(extra)} predicted image(s) have no ground truth and are ignored", file=sys.stderr)
    if args.per_image:
        writable_file(args.per_image)
    counts = {}
    for key, labels in truth.items():
        predicted = pred.get(key, np.zeros_like(labels))
        if predicted.shape != labels.shape:
            raise InputError(
                f"{args.pred}: {key}: shape {predicted.shape} differs from the ground truth {labels.shape}"
            )
        counts[key] = match_image(labels, predicted)
    scores = summarize(counts.values())
    print(format_table({Path(args.pred).name: scores}))
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump(scores.as_dict(), handle, indent=2)
    if args.per_image:
        rows = [image_row(key, counts[key]) for key in sorted(counts)]
        with atomic_write(args.per_image, "w") as handle:
            writer = csv.DictWriter(handle, list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return 0


def cmd_rle(args) -> int:
    from .io import find_images, write_labels
    from .rle import read_csv, rle_items, write_csv

    if args.rle_command == "decode":
        entries = read_csv(args.csv)
        shape_of = _shape_lookup(args.images)
        decoded, overlaps = {}, 0
        for image_id, entry in entries.items():  # decode all first: a bad row writes nothing
            decoded[image_id] = entry.to_labels(
                entry.shape or (shape_of(image_id) if shape_of else None), source=args.csv
            )
            overlaps += entry.overlap_pixels
        targets = {image_id: Path(args.out) / f"{image_id}.{args.format}" for image_id in decoded}
        if args.images and Path(args.images).resolve() == Path(args.out).resolve():
            _refuse_overwriting_images(targets.values(), [p for p in Path(args.images).iterdir() if p.is_file()])
        for image_id, labels in decoded.items():
            write_labels(targets[image_id], labels)
        print(f"decoded {len(decoded)} image(s), {sum(len(e.rles) for e in entries.values())} nuclei -> {args.out}")
        if overlaps:
            print(
                f"note: {overlaps} pixel(s) were claimed by two nuclei; each went to the nucleus listed first",
                file=sys.stderr,
            )
    else:
        from .data import read_labels

        files = find_images(args.labels)
        items = []
        for path in files:
            labels = read_labels(path)
            if labels.ndim not in (2, 3, 4):
                raise InputError(f"{path}: not a label image or stack (shape {labels.shape})")
            items += rle_items(path.stem, labels)  # a stack (or a time-lapse of them) as segment --rle-csv names it
        write_csv(args.out, items, with_shape=not args.no_shape)
        nuclei = sum(int(len(np.unique(labels)) - (0 in labels)) for _, labels in items)
        print(f"encoded {len(items)} label image(s), {nuclei} nuclei -> {args.out}")
    return 0


def cmd_export_bioimageio(args) -> int:
    from .bioimageio_export import export_package
    from .model import Checkpoint, resolve_model_path

    out = writable_file(args.out)
    checkpoint = Checkpoint.load(resolve_model_path(args.model))
    params = ExportParams(
        authors=tuple(args.authors or ()),
        cite=tuple(args.cite or ()),
        license=args.license,
        test_image=args.test_image,
        run_test=args.run_test,
    )
    started = time.perf_counter()
    written = export_package(
        checkpoint, out, params, progress=lambda message: print(f"{message}…", file=sys.stderr, flush=True)
    )
    checks = "format validated, model test passed" if args.run_test else "format validated (model test skipped)"
    print(f"wrote {written} ({checks}; {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":  # python -m napari_nuclei_unet.cli: last, once every command is defined
    sys.exit(main())
