"""bioimage.io Model Zoo packages: our exports pass the format's own checks, and packages load back as models."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_nuclei_unet.bioimageio_export import export_package, validate_package
from napari_nuclei_unet.cli import main
from napari_nuclei_unet.errors import ModelError
from napari_nuclei_unet.model import Checkpoint, UnetNetwork, resolve_model_path
from napari_nuclei_unet.model_zoo import PackageNetwork
from napari_nuclei_unet.params import ExportParams, PostprocessParams, SegmentParams, TilingParams
from napari_nuclei_unet.segment import segment
from napari_nuclei_unet.synthetic import sample_field
from napari_nuclei_unet.tiling import InputSizes, axis_tiles, predict

ZOO_PACKAGE = Path(__file__).resolve().parents[2] / "shared" / "models" / "unet2d_nuclei_broad"


@pytest.fixture(scope="module")
def bundled() -> Checkpoint:
    return Checkpoint.load(resolve_model_path("default"))


@pytest.fixture(scope="module")
def exported(bundled, tmp_path_factory) -> Path:
    """The bundled model as a package (format validated on the way; the model test is the test below's)."""
    out = tmp_path_factory.mktemp("export") / "nuclei.zip"
    return export_package(bundled, out, ExportParams(run_test=False))


@pytest.fixture
def unpacked(exported, tmp_path) -> Path:
    folder = tmp_path / "package"
    with zipfile.ZipFile(exported) as archive:
        archive.extractall(folder)
    return folder


def _edit(folder: Path, change) -> Path:
    description = folder / "rdf.yaml"
    data = yaml.safe_load(description.read_text())
    change(data)
    description.write_text(yaml.safe_dump(data))
    return folder


def _as_foreign(data: dict) -> None:
    """Our package as another tool's would be: no smp state_dict, none of our metadata."""
    del data["weights"]["pytorch_state_dict"]
    for entry in data["weights"].values():
        entry.pop("parent", None)
    data.pop("config", None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_the_exported_bundled_model_passes_bioimageio_cores_model_test(exported):
    from bioimageio.core import test_model

    summary = test_model(exported)
    assert summary.status == "passed", [e.msg for d in summary.details for e in d.errors][:3]
    reproduced = {d.name for d in summary.details if d.name.startswith("Reproduce test outputs")}
    assert reproduced == {
        f"Reproduce test outputs from test inputs ({w})" for w in ("onnx", "pytorch_state_dict", "torchscript")
    }
    assert validate_package(exported, run_test=False) == []


@pytest.mark.slow
def test_validation_catches_weights_that_do_not_reproduce_the_test_output(unpacked):
    expected = np.load(unpacked / "test_output.npy")
    np.save(unpacked / "test_output.npy", np.clip(expected + 0.2, 0, 1))
    problems = validate_package(_edit(unpacked, lambda data: data["outputs"][0]["test_tensor"].pop("sha256")))
    assert problems and "Reproduce test outputs" in problems[0]


def test_the_package_describes_our_preprocessing_outputs_and_metadata(exported, bundled):
    with zipfile.ZipFile(exported) as archive:
        data = yaml.safe_load(archive.read("rdf.yaml"))
        names = set(archive.namelist())
        readme = archive.read("README.md").decode()
    assert {
        "weights.onnx",
        "weights.pt",
        "weights.torchscript.pt",
        "test_input.npy",
        "test_output.npy",
        "cover.png",
        "README.md",
    } <= names
    steps = [step["id"] for step in data["inputs"][0]["preprocessing"] if step["id"] != "ensure_dtype"]
    assert steps == ["scale_range", "clip"]
    assert data["inputs"][0]["preprocessing"][1]["kwargs"]["max_percentile"] == bundled.percentiles[1]
    assert data["outputs"][0]["axes"][1]["channel_names"] == list(bundled.outputs)
    assert data["weights"]["pytorch_state_dict"]["architecture"]["import_from"] == "segmentation_models_pytorch"
    assert data["config"]["napari-nuclei-unet"]["postprocess"]["min_confidence"] == bundled.min_confidence
    assert (
        "monuseg" in data["training_data"]["description"].lower()
        and "NON-COMMERCIAL" in data["training_data"]["description"]
    )
    assert f"({bundled.min_confidence:g})" in readme and "watershed" in readme


def test_our_package_loads_back_and_segments_the_sample_identically(exported, bundled):
    loaded = Checkpoint.load(exported)
    assert loaded.can_finetune and isinstance(loaded.network, UnetNetwork)
    assert (loaded.outputs, loaded.percentiles, loaded.nucleus_diameter, loaded.min_confidence) == (
        bundled.outputs,
        bundled.percentiles,
        bundled.nucleus_diameter,
        bundled.min_confidence,
    )
    from skimage import data

    for image, least in ((sample_field()[0], 40), (data.immunohistochemistry(), 5)):  # the plugin's two samples
        native, imported = segment(bundled, image), segment(loaded, image)
        assert native.count >= least
        np.testing.assert_array_equal(imported.labels, native.labels)


def test_a_foreign_package_runs_through_its_own_onnx_and_torchscript_weights(unpacked, bundled):
    loaded = Checkpoint.load(_edit(unpacked, _as_foreign))
    assert isinstance(loaded.network, PackageNetwork) and not loaded.can_finetune
    # The centre channel means nothing to a foreign package's reader: left unused.
    assert loaded.outputs == bundled.outputs[:2] and loaded.input_sizes == InputSizes(64, 32, halo=16)
    image, _ = sample_field()
    reference = predict(bundled, image, bundled.normalizer(image), TilingParams(device="cpu", precision="float32"))[:2]
    through_onnx = predict(loaded, image, loaded.normalizer(image), TilingParams(device="cpu"))
    through_torchscript = predict(loaded, image, loaded.normalizer(image), TilingParams(device="cpu", backend="torch"))
    # The package takes its percentiles on the grey image repeated into three channels, as the
    # spec reads it, ours on the grey image: the interpolated percentiles differ in the 5th digit.
    np.testing.assert_allclose(through_onnx, reference, atol=1e-3)
    np.testing.assert_allclose(through_torchscript, through_onnx, atol=1e-4)
    # Without our metadata the package has no calibrated min confidence and no training nucleus size.
    same = SegmentParams(
        tiling=TilingParams(precision="float32"), postprocess=PostprocessParams(min_confidence=0.0), diameter=None
    )
    labels = segment(loaded, image, same).labels
    assert np.mean((labels > 0) == (segment(bundled, image, same).labels > 0)) > 0.999
    with pytest.raises(ModelError, match="cannot be fine-tuned"):
        import copy

        copy.deepcopy(loaded)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("inputs"), "not a valid bioimage.io model description"),
        (lambda d: d["inputs"][0]["axes"].insert(2, {"type": "space", "id": "z", "size": 8}), "only 2D"),
        (
            lambda d: d["outputs"][0]["axes"][1].update(channel_names=["alpha", "beta"]),
            "which output channel is the nuclei foreground",
        ),
        (
            lambda d: d["inputs"][0]["preprocessing"].append({"id": "ensure_dtype", "kwargs": {"dtype": "uint8"}}),
            "ensure_dtype to uint8 is not supported",
        ),
        (
            lambda d: d["outputs"][0].update(postprocessing=[{"id": "binarize", "kwargs": {"threshold": 0.5}}]),
            "binarize is not supported",
        ),
    ],
)
def test_a_package_we_cannot_interpret_is_a_one_line_error_naming_it(unpacked, change, message):
    folder = _edit(unpacked, lambda data: (_as_foreign(data), change(data)))
    with pytest.raises(ModelError, match=message) as caught:
        Checkpoint.load(folder)
    assert str(caught.value).startswith(str(folder)) and "\n" not in str(caught.value)


