"""The ONNX Runtime CPU backend gives PyTorch's probabilities and follows the weights it was exported from."""

import numpy as np
import pytest
import torch

from napari_nuclei_unet import onnx_backend
from napari_nuclei_unet.errors import ModelError
from napari_nuclei_unet.io import Normalizer
from napari_nuclei_unet.tiling import TilingParams, predict

pytestmark = pytest.mark.skipif(not onnx_backend.available(), reason="onnxruntime/onnx not installed")

# Stated tolerance for probabilities in [0, 1] (docs/performance.md).
TOLERANCE = 1e-4


def _image(shape=(200, 330), seed=3):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.random(shape), 3) * 4000).astype(np.uint16)


def _both(model, image, monkeypatch, **tiling):
    """Probabilities with each backend, checking that ONNX Runtime ran only when asked for."""
    calls = []
    original = onnx_backend.OnnxNetwork.__call__
    monkeypatch.setattr(onnx_backend.OnnxNetwork, "__call__", lambda self, batch: calls.append(1) or original(self, batch))
    normalizer = Normalizer.from_image(image, 3)
    with_torch = predict(model, image, normalizer, TilingParams(device="cpu", backend="torch", **tiling))
    assert not calls
    with_onnx = predict(model, image, normalizer, TilingParams(device="cpu", backend="onnx", **tiling))
    assert calls
    return with_torch, with_onnx


@pytest.mark.parametrize("tiling", [{}, {"tile_size": 128, "overlap": 32, "batch_size": 2}, {"tta": True}])
def test_onnx_matches_torch(tiny_checkpoint, tiling, monkeypatch):
    with_torch, with_onnx = _both(tiny_checkpoint.model, _image(), monkeypatch, **tiling)
    assert with_onnx.shape == with_torch.shape == (2, 200, 330)
    assert np.abs(with_onnx - with_torch).max() < TOLERANCE


def test_one_export_per_weights_and_a_new_one_after_training(tiny_checkpoint, monkeypatch):
    model = tiny_checkpoint.model.eval()
    first = onnx_backend.cpu_network(model, 3)
    assert isinstance(first, onnx_backend.OnnxNetwork)
    assert onnx_backend.cpu_network(model, 3) is first  # cached, not re-exported
    with torch.no_grad():  # an optimiser step changes weights in place
        model.segmentation_head[0].bias.add_(0.5)
    second = onnx_backend.cpu_network(model, 3)
    assert second is not first
    with_torch, with_onnx = _both(model, _image(), monkeypatch)
    assert np.abs(with_onnx - with_torch).max() < TOLERANCE  # the new weights, not the exported ones


def test_backend_choices(tiny_checkpoint, monkeypatch):
    model = tiny_checkpoint.model
    assert onnx_backend.cpu_network(model, 3, "torch") is model
    with pytest.raises(ModelError, match="backend must be one of"):
        onnx_backend.cpu_network(model, 3, "tensorrt")
    monkeypatch.setattr(onnx_backend, "available", lambda: False)
    assert onnx_backend.cpu_network(model, 3, "auto") is model  # quietly PyTorch
    with pytest.raises(ModelError, match="pip install onnxruntime"):
        onnx_backend.cpu_network(model, 3, "onnx")
    assert onnx_backend.describe_device("cpu") == "cpu (PyTorch)"


def test_failed_export_falls_back_to_torch_and_is_not_retried(tiny_checkpoint, monkeypatch):
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_backend, "_export", broken)
    model = tiny_checkpoint.model
    with pytest.warns(RuntimeWarning, match="ONNX export failed"):
        assert onnx_backend.cpu_network(model, 3, "auto") is model
    assert onnx_backend.cpu_network(model, 3, "auto") is model  # every tile of every image: one attempt
    with pytest.raises(ModelError, match="unsupported operator"):
        onnx_backend.cpu_network(model, 3, "onnx")
    assert len(attempts) == 1


def test_cli_names_the_engine(tmp_path, capsys):
    import tifffile

    from napari_nuclei_unet.cli import main

    tifffile.imwrite(tmp_path / "a.tif", _image((96, 96)))
    assert main(["segment", str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--diameter", "none", "--device", "cpu"]) == 0
    assert "device: cpu (ONNX Runtime)" in capsys.readouterr().err
