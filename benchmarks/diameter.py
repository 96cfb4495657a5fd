"""The size estimate and the segmentation of generated nuclei from 10 to 60 px (a benchmark, not a test).

    python benchmarks/diameter.py [--model default] [--precision int8|float32]

The generated fields of ``tests/test_diameter.py`` at every magnification, with the
defaults (diameter "auto"): the estimated diameter against the true median, and AP@0.5 and
pixel Dice of the labels. Each row is checked against the bars of the model v3 issue (the
estimate within 15% everywhere; AP@0.5 of at least 0.9 for 40 and 60 px nuclei); a row that
misses says MISS. The unit tests
check the estimator's logic; how well a model does on these fields is measured here.
"""

from __future__ import annotations

import argparse

from napari_nuclei_unet.data import median_diameter
from napari_nuclei_unet.metrics import evaluate
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.segment import SegmentParams, segment
from napari_nuclei_unet.synthetic import nuclei_field
from napari_nuclei_unet.tiling import TilingParams

ESTIMATE_BAR = 0.15  # relative error of the estimated diameter
AP50_BAR = 0.9

# (name, shape, count, diameter, seed, AP@0.5 bar or None): the fields of tests/test_diameter.py
FIELDS = [
    ("10 px", (128, 160), 30, 10.0, 11, None),
    ("20 px", (256, 320), 30, 20.0, 11, None),
    ("40 px", (512, 640), 30, 40.0, 11, AP50_BAR),
    ("40 px, 12 nuclei", (240, 300), 12, 40.0, 14, AP50_BAR),
    ("60 px", (768, 960), 30, 60.0, 11, AP50_BAR),
    ("60 px, 480x600", (480, 600), 30, 60.0, 12, AP50_BAR),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--precision", default=TilingParams().precision, choices=["int8", "float32"])
    args = parser.parse_args()
    checkpoint = Checkpoint.load(resolve_model_path(args.model))
    params = SegmentParams(tiling=TilingParams(precision=args.precision))
    print(
        f"model {checkpoint.name}, {args.precision}; bars: estimate within {ESTIMATE_BAR:.0%}, AP@0.5 >= {AP50_BAR} "
        "(40 and 60 px)"
    )
    print(f"{'field':<18} {'true px':>8} {'estimate':>9} {'error':>7} {'AP@0.5':>7} {'Dice':>6}  verdict")
    for name, shape, count, diameter, seed, ap_bar in FIELDS:
        image, truth = nuclei_field(shape, count=count, diameter=diameter, seed=seed)
        true = median_diameter([truth])
        result = segment(checkpoint, image, params)
        scores = evaluate([(truth, result.labels)])
        error = abs(result.diameter / true - 1.0) if result.diameter else float("inf")
        misses = [
            what
            for what, missed in (
                ("estimate", error > ESTIMATE_BAR),
                ("AP@0.5", ap_bar is not None and scores.ap50 < ap_bar),
            )
            if missed
        ]
        estimate = f"{result.diameter:.1f}" if result.diameter else "none"
        verdict = "MISS " + ", ".join(misses) if misses else "ok"
        print(f"{name:<18} {true:>8.1f} {estimate:>9} {error:>7.0%} {scores.ap50:>7.3f} {scores.dice:>6.3f}  {verdict}")


if __name__ == "__main__":
    main()
