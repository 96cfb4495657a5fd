"""ID continuity through a Z-stack: does one nucleus keep one ID from plane to plane?

    python benchmarks/continuity.py [--set u2os_hoechst] [--planes 5] [--shift 3]

Each image becomes a stack of ``--planes`` crops, each ``--shift`` px further down and right
(a nucleus drifting through the stack), segmented with the Z-stack defaults. A true nucleus
counts where it lies whole inside every crop and a found nucleus matches it (IoU > 0.5) in
every plane; it keeps its ID where that found ID is the same in all planes. Plane by plane
(every plane numbered from 1) no nucleus would. The result is in docs/zstacks.md.
"""

from __future__ import annotations

import argparse

import numpy as np

from generalisation import load_set
from napari_nuclei_unet.metrics import iou_matrix
from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.segment import SegmentParams, segment


def matched_ids(truth_plane: np.ndarray, found_plane: np.ndarray) -> dict[int, int]:
    """Each true ID of the plane and the found ID matching it with IoU > 0.5 (0 where none does)."""
    iou = iou_matrix(truth_plane, found_plane)
    true_ids, found_ids = np.unique(truth_plane)[1:], np.unique(found_plane)[1:]
    if not found_ids.size:
        return dict.fromkeys(true_ids.tolist(), 0)
    best = iou.argmax(axis=1)
    matched = np.where(iou[np.arange(len(true_ids)), best] > 0.5, found_ids[best], 0)
    return dict(zip(true_ids.tolist(), matched.tolist()))


def continuity(truth: np.ndarray, found: np.ndarray) -> tuple[int, int, int]:
    """(nuclei that keep one ID, nuclei matched in every plane, nuclei whole in every plane) for one stack."""
    areas = [np.bincount(plane.ravel(), minlength=int(truth.max()) + 1) for plane in truth]
    whole = [n for n in np.unique(truth[0])[1:].tolist() if all(area[n] == areas[0][n] for area in areas)]
    planes = [matched_ids(truth_plane, found_plane) for truth_plane, found_plane in zip(truth, found)]
    ids = [[plane[nucleus] for plane in planes] for nucleus in whole]  # whole: in every plane's truth
    matched = [found_ids for found_ids in ids if all(found_ids)]
    return sum(len(set(found_ids)) == 1 for found_ids in matched), len(matched), len(whole)


def shifted_stack(array: np.ndarray, planes: int, shift: int) -> np.ndarray:
    """``planes`` crops of ``array``, each ``shift`` px further down and right."""
    margin = shift * (planes - 1)
    height, width = array.shape[:2]
    starts = [z * shift for z in range(planes)]
    return np.stack([array[y : height - margin + y, y : width - margin + y] for y in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="u2os_hoechst")
    parser.add_argument("--planes", type=int, default=5)
    parser.add_argument("--shift", type=int, default=3)
    args = parser.parse_args()
    checkpoint = Checkpoint.load(bundled_model_path())
    kept = matched = whole = 0
    for item in load_set(args.set):
        truth = shifted_stack(item.labels, args.planes, args.shift)
        stack = shifted_stack(item.image, args.planes, args.shift)
        found = np.asarray(segment(checkpoint, stack, SegmentParams(stack="z")).labels)
        counts = continuity(truth, found)
        kept, matched, whole = kept + counts[0], matched + counts[1], whole + counts[2]
        print(f"{item.name}: {counts[0]} of {counts[1]} matched ({counts[2]} whole)", flush=True)
    print(
        f"{args.set}: {kept} of {matched} matched nuclei ({100 * kept / max(matched, 1):.1f}%) keep one ID through "
        f"{args.planes} planes; {kept} of {whole} whole nuclei ({100 * kept / max(whole, 1):.1f}%)"
    )


if __name__ == "__main__":
    main()
