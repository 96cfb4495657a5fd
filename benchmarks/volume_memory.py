"""Peak memory of ``nuclei-unet segment`` on a large Z-stack, as a user runs it (a benchmark, not a test).

    python benchmarks/volume_memory.py [--shape 60,2048,2048] [--keep FOLDER]

Writes a generated Z-stack (``synthetic.nuclei_volume``: a 60 x 512 x 512 field of nuclei, z
step 2 px, repeated 4 x 4 across the plane: 250 M voxels, 500 MB of uint16) as an ImageJ TIFF
with axes ZYX, then runs ``nuclei-unet segment STACK.tif --voxel-size 2,1,1`` in a new process
under ``/usr/bin/time -v`` and prints its peak resident memory, wall time and the nuclei found.
The stack is labelled in 3D block by block (``BlockParams.large_volume``); tests/test_volume.py
checks that the labels are those of one piece where it fits.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from napari_nuclei_unet.synthetic import nuclei_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="60,2048,2048", help="Z,Y,X; Y and X multiples of 512")
    parser.add_argument("--keep", default=None, help="folder to write the stack and labels into (default: temporary)")
    args = parser.parse_args()
    depth, height, width = (int(v) for v in args.shape.split(","))
    tile, _ = nuclei_volume((depth, 512, 512), count=int(depth * 2 / 20 * 26 * 26 * 0.35), seed=60)
    stack = np.tile(tile, (1, height // 512, width // 512))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
        del stack
        command = [
            "/usr/bin/time", "-v", str(Path(sys.executable).with_name("nuclei-unet")), "segment",
            str(folder / "stack.tif"), "--voxel-size", "2,1,1", "--out", str(folder / "labels"),
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(run.stderr[-3000:])
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", run.stderr).group(1)
        labels = (
            tifffile.memmap(folder / "labels" / "stack.tif")
            if args.keep
            else tifffile.imread(folder / "labels" / "stack.tif")
        )
        print(
            f"{depth} x {height} x {width} ({depth * height * width / 1e6:.0f} M voxels): peak RSS "
            f"{peak_kb / 2**20:.2f} GiB, wall {wall}, {int(labels.max())} nuclei; "
            + " ".join(line for line in run.stderr.splitlines() if "nuclei" in line and "Maximum" not in line)[:300]
        )


if __name__ == "__main__":
    main()
