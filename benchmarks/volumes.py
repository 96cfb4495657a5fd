"""3D nuclei on ``bbbc050_3d`` (30 mouse-embryo volumes, z step 2.18x the pixel): the DSB2018 score with 3D IoU.

    python benchmarks/volumes.py [--data ../shared/data/bbbc050_3d] [--voxel-size 2.18,1,1] [--rules]

Rows: the defaults with the voxel size (a Z-stack labelled in 3D, what ``nuclei-unet segment
VOLUME.tif --axes ZYX --voxel-size 2.18,1,1`` does), the same stack segmented plane by plane
(every plane numbered on its own, the behaviour before 3D), and with ``--rules`` the
alternatives measured to choose the 3D rule: planes labelled in 2D and stitched by overlap
(cellpose's ``stitch_threshold``), and a normaliser per plane. This set is for choosing and
testing the 3D rules only (docs/zstacks.md); its licence keeps it out of training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_nuclei_unet.metrics import match_image
from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.segment import SegmentParams, segment
from napari_nuclei_unet.volume import stitch_planes


def score(counts) -> tuple[float, float, int]:
    """DSB2018 score (mean over volumes), AP@0.5 over the set, and the objects found."""
    tp = sum(int(c.tp[0]) for c in counts)
    true, found = sum(c.n_true for c in counts), sum(c.n_pred for c in counts)
    return float(np.mean([c.kaggle_score for c in counts])), tp / max(true + found - tp, 1), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/bbbc050_3d")
    parser.add_argument("--voxel-size", default="2.18,1,1")
    parser.add_argument("--rules", action="store_true", help="also the rules not chosen")
    args = parser.parse_args()
    voxel = tuple(float(v) for v in args.voxel_size.split(","))
    root = Path(args.data)
    stems = sorted(path.stem for path in (root / "images").glob("*.tif"))
    if not stems:
        parser.error(f"no volumes in {root / 'images'} (run from the project root, or give --data)")
    checkpoint = Checkpoint.load(bundled_model_path())
    z_stack = SegmentParams(stack="z", voxel_size=voxel)
    runs = {"Z-stack, 3D (default + voxel size)": z_stack, "separate planes (before)": SegmentParams(stack="planes")}
    stitched = "separate planes, stitched (IoU 0.25)"
    counts: dict[str, list] = {name: [] for name in [*runs, *([stitched] if args.rules else [])]}
    seconds = 0.0
    for stem in stems:
        volume = tifffile.imread(root / "images" / f"{stem}.tif")
        truth = tifffile.imread(root / "labels" / f"{stem}.tif")
        for name, params in runs.items():
            started = time.perf_counter()
            labels = np.asarray(segment(checkpoint, volume, params).labels)
            if params is z_stack:
                seconds += time.perf_counter() - started
            counts[name].append(match_image(truth, labels))
            if args.rules and params.stack == "planes":  # the same planes' labels, joined plane to plane
                counts[stitched].append(match_image(truth, stitch_planes(labels)))
    true = sum(c.n_true for c in counts[next(iter(counts))])
    print(f"bbbc050_3d: {len(stems)} volumes, {true} nuclei; voxel size {voxel}; 3D: {seconds:.1f} s in all")
    print(f"{'rule':44s} {'DSB':>6s} {'AP@0.5':>7s} {'found':>6s}")
    for name, found in counts.items():
        dsb, ap50, objects = score(found)
        print(f"{name:44s} {dsb:6.3f} {ap50:7.3f} {objects:6d}")


if __name__ == "__main__":
    main()
