"""Checks on the real DSB2018 annotations (skipped when ../shared/data/dsb2018 is absent)."""

import csv
from collections import Counter

import numpy as np
import pytest

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.io import read_image
from napari_nuclei_unet.rle import read_csv

pytestmark = pytest.mark.realdata


def test_decoded_object_counts_match_csv(dsb2018):
    rows = Counter(row["ImageId"] for row in csv.DictReader(open(dsb2018 / "train_labels.csv")))
    entries = read_csv(dsb2018 / "train_labels.csv")
    for image_id in sorted(rows)[:8]:
        image = read_image(dsb2018 / "images" / f"{image_id}.png")
        labels = entries[image_id].to_labels(image.shape[:2])
        assert labels.max() == rows[image_id] == len(np.unique(labels)) - 1


@pytest.mark.slow
def test_rle_cli_round_trips_the_real_csv(dsb2018, tmp_path):
    decoded = tmp_path / "labels"
    assert main(["rle", "decode", str(dsb2018 / "train_labels.csv"), "--images", str(dsb2018 / "images"), "--out", str(decoded)]) == 0
    assert main(["rle", "encode", str(decoded), "--out", str(tmp_path / "again.csv"), "--no-shape"]) == 0

    def rows_by_image(path):
        grouped = {}
        for row in csv.DictReader(open(path)):
            grouped.setdefault(row["ImageId"], set()).add(row["EncodedPixels"])
        return grouped

    original, again = rows_by_image(dsb2018 / "train_labels.csv"), rows_by_image(tmp_path / "again.csv")
    assert original.keys() == again.keys()
    different = [k for k in original if original[k] != again[k]]
    # The only differences allowed: the few images where two annotations claim the same pixel
    # (9 pixels in 6 images); the label image gives such a pixel to the first nucleus.
    entries = read_csv(dsb2018 / "train_labels.csv")
    for image_id in different:
        shape = read_image(dsb2018 / "images" / f"{image_id}.png").shape[:2]
        entries[image_id].to_labels(shape)
        assert entries[image_id].overlap_pixels > 0, image_id
        assert len(original[image_id]) == len(again[image_id])
    assert len(different) <= 6
