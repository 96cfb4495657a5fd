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
from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.segment import SegmentParams, segment


def matched_id(truth_plane: np.ndarray, found_plane: np.ndarray, nucleus: int) -> int:
    """The found ID overlapping ``nucleus`` with IoU > 0.5, or 0."""
    inside = truth_plane == nucleus
    ids, overlap = np.unique(found_plane[inside], return_counts=True)
    best = int(np.argmax(np.where(ids > 0, overlap, -1)))
    if ids[best] == 0:
        return 0
    union = int(inside.sum() + (found_plane == ids[best]).sum() - overlap[best])
    return int(ids[best]) if overlap[best] / union > 0.5 else 0


def continuity(truth: np.ndarray, found: np.ndarray) -> tuple[int, int, int]:
    """(nuclei that keep one ID, nuclei matched in every plane, nuclei whole in every plane) for one stack."""
    kept = matched = whole = 0
    for nucleus in np.unique(truth[0])[1:]:
        if any((plane == nucleus).sum() != (truth[0] == nucleus).sum() for plane in truth):
            continue  # cut by a crop's border
        whole += 1
        ids = [matched_id(truth[z], found[z], nucleus) for z in range(len(truth))]
        if all(ids):
            matched += 1
            kept += len(set(ids)) == 1
    return kept, matched, whole


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
