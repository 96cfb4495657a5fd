"""Does fine-tuning on a few corrected images help? (DSB2018 val split; a benchmark, not a test.)

    python benchmarks/finetune.py [--data ../shared/data/dsb2018] [--type auto] [--images 3]
                                  [--minutes 2.2] [--json out.json]

The val images fall into three types (``data.image_type``): fluorescence, grey brightfield
and stained (H&E-like) tissue. The benchmark scores the bundled model on each, takes the
type where it is weakest (``--type auto``), fine-tunes on the ground truth of a few images
of that type (standing in for a user's corrections) with the Fine-tune widget's default
settings (``train.finetune_config``; no validation hold-out, so every corrected image is
trained on and the last weights are kept) and the same ``fit`` the CLI and the widget use,
within a CPU-time budget, and scores the remaining images of that type and every other
type before and after.

Bars (issue #5): the Kaggle DSB2018 score of the held-out images of the type rises by at
least 0.05; the score of each other type drops by no more than 0.02.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from napari_nuclei_unet.data import image_type, load_pairs, read_split
from napari_nuclei_unet.metrics import evaluate, format_table
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.segment import segment
from napari_nuclei_unet.train import finetune_config, fit

REPO = Path(__file__).resolve().parents[1]
TYPES = ("fluorescence", "brightfield", "tissue")


def score(checkpoint, samples):
    return evaluate([(s.labels, segment(checkpoint, s.image).labels) for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    parser.add_argument("--type", default="auto", choices=("auto", *TYPES), help="image type to fine-tune on; auto: the weakest")
    parser.add_argument("--images", type=int, default=3, help="corrected images to fine-tune on (fewer when the type has few)")
    parser.add_argument("--minutes", type=float, default=2.2, help="training budget, wall clock; with 2 threads this stays under 5 CPU minutes")
    parser.add_argument("--iterations", type=int, default=None, help="stop after this many iterations instead (for quick checks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a fine-tuning setting (TrainConfig field), e.g. learning_rate=3e-4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    overrides = {field: json.loads(value) for field, value in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)

    data = Path(args.data)
    split = read_split(data / "split.csv")
    val = load_pairs(data / "images", data / "train_labels.csv", {k for k, v in split.items() if v == "val"})
    by_type = {kind: sorted((s for s in val if image_type(s.image) == kind), key=lambda s: s.name) for kind in TYPES}
    base = Checkpoint.load(resolve_model_path("default"))
    before = {kind: score(base, samples) for kind, samples in by_type.items() if samples}
    print(format_table({f"{kind} ({len(by_type[kind])} images), bundled model": s for kind, s in before.items()}))

    kind = min(before, key=lambda k: before[k].kaggle_score) if args.type == "auto" else args.type
    weak = by_type[kind]
    count = max(1, min(args.images, len(weak) - 2))  # keep at least two images to score
    step = len(weak) / count  # spread over the sorted names, so not all from one experiment
    corrected = [weak[int(i * step)] for i in range(count)]
    held_out = [s for s in weak if s not in corrected]
    print(f"\nfine-tune on {len(corrected)} {kind} images ({sum(int(s.labels.max()) for s in corrected)} nuclei: "
          f"{', '.join(s.name[:8] for s in corrected)}); score on the {len(held_out)} other {kind} images")  # fmt: skip

    config = finetune_config(**{"max_minutes": args.minutes, "threads": args.threads, **overrides})
    if args.iterations:
        config.max_minutes, config.epochs, config.iterations_per_epoch = None, 1, args.iterations
    tuned = copy.deepcopy(base)
    started_cpu, started = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        event = fit(tuned, corrected, out, val=[], config=config, resume=False, base_model="default")
    cpu_minutes = (time.process_time() - started_cpu) / 60
    print(f"fine-tuned: {event.iteration} iterations, {(time.perf_counter() - started) / 60:.1f} min wall clock, "
          f"{cpu_minutes:.1f} min CPU time over {args.threads} threads")  # fmt: skip

    held_before = score(base, held_out)
    after = {kind: score(tuned, held_out)} | {other: score(tuned, by_type[other]) for other in before if other != kind}
    rows = {f"{kind} held out ({len(held_out)}), before": held_before, f"{kind} held out, after": after[kind]}
    for other in after:
        if other != kind:
            rows |= {f"{other} ({len(by_type[other])}), before": before[other], f"{other}, after": after[other]}
    print(format_table(rows))
    changes = {kind: after[kind].kaggle_score - held_before.kaggle_score}
    changes |= {other: after[other].kaggle_score - before[other].kaggle_score for other in after if other != kind}
    met = changes[kind] >= 0.05 and all(change >= -0.02 for other, change in changes.items() if other != kind)
    print("\nDSB2018 score change: " + ", ".join(
        f"{other} {'held out ' if other == kind else ''}{change:+.3f} (bar {'>= +0.05' if other == kind else '>= -0.02'})"
        for other, change in changes.items()) + f"; bars {'met' if met else 'missed'}")  # fmt: skip
    if args.json:
        result = {
            "type": kind, "settings": overrides, "corrected": [s.name for s in corrected], "held_out": [s.name for s in held_out],
            "iterations": event.iteration, "cpu_minutes": cpu_minutes, "changes": changes, "bars_met": met,
            "rows": {name: s.as_dict() for name, s in rows.items()},
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
