"""Accuracy on the DSB2018 `val` split: bundled model vs. the classical baseline (and other models).

    python benchmarks/accuracy.py [--data ../shared/data/dsb2018] [--model PATH ...] [--tta] [--json out.json]

Prints one table for all val images and the same table per image type (fluorescence vs
brightfield/tissue). Megapixels/s is end to end per image (network + post-processing),
single process, on this machine. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_nuclei_unet.baseline import classical_segment
from napari_nuclei_unet.data import image_kind, load_pairs, read_split
from napari_nuclei_unet.metrics import format_table, match_image, summarize
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.segment import SegmentParams, segment
from napari_nuclei_unet.tiling import TilingParams

REPO = Path(__file__).resolve().parents[1]


def run_method(name, predict, samples):
    """Per-image counts and throughput of one method."""
    counts, seconds, pixels = [], 0.0, 0
    for sample in samples:
        started = time.perf_counter()
        labels = predict(sample.image)
        seconds += time.perf_counter() - started
        pixels += sample.labels.size
        counts.append(match_image(sample.labels, labels))
    return counts, pixels / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    parser.add_argument("--model", action="append", default=None, help="model folder(s); default: the bundled model")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="only the first N val images (quick checks)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = Path(args.data)
    split = read_split(data / "split.csv")
    names = sorted(k for k, v in split.items() if v == "val")[: args.limit]
    samples = load_pairs(data / "images", data / "train_labels.csv", set(names))
    kinds = [image_kind(s.image) for s in samples]
    print(f"{len(samples)} val images: {kinds.count('fluorescence')} fluorescence, {kinds.count('brightfield')} brightfield/tissue")

    methods = {"classical (Gaussian+Otsu+watershed)": classical_segment}
    params = SegmentParams(tiling=TilingParams(tta=args.tta))
    for model_path in args.model or ["default"]:
        checkpoint = Checkpoint.load(resolve_model_path(model_path))
        label = f"{checkpoint.name} ({checkpoint.config.encoder_name}{', TTA' if args.tta else ''})"
        segment(checkpoint, samples[0].image, params)  # warm-up outside the timing
        methods[label] = lambda image, c=checkpoint: segment(c, image, params).labels

    results, speed = {}, {}
    for name, predict in methods.items():
        results[name], speed[name] = run_method(name, predict, samples)

    report = {}
    for group in ("all", "fluorescence", "brightfield"):
        rows, extra = {}, {}
        for name, counts in results.items():
            chosen = [c for c, k in zip(counts, kinds) if group == "all" or k == group]
            if chosen:
                rows[name] = summarize(chosen)
                extra[name] = {"MP/s": f"{speed[name]:.2f}"} if group == "all" else {}
        print(f"\n## {group} ({rows[next(iter(rows))].n_images} images)")
        print(format_table(rows, extra))
        report[group] = {name: {**scores.as_dict(), "mp_per_s": speed[name]} for name, scores in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
