"""Calibrate the bundled model's (or another's) min_confidence on DSB2018 train-split images (not val: val is what
the model card reports).

    python scripts/calibrate_bundled.py [--data ../shared/data/dsb2018] [--images 128] [--model FOLDER]

The weights are stored as fp16 already, so saving them again leaves them bit-identical.
"""

import argparse
import os
import random
from pathlib import Path

import torch

from napari_nuclei_unet.data import load_pairs, read_split
from napari_nuclei_unet.model import BUNDLED_MODEL_DIR, Checkpoint
from napari_nuclei_unet.training import calibrate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"))
    parser.add_argument("--images", type=int, default=128, help="random train-split images to calibrate on")
    parser.add_argument("--model", default=str(BUNDLED_MODEL_DIR), help="model folder, calibrated in place")
    args = parser.parse_args()
    folder = Path(args.model)
    data = Path(args.data)
    names = sorted(name for name, part in read_split(data / "split.csv").items() if part == "train")
    random.Random(0).shuffle(names)
    samples = load_pairs(data / "images", data / "train_labels.csv", set(names[: args.images]))
    checkpoint = Checkpoint.load(folder)
    before = {k: v.clone() for k, v in checkpoint.model.state_dict().items()}
    value = calibrate(checkpoint, samples, f"{len(samples)} random images of the DSB2018 train split")
    print("kaggle score by min_confidence:", checkpoint.metadata["postprocess"]["kaggle_score_by_min_confidence"])
    os.environ["NUCLEI_UNET_WRITE_BUNDLED"] = "1"
    checkpoint.save(folder, overwrite=True, half=True)
    (folder / "README.md").unlink(missing_ok=True)  # SMP's generic card; ours is docs/model-card.md
    after = Checkpoint.load(folder).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the bundled weights changed"
    print(f"min_confidence {value} -> {folder}")
