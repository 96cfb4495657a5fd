"""The model shipped in the package: loads offline and segments the generated sample sensibly."""

from pathlib import Path

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.metrics import evaluate
from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.segment import segment
from napari_nuclei_unet.synthetic import nuclei_field


def test_bundled_model_is_small_and_complete():
    path = bundled_model_path()
    assert path is not None
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 30e6
    checkpoint = Checkpoint.load(path)
    assert checkpoint.outputs == ("foreground", "boundary", "centre") and checkpoint.nucleus_diameter
    assert "kaggle_score" in checkpoint.metadata["metrics"]
    # Its min confidence was calibrated on training images, never on the test-only sets.
    assert checkpoint.min_confidence == 0.8 and "train split" in checkpoint.metadata["postprocess"]["calibrated_on"]
    # H&E is read as RGB, split by distance markers; the licence names MoNuSeg's and e2f's terms.
    assert checkpoint.stain_for("tissue") == "none" and checkpoint.markers_for("tissue") == "distance"
    assert checkpoint.markers_for("fluorescence") == "boundary"
    assert "NON-COMMERCIAL" in checkpoint.metadata["license"] and "LGPL-3.0" in checkpoint.metadata["license"]


def test_bundled_model_segments_generated_nuclei():
    image, truth = nuclei_field((256, 320), count=30, diameter=20, seed=7)
    result = segment(Checkpoint.load(bundled_model_path()), image)
    assert 0.7 * truth.max() <= result.count <= 1.3 * truth.max()
    scores = evaluate([(truth, result.labels)])
    assert scores.ap50 > 0.6 and scores.dice > 0.85


def test_cli_default_model_on_sample(tmp_path, capsys):
    sample = str(Path(__file__).resolve().parents[1] / "sample_data" / "synthetic_nuclei.tif")
    assert main(["segment", sample, "--out", str(tmp_path)]) == 0
    assert "nuclei-unet-default" in capsys.readouterr().err
    assert (tmp_path / "synthetic_nuclei.tif").is_file()
