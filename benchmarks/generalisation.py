"""How models do on images from sources they never saw: the test-only sets, and the choosing sets beside them.

    python benchmarks/generalisation.py [--model PATH ...] [--sets cpm15,gbm40,ctc_fluo,val,monuseg_val]
                                        [--stains auto,none,hematoxylin] [--scales 1,0.5,2]
                                        [--tints blue,green,red,magenta] [--degrade shot-noise,uneven]
                                        [--json out.json]

Sets (``../shared/data/README.md`` gives each its role):

* test only: ``cpm15`` and ``gbm40`` (H&E of other origins), ``ctc_fluo`` (fluorescence
  from the Cell Tracking Challenge), ``u2os_hoechst`` and ``e2f_intestine:test`` (partly labelled: found
  objects count only inside the labelled region). Never trained on, never used to pick anything;
* choosing: ``val`` (the DSB2018 val split, also scored per image type) and ``monuseg_val``
  (the MoNuSeg tiles marked ``val`` in ``docs/data/monuseg_train_split.csv``);
* any other folder of ``../shared/data`` by name (``u2os_hoechst``), or one split of it as
  ``SET:SPLIT`` (``e2f_intestine:val``, by its ``split.csv``).

Every model runs with the default options (``SegmentParams()``: image type and stain
"auto", diameter "auto", Otsu threshold, the model's min confidence); ``--stains`` adds runs
with the stain forced, which is how the stain each model gets for tissue was chosen (on the
choosing sets). ``--scales`` adds copies as if imaged at another magnification: x0.5 is the
2 x 2 block mean of the image with the majority label of each block, x2, x3, ... the image
bilinear and the labels repeated. ``--tints`` adds the set's grey fluorescence images rendered in a
pseudo-colour (as Hoechst is often saved blue on black), one row per colour; ``--degrade`` adds them
with heavy shot noise (a few photons) or lit unevenly (a background ramp). The classical baseline
(Otsu + watershed) runs beside.
Prints the Kaggle DSB2018 score and AP@0.5 per set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_nuclei_unet.baseline import classical_segment
from napari_nuclei_unet.data import LabelledImage, image_type, load_pairs, read_split
from napari_nuclei_unet.metrics import inside_region, labelled_region, match_image, summarize
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.segment import SegmentParams, segment

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TEST_ONLY = ("cpm15", "gbm40", "ctc_fluo", "u2os_hoechst", "e2f_intestine:test")
# Sets whose labels cover only part of each image (e2f_intestine test: one crypt or villus section each, its
# README): found objects are scored only inside the labelled region (:func:`labelled_region`).
PARTIALLY_LABELLED = ("e2f_intestine:test",)


def load_set(name: str) -> list[LabelledImage]:
    """The labelled images of one set, by the name used in the tables."""
    if name == "val":
        split = read_split(DATA / "dsb2018" / "split.csv")
        return load_pairs(
            DATA / "dsb2018" / "images",
            DATA / "dsb2018" / "train_labels.csv",
            {k for k, v in split.items() if v == "val"},
        )
    if name == "monuseg_val":
        split = read_split(REPO / "docs" / "data" / "monuseg_train_split.csv")
        return load_pairs(
            DATA / "monuseg_train" / "images",
            DATA / "monuseg_train" / "labels",
            {k for k, v in split.items() if v == "val"},
        )
    if ":" in name:  # SET:SPLIT, e.g. e2f_intestine:val, by the set's own split.csv
        folder, part = name.split(":", 1)
        split = read_split(DATA / folder / "split.csv")
        names = {k for k, v in split.items() if v == part}
        return load_pairs(DATA / folder / "images", DATA / folder / "labels", names)
    return load_pairs(DATA / name / "images", DATA / name / "labels")


def magnified(sample: LabelledImage, scale: float) -> LabelledImage:
    """x0.5: 2 x 2 block mean of the image, majority label of each block (ties: the top-left one); x2, x3, ...: bilinear
    image, repeated labels."""
    if scale == 1.0:
        return sample
    image, labels = sample.image, sample.labels
    if scale == 0.5:
        height, width = (labels.shape[0] // 2) * 2, (labels.shape[1] // 2) * 2
        blocks = image[:height, :width].astype(np.float32).reshape(height // 2, 2, width // 2, 2, *image.shape[2:])
        small = blocks.mean(axis=(1, 3))
        small = np.round(small).astype(image.dtype) if image.dtype.kind in "ui" else small.astype(image.dtype)
        votes = labels[:height, :width].reshape(height // 2, 2, width // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4)
        agree = (votes[:, :, None] == votes[:, None, :]).sum(-1)
        majority = votes[np.arange(len(votes)), agree.argmax(1)].reshape(height // 2, width // 2)
        return LabelledImage(sample.name, small, majority)
    if scale >= 2 and float(scale).is_integer():
        from skimage.transform import rescale

        factor = int(scale)
        zoomed = rescale(image, factor, order=1, preserve_range=True, channel_axis=-1 if image.ndim == 3 else None)
        zoomed = np.round(zoomed).astype(image.dtype) if image.dtype.kind in "ui" else zoomed.astype(image.dtype)
        return LabelledImage(sample.name, zoomed, np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1))
    raise ValueError(f"scale must be 0.5, 1 or a whole number, got {scale}")


# Pseudo-colours fluorescence is saved in (``--tints``).
TINTS = {"blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0), "magenta": (1.0, 0.0, 1.0)}


def _grey(image: np.ndarray) -> np.ndarray:
    """A grey (or grey saved as RGB) image as float32 ``(Y, X)``."""
    return image[..., :3].astype(np.float32).mean(-1) if image.ndim == 3 else image.astype(np.float32)


def tinted(sample: LabelledImage, colour: tuple[float, float, float]) -> LabelledImage:
    """A grey image as RGB in one colour: its grey level times ``colour``, in the image's own dtype."""
    image = sample.image
    rgb = _grey(image)[..., None] * np.asarray(colour, np.float32)
    rgb = np.round(rgb).astype(image.dtype) if image.dtype.kind in "ui" else rgb.astype(image.dtype)
    return LabelledImage(sample.name, rgb, sample.labels, sample.roi)


