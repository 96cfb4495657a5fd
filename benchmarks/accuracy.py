"""Accuracy on the DSB2018 `val` split: bundled model vs. the classical baseline (and other models).

    python benchmarks/accuracy.py --versions [--json out.json]
    python benchmarks/accuracy.py [--data ../shared/data/dsb2018] [--model PATH ...] [--tta]
                                  [--scales 1,0.5,2,4] [--json out.json]

``--versions``: the bundled models v1 and v2 (from git history) and the bundled one side by side with the
classical baseline, on every set of ``generalisation.py`` (test-only and choosing) and on
each image type of DSB2018 val, with the defaults. v1 runs twice: with the stain it had as
default ("none") and with today's "auto", which reads tissue through the hematoxylin channel
for a model that records no stain choice, as v1 (and other images as they are). One table, "DSB score / AP@0.5" per
cell.

Prints one table for all val images and the same table per image type (fluorescence vs
brightfield/tissue). Megapixels/s is end to end per image (network + post-processing),
single process, on this machine. Each model runs with the default options (nucleus
diameter "auto") and with ``diameter=None`` (the image at its own scale).

``--scales`` also scores rescaled copies of the val split (images bilinear, labels
nearest-neighbour), as if imaged at another magnification, and ends with a table of the
Kaggle DSB2018 score per scale next to the native one. Shrinking by an integer factor
samples image and labels at the same pixels (see ``rescaled``); ``--shrink skimage``
gives the earlier copies, whose labels sit a quarter pixel off their image. This is a
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_nuclei_unet.baseline import classical_segment
from napari_nuclei_unet.data import LabelledImage, image_kind, load_pairs, read_split
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


def rescaled(sample: LabelledImage, scale: float, shrink: str = "registered") -> LabelledImage:
    """The sample as imaged at ``scale`` x the magnification: image bilinear, labels nearest.

    Shrinking by an integer factor k ("registered"): the image is smoothed as scikit-image
    antialiases (sigma (k - 1) / 2) and image and labels are both taken at every k-th
    pixel, so each label sits on its image pixel. scikit-image's ``rescale`` ("skimage")
    puts the image pixel's centre between two original pixels and nearest-neighbour
    labels on one of them: at x0.5 the labels' centroids sit 0.19 / 0.24 px (y / x) off
    their nuclei, which costs a segmentation that is right about the image ~0.05 DSB
    score. Enlarging has no such offset.
    """
    if scale == 1.0:
        return sample
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.transform import rescale

    image = sample.image
    step = round(1.0 / scale)
    if shrink == "registered" and scale < 1.0 and abs(step * scale - 1.0) < 1e-9:
        sigma = [(step - 1) / 2.0] * 2 + [0.0] * (image.ndim - 2)
        smooth = ndi.gaussian_filter(image.astype(np.float32), sigma)[::step, ::step]
        small = np.round(smooth).astype(image.dtype) if image.dtype.kind in "ui" else smooth.astype(image.dtype)
        return LabelledImage(sample.name, small, sample.labels[::step, ::step].copy())
    zoomed = rescale(
        image,
        scale,
        order=1,
        preserve_range=True,
        anti_aliasing=scale < 1,
        channel_axis=-1 if image.ndim == 3 else None,
    )
    labels = rescale(sample.labels, scale, order=0, preserve_range=True, anti_aliasing=False).astype(
        sample.labels.dtype
    )
    return LabelledImage(
        sample.name,
        np.round(zoomed).astype(image.dtype) if image.dtype.kind in "ui" else zoomed.astype(image.dtype),
        labels,
    )


def compare_versions(json_path: str | None) -> None:
    """v1 and v2 of the bundled model and the classical baseline, on every set: ``generalisation.run``."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from generalisation import V1_REVISION, V2_REVISION, run

    v1, v2 = f"git:{V1_REVISION}", f"git:{V2_REVISION}"
    args = argparse.Namespace(
        model=[v1, v2, "default"],
        sets="cpm15,gbm40,ctc_fluo,u2os_hoechst,e2f_intestine:test,val,monuseg_val,e2f_intestine:val",
        stains="auto",
        scales="1",
        no_classical=False,
        json=json_path,
    )
    labels = {
        f"{v1} none": "v1, defaults (stain none)",
        f"{v1} auto": "v1, tissue as hematoxylin",
        f"{v2} auto": "v2, defaults",
        "default auto": "bundled, defaults",
    }
    run(args, labels=labels, stains={v1: ["none", "auto"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    parser.add_argument("--model", action="append", default=None, help="model folder(s); default: the bundled model")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--scales", default="1", help="comma-separated magnification factors, e.g. 1,0.5,2,4")
    parser.add_argument(
        "--shrink",
        default="registered",
        choices=("registered", "skimage"),
        help="how shrunk copies are made (see rescaled)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N val images (quick checks)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--versions", action="store_true", help="v1 and v2 of the bundled model on every set (see above)"
    )
    args = parser.parse_args()
    if args.versions:
        compare_versions(args.json)
        return

    data = Path(args.data)
    split = read_split(data / "split.csv")
    names = sorted(k for k, v in split.items() if v == "val")[: args.limit]
    samples = load_pairs(data / "images", data / "train_labels.csv", set(names))
    kinds = [image_kind(s.image) for s in samples]
    print(
        f"{len(samples)} val images: {kinds.count('fluorescence')} fluorescence, {kinds.count('brightfield')} "
        "brightfield/tissue"
    )

    methods = {"classical (Gaussian+Otsu+watershed)": classical_segment}
    for model_path in args.model or ["default"]:
        checkpoint = Checkpoint.load(resolve_model_path(model_path))
        label = f"{checkpoint.name} ({checkpoint.config.encoder_name}{', TTA' if args.tta else ''})"
        for suffix, diameter in (("", "auto"), (", diameter none", None)):
            params = SegmentParams(tiling=TilingParams(tta=args.tta), diameter=diameter)
            segment(checkpoint, samples[0].image, params)  # warm-up outside the timing
            methods[label + suffix] = lambda image, c=checkpoint, p=params: segment(c, image, p).labels

    scales = [float(v) for v in args.scales.split(",")]
    report, by_scale = {}, {}
    for scale in scales:
        scaled = [rescaled(s, scale, args.shrink) for s in samples]
        results, speed = {}, {}
        for name, predict in methods.items():
            results[name], speed[name] = run_method(name, predict, scaled)
        for group in ("all", "fluorescence", "brightfield"):
            rows, extra = {}, {}
            for name, counts in results.items():
                chosen = [c for c, k in zip(counts, kinds) if group == "all" or k == group]
                if chosen:
                    rows[name] = summarize(chosen)
                    extra[name] = {"MP/s": f"{speed[name]:.2f}"} if group == "all" else {}
            print(f"\n## x{scale:g}, {group} ({rows[next(iter(rows))].n_images} images)", flush=True)
            print(format_table(rows, extra), flush=True)
            report.setdefault(f"x{scale:g}", {})[group] = {
                name: {**scores.as_dict(), "mp_per_s": speed[name]} for name, scores in rows.items()
            }
            if group == "all":
                by_scale[scale] = {name: scores.kaggle_score for name, scores in rows.items()}
    if len(scales) > 1:
        print(scale_table(by_scale))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def scale_table(by_scale: dict[float, dict[str, float]]) -> str:
    """Kaggle DSB2018 score per magnification, with the change from x1 for each method."""
    names = list(next(iter(by_scale.values())))
    native = by_scale.get(1.0)
    lines = [
        "\n## Kaggle DSB2018 score by magnification (change from x1)",
        "method | " + " | ".join(f"x{s:g}" for s in by_scale),
    ]
    for name in names:
        cells = []
        for values in by_scale.values():
            cell = f"{values[name]:.3f}"
            if native is not None and values is not native:
                cell += f" ({values[name] - native[name]:+.3f})"
            cells.append(cell)
        lines.append(f"{name} | " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