def test_an_smp_unet_package_loads_as_ours_only_with_our_normalisation(unpacked, tiny_config):
    """Without our metadata, a state_dict package is ours when its percentiles are pooled over the colour channels, as
    ours are."""

    def without_our_metadata(data):
        data.pop("config")

    assert Checkpoint.load(_edit(unpacked, without_our_metadata)).can_finetune

    def per_channel(data):
        next(s for s in data["inputs"][0]["preprocessing"] if s["id"] == "scale_range")["kwargs"]["axes"] = ["y", "x"]

    foreign = Checkpoint.load(_edit(unpacked, per_channel))
    assert not foreign.can_finetune and isinstance(foreign.network, PackageNetwork)


def test_the_readme_says_how_inputs_are_normalised_for_grey_and_colour_models(tiny_config):
    from dataclasses import replace

    from napari_nuclei_unet.bioimageio_export import _readme

    for channels, wording in ((3, "repeated into the three channels"), (1, "averaged to grey")):
        readme = _readme(Checkpoint.create(replace(tiny_config, in_channels=channels)))
        assert "percentiles, pooled over the colour channels" in readme and wording in readme


def test_a_package_without_runnable_weights_files_says_so_and_downloads_nothing(unpacked):
    folder = _edit(unpacked, _as_foreign)
    (folder / "weights.onnx").unlink()
    (folder / "weights.torchscript.pt").unlink()
    with pytest.raises(ModelError, match="no ONNX or TorchScript weights file"):
        Checkpoint.load(folder)


