"""The ONNX Runtime CPU backend gives PyTorch's probabilities (float32) or nearly them (int8), and follows the weights
it was exported from."""

import collections

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


@pytest.fixture(autouse=True)
def _empty_network_cache(tmp_path, monkeypatch):
    """Each test counts its own exports: nothing comes from another test's disk cache or opened networks."""
    monkeypatch.setenv("NUCLEI_UNET_CACHE", str(tmp_path / "onnx-cache"))
    monkeypatch.setattr(onnx_backend, "_SESSIONS", collections.OrderedDict())


def _image(shape=(200, 330), seed=3):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.random(shape), 3) * 4000).astype(np.uint16)


def _both(model, image, monkeypatch, **tiling):
    """Probabilities with each backend, checking that ONNX Runtime ran only when asked for."""
    calls = []
    original = onnx_backend.OnnxNetwork.__call__
    monkeypatch.setattr(
        onnx_backend.OnnxNetwork, "__call__", lambda self, batch: calls.append(1) or original(self, batch)
    )
    normalizer = Normalizer.from_image(image, 3)
    with_torch = predict(model, image, normalizer, TilingParams(device="cpu", backend="torch", **tiling))
    assert not calls
    with_onnx = predict(
        model, image, normalizer, TilingParams(device="cpu", backend="onnx", precision="float32", **tiling)
    )
    assert calls
    return with_torch, with_onnx


@pytest.mark.parametrize("tiling", [{}, {"tile_size": 128, "overlap": 32, "batch_size": 2}, {"tta": True}])
def test_onnx_matches_torch(tiny_checkpoint, tiling, monkeypatch):
    with_torch, with_onnx = _both(tiny_checkpoint.model, _image(), monkeypatch, **tiling)
    assert with_onnx.shape == with_torch.shape == (2, 200, 330)
    assert np.abs(with_onnx - with_torch).max() < TOLERANCE


def test_one_export_per_weights_and_a_new_one_after_training(tiny_checkpoint, monkeypatch):
    model = tiny_checkpoint.model.eval()
    first = onnx_backend.cpu_network(model, 3, precision="float32")
    assert isinstance(first, onnx_backend.OnnxNetwork)
    assert onnx_backend.cpu_network(model, 3, precision="float32") is first  # cached, not re-exported
    quantised = onnx_backend.cpu_network(model, 3, precision="int8")
    assert quantised is not first and onnx_backend.cpu_network(model, 3, precision="int8") is quantised
    with torch.no_grad():  # an optimiser step changes weights in place
        model.segmentation_head[0].bias.add_(0.5)
    second = onnx_backend.cpu_network(model, 3, precision="float32")
    assert second is not first
    assert onnx_backend.cpu_network(model, 3, precision="int8") is not quantised
    with_torch, with_onnx = _both(model, _image(), monkeypatch)
    assert np.abs(with_onnx - with_torch).max() < TOLERANCE  # the new weights, not the exported ones


def test_the_weights_are_digested_only_when_onnx_runtime_runs_them(tiny_checkpoint, monkeypatch):
    """Naming the export hashes every weight (~25 ms for the bundled model): not for PyTorch, on every plane."""

    def no_digest(*args):
        raise AssertionError("digested for PyTorch")

    monkeypatch.setattr(onnx_backend, "weights_digest", no_digest)
    image = _image((64, 64))
    predict(tiny_checkpoint, image, Normalizer.from_image(image, 3), TilingParams(device="cpu", backend="torch"))
    assert onnx_backend.cpu_network(tiny_checkpoint.model, 3, "torch") is tiny_checkpoint.model