def degraded(sample: LabelledImage, how: str) -> LabelledImage:
    """A grey image as a worse microscope would give it: ``shot-noise`` (Poisson, a quarter of a photon per grey
    level, as a short exposure) or ``uneven`` (a background ramp from 0 to a quarter of the image's range, left to
    right, as uneven illumination or haze). Deterministic; uint8 out."""
    grey = _grey(sample.image)
    grey = 255.0 * (grey - grey.min()) / max(float(np.ptp(grey)), 1e-6)
    if how == "shot-noise":
        out = np.random.default_rng(0).poisson(grey / 4.0 + 2.0) * 4.0
    elif how == "uneven":
        out = grey + np.linspace(0.0, 64.0, grey.shape[1], dtype=np.float32)[None, :]
    else:
        raise ValueError(f"unknown degradation {how!r}")
    return LabelledImage(sample.name, np.clip(out, 0, 255).astype(np.uint8), sample.labels, sample.roi)


# The last commit whose bundled model is v1 (the one before v2 was bundled), and the last with v2 as it shipped
# (distance markers for every image type).
V1_REVISION = "e54a6ac~1"
V2_REVISION = "b23d402"
_BUNDLED = "src/napari_nuclei_unet/models/default"


def model_folder(spec: str) -> Path:
    """A model folder: ``git:REV`` is the bundled model at that commit (written to a temporary folder), anything else a
    path or 'default'."""
    if not spec.startswith("git:"):
        return resolve_model_path(spec)
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="bundled-"))
    for name in ("config.json", "model.safetensors", "nuclei_unet.json"):
        blob = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{spec[4:]}:{_BUNDLED}/{name}"], capture_output=True, check=True
        ).stdout
        (folder / name).write_bytes(blob)
    return folder


