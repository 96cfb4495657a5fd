import json

import numpy as np
import pytest
import torch

from napari_nuclei_unet import ModelError
from napari_nuclei_unet.devices import resolve_device
from napari_nuclei_unet.model import Checkpoint, ModelConfig


def test_save_load_round_trip(tmp_path, tiny_checkpoint):
    tiny_checkpoint.metadata["training"] = {"data": "unit test"}
    tiny_checkpoint.nucleus_diameter = 17.5
    folder = tiny_checkpoint.save(tmp_path / "model")
    assert {"config.json", "model.safetensors", "nuclei_unet.json"} <= {p.name for p in folder.iterdir()}
    meta = json.loads((folder / "nuclei_unet.json").read_text())
    assert meta["config"]["outputs"] == ["foreground", "boundary"] and meta["nucleus_diameter"] == 17.5
    assert json.loads((folder / "config.json").read_text())["encoder_weights"] is None  # never downloads on load
    loaded = Checkpoint.load(folder)
    assert loaded.outputs == ("foreground", "boundary") and loaded.metadata["training"]["data"] == "unit test"
    x = torch.rand(1, 3, 64, 64)
    tiny_checkpoint.model.eval()
    with torch.no_grad():
        assert torch.allclose(tiny_checkpoint.model(x), loaded.model(x), atol=1e-6)
    with pytest.raises(ModelError, match="already exists"):
        tiny_checkpoint.save(folder)


def test_half_precision_save_loads_as_float32(tmp_path, tiny_checkpoint):
    folder = tiny_checkpoint.save(tmp_path / "half", half=True)
    loaded = Checkpoint.load(folder)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert next(tiny_checkpoint.model.parameters()).dtype == torch.float32  # the original is untouched


@pytest.mark.parametrize("encoder, decoder", [("resnet18", (32, 16, 8)), ("efficientnet-b0", (64, 32, 16, 8, 8))])
def test_plain_state_dict_architecture_is_inferred(tmp_path, encoder, decoder):
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder, encoder_depth=len(decoder), encoder_weights=None, decoder_channels=decoder, classes=1)
    path = tmp_path / "notebook.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = Checkpoint.load(path)
    assert loaded.config.encoder_name == encoder and loaded.outputs == ("foreground",)
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-6)


def test_named_encoder_that_does_not_match(tmp_path, tiny_checkpoint):
    path = tmp_path / "w.pth"
    torch.save(tiny_checkpoint.model.state_dict(), path)
    with pytest.raises(ModelError) as info:
        Checkpoint.load(path, encoder="resnet34")
    message = str(info.value)
    assert (
        message.startswith(str(path))
        and "weights do not match smp.Unet(encoder='resnet34'" in message
        and "\n" not in message
    )


def test_weights_that_do_not_match_the_config(tmp_path, tiny_checkpoint):
    folder = tiny_checkpoint.save(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["classes"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    meta = json.loads((folder / "nuclei_unet.json").read_text())
    meta["config"]["outputs"] = ["foreground", "boundary", "extra"]
    (folder / "nuclei_unet.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="weights do not match"):
        Checkpoint.load(folder)


def test_truncated_and_corrupt_checkpoints(tmp_path, tiny_checkpoint):
    folder = tiny_checkpoint.save(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"model.safetensors: corrupt or truncated"):
        Checkpoint.load(folder)
    pth = tmp_path / "x.pth"
    torch.save(tiny_checkpoint.model.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:5000])
    with pytest.raises(ModelError, match=r"x.pth: corrupt, truncated"):
        Checkpoint.load(pth)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt JSON"):
        Checkpoint.load(folder)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": np.array([1])}, "obj": object()}, path)
    with pytest.raises(ModelError, match="not a weights-only state_dict"):
        Checkpoint.load(path)


def test_device_selection():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")


def test_config_validation():
    with pytest.raises(ModelError, match="foreground"):
        ModelConfig(outputs=("boundary",))
    with pytest.raises(ModelError, match="encoder_depth"):
        ModelConfig(encoder_depth=4, decoder_channels=(1, 2, 3))


def test_a_copy_of_a_checkpoint_that_ran_on_the_cpu_can_be_trained(tmp_path, tiny_checkpoint, monkeypatch):
    """The Fine-tune widget deep-copies the model Segment uses; its exported network must not come along."""
    import collections
    import copy

    import numpy as np
    import torch

    from napari_nuclei_unet import onnx_backend
    from napari_nuclei_unet.io import Normalizer
    from napari_nuclei_unet.model import Checkpoint
    from napari_nuclei_unet.tiling import TilingParams, predict

    monkeypatch.setenv("NUCLEI_UNET_CACHE", str(tmp_path / "cache"))
    # An earlier test's open network for the same weights would spare the export this test reads from disk.
    monkeypatch.setattr(onnx_backend, "_SESSIONS", collections.OrderedDict())
    tiny_checkpoint.save(tmp_path / "m")
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    predict(
        Checkpoint.load(tmp_path / "m"), image, Normalizer.from_image(image, 3), TilingParams(device="cpu")
    )  # exports to the disk cache
    loaded = Checkpoint.load(tmp_path / "m")
    assert not loaded.network.built
    predict(loaded, image, Normalizer.from_image(image, 3), TilingParams(device="cpu"))  # its network is kept with it
    expected = predict(loaded, image, Normalizer.from_image(image, 3), TilingParams(device="cpu"))
    copied = copy.deepcopy(loaded)
    assert copied.network.built
    with torch.no_grad():
        copied.model.segmentation_head[0].bias.add_(1.0)
    trained = predict(copied, image, Normalizer.from_image(image, 3), TilingParams(device="cpu"))
    assert np.abs(trained - expected).max() > 0.01  # the copy runs its own weights
    assert np.array_equal(predict(loaded, image, Normalizer.from_image(image, 3), TilingParams(device="cpu")), expected)


def test_the_summary_says_what_its_score_was_measured_on():
    """Item 4 of the napari issue: "val DSB score 0.553" read as the README's val score."""
    from napari_nuclei_unet.model import Checkpoint, bundled_model_path

    summary = Checkpoint.load(bundled_model_path()).summary()
    assert "val DSB score" not in summary and "validation images" in summary