def test_backend_choices(tiny_checkpoint, monkeypatch):
    model = tiny_checkpoint.model
    assert onnx_backend.cpu_network(model, 3, "torch") is model
    with pytest.raises(ModelError, match="backend must be one of"):
        onnx_backend.cpu_network(model, 3, "tensorrt")
    with pytest.raises(ModelError, match="precision must be one of int8, float32"):
        onnx_backend.cpu_network(model, 3, "auto", "int4")
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
    assert (
        main(
            [
                "segment",
                str(tmp_path / "a.tif"),
                "--out",
                str(tmp_path / "out"),
                "--diameter",
                "none",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "device: cpu (ONNX Runtime, 8-bit)" in capsys.readouterr().err
    assert (
        main(
            [
                "segment",
                str(tmp_path / "a.tif"),
                "--out",
                str(tmp_path / "out32"),
                "--diameter",
                "none",
                "--device",
                "cpu",
                "--precision",
                "float32",
            ]
        )
        == 0
    )
    assert "device: cpu (ONNX Runtime)\n" in capsys.readouterr().err


def test_int8_network_is_quantised_and_stays_close_to_float32(tiny_checkpoint):
    """8-bit convolutions except the first (raw pixels in), and probabilities near float32's."""
    import onnx

    model = tiny_checkpoint.model.eval()
    assert onnx_backend.cpu_network(model, 3, precision="int8").precision == "int8"
    graph = onnx.load_from_string(onnx_backend.quantize(onnx_backend.to_onnx(model, 3)[0], 3)).graph
    dequantised = {name for node in graph.node if node.op_type == "DequantizeLinear" for name in node.output}
    quantised_weights = [node.input[1] in dequantised for node in graph.node if node.op_type == "Conv"]
    assert len(quantised_weights) > 4
    assert not quantised_weights[0] and all(quantised_weights[1:])
    # Full-range 8-bit weights; 7 bits where a pair of products with 8-bit activations is added in 16 bits (x86
    # without VNNI), which then never saturates.
    from onnx import numpy_helper

    for bits, largest in ((8, 127), (7, 64)):
        graph = onnx.load_from_string(onnx_backend.quantize(onnx_backend.to_onnx(model, 3)[0], 3, bits)).graph
        weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert len(weights) >= len(quantised_weights) - 1
        widest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
        assert widest == largest
        assert (2 * 255 * widest <= 32767) == (bits == 7)  # a 16-bit sum of two products fits only with 7 bits

    normalizer = Normalizer.from_image(_image(), 3)
    int8, float32 = (
        predict(model, _image(), normalizer, TilingParams(device="cpu", precision=p)) for p in ("int8", "float32")
    )
    assert int8.shape == float32.shape == (2, 200, 330)
    assert np.abs(int8 - float32).mean() < 0.02


def test_weights_are_seven_bit_only_on_x86_without_vnni(monkeypatch):
    """The bits follow the CPU, and name the export: a cache shared by two machines keeps both."""
    import platform

    int8, float32 = {}, set()
    for machine, vnni, bits in (("x86_64", False, 7), ("AMD64", True, 8), ("arm64", False, 8)):
        onnx_backend.weight_bits.cache_clear()
        monkeypatch.setattr(platform, "machine", lambda machine=machine: machine)
        monkeypatch.setattr(onnx_backend, "_has_vnni", lambda vnni=vnni: vnni)
        assert onnx_backend.weight_bits() == bits
        int8.setdefault(bits, set()).add(onnx_backend.export_name("digest", 3, "int8"))
        float32.add(onnx_backend.export_name("digest", 3, "float32"))
    onnx_backend.weight_bits.cache_clear()
    assert len(int8[7]) == len(int8[8]) == 1 and int8[7] != int8[8]
    assert len(float32) == 1  # float32 does not depend on the CPU


def test_int8_segments_the_sample_as_float32_does():
    """The bundled model in 8 bits finds the same nuclei as in float32, as well against the truth."""
    from napari_nuclei_unet.metrics import evaluate
    from napari_nuclei_unet.model import Checkpoint, bundled_model_path
    from napari_nuclei_unet.segment import SegmentParams, segment
    from napari_nuclei_unet.synthetic import sample_field

    checkpoint = Checkpoint.load(bundled_model_path())
    image, truth = sample_field()
    int8, float32 = (
        segment(checkpoint, image, SegmentParams(tiling=TilingParams(device="cpu", precision=p)))
        for p in ("int8", "float32")
    )
    assert onnx_backend.cpu_network(checkpoint.model, 3, precision="int8").precision == "int8"  # it really ran 8-bit
    assert np.abs(int8.probabilities - float32.probabilities).mean() < 0.01
    assert np.mean((int8.labels > 0) == (float32.labels > 0)) > 0.99
    assert abs(int8.count - float32.count) <= 2
    scores = [evaluate([(truth, result.labels)]).kaggle_score for result in (int8, float32)]
    assert abs(scores[0] - scores[1]) < 0.02, scores


def test_failed_quantisation_runs_float32_with_a_warning(tiny_checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no 8-bit kernel for this operator")

    monkeypatch.setattr(onnx_backend, "quantize", broken)
    with pytest.warns(RuntimeWarning, match="8-bit quantisation failed, running float32 .no 8-bit kernel"):
        network = onnx_backend.cpu_network(tiny_checkpoint.model.eval(), 3, precision="int8")
    assert isinstance(network, onnx_backend.OnnxNetwork) and network.precision == "float32"


def test_the_same_weights_are_quantised_once(tiny_config, monkeypatch):
    """Two copies of one checkpoint (e.g. loaded twice) share one quantisation; other weights get their own."""
    from napari_nuclei_unet.model import Checkpoint

    calls = []
    original = onnx_backend.quantize
    monkeypatch.setattr(onnx_backend, "quantize", lambda *args: calls.append(1) or original(*args))
    first = Checkpoint.create(tiny_config)
    copy = Checkpoint.create(tiny_config)
    copy.model.load_state_dict(first.model.state_dict())
    assert onnx_backend.cpu_network(first.model.eval(), 3).precision == "int8"
    assert onnx_backend.cpu_network(copy.model.eval(), 3).precision == "int8"
    assert len(calls) == 1
    torch.manual_seed(1)
    onnx_backend.cpu_network(Checkpoint.create(tiny_config).model.eval(), 3)
    assert len(calls) == 2


def test_a_second_load_takes_the_network_from_disk_without_building_the_model(tmp_path, tiny_checkpoint, monkeypatch):
    """The next process (here: the next load) pays neither the export nor segmentation-models-pytorch's import."""
    from napari_nuclei_unet.model import Checkpoint, ModelConfig

    monkeypatch.setenv("NUCLEI_UNET_CACHE", str(tmp_path / "cache"))
    tiny_checkpoint.save(tmp_path / "model")
    image = _image()
    normalizer = Normalizer.from_image(image, 3)
    first = Checkpoint.load(tmp_path / "model")
    assert first.network.built  # nothing cached yet: built, checked and exported as before
    expected = predict(first, image, normalizer, TilingParams(device="cpu"))
    assert list((tmp_path / "cache").glob("*.onnx")), "the export was not kept on disk"

    def no_build(self, *args, **kwargs):
        raise AssertionError("the torch model was built")

    monkeypatch.setattr(ModelConfig, "build", no_build)
    second = Checkpoint.load(tmp_path / "model")
    assert not second.network.built
    again = predict(second, image, normalizer, TilingParams(device="cpu"))
    assert np.array_equal(again, expected)
    assert not second.network.built  # still never built
    monkeypatch.undo()
    assert isinstance(second.model, torch.nn.Module) and second.network.built  # asked for: built then
    with torch.no_grad():
        for a, b in zip(second.model.state_dict().values(), tiny_checkpoint.model.state_dict().values()):
            assert torch.equal(a, b)
        second.model.segmentation_head[0].bias.add_(0.5)  # whoever took the module may change it in place
    changed = predict(second, image, normalizer, TilingParams(device="cpu"))
    assert np.abs(changed - expected).max() > 0.01  # the new weights run, not the export of the old ones


def test_other_weights_are_another_file_and_a_damaged_file_is_exported_again(tmp_path, tiny_config, monkeypatch):
    from napari_nuclei_unet.model import Checkpoint

    monkeypatch.setenv("NUCLEI_UNET_CACHE", str(tmp_path / "cache"))
    image = _image()
    normalizer = Normalizer.from_image(image, 3)
    checkpoint = Checkpoint.create(tiny_config)
    checkpoint.save(tmp_path / "a")
    predict(Checkpoint.load(tmp_path / "a"), image, normalizer, TilingParams(device="cpu", precision="float32"))
    with torch.no_grad():
        checkpoint.model.segmentation_head[0].bias.add_(0.5)
    checkpoint.save(tmp_path / "b")
    expected = predict(checkpoint.model, image, normalizer, TilingParams(device="cpu", backend="torch"))
    other = Checkpoint.load(tmp_path / "b")
    assert other.network.built  # different weights: nothing of theirs is cached
    assert (
        np.abs(predict(other, image, normalizer, TilingParams(device="cpu", precision="float32")) - expected).max()
        < TOLERANCE
    )
    for path in (tmp_path / "cache").glob("*.onnx"):
        path.write_bytes(b"\x02\x00not an onnx graph")
    damaged = Checkpoint.load(tmp_path / "b")
    assert not damaged.network.built
    assert (
        np.abs(predict(damaged, image, normalizer, TilingParams(device="cpu", precision="float32")) - expected).max()
        < TOLERANCE
    )


def test_an_unwritable_cache_folder_costs_only_the_export(tmp_path, tiny_checkpoint, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NUCLEI_UNET_CACHE", str(blocker / "cache"))  # a folder that cannot be made
    image = _image()
    out = predict(
        tiny_checkpoint, image, Normalizer.from_image(image, 3), TilingParams(device="cpu", precision="float32")
    )
    assert out.shape == (2, *image.shape)


def test_a_cli_run_from_the_disk_cache_imports_neither_torch_nor_onnx(tmp_path, tiny_checkpoint, monkeypatch):
    """Importing torch (~2.5 s) and onnx (~1 s) was most of a short run's start-up; a cached network needs neither."""
    import json
    import subprocess
    import sys

    import tifffile

    from napari_nuclei_unet.model import Checkpoint

    monkeypatch.setenv("NUCLEI_UNET_CACHE", str(tmp_path / "cache"))
    tiny_checkpoint.nucleus_diameter = 10.0
    tiny_checkpoint.save(tmp_path / "model")
    tifffile.imwrite(tmp_path / "cells.tif", _image((120, 150)))
    arguments = [
        "segment",
        str(tmp_path / "cells.tif"),
        "--model",
        str(tmp_path / "model"),
        "--diameter",
        "5",
        "--device",
        "auto",
    ]
    # In this process: export and cache the network.
    predict(
        Checkpoint.load(tmp_path / "model"),
        _image((8, 8)),
        Normalizer.from_image(_image((8, 8)), 3),
        TilingParams(device="cpu"),
    )
    script = (
        "import json, sys\n"
        "from napari_nuclei_unet import cli, devices\n"
        "gpu = devices._gpu_possible()\n"
        f"code = cli.main({arguments + ['--out', str(tmp_path / 'second')]!r})\n"
        "print(json.dumps({'code': code, 'gpu': gpu, 'torch': 'torch' in sys.modules, 'onnx': 'onnx' in "
        "sys.modules}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    if report["gpu"]:
        pytest.skip("a GPU driver is present: 'auto' must ask torch")
    assert not report["torch"] and not report["onnx"], report
    from napari_nuclei_unet import cli

    assert cli.main([*arguments, "--out", str(tmp_path / "first")]) == 0  # the same run with torch loaded
    assert np.array_equal(
        tifffile.imread(tmp_path / "second" / "cells.tif"), tifffile.imread(tmp_path / "first" / "cells.tif")
    )


def test_int8_export_widens_the_output_head_to_sixteen_channels_with_the_same_logits(tiny_checkpoint):
    """ONNX Runtime's 8-bit convolution is slow for a 3-channel output: the exported head has 16 filters, the extra
    ones zero and sliced off, so the network's outputs are the model's own."""
    import onnx
    import torch

    model = tiny_checkpoint.model.eval()
    widened = onnx_backend.head_widened(model)
    assert model.segmentation_head[0].out_channels == 2  # the model itself is untouched
    batch = torch.from_numpy(np.stack([_image()[:64, :96]] * 3)[None].astype(np.float32) / 255)
    with torch.inference_mode():
        assert torch.equal(widened(batch), model(batch))
    network = onnx_backend.cpu_network(model, 3, precision="int8")  # what segmentation runs
    graph = onnx.load_from_string(network.serialized).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    head = [node for node in graph.node if node.op_type == "Conv"][-1]
    producer = {output: node for node in graph.node for output in node.output}
    head_weight = weights[producer[head.input[1]].input[0]]  # the weight behind its DequantizeLinear
    assert network.out_channels == 2 and head_weight.dims[0] == 16
    assert network(batch.numpy()).shape == (1, 2, 64, 96)
    assert onnx_backend.head_widened(widened) is widened  # nothing to widen: returned as it is


def test_the_fast_sigmoid_is_scipys_within_a_rounding_step():
    """Probabilities come from ``0.5 * tanh(x / 2) + 0.5`` (faster): the same as ``expit`` to float32 rounding, in
    place, and exactly 0 / 1 far out."""
    from scipy.special import expit

    from napari_nuclei_unet.forward import sigmoid_

    logits = np.concatenate([np.linspace(-120, 120, 100_001), [0.0, -1e-8, 1e-8]]).astype(np.float32)
    expected = expit(logits.copy())
    result = sigmoid_(logits)
    assert result is logits and result.dtype == np.float32
    assert np.abs(result - expected).max() <= 2.5e-7
    assert result[0] == 0.0 and result[100_000] == 1.0 and result[-3] == 0.5
