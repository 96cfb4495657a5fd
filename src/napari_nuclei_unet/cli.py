"""``nuclei-unet``: segment, train, evaluate and convert RLE from the command line.

Expected failures (bad files, bad weights) print one line naming the file and the
problem and exit with status 2; nothing partial is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .errors import Cancelled, InputError, NucleiUnetError


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


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="checkpoint folder or .pth state_dict (default: the bundled model)")
    parser.add_argument("--encoder", default=None, help="encoder of a plain .pth state_dict when it can't be inferred (e.g. efficientnet-b3)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def _add_segment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile-size", type=int, default=1024, help="tile edge in pixels (smaller tiles use less memory)")
    parser.add_argument("--overlap", type=int, default=64, help="overlap between tiles in pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="tiles per network call")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"], help="CPU inference engine: auto = ONNX Runtime when installed (~2x faster than torch), else PyTorch")
    parser.add_argument("--precision", default="int8", choices=["int8", "float32"], help="network precision with ONNX Runtime on the CPU: int8 (network ~1.7x faster; same val DSB2018 score within 0.001) or float32 (as trained; PyTorch and GPUs always use it)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (4 flips; ~4x slower)")
    parser.add_argument("--threshold", type=_auto_or_fraction(zero_allowed=False), default="auto", help="foreground probability threshold, or auto")
    parser.add_argument("--min-size", type=int, default=15, help="remove nuclei smaller than this many pixels")
    parser.add_argument("--hole-size", type=int, default=64, help="fill holes up to this many pixels")
    parser.add_argument("--markers", default="distance", choices=["distance", "boundary"], help="watershed markers: distance-transform peaks, or the model's predicted interiors")
    parser.add_argument("--h", type=float, default=0.5, help="h-maxima height for distance markers, pixels (higher splits fewer nuclei)")
    parser.add_argument(
        "--min-confidence", type=_auto_or_fraction(zero_allowed=True), default="auto",
        help="drop objects whose mean foreground probability is below this (folds, debris); auto: the value calibrated for the model (0.85 for the bundled one), 0: keep all",
    )  # fmt: skip
    parser.add_argument("--stain", default="none", choices=["none", "hematoxylin"], help="hematoxylin: segment the hematoxylin channel of brightfield RGB images (e.g. DAB immunohistochemistry)")
    parser.add_argument(
        "--diameter", type=_diameter, default="auto",
        help="typical nucleus diameter in pixels: auto (estimated per image; default), a number, or none (no rescaling). "
        "Images are rescaled so nuclei match the model's training size",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nuclei-unet", description="Nuclei segmentation with a tiled U-Net and watershed.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment images into instance label images")
    seg.add_argument("inputs", nargs="+", help="image files, .zarr stores, folders or glob patterns")
    seg.add_argument("--out", required=True, help="output folder for <stem>.tif (or .zarr) label images")
    seg.add_argument("--rle-csv", default=None, help="also write one RLE CSV for all inputs (ImageId = file stem)")
    seg.add_argument("--out-format", default="tif", choices=["tif", "zarr"], help="label images as TIFF, or zarr stores (written block by block, for images larger than memory)")
    seg.add_argument("--workers", type=int, default=None, help="run on a dask LocalCluster of this many worker processes")
    seg.add_argument("--dask-scheduler", default=None, help="run on an existing dask.distributed cluster, e.g. tcp://HOST:8786 (the --out folder must be shared with the workers)")
    _add_model_args(seg)
    _add_segment_args(seg)

    train = commands.add_parser("train", help="train or fine-tune a model")
    train.add_argument("--images", required=True, help="folder of images")
    train.add_argument("--labels", required=True, help="folder of label images, an RLE CSV, or a Kaggle DSB folder")
    train.add_argument("--out", required=True, help="output model folder (resumes if it holds a training state)")
    train.add_argument("--model", default=None, help="starting weights: 'default' (bundled), a checkpoint, or none for a fresh U-Net")
    train.add_argument("--encoder", default="mobilenet_v2", help="encoder of a fresh U-Net")
    train.add_argument("--decoder-channels", default="128,64,32,16,16", help="decoder widths of a fresh U-Net")
    train.add_argument("--encoder-weights", default=None, choices=[None, "imagenet"], help="pretrained encoder for a fresh U-Net (needs internet)")
    train.add_argument("--split", default=None, help="CSV ImageId,split: train on 'train', validate on 'val'")
    train.add_argument("--val-fraction", type=float, default=0.15, help="images held out for validation when --split is not given")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    train.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall-clock time (validates and saves)")
    train.add_argument("--patch-size", type=int, default=256)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    train.add_argument("--scale-range", default="0.5,2.0", help="zoom range of the scale augmentation")
    train.add_argument("--low-resolution", type=float, default=0.0, help="share of patches blurred as if taken at up to 2.5x lower magnification (experimental; see the model card)")
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--freeze-batchnorm", action="store_true", help="keep the starting model's BatchNorm statistics (fine-tuning on a few images)")
    train.add_argument("--zoom-to-reference", action="store_true", help="show each image's nuclei at the zoom segmentation will use (fine-tuning)")
    train.add_argument("--anchor-weight", type=float, default=0.0, help="L2-SP pull towards the starting weights (fine-tuning)")
    train.add_argument("--distill-weight", type=float, default=0.0, help="hold the other image types to the starting model's output, seen on restyled patches (fine-tuning; the widget uses 1)")
    train.add_argument("--start-weight-share", type=float, default=0.0, help="share of the starting weights mixed into the saved model, WiSE-FT (fine-tuning; the widget uses 0.25)")
    train.add_argument("--no-resume", action="store_true", help="start over even if --out holds a training state")
    train.add_argument("--overwrite", action="store_true", help="allow writing into an existing model folder")
    train.add_argument("--device", default="auto")
    train.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    train.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="training arithmetic: auto = bfloat16 autocast on CPUs with native bfloat16 (~1.5x faster steps), float32 elsewhere")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-calibrate", action="store_true", help="skip calibrating the model's min confidence on the validation images (with the training images when there are few) after training")

    ev = commands.add_parser("evaluate", help="score predictions against ground truth")
    ev.add_argument("--truth", required=True, help="folder of label images or an RLE CSV")
    ev.add_argument("--pred", required=True, help="folder of label images or an RLE CSV")
    ev.add_argument("--images", default=None, help="image folder giving shapes for RLE CSVs without Height/Width")
    ev.add_argument("--json", default=None, help="also write the metrics as JSON")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = {"segment": cmd_segment, "train": cmd_train, "evaluate": cmd_evaluate, "rle": cmd_rle}[args.command]
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


def _load_checkpoint(args):
    from .model import Checkpoint, resolve_model_path

    return Checkpoint.load(resolve_model_path(args.model), encoder=args.encoder)


def cmd_segment(args) -> int:
    from .batch import output_path
    from .io import find_images
    from .model import resolve_device
    from .onnx_backend import describe_device
    from .postprocess import PostprocessParams
    from .rle import write_csv
    from .segment import SegmentParams
    from .tiling import TilingParams

    files = find_images(args.inputs)
    out = Path(args.out)
    targets = [output_path(out, path, args.out_format) for path in files]
    clashes = sorted({t.name for t in targets if targets.count(t) > 1})
    if clashes:
        raise InputError(f"{out}: several inputs would write {', '.join(clashes[:3])}; segment them into separate --out folders")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    distributed = args.workers or args.dask_scheduler
    device = resolve_device("cpu" if distributed and args.device == "auto" else args.device)
    checkpoint = _load_checkpoint(args)  # fails early, here, on bad weights
    params = SegmentParams(
        TilingParams(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size, device=str(device), tta=args.tta, backend=args.backend, precision=args.precision),
        PostprocessParams(threshold=args.threshold, min_size=args.min_size, hole_size=args.hole_size, markers=args.markers, h=args.h, min_confidence=args.min_confidence),
        diameter=args.diameter,
        stain=args.stain,
    )
    print(f"model: {checkpoint.summary()} | device: {describe_device(device, args.backend, args.precision)}", file=sys.stderr)
    started = time.perf_counter()
    if distributed:
        results = _segment_distributed(args, files, params)
    else:
        results = _segment_serial(checkpoint, files, out, params, args.out_format)
    if args.rle_csv:  # from the written files: one codec, and flat memory for thousands of images
        write_csv(args.rle_csv, _rle_items(results))
    seconds = time.perf_counter() - started
    pixels = sum(r.pixels for r in results)
    print(
        f"segmented {len(results)} image(s): {sum(r.nuclei for r in results)} nuclei in {seconds:.1f} s, "
        f"{pixels / 1e6 / max(seconds, 1e-9):.2f} MP/s on {device}; "
        f"{_diameter_summary(args.diameter, [r.diameter for r in results if r.diameter is not None])} -> {out}"
    )
    return 0


def _segment_serial(checkpoint, files, out, params, out_format):
    from tqdm import tqdm

    from .batch import segment_file

    results = []
    with tqdm(files, unit="image", desc="segment", file=sys.stderr) as bar:
        for path in bar:
            steps = tqdm(unit="step", leave=False, file=sys.stderr)

            def progress(done: int, total: int, steps=steps) -> None:
                steps.total, steps.n = total, done
                steps.refresh()

            with steps:
                result = segment_file(checkpoint, path, out, params, out_format, progress=progress)
            results.append(result)
            bar.set_postfix(nuclei=result.nuclei, diameter=_format_diameter(result))
    return results


def _segment_distributed(args, files, params):
    """One task per image on a dask.distributed cluster: an existing one, or a LocalCluster of --workers."""
    import os

    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

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
        print(f"dask: {len(client.scheduler_info()['workers'])} worker(s) at {client.scheduler.address}", file=sys.stderr)
        futures = [
            client.submit(segment_file_task, args.model, args.encoder, str(path), str(Path(args.out).resolve()), params, args.out_format, threads, pure=False)
            for path in files
        ]
        order = {future.key: index for index, future in enumerate(futures)}
        results = [None] * len(futures)
        with tqdm(total=len(futures), unit="image", desc="segment", file=sys.stderr) as bar:
            for future in as_completed(futures):
                result = future.result()  # re-raises a worker's error (e.g. a bad file) here
                results[order[future.key]] = result
                bar.update()
                bar.set_postfix(nuclei=result.nuclei, diameter=_format_diameter(result))
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _rle_items(results):
    """``(image_id, labels)`` of the written outputs, read back one at a time."""
    from .io import read_image

    for result in results:
        path = Path(result.output)
        if path.suffix == ".zarr":
            import zarr

            labels = np.asarray(zarr.open_array(str(path), mode="r")[...])
        else:
            labels = read_image(path)
        stem = Path(result.source).stem
        if labels.ndim == 2:
            yield stem, labels
        else:
            yield from ((f"{stem}_{i}", plane) for i, plane in enumerate(labels))


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
    from .train import STATE_FILE, TrainConfig, fit

    out = Path(args.out)
    resuming = (out / STATE_FILE).exists() and not args.no_resume
    if out.exists() and any(out.iterdir()) and not resuming and not args.overwrite:
        raise InputError(f"{out}: folder exists and is not empty; pass --overwrite or choose another --out")
    split = read_split(args.split) if args.split else None
    if split is not None:
        train = load_pairs(args.images, args.labels, {k for k, v in split.items() if v == "train"})
        val = load_pairs(args.images, args.labels, {k for k, v in split.items() if v == "val"})
    else:
        train, val = load_pairs(args.images, args.labels), None
    if args.model:
        checkpoint = Checkpoint.load(resolve_model_path(args.model))
    else:
        decoder = tuple(int(c) for c in args.decoder_channels.split(","))
        config = ModelConfig(encoder_name=args.encoder, encoder_depth=len(decoder), decoder_channels=decoder)
        checkpoint = Checkpoint.create(config, encoder_weights=args.encoder_weights)
    scale = tuple(float(v) for v in args.scale_range.split(","))
    config = TrainConfig(
        epochs=args.epochs, iterations_per_epoch=args.iterations, max_minutes=args.max_minutes, patch_size=args.patch_size,
        batch_size=args.batch_size, learning_rate=args.lr, augment=not args.no_augment, scale_range=scale, freeze_batchnorm=args.freeze_batchnorm,
        low_resolution=args.low_resolution, zoom_to_reference=args.zoom_to_reference, anchor_weight=args.anchor_weight, distill_weight=args.distill_weight,
        start_weight_share=args.start_weight_share, val_every=args.val_every, val_fraction=args.val_fraction, device=args.device, seed=args.seed,
        threads=args.threads, precision=args.precision, calibrate=not args.no_calibrate,
    )
    bar = tqdm(total=config.epochs * config.iterations_per_epoch, unit="it", desc="train", file=sys.stderr)

    def progress(event) -> None:
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

    with bar:
        result = fit(checkpoint, train, out, val, config, progress=progress, data_description=_describe(args, train))
    best = f"{result.best_score:.4f}" if result.best_score is not None else "n/a"
    calibration = checkpoint.metadata.get("postprocess", {}) if config.calibrate and not result.cancelled else {}
    calibrated = f"; min confidence {calibration['min_confidence']:g} (calibrated on {calibration['calibrated_on']})" if calibration else ""
    print(f"trained {result.iteration} iterations in {result.elapsed / 60:.1f} min on {result.device}; best val DSB score {best}{calibrated} -> {out}")
    return 0


def _describe(args, train) -> str:
    return f"{len(train)} images from {Path(args.images).resolve().parent.name}/{Path(args.images).name}"


def _read_label_source(path: str, images: str | None) -> dict[str, np.ndarray]:
    from .io import IMAGE_SUFFIXES, find_images, read_image
    from .rle import decode_csv

    source = Path(path)
    if source.is_file() and source.suffix.lower() == ".csv":
        return decode_csv(source, _shape_lookup(images))
    if source.is_dir():
        return {p.stem: read_image(p) for p in find_images([str(source)]) if p.suffix.lower() in IMAGE_SUFFIXES}
    raise InputError(f"{path}: expected a folder of label images or an RLE CSV")


def _shape_lookup(images: str | None):
    from .io import image_shape_lookup

    return image_shape_lookup(images) if images is not None else None


def cmd_evaluate(args) -> int:
    from .io import atomic_write
    from .metrics import evaluate, format_table

    truth = _read_label_source(args.truth, args.images)
    pred = _read_label_source(args.pred, args.images)
    missing = sorted(set(truth) - set(pred))
    if missing:
        print(f"note: {len(missing)} image(s) have no prediction and count as all-missed: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    extra = sorted(set(pred) - set(truth))
    if extra:
        print(f"note: {len(extra)} predicted image(s) have no ground truth and are ignored", file=sys.stderr)
    pairs = []
    for key, labels in truth.items():
        predicted = pred.get(key, np.zeros_like(labels))
        if predicted.shape != labels.shape:
            raise InputError(f"{args.pred}: {key}: shape {predicted.shape} differs from the ground truth {labels.shape}")
        pairs.append((labels, predicted))
    scores = evaluate(pairs)
    print(format_table({Path(args.pred).name: scores}))
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump(scores.as_dict(), handle, indent=2)
    return 0


def cmd_rle(args) -> int:
    from .io import find_images, read_image, write_labels
    from .rle import read_csv, write_csv

    if args.rle_command == "decode":
        entries = read_csv(args.csv)
        shape_of = _shape_lookup(args.images)
        decoded, overlaps = {}, 0
        for image_id, entry in entries.items():  # decode all first: a bad row writes nothing
            decoded[image_id] = entry.to_labels(entry.shape or (shape_of(image_id) if shape_of else None), source=args.csv)
            overlaps += entry.overlap_pixels
        for image_id, labels in decoded.items():
            write_labels(Path(args.out) / f"{image_id}.{args.format}", labels)
        print(f"decoded {len(decoded)} image(s), {sum(len(e.rles) for e in entries.values())} nuclei -> {args.out}")
        if overlaps:
            print(f"note: {overlaps} pixel(s) were claimed by two nuclei; each went to the nucleus listed first", file=sys.stderr)
    else:
        files = find_images(args.labels)
        items = []
        for path in files:
            labels = read_image(path)
            if labels.ndim != 2 or labels.dtype.kind not in "iub":
                raise InputError(f"{path}: not a 2D integer label image (shape {labels.shape}, {labels.dtype})")
            items.append((path.stem, labels))
        write_csv(args.out, items, with_shape=not args.no_shape)
        print(f"encoded {len(items)} label image(s), {sum(int(len(np.unique(l)) - (0 in l)) for _, l in items)} nuclei -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