def test_broken_package_files_are_one_line_cli_errors(tmp_path, exported, capsys):
    image = tmp_path / "image.tif"
    import tifffile

    tifffile.imwrite(image, sample_field()[0])
    not_zip = tmp_path / "model.zip"
    not_zip.write_text("not a zip")
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("README.md", "no description")
    for model, message in ((not_zip, "not a readable zip file"), (empty_zip, "no bioimageio.yaml or rdf.yaml inside")):
        assert main(["segment", str(image), "--out", str(tmp_path / "out"), "--model", str(model)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and str(model) in err and "\n" not in err
    assert not list((tmp_path / "out").glob("*.tif"))  # the model is checked before any image is written


def test_cli_export_writes_a_package_with_the_users_fields_and_leaves_nothing_when_it_fails(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "mine.zip"
    code = main(
        [
            "export-bioimageio",
            "default",
            "--out",
            str(out),
            "--no-test",
            "--author",
            "Jane Doe;Nuclei Lab;0000-0002-1825-0097",
            "--cite",
            "Our paper;10.1000/xyz123",
        ]
    )
    assert code == 0, capsys.readouterr().err
    with zipfile.ZipFile(out) as archive:
        data = yaml.safe_load(archive.read("rdf.yaml"))
    assert data["authors"] == [{"name": "Jane Doe", "affiliation": "Nuclei Lab", "orcid": "0000-0002-1825-0097"}]
    assert {"text": "Our paper", "doi": "10.1000/xyz123"} in data["cite"]
    before = out.read_bytes()
    assert main(["export-bioimageio", "default", "--out", str(out), "--no-test"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before

    import napari_nuclei_unet.bioimageio_export as bioimageio_export

    monkeypatch.setattr(bioimageio_export, "validate_package", lambda path, run_test=True: ["test outputs differ"])
    failed = tmp_path / "failed.zip"
    assert main(["export-bioimageio", "default", "--out", str(failed), "--no-test"]) == 2
    assert "test outputs differ" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zip"]  # no package, no leftovers


def test_fixed_and_parameterized_input_sizes_shape_the_tiles():
    fixed = InputSizes(minimum=512, step=512, fixed=True)
    assert axis_tiles(100, 1024, 64, fixed) == (512, [0])
    tile, starts = axis_tiles(1300, 1024, 64, fixed)
    assert (
        tile == 512
        and starts[0] == 0
        and starts[-1] == 1300 - 512
        and all(b - a <= 512 - 64 for a, b in zip(starts, starts[1:]))
    )
    stepped = InputSizes(minimum=64, step=16)
    assert [stepped.fit(n) for n in (10, 64, 65, 80, 81)] == [64, 64, 80, 80, 96]
    assert axis_tiles(70, 1024, 64, stepped) == (80, [0])


@pytest.fixture
def zoo_package() -> Path:
    if not (ZOO_PACKAGE / "bioimageio.yaml").is_file():
        pytest.skip("../shared/models/unet2d_nuclei_broad is not available")
    return ZOO_PACKAGE


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_the_zoo_package_reproduces_its_own_test_output_in_our_tiling(zoo_package, backend):
    loaded = Checkpoint.load(zoo_package)
    assert isinstance(loaded.network, PackageNetwork) and loaded.outputs == ("foreground",)
    assert loaded.input_sizes == InputSizes(512, 512, fixed=True, halo=32)
    plane = np.load(zoo_package / "test_input.npy")[0, 0]
    expected = np.load(zoo_package / "test_output.npy")[0]
    probabilities = predict(loaded, plane, loaded.normalizer(plane), TilingParams(device="cpu", backend=backend))
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_zoo_package_whose_batch_is_one_runs_batches_image_by_image(zoo_package, backend):
    loaded = Checkpoint.load(zoo_package)
    assert loaded.network.one_at_a_time  # its batch axis is fixed at 1: ONNX Runtime refuses 4 tiles at once
    plane = np.random.default_rng(0).random((700, 900)).astype(np.float32) * 4000
    single, batched = (
        predict(loaded, plane, loaded.normalizer(plane), TilingParams(device="cpu", backend=backend, batch_size=n))
        for n in (1, 4)
    )
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_the_zoo_package_segments_a_dsb2018_image_from_the_cli_without_the_network(
    zoo_package, dsb2018, tmp_path, monkeypatch, capsys
):
    import csv
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(
        socket.socket, "connect", no_network
    )  # its pytorch_state_dict is remote: it must not be fetched

    with open(dsb2018 / "split.csv") as handle:
        image_id = next(row[0] for row in csv.reader(handle) if row[1:] == ["val"])
    out = tmp_path / "out"
    assert (
        main(["segment", str(dsb2018 / "images" / f"{image_id}.png"), "--out", str(out), "--model", str(zoo_package)])
        == 0
    )
    from napari_nuclei_unet.io import read_image

    labels = read_image(out / f"{image_id}.tif")
    assert labels.max() >= 5
    err = capsys.readouterr().err
    assert (
        "UNet 2D Nuclei Broad, bioimage.io package" in err and "cpu (ONNX Runtime, the package's weights)" in err
    )  # not "8-bit": run as published
