"""Does fine-tuning on a few corrected images help? (DSB2018 val split; a benchmark, not a test.)

    python benchmarks/finetune.py [--data ../shared/data/dsb2018] [--images 3] [--minutes 4.5]

Takes the image type where the bundled model is weakest (brightfield/tissue), fine-tunes on
the ground truth of a few of those images (standing in for a user's corrections) with the
same `fit` the CLI and the Fine-tune widget use, within a CPU-time budget, and scores the
remaining images of that type and the other type before and after.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from napari_nuclei_unet.data import image_kind, load_pairs, read_split
from napari_nuclei_unet.metrics import evaluate, format_table
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.segment import segment
from napari_nuclei_unet.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]


def score(checkpoint, samples):
    return evaluate([(s.labels, segment(checkpoint, s.image).labels) for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    parser.add_argument("--images", type=int, default=3, help="corrected images to fine-tune on")
    parser.add_argument("--minutes", type=float, default=2.3, help="training budget, wall clock; with 2 threads this stays under 5 CPU minutes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = Path(args.data)
    split = read_split(data / "split.csv")
    val = load_pairs(data / "images", data / "train_labels.csv", {k for k, v in split.items() if v == "val"})
    weak = sorted((s for s in val if image_kind(s.image) == "brightfield"), key=lambda s: s.name)
    other = [s for s in val if image_kind(s.image) != "brightfield"]
    # The corrected images: spread over the sorted list, so not all from one experiment.
    step = max(1, len(weak) // args.images)
    corrected = weak[::step][: args.images]
    held_out = [s for s in weak if s not in corrected]
    print(f"fine-tune on {len(corrected)} brightfield images ({sum(int(s.labels.max()) for s in corrected)} nuclei); "
          f"score on {len(held_out)} held-out brightfield and {len(other)} fluorescence images")  # fmt: skip

    base = Checkpoint.load(resolve_model_path("default"))
    before_weak, before_other = score(base, held_out), score(base, other)

    tuned = copy.deepcopy(base)
    config = TrainConfig(epochs=1000, iterations_per_epoch=25, max_minutes=args.minutes, learning_rate=args.lr,
                         batch_size=4, patch_size=256, warmup_iterations=10, threads=args.threads,
                         freeze_batchnorm=True)  # fmt: skip
    started = time.process_time()
    with tempfile.TemporaryDirectory() as out:
        event = fit(tuned, corrected, out, val=[], config=config, resume=False, base_model="default")
    cpu_minutes = (time.process_time() - started) / 60
    print(f"fine-tuned: {event.iteration} iterations, {event.elapsed / 60:.1f} min wall clock, {cpu_minutes:.1f} min CPU time over {args.threads} threads")
    after_weak, after_other = score(tuned, held_out), score(tuned, other)

    print(format_table({"brightfield held out, before": before_weak, "brightfield held out, after": after_weak,
                        "fluorescence, before": before_other, "fluorescence, after": after_other}))  # fmt: skip
    print(f"\nDSB2018 score change: brightfield held out {after_weak.kaggle_score - before_weak.kaggle_score:+.3f} "
          f"(bar >= +0.05), fluorescence {after_other.kaggle_score - before_other.kaggle_score:+.3f} (bar >= -0.02)")  # fmt: skip


if __name__ == "__main__":
    main()