def side_by_side(results: list[dict]) -> str:
    """One table: a row per set (and magnification), a column per method, "DSB score / AP@0.5" in each cell."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    rows = list(dict.fromkeys((r["set"], r["scale"], r["images"]) for r in results))
    cells = {(r["set"], r["scale"], r["method"]): f"{r['kaggle_score']:.3f} / {r['ap50']:.3f}" for r in results}
    lines = ["| set | images | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name, scale, images in rows:
        test_only = " (test only)" if name.split(" ")[0] in TEST_ONLY else ""
        label = name + ("" if scale == 1.0 else f" x{scale:g}") + test_only
        lines.append(f"| {label} | {images} | " + " | ".join(cells.get((name, scale, m), "") for m in methods) + " |")
    return "\n".join(lines)


def score(predict, samples: list[LabelledImage], partial: bool = False) -> dict:
    """The set's scores; ``partial``: each image's labels cover only part of it, and objects found elsewhere are not
    counted (:func:`labelled_region`)."""
    counts, started, records = [], time.perf_counter(), []
    for sample in samples:
        labels, record = predict(sample.image)
        if partial:
            labels = inside_region(labels, labelled_region(sample.labels))
        counts.append(match_image(sample.labels, labels))
        records.append(record)
    scores = summarize(counts)
    kinds = sorted({r.get("image_type") for r in records if r.get("image_type")})
    stains = sorted({r.get("stain") for r in records if r.get("stain")})
    return {
        "kaggle_score": scores.kaggle_score,
        "ap50": scores.ap50,
        "images": len(samples),
        "nuclei": scores.n_true,
        "found": scores.n_pred,
        "seconds": time.perf_counter() - started,
        "image_types": kinds,
        "stains": stains,
        "per_image": [c.kaggle_score for c in counts],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model folder(s), 'default', or git:REV (the bundled model at a commit); default: the bundled model",
    )
    parser.add_argument("--sets", default="cpm15,gbm40,ctc_fluo,val,monuseg_val")
    parser.add_argument("--stains", default="auto", help="stain settings to run, e.g. auto,none,hematoxylin")
    parser.add_argument(
        "--scales",
        default="1",
        help="magnifications: 0.5, 1 or whole numbers (other than 1 only for gbm40, ctc_fluo, u2os_hoechst)",
    )
    parser.add_argument(
        "--tints", default="", help=f"pseudo-colour copies of the grey fluorescence images: {','.join(TINTS)}"
    )
    parser.add_argument(
        "--degrade", default="", help="degraded copies of the grey fluorescence images: shot-noise,uneven"
    )
    parser.add_argument("--no-classical", action="store_true")
    parser.add_argument("--json", default=None)
    run(parser.parse_args())


def run(
    args: argparse.Namespace, labels: dict[str, str] | None = None, stains: dict[str, list[str]] | None = None
) -> list[dict]:
    """Score every model (and stain) on every set; print a line per result as it comes, then one table.
    ``labels`` names methods in the table (by ``"<model spec> <stain>"``); ``stains`` gives a
    model spec its own stain settings instead of ``--stains``."""
    labels, stains = labels or {}, stains or {}
    sets = {name: load_set(name) for name in args.sets.split(",")}
    if "val" in sets:  # DSB2018 val per image type, as the model card reports it
        for kind in ("fluorescence", "brightfield", "tissue"):
            sets[f"val_{kind}"] = [s for s in sets["val"] if image_type(s.image) == kind]
    scales = [float(v) for v in args.scales.split(",")]
    methods = {}
    for spec in args.model or ["default"]:
        checkpoint = Checkpoint.load(model_folder(spec))
        for stain in stains.get(spec, args.stains.split(",")):
            params = replace(SegmentParams(), stain=stain)

            def predict(image, checkpoint=checkpoint, params=params):
                result = segment(checkpoint, image, params)
                return result.labels, result.record()

            name = labels.get(f"{spec} {stain}", f"{checkpoint.name} (stain {stain})")
            methods[f"{name} [{spec}]" if name in methods else name] = predict  # two versions of one name
    if not args.no_classical:
        methods["classical"] = lambda image: (classical_segment(image), {})
    results = []
    variants = {tint: lambda s, tint=tint: tinted(s, TINTS[tint]) for tint in _listed(args, "tints")}
    variants.update({how: lambda s, how=how: degraded(s, how) for how in _listed(args, "degrade")})
    for name, samples in list(sets.items()) if variants else []:  # copies of each set's grey fluorescence images
        fluorescence = [s for s in samples if not name.startswith("val_") and image_type(s.image) == "fluorescence"]
        for variant, make in variants.items() if fluorescence else []:
            sets[f"{name} {variant}"] = [make(s) for s in fluorescence]
    for name, samples in sets.items():
        for scale in scales:
            if scale != 1.0 and name not in ("gbm40", "ctc_fluo", "u2os_hoechst"):
                continue
            copies = [magnified(s, scale) for s in samples]
            for method, predict in methods.items():
                partial = name.split(" ")[0] in PARTIALLY_LABELLED
                row = {"set": name, "scale": scale, "method": method, **score(predict, copies, partial)}
                results.append(row)
                print(
                    f"{name:18s} x{scale:<4g} {method:44s} DSB {row['kaggle_score']:.3f}  AP@0.5 {row['ap50']:.3f}  "
                    f"{row['found']}/{row['nuclei']} nuclei  {row['seconds']:.0f} s  {','.join(row['image_types'])} "
                    f"{','.join(row['stains'])}",
                    flush=True,
                )
    print("\nKaggle DSB2018 score / AP@0.5\n" + side_by_side(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def _listed(args: argparse.Namespace, option: str) -> list[str]:
    """The comma-separated values of ``option`` (absent when another script builds ``args``)."""
    return [value for value in getattr(args, option, "").split(",") if value]


if __name__ == "__main__":
    main()
