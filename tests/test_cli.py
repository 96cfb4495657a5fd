"""The ``nuclei-unet`` command line, run in-process through ``main(argv)``."""

import json
import re

import numpy as np
import pytest
import tifffile

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.io import read_image
from napari_nuclei_unet.rle import decode_csv, write_csv
from napari_nuclei_unet.synthetic import nuclei_field


@pytest.fixture
def model_dir(tmp_path, tiny_checkpoint):
    return tiny_checkpoint.save(tmp_path / "model")


@pytest.fixture
def image_folder(tmp_path):
    import imageio.v3 as iio

    folder = tmp_path / "images"
    folder.mkdir()
    image, _ = nuclei_field((96, 128), count=8, seed=1)
    tifffile.imwrite(folder / "fluo16.tif", image)  # 16-bit TIFF
    iio.imwrite(folder / "bright8.png", (255 - image // 13).astype(np.uint8))  # 8-bit PNG
    tifffile.imwrite(folder / "stack.tif", np.stack([image, image[::-1]]))  # Z stack
    return folder


def test_segment_folder_writes_labels_and_rle(tmp_path, model_dir, image_folder, capsys):
    out = tmp_path / "out"
    csv_path = tmp_path / "pred.csv"
    code = main(
        [
            "segment",
            str(image_folder),
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--rle-csv",
            str(csv_path),
            "--tile-size",
            "64",
            "--overlap",
            "16",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "bright8.tif",
        "fluo16.tif",
        "nuclei-unet-summary.csv",
        "stack.tif",
    ]
    labels = read_image(out / "fluo16.tif")
    assert labels.shape == (96, 128) and labels.dtype == np.uint16
    assert read_image(out / "stack.tif").shape == (2, 96, 128)
    decoded = decode_csv(csv_path)
    assert set(decoded) == {"bright8", "fluo16", "stack_0", "stack_1"}
    assert np.array_equal(decoded["fluo16"] > 0, labels > 0)
    # the rows are the written labels, nucleus for nucleus (each file's part, joined; no part left behind)
    _, ids = np.unique(labels, return_inverse=True)
    _, decoded_ids = np.unique(decoded["fluo16"], return_inverse=True)
    assert np.array_equal(ids, decoded_ids) and np.array_equal(
        decoded["stack_1"] > 0, read_image(out / "stack.tif")[1] > 0
    )
    captured = capsys.readouterr()
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("segmented 3 image(s):") and "MP/s on cpu" in summary
    # stderr is not a terminal here (a log or a pipe): one plain line per image, no redrawn bars
    lines = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"], captured.err
    assert "\r" not in captured.err and "\x1b[A" not in captured.err and "step/s" not in captured.err


def test_min_confidence_defaults_to_the_models_calibrated_level(tmp_path, image_folder, capsys):
    image = tifffile.imread(image_folder / "fluo16.tif")
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    image[(rows - 15) ** 2 + (cols - 110) ** 2 < 64] = (
        500  # a faint blob: found, but less surely than the calibrated level
    )
    tifffile.imwrite(tmp_path / "faint.tif", image)
    counts = {}
    for value in ("0", "auto", "0.8", "0.95"):  # the bundled model's calibrated level is 0.8
        out = tmp_path / value
        assert main(["segment", str(tmp_path / "faint.tif"), "--out", str(out), "--min-confidence", value]) == 0
        counts[value] = int(read_image(out / "faint.tif").max())
    assert counts["0"] >= counts["auto"] == counts["0.8"] >= counts["0.95"] and counts["0"] > counts["0.95"], counts
    assert counts["0"] > counts["auto"], counts  # "auto" is the model's level, not 0
    with pytest.raises(SystemExit):
        main(["segment", str(image_folder), "--out", str(tmp_path / "x"), "--min-confidence", "1.5"])
    assert "--min-confidence: must be in [0, 1)" in capsys.readouterr().err


def test_segment_needs_a_model_or_bundled_default(tmp_path, image_folder, capsys, monkeypatch):
    import napari_nuclei_unet.model as model

    monkeypatch.setattr(model, "BUNDLED_MODEL_DIR", tmp_path / "nothing")
    assert main(["segment", str(image_folder), "--out", str(tmp_path / "o")]) == 2
    assert "pass a model with --model" in capsys.readouterr().err


def test_bad_image_is_one_line_and_writes_nothing(tmp_path, model_dir, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    out = tmp_path / "out"
    assert main(["segment", str(bad), "--out", str(out), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nuclei-unet: error: {bad}: cannot read image")
    assert not out.exists() or not any(out.iterdir())


def test_bad_weights_are_one_line(tmp_path, image_folder, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not a checkpoint")
    assert main(["segment", str(image_folder), "--out", str(tmp_path / "o"), "--model", str(weights)]) == 2
    assert f"{weights}: corrupt, truncated" in capsys.readouterr().err


def test_rle_decode_encode_round_trip(tmp_path, capsys):
    labels = nuclei_field((64, 80), count=6, seed=3)[1]
    src = tmp_path / "labels"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", labels.astype(np.uint16))
    tifffile.imwrite(src / "b.tif", np.zeros((10, 12), np.uint16))
    csv_path = tmp_path / "a.csv"
    assert main(["rle", "encode", str(src), "--out", str(csv_path)]) == 0
    assert main(["rle", "decode", str(csv_path), "--out", str(tmp_path / "dec")]) == 0
    assert np.array_equal(read_image(tmp_path / "dec" / "a.tif"), labels)
    assert read_image(tmp_path / "dec" / "b.tif").max() == 0  # the empty image survived


def test_rle_encode_takes_the_label_stacks_segment_writes(tmp_path, model_dir, image_folder, capsys):
    """``rle encode`` on segment's own output folder (a Z/T stack among the images) gives the rows that
    ``segment --rle-csv`` wrote: a stack's planes as ``<stem>_<plane>``. It refused the stack."""
    out, written_csv = tmp_path / "out", tmp_path / "segment.csv"
    options = {"--out": out, "--model": model_dir, "--rle-csv": written_csv, "--tile-size": 64}
    assert main(["segment", str(image_folder), *(str(v) for item in options.items() for v in item)]) == 0
    assert main(["rle", "encode", str(out), "--out", str(tmp_path / "encoded.csv")]) == 0
    written, encoded = decode_csv(written_csv), decode_csv(tmp_path / "encoded.csv")
    assert sorted(encoded) == sorted(written) == ["bright8", "fluo16", "stack_0", "stack_1"]
    assert all(np.array_equal(encoded[name], written[name]) for name in written)
    # the RLE rows scored against the label files, stack included: plane by plane
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--truth", str(written_csv), "--pred", str(out), "--json", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert result["n_images"] == 4 and result["kaggle_score"] == 1.0 and result["n_pred"] == result["n_true"]


def test_rle_decode_bad_row_writes_nothing(tmp_path, capsys):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("ImageId,EncodedPixels,Height,Width\ngood,1 2,4,4\nbad,1 2 3,4,4\n")
    out = tmp_path / "dec"
    assert main(["rle", "decode", str(csv_path), "--out", str(out)]) == 2
    assert "row 3 (ImageId 'bad'): odd number of values" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_prints_table_and_json(tmp_path, capsys):
    import json

    labels = nuclei_field((64, 80), count=6, seed=3)[1]
    truth, pred = tmp_path / "t", tmp_path / "p"
    truth.mkdir(), pred.mkdir()
    tifffile.imwrite(truth / "x.tif", labels.astype(np.uint16))
    tifffile.imwrite(pred / "x.tif", labels.astype(np.uint16))
    assert main(["evaluate", "--truth", str(truth), "--pred", str(pred), "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "DSB2018 score" in table and "AP@0.5" in table
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["kaggle_score"] == 1.0 and metrics["n_true"] == labels.max()


def test_evaluate_writes_each_images_scores_where_the_set_loses(tmp_path, capsys):
    import csv

    labels = nuclei_field((64, 80), count=6, seed=3)[1]
    truth, pred = tmp_path / "t", tmp_path / "p"
    truth.mkdir(), pred.mkdir()
    merged = labels.copy()
    merged[merged > 0] = 1  # five nuclei one object (not a mask: nucleus 2 keeps its own label)
    merged[labels == 2] = 2
    for name, predicted in (("good", labels), ("merged", merged), ("missing", None)):
        tifffile.imwrite(truth / f"{name}.tif", labels.astype(np.uint16))
        if predicted is not None:
            tifffile.imwrite(pred / f"{name}.tif", predicted.astype(np.uint16))
    per_image = tmp_path / "per_image.csv"
    assert main(["evaluate", "--truth", str(truth), "--pred", str(pred), "--per-image", str(per_image)]) == 0
    with open(per_image, newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["good", "merged", "missing"]
    assert float(rows["good"]["dsb_score"]) == 1.0 and rows["good"]["matched_at_0.5"] == "6"
    assert rows["merged"]["nuclei_pred"] == "2" and rows["merged"]["matched_at_0.5"] == "1"
    assert rows["missing"]["nuclei_pred"] == "0" and float(rows["missing"]["dsb_score"]) == 0.0
    overall = float(capsys.readouterr().out.splitlines()[2].split("|")[1])
    assert abs(overall - np.mean([float(r["dsb_score"]) for r in rows.values()])) < 1e-3  # the table's mean


def test_evaluate_says_what_is_missing_and_refuses_disjoint_sets(tmp_path, capsys):
    import json

    labels = nuclei_field((64, 80), count=6, seed=3)[1]
    truth, pred, other = tmp_path / "t", tmp_path / "p", tmp_path / "o"
    for folder in (truth, pred, other):
        folder.mkdir()
    for name in ("a", "b", "c", "d"):
        tifffile.imwrite(truth / f"{name}.tif", labels.astype(np.uint16))
    tifffile.imwrite(pred / "a.tif", labels.astype(np.uint16))
    assert main(["evaluate", "--truth", str(truth), "--pred", str(pred), "--json", str(tmp_path / "all.json")]) == 0
    err = capsys.readouterr().err
    assert (
        "3 of 4 ground-truth images have no prediction" in err
        and "--only-predicted" in err
        and len(err.strip().splitlines()) == 1
    )
    assert json.loads((tmp_path / "all.json").read_text())["kaggle_score"] == pytest.approx(0.25)  # 3 all-missed
    assert (
        main(
            [
                "evaluate",
                "--truth",
                str(truth),
                "--pred",
                str(pred),
                "--only-predicted",
                "--json",
                str(tmp_path / "one.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "one.json").read_text())["kaggle_score"] == 1.0
    tifffile.imwrite(other / "a nuclei.tif", labels.astype(np.uint16))  # named after a napari layer, not the image
    assert main(["evaluate", "--truth", str(truth), "--pred", str(other)]) == 2
    err = capsys.readouterr().err
    assert "no image in common" in err and "'a nuclei'" in err and len(err.strip().splitlines()) == 1


def test_labels_are_never_written_over_the_input_images(tmp_path, model_dir, capsys):
    """``--out`` the images' own folder: a.tif's labels went to a.tif, and the raw image was gone."""
    image, labels = nuclei_field((64, 80), count=5, seed=2)
    tifffile.imwrite(tmp_path / "a.tif", image)
    before = (tmp_path / "a.tif").read_bytes()
    assert main(["segment", str(tmp_path), "--out", str(tmp_path), "--model", str(model_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"nuclei-unet: error: {tmp_path / 'a.tif'}: the labels would overwrite this input image; choose another --out "
        "folder"
    )
    assert (tmp_path / "a.tif").read_bytes() == before
    write_csv(tmp_path / "a.csv", [("a", labels)])
    assert main(["rle", "decode", str(tmp_path / "a.csv"), "--out", str(tmp_path), "--images", str(tmp_path)]) == 2
    assert (tmp_path / "a.tif").read_bytes() == before
    assert main(["segment", str(tmp_path / "a.tif"), "--out", str(tmp_path / "labels"), "--model", str(model_dir)]) == 0


def test_ctrl_c_during_segmentation_says_nothing_was_written(tmp_path, model_dir, image_folder, capsys, monkeypatch):
    import napari_nuclei_unet.batch as batch

    real, calls = batch.segment_file, []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "segment_file", interrupted_at_the_third)
    out = tmp_path / "out"
    assert (
        main(["segment", str(image_folder), "--out", str(out), "--model", str(model_dir), "--tile-size", "64"]) == 130
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    done = message.removeprefix("nuclei-unet: interrupted after ").split(" ")[0]  # 2, or 1 if its pair was not done
    assert done in ("1", "2") and message == (
        f"nuclei-unet: interrupted after {done} of 3 image(s): nothing written to {out} (a run's outputs appear when "
        "all its images are done)"
    )
    assert list(out.iterdir()) == []  # no output, no staging folder


def test_ctrl_c_during_training_says_what_was_kept_and_the_same_command_resumes(
    tmp_path, tiny_checkpoint, capsys, monkeypatch
):
    """Ctrl-C in the second epoch: the first epoch's model and state are on disk, and the message says so (it said
    only "interrupted"); running the same command again resumes and finishes."""
    import napari_nuclei_unet.training.loop as loop
    from napari_nuclei_unet.io import write_labels

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for seed in (1, 2, 3):
        image, truth = nuclei_field((96, 128), count=8, seed=seed)
        tifffile.imwrite(images / f"field{seed}.tif", image)
        write_labels(labels / f"field{seed}.tif", truth)
    out = tmp_path / "run"
    argv = ["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--epochs", "2"]
    argv += ["--iterations", "2", "--patch-size", "64", "--batch-size", "2", "--val-fraction", "0.34", "--no-calibrate"]
    step, calls = loop._step, []

    def interrupted_in_epoch_two(run):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(run)

    monkeypatch.setattr(loop, "_step", interrupted_in_epoch_two)
    assert main(argv) == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("nuclei-unet: interrupted at iteration 2 (epoch 1): the best model so far"), message
    assert f"is in {out}; the same command resumes" in message
    monkeypatch.setattr(loop, "_step", step)
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "epoch 2:" in printed and "epoch 1:" not in printed  # resumed at the second epoch


def test_train_fine_tunes_with_the_widget_settings(tmp_path, tiny_checkpoint, capsys):
    from napari_nuclei_unet.io import write_labels
    from napari_nuclei_unet.model import Checkpoint

    tiny_checkpoint.nucleus_diameter = 20.0
    model_dir = tiny_checkpoint.save(tmp_path / "model")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for seed in (1, 2):
        image, truth = nuclei_field((96, 128), count=8, diameter=30, seed=seed)
        tifffile.imwrite(images / f"field{seed}.tif", image)
        write_labels(labels / f"field{seed}.tif", truth)
    out = tmp_path / "tuned"
    argv = [
        "train",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--patch-size",
        "64",
        "--batch-size",
        "2",
        "--val-fraction",
        "0",
        "--freeze-batchnorm",
        "--zoom-to-reference",
        "--anchor-weight",
        "0.01",
        "--distill-weight",
        "1",
        "--scale-range",
        "0.8,1.25",
        "--precision",
        "bfloat16",
        "--start-weight-share",
        "0.25",
    ]
    assert main(argv) == 0
    assert (
        "min confidence" in capsys.readouterr().out
        and Checkpoint.load(out).metadata["postprocess"]["calibrated_on"] == "2 training images"
    )
    training = Checkpoint.load(out).metadata["training"]
    config = training["config"]
    assert (
        config["zoom_to_reference"]
        and config["anchor_weight"] == 0.01
        and config["distill_weight"] == 1.0
        and config["scale_range"] == [0.8, 1.25]
    )
    assert (
        config["precision"] == "bfloat16"
        and training["precision"] == "bfloat16"
        and config["start_weight_share"] == 0.25
    )


def test_train_says_when_a_fine_tune_validates_no_better_than_its_start(tmp_path, capsys):
    """Trained on wrong labels (background marked as nucleus), validated on a correctly labelled image held out by
    the fine-tuning defaults: the CLI prints both scores and tells the user to keep the starting model."""
    from napari_nuclei_unet.io import write_labels
    from napari_nuclei_unet.params import FINETUNE_DEFAULTS
    from napari_nuclei_unet.training import split_validation

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    names = [f"field{seed}" for seed in range(4)]  # the order the images load in
    _, held = split_validation(names, FINETUNE_DEFAULTS.val_fraction, FINETUNE_DEFAULTS.seed)
    for seed, name in enumerate(names):
        image, truth = nuclei_field((128, 160), count=14, diameter=20, seed=31 + seed)
        tifffile.imwrite(images / f"{name}.tif", image)
        write_labels(labels / f"{name}.tif", truth if name in held else (truth == 0).astype(np.int32))
    out = tmp_path / "wrong"
    options = ["--epochs", "2", "--iterations", "5", "--patch-size", "64", "--lr", "3e-3", "--distill-weight", "0"]
    argv = ["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--model", "default"]
    assert main([*argv, *options]) == 0
    printed = capsys.readouterr().out
    assert "no better: validation score" in printed and "keep segmenting with default" in printed, printed
    assert (out / "model.safetensors").is_file()  # kept on disk: the user may still want it


def test_measurements_are_written_beside_each_label_image(tmp_path, model_dir, image_folder):
    import csv

    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(image_folder),
                "--out",
                str(out),
                "--model",
                str(model_dir),
                "--measurements",
                "--tile-size",
                "64",
                "--overlap",
                "16",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "bright8.tif",
        "bright8_nuclei.csv",
        "fluo16.tif",
        "fluo16_nuclei.csv",
        "nuclei-unet-summary.csv",
        "stack.tif",
        "stack_nuclei.csv",
    ]
    labels = read_image(out / "fluo16.tif")
    rows = list(csv.DictReader(open(out / "fluo16_nuclei.csv")))
    assert rows, "no nuclei to measure"
    assert [int(r["label"]) for r in rows] == sorted(set(np.unique(labels).tolist()) - {0})
    for row in rows:
        assert int(float(row["area"])) == int((labels == int(row["label"])).sum())
    stack = read_image(out / "stack.tif")
    planes = [int(r["plane"]) for r in csv.DictReader(open(out / "stack_nuclei.csv"))]
    assert planes.count(0) == len(np.unique(stack[0])) - 1 and planes.count(1) == len(np.unique(stack[1])) - 1


def test_measurements_are_in_micrometres_when_the_file_states_its_pixel_size(tmp_path, model_dir):
    """ImageJ's calibration and OME's PhysicalSizeX give µm columns; a file in dots per inch (no length) does
    not."""
    import csv

    image, _ = nuclei_field((96, 128), count=8, seed=1)
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(
        folder / "imagej.tif", image, imagej=True, resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "um"}
    )
    tifffile.imwrite(folder / "ome.tif", image, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.5})
    tifffile.imwrite(folder / "dpi.tif", image, resolution=(72, 72))
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--out", str(out), "--model", str(model_dir), "--measurements"]) == 0

    def rows(stem):
        with open(out / f"{stem}_nuclei.csv") as handle:
            return list(csv.DictReader(handle))

    for stem, size in (("imagej", 0.325), ("ome", 0.5)):
        row = rows(stem)[0]
        assert float(row["area_um2"]) == pytest.approx(float(row["area"]) * size**2, rel=1e-4)
    assert rows("dpi") and "area_um2" not in rows("dpi")[0]


def test_geojson_polygons_beside_the_labels_carry_the_measurements(tmp_path, model_dir, image_folder):
    from napari_nuclei_unet.geojson import read_geojson

    out = tmp_path / "out"
    arguments = [
        "segment",
        str(image_folder),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--out-format",
        "geojson",
        "--measurements",
    ]
    assert main([*arguments, "--tile-size", "64", "--overlap", "16"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {
        "fluo16.tif",
        "fluo16.geojson",
        "fluo16_nuclei.csv",
        "stack.tif",
        "stack_0.geojson",
        "stack_1.geojson",
    } <= set(names), names
    labels = read_image(out / "fluo16.tif")
    assert labels.max() > 0 and np.array_equal(read_geojson(out / "fluo16.geojson", labels.shape), labels)
    import json

    first = json.loads((out / "fluo16.geojson").read_text())["features"][0]["properties"]["measurements"]
    assert first["label"] == 1 and first["area"] == float((labels == 1).sum())
    stack = read_image(out / "stack.tif")
    assert np.array_equal(read_geojson(out / "stack_1.geojson", stack.shape[1:]), stack[1])


def test_train_options_are_the_train_config_fields_with_their_defaults():
    from napari_nuclei_unet.cli import build_parser, train_config
    from napari_nuclei_unet.params import TrainConfig, cli_fields

    args = build_parser().parse_args(["train", "--images", "i", "--labels", "l", "--out", "o"])
    assert train_config(args) == TrainConfig()  # every default comes from the dataclass
    assert len(cli_fields(TrainConfig)) >= 20
    flags = ["--no-augment", "--lr", "3e-4", "--iterations", "7", "--scale-range", "0.8,1.25", "--no-calibrate"]
    changed = train_config(build_parser().parse_args(["train", "--images", "i", "--labels", "l", "--out", "o", *flags]))
    assert (changed.augment, changed.learning_rate, changed.iterations_per_epoch) == (False, 3e-4, 7)
    assert changed.scale_range == (0.8, 1.25) and not changed.calibrate


def test_train_takes_the_fine_tuning_defaults_for_a_few_images_from_a_trained_model():
    """A user fine-tuning the bundled model on 3 corrected images gets the Fine-tune widget's recipe, not the one
    for training on a data set; an option given on the command line still wins, and --recipe chooses."""
    from napari_nuclei_unet.cli import build_parser, train_config, train_recipe
    from napari_nuclei_unet.params import FINETUNE_DEFAULTS, FINETUNE_MAX_IMAGES, TrainConfig

    base = ["train", "--images", "i", "--labels", "l", "--out", "o"]
    tuning = build_parser().parse_args([*base, "--model", "default", "--max-minutes", "2"])
    assert train_recipe(tuning, 3) == "finetune" and train_recipe(tuning, FINETUNE_MAX_IMAGES + 1) == "scratch"
    config = train_config(tuning, "finetune")
    assert config.max_minutes == 2 and config == TrainConfig(**{**vars(FINETUNE_DEFAULTS), "max_minutes": 2.0})
    scratch = build_parser().parse_args([*base, "--model", "default", "--recipe", "scratch"])
    assert train_recipe(scratch, 3) == "scratch" and train_config(scratch, "scratch") == TrainConfig()
    assert train_recipe(build_parser().parse_args(base), 3) == "scratch"  # a fresh network is trained, not tuned
    lr = train_config(build_parser().parse_args([*base, "--model", "default", "--lr", "1e-3"]), "finetune")
    assert lr.learning_rate == 1e-3 and lr.distill_weight == FINETUNE_DEFAULTS.distill_weight


def test_two_small_images_are_segmented_at_once_in_input_order_and_a_large_one_alone(tmp_path, monkeypatch, capsys):
    """Both cores busy: the network of one image runs while the other is post-processed. Results and progress
    keep the input order; an image too large to share the memory runs alone."""
    import threading
    import time
    from types import SimpleNamespace

    import napari_nuclei_unet.batch as batch
    import napari_nuclei_unet.cli as cli

    lock, running, seen = threading.Lock(), set(), []

    def fake_segment_file(checkpoint, path, out, params, out_format, progress=None, cancel=None, extras=()):
        with lock:
            running.add(path.name)
            seen.append(frozenset(running))
        time.sleep(0.2 if path.name == "a.png" else 0.05)  # the first of a pair finishes last
        with lock:
            running.discard(path.name)
        return SimpleNamespace(nuclei=1, diameter=None, name=path.name, record={})

    monkeypatch.setattr(batch, "segment_file", fake_segment_file)
    sizes = {"big.png": 10 * cli.SHARED_IMAGE_BYTES}
    monkeypatch.setattr("napari_nuclei_unet.io.declared_bytes", lambda path: sizes.get(path.name, 1000))
    files = [tmp_path / name for name in ("first.png", "a.png", "b.png", "big.png", "c.png", "d.png")]
    results = cli._segment_local(None, files, tmp_path, None, "tif")
    assert [r.name for r in results] == [f.name for f in files]
    assert max(len(group) for group in seen) == 2  # two at once
    assert all(group == {"big.png"} for group in seen if "big.png" in group)  # the large one alone
    assert all(group == {"first.png"} for group in seen if "first.png" in group)  # the first alone: loads the network
    lines = [line.split(": ")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines == [f"[{i}/6] {f.name}" for i, f in enumerate(files, start=1)]


def test_a_bad_image_among_many_stops_the_run_and_writes_nothing(tmp_path, model_dir, image_folder, capsys):
    import imageio.v3 as iio

    image, _ = nuclei_field((96, 128), count=8, seed=2)
    for index in range(4):
        iio.imwrite(image_folder / f"more{index}.png", (image // 256).astype(np.uint8))
    (image_folder / "more2.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    out = tmp_path / "out"
    code = main(["segment", str(image_folder), "--out", str(out), "--model", str(model_dir), "--tile-size", "64"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nuclei-unet: error: {image_folder / 'more2.png'}: cannot read image"), err[-1]
    assert not any(out.iterdir())  # nothing of the images that did succeed, no staging folder


def test_every_command_prints_its_help(capsys):
    """``--help`` of every command and sub-command prints (a ``%`` in a parameter's help once broke it)."""
    import argparse

    from napari_nuclei_unet.cli import build_parser

    def commands(parser, path):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, [*path, name])

    paths = list(commands(build_parser(), []))
    assert ["segment"] in paths and ["rle", "decode"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        text = " ".join(capsys.readouterr().out.split())
        assert "usage: nuclei-unet" in text
        # A default is said once, and only where there is one (not "(default: None)" on the required --out).
        assert "(default: None)" not in text and "(default: False)" not in text, path
        assert not re.search(r"\(default: [^()]*(\([^()]*\))?[^()]*\) \(default:", text), path
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "at most 40% of an image's objects" in " ".join(capsys.readouterr().out.split())


def test_a_run_summary_counts_each_image_and_keeps_earlier_runs_rows(tmp_path, model_dir, image_folder):
    """A plate's nuclei per image, and what every "auto" became, in one table beside the labels."""
    import csv

    out = tmp_path / "out"
    argv = ["--out", str(out), "--model", str(model_dir), "--tile-size", "64"]
    assert main(["segment", str(image_folder / "fluo16.tif"), str(image_folder / "stack.tif"), *argv]) == 0

    def rows():
        with open(out / "nuclei-unet-summary.csv", newline="") as handle:
            return {row["labels"]: row for row in csv.DictReader(handle)}

    first = rows()
    assert list(first) == ["fluo16.tif", "stack.tif"]
    for name, row in first.items():
        labels = read_image(out / name)
        assert int(row["nuclei"]) == (labels.max() if name == "fluo16.tif" else sum(p.max() for p in labels))
        assert row["image"].endswith(name) and row["image_type"] and row["markers"]
        assert float(row["threshold"].split("-")[0]) > 0  # a time-lapse's planes: a range
        assert "napari-nuclei-unet" in row["model"]
    assert main(["segment", str(image_folder / "bright8.png"), str(image_folder / "fluo16.tif"), *argv]) == 0
    second = rows()
    assert sorted(second) == ["bright8.tif", "fluo16.tif", "stack.tif"]  # the first run's stack row is kept
    assert second["stack.tif"] == first["stack.tif"] and second["fluo16.tif"]["seconds"]  # fluo16's row: this run's
