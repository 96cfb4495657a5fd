"""Does fine-tuning on a few corrected images help? (DSB2018 val split; a benchmark, not a test.)

    python benchmarks/finetune.py [--data ../shared/data/dsb2018] [--type auto] [--images 3]
                                  [--runs 4] [--minutes 2.0] [--weak SET] [--validate] [--json out.json]

The val images fall into three types (``data.image_type``): fluorescence, grey brightfield
and stained (H&E-like) tissue. The benchmark scores the bundled model on each, takes the
type where it is weakest (``--type auto``), fine-tunes on the ground truth of a few images
of that type (standing in for a user's corrections) with the Fine-tune widget's default
settings (``train.finetune_config``; no validation hold-out, so every corrected image is
trained on and the last weights, mixed with the starting ones as the widget saves them, are
kept) and the same ``fit`` the CLI and the widget use, for the widget's 200 iterations or
``--minutes`` of wall clock (checked after every epoch of 20 iterations), whichever comes
first. ``fit`` then calibrates the new model's min confidence on the corrected images, as the
widget does. With 2 threads all of that stays under 5 CPU minutes; each run prints its CPU
time. The benchmark then scores the remaining images of that type and every other type before
and after, each model with its own calibrated min confidence (0.85 for the bundled one).

``--validate`` fine-tunes as ``nuclei-unet train --model default --max-minutes 2`` does instead: a quarter of
the corrected images (1 of 3) is held out to pick the epoch, and a model that validates no better than the
model it started from is not used (the CLI says to keep the starting model; the widget does not switch). The
benchmark then prints two outcomes: the fine-tuned model's, and the one of the model the user goes on with.

A type has few val images (4 brightfield), so one run would score one or two images: the
benchmark repeats the fine-tuning with the corrected images rotated (cross-validation; with
3 of 4 images corrected, each image is held out once) and pools the held-out predictions.

Bars (issue #5): the Kaggle DSB2018 score of the held-out images of the type rises by at
least 0.05; the score of each other type drops by no more than 0.02 (mean over the runs;
the worst run is printed too).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_nuclei_unet.data import image_type, load_pairs, read_split
from napari_nuclei_unet.metrics import evaluate, format_table
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.segment import segment
from napari_nuclei_unet.training import finetune_config, fit

REPO = Path(__file__).resolve().parents[1]
TYPES = ("fluorescence", "brightfield", "tissue")


def predictions(checkpoint, samples):
    return [(s.labels, segment(checkpoint, s.image).labels) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    parser.add_argument(
        "--type", default="auto", choices=("auto", *TYPES), help="image type to fine-tune on; auto: the weakest"
    )
    parser.add_argument(
        "--images", type=int, default=3, help="corrected images to fine-tune on per run (fewer when the type has few)"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=4,
        help="fine-tuning runs; the corrected images rotate between runs, so with 4 images of a type each is held out "
        "once",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="training budget, wall clock; with 2 threads, training and calibration stay under 5 CPU minutes",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="stop after this many iterations instead (for quick checks)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a fine-tuning setting (TrainConfig field), e.g. learning_rate=3e-4",
    )
    parser.add_argument(
        "--weak",
        default=None,
        help="fine-tune on a few images of this set instead (a benchmarks/generalisation.py set name, e.g. "
        "e2f_intestine:val) and score the rest of it; the DSB2018 val types are then the ones checked for harm",
    )
    parser.add_argument("--gain-bar", type=float, default=0.05, help="the held-out images' score must rise this much")
    parser.add_argument("--harm-bar", type=float, default=0.02, help="each other type may drop at most this much")
    parser.add_argument(
        "--validate",
        action="store_true",
        help="as `nuclei-unet train` with the fine-tuning defaults: a quarter of the corrected images (1 of 3) are "
        "held out to pick the epoch, and a model that validates no better than its start is not used (the starting "
        "model's scores count for that run, beside the fine-tuned model's)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    overrides = {field: json.loads(value) for field, value in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)

    data = Path(args.data)
    split = read_split(data / "split.csv")
    val = load_pairs(data / "images", data / "train_labels.csv", {k for k, v in split.items() if v == "val"})
    by_type = {kind: sorted((s for s in val if image_type(s.image) == kind), key=lambda s: s.name) for kind in TYPES}
    if args.weak:
        from generalisation import load_set

        by_type = {args.weak: sorted(load_set(args.weak), key=lambda s: s.name), **by_type}
        args.type = args.weak
    base = Checkpoint.load(resolve_model_path("default"))
    base_pairs = {kind: predictions(base, samples) for kind, samples in by_type.items() if samples}
    before = {kind: evaluate(pairs) for kind, pairs in base_pairs.items()}
    print(format_table({f"{kind} ({len(by_type[kind])} images), bundled model": s for kind, s in before.items()}))

    kind = min(before, key=lambda k: before[k].kaggle_score) if args.type == "auto" else args.type
    weak = by_type[kind]
    count = max(1, min(args.images, len(weak) - 1))  # at least one image left to score
    runs = min(args.runs, len(weak))
    config = finetune_config(**{"max_minutes": args.minutes, "threads": args.threads, **overrides})
    if args.iterations:
        config.max_minutes, config.epochs, config.iterations_per_epoch = None, 1, args.iterations
    print(
        f"\n{runs} runs: each fine-tunes on {count} {kind} images and scores the other {len(weak) - count} {kind} "
        "images and every other type"
    )
    # Held-out (truth, prediction) pairs over all runs: the starting model, the fine-tuned one, and the one the user
    # goes on with (with --validate, the starting model where the fine-tuned one validated no better).
    pairs = {"before": [], "after": [], "used": []}
    changes_by_run, used_by_run, results = [], [], []
    for run in range(runs):
        step = len(weak) / count  # spread over the sorted names, so not all from one experiment; rotated per run
        corrected = [weak[(int(i * step) + run) % len(weak)] for i in range(count)]
        held_out = [s for s in weak if s not in corrected]
        tuned = copy.deepcopy(base)
        started_cpu, started = time.process_time(), time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            val = None if args.validate else []  # None: the fine-tuning defaults hold some corrected images out
            event = fit(tuned, corrected, out, val=val, config=config, resume=False, base_model="default")
        cpu_minutes = (time.process_time() - started_cpu) / 60
        verdict, better = event.gain()
        used = better is not False  # validated no better: the user is told to keep the starting model
        held = {
            "before": [pair for s, pair in zip(weak, base_pairs[kind]) if s in held_out],
            "after": predictions(tuned, held_out),
        }
        held["used"] = held["after"] if used else held["before"]
        for key in pairs:
            pairs[key] += held[key]
        changes = {kind: evaluate(held["after"]).kaggle_score - evaluate(held["before"]).kaggle_score}
        changes |= {
            other: evaluate(predictions(tuned, by_type[other])).kaggle_score - before[other].kaggle_score
            for other in before
            if other != kind
        }
        used_changes = changes if used else dict.fromkeys(changes, 0.0)
        changes_by_run.append(changes)
        used_by_run.append(used_changes)
        print(
            f"run {run + 1}: fine-tuned on {', '.join(s.name[:8] for s in corrected)} "
            f"({sum(int(s.labels.max()) for s in corrected)} nuclei): "
            f"{event.iteration} iterations, {(time.perf_counter() - started) / 60:.1f} min wall clock, "
            f"{cpu_minutes:.1f} min CPU time over "
            f"{args.threads} threads; calibrated min confidence {tuned.min_confidence:g}; DSB2018 score change: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in changes.items())
            + (f"; {verdict}" + ("" if used else ", so the starting model stays in use") if args.validate else ""),
            flush=True,
        )
        results.append(
            {
                "corrected": [s.name for s in corrected],
                "held_out": [s.name for s in held_out],
                "iterations": event.iteration,
                "cpu_minutes": cpu_minutes,
                "min_confidence": tuned.min_confidence,
                "changes": changes,
                "validation": verdict,
                "used": used,
            }
        )

    held_before = evaluate(pairs["before"])
    tables = {f"{kind} held out ({len(pairs['before'])} over {runs} runs), before": held_before}
    tables[f"{kind} held out, fine-tuned model"] = evaluate(pairs["after"])
    if args.validate:
        tables[f"{kind} held out, the model in use"] = evaluate(pairs["used"])
    print(format_table(tables))
    tuned_outcome = summary("fine-tuned model", kind, held_before, pairs["after"], changes_by_run, args)
    outcomes = {"fine-tuned model": tuned_outcome}
    if args.validate:
        outcomes["model in use"] = summary("model in use", kind, held_before, pairs["used"], used_by_run, args)
    if args.json:
        result = {"type": kind, "settings": overrides, "images": count, "validate": args.validate, "runs": results}
        result |= {"held_out_before": held_before.as_dict(), "outcomes": outcomes}
        Path(args.json).write_text(json.dumps(result, indent=2))


def summary(label: str, kind: str, held_before, held_pairs, by_run: list[dict], args) -> dict:
    """Print the change of one model's scores against the bars, and return it."""
    held_after = evaluate(held_pairs)
    mean = {k: float(np.mean([c[k] for c in by_run])) for k in by_run[0]}
    worst = {k: float(np.min([c[k] for c in by_run])) for k in by_run[0]}
    gain = held_after.kaggle_score - held_before.kaggle_score
    met = gain >= args.gain_bar and all(mean[other] >= -args.harm_bar for other in mean if other != kind)
    print(
        f"\n{label}, DSB2018 score change: {kind} held out {gain:+.3f} (bar >= {args.gain_bar:+g}; by run "
        + ", ".join(f"{c[kind]:+.3f}" for c in by_run)
        + "); "
        + ", ".join(
            f"{other} {mean[other]:+.3f} (bar >= {-args.harm_bar:g}; worst run {worst[other]:+.3f})"
            for other in mean
            if other != kind
        )
        + f"; bars {'met' if met else 'missed'}"
    )
    return {
        "held_out_change": gain,
        "mean_changes": mean,
        "worst_changes": worst,
        "bars_met": met,
        "held_out_after": held_after.as_dict(),
    }


if __name__ == "__main__":
    main()
