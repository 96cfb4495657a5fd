"""End-to-end speed and peak memory of `nuclei-unet segment` (a benchmark, not a test).

    python benchmarks/speed.py [--data ../shared/data/dsb2018] [--sizes 1,4,16,64] [--threads 2]

Each measurement runs in a fresh process, so its peak RSS is its own. "End to end" is
what the CLI does per file: read the image, estimate the nucleus size, run the tiled
network, post-process, write the label TIFF. Inputs: the DSB2018 `val` images, and
synthetic fields of 1, 4, 16 and 64 megapixels built by tiling one generated 1024x1024
field. Methods, side by side:

* ``model``: the bundled model as shipped, default options (tiles of 1024, block-by-block
  above 12.6 MP, diameter auto), no test-time augmentation;
* ``naive``: the same network on the whole image in one call (no tiling, no size
  estimate), where that fits (up to 4 MP here);
* ``classical``: Gaussian + Otsu + watershed baseline.

Network seconds are the time inside the tiled network calls (including the estimation
passes); the rest is reading, normalising, post-processing and writing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAIVE_LIMIT_MP = 4.0


def child(method: str, inputs: list[str], out: str, threads: int) -> dict:
    """Runs in a fresh process: segment every input file, report seconds and peak RSS."""
    import resource

    import torch

    torch.set_num_threads(threads)
    from napari_nuclei_unet import tiling
    from napari_nuclei_unet.baseline import classical_segment
    from napari_nuclei_unet.batch import segment_file
    from napari_nuclei_unet.io import read_image, write_labels
    from napari_nuclei_unet.model import Checkpoint, bundled_model_path
    from napari_nuclei_unet.segment import SegmentParams

    network = [0.0]
    original = tiling.predict

    def timed_predict(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            network[0] += time.perf_counter() - started

    tiling.predict = timed_predict
    import napari_nuclei_unet.scale as scale_module
    import napari_nuclei_unet.segment as segment_module

    scale_module.predict = timed_predict  # every network call of the pipeline goes through scale.predict_zoomed
    checkpoint = Checkpoint.load(bundled_model_path())
    if method == "naive":
        params = SegmentParams(tiling=tiling.TilingParams(tile_size=1 << 16), diameter=None)
    else:
        params = SegmentParams()
    # Warm-up (first call at a tile shape is slow), outside the timing.
    import numpy as np

    segment_module.segment(
        checkpoint, np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8), SegmentParams(diameter=None)
    )
    network[0] = 0.0
    pixels = 0
    started = time.perf_counter()
    for path in inputs:
        if method == "classical":
            image = read_image(path)
            labels = classical_segment(image)
            write_labels(Path(out) / f"{Path(path).stem}.tif", labels)
            pixels += labels.size
        elif method == "naive":
            from napari_nuclei_unet.segment import segment

            image = read_image(path)
            result = segment(checkpoint, image, params)
            write_labels(Path(out) / f"{Path(path).stem}.tif", result.labels)
            pixels += result.labels.size
        else:
            pixels += segment_file(checkpoint, path, out, params).pixels
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "network": network[0], "megapixels": pixels / 1e6, "peak_rss_mb": peak_mb}


def run_child(method: str, inputs: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        listing = Path(out) / "inputs.json"
        listing.write_text(json.dumps(inputs))
        command = [sys.executable, __file__, "--child", method, str(listing), out, str(threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_field(megapixels: int, folder: Path) -> str:
    """A ``megapixels`` MP field tiled from one generated 1024x1024 field (uint16 TIFF)."""
    import numpy as np
    import tifffile

    from napari_nuclei_unet.synthetic import nuclei_field

    tile, _ = nuclei_field((1024, 1024), count=700, diameter=20, seed=6)
    side = int(round(megapixels**0.5))
    if side * side != megapixels:
        raise SystemExit(f"--sizes: {megapixels} is not a square number of megapixels (1, 4, 16, 64, ...)")
    path = folder / f"field_{megapixels}mp.tif"
    tifffile.imwrite(path, np.tile(tile, (side, side)))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    parser.add_argument("--sizes", default="1,4,16,64", help="synthetic field sizes in megapixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="model,naive,classical")
    parser.add_argument("--val-limit", type=int, default=None, help="only the first N val images (quick checks)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from napari_nuclei_unet.data import read_split

    data = Path(args.data)
    split = read_split(data / "split.csv")
    val = sorted(str(p) for p in (data / "images").iterdir() if split.get(p.stem) == "val")[: args.val_limit]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cases = [(f"DSB2018 val ({len(val)} images)", val, 0.0)]
        cases += [
            (f"synthetic {mp} MP", [synthetic_field(mp, Path(folder))], float(mp))
            for mp in (int(s) for s in args.sizes.split(","))
        ]
        for name, inputs, megapixels in cases:
            for method in args.methods.split(","):
                if method == "naive" and megapixels > NAIVE_LIMIT_MP and len(inputs) == 1:
                    rows.append({"input": name, "method": method, "note": "does not fit"})
                    continue
                result = run_child(method, inputs, args.threads)
                rows.append({"input": name, "method": method, **result})
                print(_format(rows[-1]), flush=True)
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _format(row: dict) -> str:
    return f"{row['input']:<26} {row['method']:<10} " + (
        row["note"]
        if "note" in row
        else f"{row['megapixels'] / row['seconds']:6.2f} MP/s  {row['seconds']:7.1f} s  "
        f"network {row['network']:7.1f} s  other {row['seconds'] - row['network']:6.1f} s  "
        f"peak RSS {row['peak_rss_mb'] / 1024:5.2f} GB"
    )


def table(rows: list[dict]) -> str:
    header = "input | method | MP/s | seconds | network s | post-processing + I/O s | peak RSS GB"
    lines = [header, "|".join("---" for _ in header.split("|"))]
    for row in rows:
        if "note" in row:
            lines.append(f"{row['input']} | {row['method']} | {row['note']} | | | |")
        else:
            lines.append(
                f"{row['input']} | {row['method']} | {row['megapixels'] / row['seconds']:.2f} | {row['seconds']:.1f} | "
                f"{row['network']:.1f} | {row['seconds'] - row['network']:.1f} | {row['peak_rss_mb'] / 1024:.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, method, listing, out, threads = sys.argv
        print(json.dumps(child(method, json.loads(Path(listing).read_text()), out, int(threads))))
    else:
        main()
