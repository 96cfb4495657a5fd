"""Whole-process speed of `nuclei-unet segment`, paired with the Model Zoo reference (a benchmark, not a test).

    python benchmarks/paired_speed.py [--images FOLDER] [--rounds 4] [--before REV] [--threads 2]

Speed as a user waits for it: each run is a fresh process (start-up, model load, every image read, segmented and
written as a label TIFF), timed from outside. The machines this project runs on are noisy, so the runs alternate in
rounds (this code, then ``--before``'s, then the reference) and each round's ratio compares runs taken side by side.

* this code: ``python -m napari_nuclei_unet.cli segment FOLDER --out ...`` with the default options;
* ``--before REV``: the same command with the package of commit REV first on ``PYTHONPATH`` (a temporary
  ``git worktree``), to pair a change with the code before it; the label files of both are compared;
* the reference: ``benchmarks/zoo_reference.py`` (the Model Zoo's "UNet 2D Nuclei Broad" + a plain watershed).

``--images`` defaults to the DSB2018 ``val`` split of ``../shared/data/dsb2018`` (67 images, 13.5 MP), linked into a
temporary folder. Prints each round's seconds, megapixels per second and the ratio to the reference, then the
median ratio and how many rounds reach ``--bar`` (issue #32: 1.3x). The network cache is warmed first, so no run
pays for an export.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DSB2018 = REPO.parent / "shared" / "data" / "dsb2018"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def val_images(folder: Path) -> Path:
    """A folder of links to the DSB2018 ``val`` images."""
    with open(DSB2018 / "split.csv", newline="", encoding="utf-8") as handle:
        names = [row["ImageId"] for row in csv.DictReader(handle) if row["split"] == "val"]
    folder.mkdir()
    for name in names:
        (folder / f"{name}.png").symlink_to(DSB2018 / "images" / f"{name}.png")
    return folder


def megapixels(folder: Path) -> float:
    from PIL import Image

    total = 0
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                total += image.width * image.height
    return total / 1e6


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one process; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def differing(first: Path, second: Path) -> int:
    """How many label files of ``first`` are missing from ``second`` or differ from it (the run summary, which
    holds each image's seconds, is not a label file)."""
    names = [path.name for path in first.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    return sum(not (second / name).is_file() or not filecmp.cmp(first / name, second / name, False) for name in names)


def commands(images: Path, out: Path, threads: int, before_src: Path | None) -> dict[str, tuple[list[str], dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs = {"now": ([sys.executable, "-m", "napari_nuclei_unet.cli", "segment", str(images), "--out"], env)}
    if before_src is not None:
        runs["before"] = (runs["now"][0], {**env, "PYTHONPATH": str(before_src)})
    zoo = [sys.executable, str(REPO / "benchmarks" / "zoo_reference.py"), str(images), "--threads", str(threads)]
    runs["zoo"] = ([*zoo, "--out"], env)
    return {name: ([*command, str(out / name)], env) for name, (command, env) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None, help="a folder of images (default: the DSB2018 val split)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--before", default=None, help="a git revision to pair this code with")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every run")
    parser.add_argument("--bar", type=float, default=1.3, help="the ratio to the reference asked for")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="paired-speed-") as scratch:
        scratch = Path(scratch)
        images = Path(args.images) if args.images else val_images(scratch / "images")
        size = megapixels(images)
        before_src = None
        if args.before:
            worktree = scratch / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True)
            before_src = worktree / "src"
        try:
            run_rounds(args, images, size, scratch, before_src)
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(scratch / "before")], cwd=REPO, check=False)


def run_rounds(args, images: Path, size: float, scratch: Path, before_src: Path | None) -> None:
    out = scratch / "out"
    runs = commands(images, out, args.threads, before_src)
    for name, (command, env) in runs.items():  # warm-up: the network cache, the page cache
        if name != "zoo":
            timed([*command[:-1], str(scratch / "warm")], env)
    print(f"{size:.1f} MP in {images}; {args.rounds} rounds of {', '.join(runs)}; {args.threads} threads")
    ratios: list[float] = []
    for round_number in range(1, args.rounds + 1):
        seconds = {}
        for name, (command, env) in runs.items():
            target = out / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            seconds[name] = timed(command, env)
        ratios.append(seconds["zoo"][0] / seconds["now"][0])
        line = ", ".join(
            f"{name} {wall:.2f} s ({size / wall:.2f} MP/s, CPU {cpu:.1f} s)" for name, (wall, cpu) in seconds.items()
        )
        print(f"round {round_number}: {line}; reference / now {ratios[-1]:.2f}x", flush=True)
    if before_src is not None:
        print(f"label files that differ between now and before: {differing(out / 'now', out / 'before')}")
    reached = sum(ratio >= args.bar for ratio in ratios)
    print(
        f"reference / now: {min(ratios):.2f}-{max(ratios):.2f}x, median {statistics.median(ratios):.2f}x; "
        f">= {args.bar}x in {reached} of {len(ratios)} rounds"
    )


if __name__ == "__main__":
    main()
