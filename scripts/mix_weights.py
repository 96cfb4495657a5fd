"""Mix a trained model's weights with those it started from (WiSE-FT, Wortsman et al. 2022), as the bundled v3 was made.

    D=../shared/data
    python scripts/mix_weights.py runs/v3e runs/v2 --share 0.35 --out runs/v3 \\
        --validate-on $D/dsb2018/images $D/dsb2018/train_labels.csv $D/dsb2018/split.csv [--validate-on ...]

``(1 - share) x trained + share x start``, every floating-point weight and BatchNorm statistic
(``training.loop.mixed_with_start``, the fine-tuning's own mix). Output channels the start lacks
(e.g. a ``centre`` grown onto it) keep the trained model's weights. ``--validate-on`` (repeatable:
images, labels, split CSV) scores the mix on those sets' ``val`` images and records it as the model's
metrics, as training does. The trained model's metadata is kept (markers, stain, min confidence), with
the mix recorded under ``training``. Choose ``--share`` on choosing sets (docs/model-card.md).
"""

import argparse

from napari_nuclei_unet.data import load_pairs, read_split
from napari_nuclei_unet.model import Checkpoint, resolve_model_path
from napari_nuclei_unet.training.calibrate import validate
from napari_nuclei_unet.training.loop import mixed_with_start

_HEAD = ("segmentation_head.0.weight", "segmentation_head.0.bias")


def start_state(trained: Checkpoint, start: Checkpoint) -> dict:
    """The start's weights laid out as the trained model's (its outputs grown), the rows it lacks taken from
    the trained model."""
    state = start.with_outputs(trained.outputs).model.state_dict()
    own = trained.model.state_dict()
    for row, name in enumerate(trained.outputs):
        if name not in start.outputs:
            for key in _HEAD:
                state[key][row] = own[key][row]
    return state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", help="the trained checkpoint folder")
    parser.add_argument("start", help="the weights it started from: a folder or 'default' (the bundled model)")
    parser.add_argument("--share", type=float, required=True, help="share of the start's weights, in [0, 1]")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--validate-on", nargs=3, action="append", default=[], metavar=("IMAGES", "LABELS", "SPLIT"))
    args = parser.parse_args()
    if not 0.0 <= args.share <= 1.0:
        parser.error(f"--share must be in [0, 1], got {args.share}")
    trained = Checkpoint.load(args.trained)
    start = Checkpoint.load(resolve_model_path(args.start))
    samples = []
    for images, labels, split in args.validate_on:
        names = {name for name, part in read_split(split).items() if part == "val"}
        samples += load_pairs(images, labels, names)
    trained.metadata.setdefault("training", {})["mixed_with"] = {"start": args.start, "start_share": args.share}
    with mixed_with_start(trained.model, start_state(trained, start), args.share):
        if samples:
            scores = validate(trained, samples, "cpu")
            trained.metadata["metrics"] = {
                **{k: round(v, 5) if isinstance(v, float) else v for k, v in scores.as_dict().items()},
                "measured_on": "validation images",
            }
        trained.save(args.out, overwrite=True, half=True)
    print(f"{args.out}: {Checkpoint.load(args.out).summary()}")
