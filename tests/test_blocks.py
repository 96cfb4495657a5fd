"""Block-by-block segmentation of large planes: flat memory, nuclei whole across block borders."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_nuclei_unet.metrics import evaluate
from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.params import BlockParams, TilingParams
from napari_nuclei_unet.postprocess import block_grid, instances, with_threshold
from napari_nuclei_unet.segment import SegmentParams, segment, segment_planes
from napari_nuclei_unet.synthetic import nuclei_field

# The float32 network: the 8-bit one's output depends on the CPU's integer kernels (VNNI or not),
# and these tests compare two paths pixel for pixel.
EXACT = SegmentParams(tiling=TilingParams(precision="float32"))


def segment_large(checkpoint, image, params, block_size, labels_out=None):
    """The dispatcher, told to take the block path for this (small) plane."""
    blocked = replace(params, blocks=BlockParams(block_size=block_size, large_plane=1))
    return segment_planes(checkpoint, image, blocked, labels_out=labels_out)


@pytest.fixture(scope="module")
def bundled() -> Checkpoint:
    return Checkpoint.load(bundled_model_path())


@pytest.fixture(scope="module")
def field():
    return nuclei_field((384, 512), count=70, diameter=22, seed=21)


def _crossing(truth: np.ndarray, size: int) -> list[int]:
    """Ids of true nuclei that straddle a block border."""
    ids = []
    for index in range(1, int(truth.max()) + 1):
        rows, cols = np.nonzero(truth == index)
        if rows.size and (rows.min() // size != rows.max() // size or cols.min() // size != cols.max() // size):
            ids.append(index)
    return ids


def test_nuclei_across_block_borders_stay_whole_and_labels_are_unique(bundled, field):
    """With too little context around a block (96 px), a nucleus at a 128 px block border came
    out merged with its neighbour (272 px for 185 px): the block's probabilities differed from the
    whole plane's by up to 0.37 there."""
    image, truth = field
    size = 128
    crossing = _crossing(truth, size)
    assert len(crossing) >= 10  # the test means something: many nuclei cross the 12 blocks' borders
    params = replace(EXACT, diameter=None)
    blocked = segment_large(bundled, image, params, block_size=size)
    labels = blocked.labels
    assert labels.shape == truth.shape and labels.dtype == np.int32
    assert blocked.count == len(np.unique(labels)) - 1  # every written label is a distinct nucleus
    whole = segment(bundled, image, params)

    def dominant(labels: np.ndarray, index: int) -> tuple[int, int, int]:
        """The predicted label covering most of true nucleus ``index``: (overlap, its whole size, the nucleus' size)."""
        inside = labels[truth == index]
        values, counts = np.unique(inside[inside > 0], return_counts=True)
        if not values.size:
            return 0, 0, inside.size
        return int(counts.max()), int((labels == values[np.argmax(counts)]).sum()), inside.size

    for index in crossing:
        overlap, size_blocked, area = dominant(labels, index)
        assert overlap, f"nucleus {index} lost"
        assert overlap >= 0.8 * area, f"nucleus {index} cut at a block border"
        # Not merged with a neighbour by the stitching (the model may merge a pair on its own:
        # then the whole-plane segmentation merges it too).
        assert size_blocked <= 1.3 * max(area, dominant(whole.labels, index)[1])
    assert abs(evaluate([(truth, labels)]).kaggle_score - evaluate([(truth, whole.labels)]).kaggle_score) < 0.03


def test_small_nuclei_are_separated_on_the_zoomed_grid_block_by_block(bundled):
    """8 px nuclei are zoomed up ~2.5x; block by block they come out as the whole plane labels them. Distance
    markers: with them the image grid loses most (boundary markers lose less there)."""
    image, truth = nuclei_field((256, 320), count=200, diameter=8, seed=22)
    params = replace(EXACT, diameter=8.0, postprocess=replace(EXACT.postprocess, markers="distance"))
    whole = segment(bundled, image, params)
    blocked = segment_large(bundled, image, params, block_size=256)  # 128 px blocks, ~320 px on the finer grid
    assert blocked.factor == whole.factor > 2.0
    labels = blocked.labels
    assert blocked.count == len(np.unique(labels)) - 1
    same = np.mean((labels > 0) == (whole.labels > 0))
    assert same > 0.99, same
    blocked_score, whole_score = (evaluate([(truth, found)]).kaggle_score for found in (labels, whole.labels))
    assert abs(blocked_score - whole_score) < 0.03, (blocked_score, whole_score)
    prediction = whole.planes[None].prediction  # labelled on the image grid instead: clearly worse
    image_grid_params = with_threshold(replace(whole.params.postprocess, threshold="auto"), prediction.probabilities[0])
    on_image_grid = instances(
        prediction.probabilities, bundled.outputs, image_grid_params, network_zoom=prediction.factor
    )[1]
    assert blocked_score > evaluate([(truth, on_image_grid)]).kaggle_score + 0.05
    assert len(_crossing(truth, 128)) >= 10  # many nuclei cross the borders of the 128 px blocks (both passes)


def test_writes_into_a_zarr_array_from_a_dask_input(bundled, field, tmp_path):
    import dask.array as da
    import zarr

    image, truth = field
    lazy = da.from_array(image, chunks=(100, 100))
    out = zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=image.shape, chunks=(128, 128), dtype="int32")
    result = segment_large(bundled, lazy, SegmentParams(diameter=None), block_size=192, labels_out=out)
    stored = np.asarray(zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:])
    assert result.count == len(np.unique(stored)) - 1
    assert evaluate([(truth, stored)]).ap50 > 0.8


def test_block_grid_covers_the_plane_once():
    cover = np.zeros((300, 500), int)
    for rows, cols in block_grid(300, 500, 128):
        cover[rows, cols] += 1
    assert (cover == 1).all()


def test_blocked_equals_whole_at_the_default_settings(bundled):
    """Block by block and whole, with every default but the precision (diameter, threshold and min confidence "auto").

    The block path once skipped the model's min confidence (0.8 for the bundled model) and
    kept every unsure object the whole-plane path drops; this fails then (blocked > whole).
    """
    image, truth = nuclei_field((384, 512), count=70, diameter=22, seed=21)
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    low, high = np.percentile(image, (1, 99.8))
    for cy, cx in ((40, 60), (200, 300), (330, 450), (100, 400), (300, 100)):  # faint blobs the network is unsure of
        image[(rows - cy) ** 2 + (cols - cx) ** 2 < 64] = low + 0.09 * (high - low)
    whole = segment(bundled, image, EXACT)
    blocked = segment_large(bundled, image, EXACT, block_size=128)
    assert whole.min_confidence == blocked.min_confidence == bundled.min_confidence == 0.8
    assert blocked.probabilities is None and whole.probabilities is not None  # the block path was taken
    unsure = segment(bundled, image, replace(EXACT, postprocess=replace(EXACT.postprocess, min_confidence=0.0))).count
    assert unsure > whole.count  # the faint blobs are found, and dropped at 0.8
    assert abs(blocked.count - whole.count) <= 1, (blocked.count, whole.count, unsure)
    agreement = np.mean((blocked.labels > 0) == (whole.labels > 0))
    assert agreement > 0.995, agreement
    assert abs(evaluate([(truth, blocked.labels)]).kaggle_score - evaluate([(truth, whole.labels)]).kaggle_score) < 0.01
