"""The Fine-tune widget: trains with the shared core on layers, live curve, cancel, hand-over to Segment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

napari = pytest.importorskip("napari")

from napari_nuclei_unet._widgets import finetune as finetune_module  # noqa: E402
from napari_nuclei_unet._widgets.finetune import FineTuneWidget, samples_from_layers  # noqa: E402
from napari_nuclei_unet.model import Checkpoint  # noqa: E402
from napari_nuclei_unet.synthetic import nuclei_field  # noqa: E402
from napari_nuclei_unet.training import FINETUNE_DEFAULTS, loss_targets, make_loss, make_targets  # noqa: E402

PLUGIN = "napari-nuclei-unet"
TIMEOUT_MS = 180_000


@pytest.fixture
def setup(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path, monkeypatch):
    """A viewer with an image, its corrected labels, the Segment widget on a tiny model, and Fine-tune."""
    messages = []
    monkeypatch.setattr(finetune_module, "show_error", messages.append)
    monkeypatch.setattr(finetune_module, "show_info", lambda message: None)
    tiny_checkpoint.nucleus_diameter = 20.0
    tiny_checkpoint.save(tmp_path / "tiny")
    viewer = make_napari_viewer()
    image, labels = nuclei_field((128, 160), count=14, diameter=20, seed=7)
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells nuclei")
    _dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    segment.model.use_checkpoint_folder(tmp_path / "tiny")
    qtbot.waitUntil(lambda: "Unet/resnet18" in segment.model.summary.value, timeout=20000)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    qtbot.waitUntil(lambda: "Unet/resnet18" in widget.model.summary.value and widget.hub.idle, timeout=TIMEOUT_MS)
    widget.output_folder.value = str(tmp_path / "models")
    widget.model_name.value = "mine"
    widget.epochs.value, widget.iterations.value = 4, 5
    widget.patch_size.value, widget.batch_size.value, widget.learning_rate.value = 64, 4, 3e-3
    # On by default; off here: an untrained tiny model is no teacher worth keeping, and its pull
    # would blur the loss curve these tests check (distillation: tests/test_train.py).
    assert widget.keep_other_types.value
    widget.keep_other_types.value = False
    return viewer, segment, widget, messages, tmp_path


def wait(widget, qtbot) -> None:
    qtbot.waitUntil(lambda: widget._worker is None and widget.hub.idle, timeout=TIMEOUT_MS)


def test_finetune_trains_saves_and_hands_the_model_to_segment(setup, qtbot):
    viewer, segment, widget, messages, tmp_path = setup
    assert (
        widget.image_layer.value is viewer.layers["cells"]
        and widget.labels_layer.value is viewer.layers["cells nuclei"]
    )
    widget.start()
    wait(widget, qtbot)
    assert not messages, messages
    out = tmp_path / "models" / "mine"
    loaded = Checkpoint.load(out)
    training = loaded.metadata["training"]
    assert training["images"] == 1 and training["nuclei"] == 14 and "tiny" in training["base_model"]
    assert training["iterations"] == 20 and "date" in training
    assert [e for e, _ in widget.plot.losses] == [1, 2, 3, 4] and widget.plot.losses[-1][1] < widget.plot.losses[0][1]
    assert (
        not widget.plot.scores and "no validation score" in widget.plot.note
    )  # one image: nothing held out, said plainly
    assert "done" in widget.status.value and "on cpu" in widget.status.value
    assert segment.model.path() == str(out / "model.safetensors")
    assert widget.model.path() == str(out / "model.safetensors")  # the next round starts from the new model
    assert widget.model_name.value == "mine-2"  # Start again would not hit "already exists"
    # The base model folder is untouched, and one click re-segments with the new model.
    assert Checkpoint.load(tmp_path / "tiny").metadata.get("training") is None
    assert widget.resegment_button.enabled
    widget.resegment()  # waits for the new model to load, then segments
    qtbot.waitUntil(
        lambda: "nuclei_unet" in viewer.layers["cells nuclei"].metadata and widget.hub.idle, timeout=TIMEOUT_MS
    )
    assert viewer.layers["cells nuclei"].metadata["nuclei_unet"]["model"] == "mine"


def test_cancel_saves_only_what_was_validated_better_or_what_the_user_asked_for(setup, qtbot):
    """Item 13: an early cancel saved a model, switched Segment to it, with the base model's calibration record."""
    _viewer, segment, widget, messages, tmp_path = setup
    widget.epochs.value, widget.iterations.value = 50, 5
    tiny = segment.model.path()

    def cancel_after_second_epoch(event):
        if event.kind == "epoch" and event.epoch == 2:
            widget.cancel()

    widget._relay.message.connect(cancel_after_second_epoch)
    widget.start()  # one image: nothing is validated, so nothing is kept
    wait(widget, qtbot)
    assert not messages, messages
    assert "nothing was validated" in widget.status.value and "nothing was saved" in widget.status.value
    assert not (tmp_path / "models" / "mine").exists() and segment.model.path() == tiny
    widget.keep_on_cancel.value = True  # the user asks for it
    widget.start()
    wait(widget, qtbot)
    loaded = Checkpoint.load(tmp_path / "models" / widget.request().out_dir.name.replace("-2", ""))
    assert loaded.metadata["training"]["iterations"] < 50 * 5 and loaded.metadata["training"]["cancelled"]
    assert "not calibrated" in widget.status.value and segment.model.path() == tiny  # kept on disk, not put to use


def test_start_cancel_in_the_first_epoch_start_again_finish(setup, qtbot, monkeypatch):
    """The sequence that froze napari on 2 cores: a cancelled run saved and reloaded its model
    beside the next run. Now one long job runs at a time, others are refused or wait, and a
    run cancelled before its first epoch ended saves, loads and switches nothing."""
    from napari_nuclei_unet._widgets import _common

    viewer, segment, widget, messages, tmp_path = setup
    refused = []
    monkeypatch.setattr(_common, "show_warning", refused.append)
    jobs = []
    widget.hub.job_changed.connect(jobs.append)
    assert segment.hub is widget.hub  # one hub per window
    tiny = segment.model.path()
    widget.epochs.value, widget.iterations.value = 3, 5

    def cancel_in_the_first_epoch(event):
        if event.kind == "iteration" and event.epoch <= 1:
            widget.cancel()

    widget._relay.message.connect(cancel_in_the_first_epoch)
    widget.start()
    segment.run()  # a second long job beside the running one: refused, with a message
    assert segment._worker is None and refused and "wait until fine-tuning has finished" in refused[-1]
    wait(widget, qtbot)
    assert "nothing was saved" in widget.status.value, widget.status.value
    assert not (tmp_path / "models" / "mine").exists()
    assert segment.model.path() == tiny and not widget.resegment_button.enabled  # nothing switched
    widget._relay.message.disconnect(cancel_in_the_first_epoch)

    widget.start()  # start again, and let it finish
    wait(widget, qtbot)
    assert not messages, messages
    assert (
        "done" in widget.status.value
        and Checkpoint.load(tmp_path / "models" / "mine").metadata["training"]["iterations"] == 15
    )
    qtbot.waitUntil(
        lambda: "mine" in segment.model.summary.value, timeout=TIMEOUT_MS
    )  # the new model, loaded after the run
    assert segment.model.path() == str(tmp_path / "models" / "mine" / "model.safetensors")
    # never two at once; the new model is then loaded by Segment and by Fine-tune itself (the next round starts from it)
    assert jobs == ["fine-tuning", "", "fine-tuning", "", "loading the model", "", "loading the model", ""], jobs
    qtbot.waitUntil(lambda: widget.hub.idle, timeout=TIMEOUT_MS)
    segment.run()  # and the viewer is free again
    qtbot.waitUntil(lambda: segment._worker is None and widget.hub.idle, timeout=TIMEOUT_MS)
    assert (
        "nuclei in" in segment.status.value and viewer.layers["cells nuclei"].metadata["nuclei_unet"]["model"] == "mine"
    )


def test_keeping_the_other_image_types_can_be_switched_off(setup):
    _viewer, _segment, widget, _messages, _tmp_path = setup
    widget.keep_other_types.value = True
    assert widget.request().config.distill_weight == FINETUNE_DEFAULTS.distill_weight > 0
    widget.keep_other_types.value = False
    assert widget.request().config.distill_weight == 0.0


def test_the_share_of_the_starting_weights_kept_reaches_the_training(setup):
    _viewer, _segment, widget, _messages, _tmp_path = setup
    assert widget.request().config.start_weight_share == FINETUNE_DEFAULTS.start_weight_share > 0
    widget.start_share.value = 0.0
    assert widget.request().config.start_weight_share == 0.0


def test_bad_input_gives_clear_messages(setup, qtbot):
    viewer, _segment, widget, messages, tmp_path = setup
    corrected = viewer.layers["cells nuclei"]
    viewer.layers.remove(corrected)
    assert widget.labels_layer.value is None
    widget.start()
    assert "choose a labels layer" in messages[-1]
    viewer.layers.append(corrected)

    viewer.add_labels(np.zeros((64, 64), np.int32), name="wrong shape")
    widget.labels_layer.value = viewer.layers["wrong shape"]
    widget.start()
    assert "shape (64, 64)" in messages[-1] and "(128, 160)" in messages[-1]

    viewer.add_labels(np.zeros((128, 160), np.int32), name="empty")
    widget.labels_layer.value = viewer.layers["empty"]
    widget.start()
    assert "'empty' are empty" in messages[-1]

    mask = (viewer.layers["cells nuclei"].data > 0).astype(np.uint8)
    viewer.add_labels(mask, name="cells mask")
    widget.labels_layer.value = viewer.layers["cells mask"]
    widget.start()
    assert "'cells mask' hold one label for" in messages[-1] and "a mask" in messages[-1]

    widget.labels_layer.value = viewer.layers["cells nuclei"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    widget.output_folder.value = str(blocker)
    widget.start()
    wait(widget, qtbot)
    assert "not writable" in messages[-1]

    (tmp_path / "models" / "taken").mkdir(parents=True)
    (tmp_path / "models" / "taken" / "model.safetensors").write_bytes(b"x")
    widget.output_folder.value = str(tmp_path / "models")
    widget.model_name.value = "taken"
    widget.start()
    assert "already exists" in messages[-1]


def test_region_of_interest_limits_the_loss(make_napari_viewer):
    viewer = make_napari_viewer()
    image, labels = nuclei_field((96, 96), count=8, diameter=20, seed=2)
    image_layer = viewer.add_image(image, name="img")
    labels_layer = viewer.add_labels(labels, name="lab")
    roi = viewer.add_shapes([np.array([[0, 0], [0, 47], [47, 47], [47, 0]])], shape_type="polygon", name="checked")
    (sample,) = samples_from_layers(image_layer, labels_layer, roi)
    assert sample.roi[:40, :40].all() and not sample.roi[60:, :].any() and not sample.roi[:, 60:].any()

    target = loss_targets(torch.from_numpy(make_targets(sample.labels, sample.roi)))[None]
    loss = make_loss()
    logits = torch.randn(1, 2, 96, 96)
    changed = logits.clone()
    changed[..., 60:, :] += 10.0  # very different predictions outside the checked region
    changed[..., :, 60:] -= 10.0
    assert torch.isclose(loss(logits, target), loss(changed, target))
    inside = logits.clone()
    inside[..., 10:20, 10:20] += 10.0
    assert not torch.isclose(loss(logits, target), loss(inside, target))


def test_stacks_contribute_their_labelled_planes(make_napari_viewer):
    viewer = make_napari_viewer()
    image, labels = nuclei_field((64, 64), count=4, diameter=16, seed=3)
    stack = viewer.add_image(np.stack([image, image, image]), name="stack")
    stack_labels = np.stack([labels, np.zeros_like(labels), labels])
    samples = samples_from_layers(stack, viewer.add_labels(stack_labels, name="stack nuclei"))
    assert [s.name for s in samples] == ["stack[0]", "stack[2]"]
    # a time-lapse of Z-stacks (T, Z, Y, X): each labelled plane (before: "labels shape (3, 64, 64) does not match")
    series = viewer.add_image(np.stack([np.stack([image] * 3)] * 2), name="live", axis_labels=("t", "z", "y", "x"))
    series_labels = np.stack([stack_labels, np.zeros_like(stack_labels)])
    samples = samples_from_layers(series, viewer.add_labels(series_labels, name="live nuclei"))
    assert [s.name for s in samples] == ["live[0, 0]", "live[0, 2]"] and samples[0].image.shape == image.shape


def test_a_nucleus_painted_with_a_label_in_use_is_trained_as_a_nucleus_of_its_own(make_napari_viewer):
    """napari's brush keeps the last label: a missed nucleus painted with it was taught as part of a far-away one."""
    viewer = make_napari_viewer()
    image, labels = nuclei_field((96, 96), count=5, diameter=16, seed=3)
    corrected = labels.copy()
    corrected[80:90, 80:90] = 1  # a missed nucleus, painted with the label of nucleus 1
    assert not (labels[80:90, 80:90]).any()
    (sample,) = samples_from_layers(viewer.add_image(image, name="cells"), viewer.add_labels(corrected, name="fix"))
    assert sample.labels.max() == labels.max() + 1
    assert len(np.unique(sample.labels[80:90, 80:90])) == 1 and sample.labels[85, 85] not in set(
        np.unique(sample.labels[labels == 1])
    )
    for value in np.unique(labels)[1:]:  # every other nucleus is still one nucleus
        assert len(np.unique(sample.labels[labels == value])) == 1


def test_widget_is_declared_in_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert isinstance(widget, FineTuneWidget)


def test_export_writes_a_checked_package_of_the_chosen_model_cut_from_the_image_layer(setup, qtbot, monkeypatch):
    import zipfile

    viewer, _segment, widget, messages, tmp_path = setup
    assert widget.export_button.enabled
    out = tmp_path / "exported" / "tiny-for-zoo"
    monkeypatch.setattr(FineTuneWidget, "ask_export_path", lambda self: str(out))
    widget.export()
    assert not widget.export_button.enabled and not widget.start_button.enabled  # one job at a time
    qtbot.waitUntil(lambda: widget._export_worker is None and widget.hub.idle, timeout=TIMEOUT_MS)
    assert not messages, messages
    written = out.with_suffix(".zip")
    assert "model test passed" in widget.status.value and str(written) in widget.status.value
    with zipfile.ZipFile(written) as archive:
        test_input = np.load(archive.open("test_input.npy"))
    image = viewer.layers["cells"].data  # 128 x 160: its centre 128 x 128 square, repeated into the model's 3 channels
    np.testing.assert_array_equal(test_input[0, 0], image[:, 16:144].astype(np.float32))
    assert widget.export_button.enabled and widget.start_button.enabled


def test_a_foreign_bioimageio_package_segments_but_cannot_be_fine_tuned(setup, qtbot, tmp_path):
    import zipfile

    import yaml

    from napari_nuclei_unet.bioimageio_export import export_package
    from napari_nuclei_unet.params import ExportParams

    _viewer, _segment, widget, messages, _ = setup
    folder = tmp_path / "foreign"
    with zipfile.ZipFile(
        export_package(widget.model.checkpoint(widget.model.path()), tmp_path / "p.zip", ExportParams(run_test=False))
    ) as archive:
        archive.extractall(folder)
    description = yaml.safe_load((folder / "rdf.yaml").read_text())
    del description["weights"]["pytorch_state_dict"], description["config"]  # as another tool would write it
    for entry in description["weights"].values():
        entry.pop("parent", None)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(description))
    widget.model.file.value = str(folder / "rdf.yaml")
    qtbot.waitUntil(lambda: "bioimage.io package" in widget.model.summary.value and widget.hub.idle, timeout=TIMEOUT_MS)
    assert not widget.start_button.enabled and not widget.export_button.enabled
    assert "cannot be fine-tuned" in widget.status.value
    widget.model.source.value = "bundled default"
    qtbot.waitUntil(lambda: "Unet/" in widget.model.summary.value and widget.hub.idle, timeout=TIMEOUT_MS)
    assert widget.start_button.enabled and widget.export_button.enabled and not widget.status.value
    assert not messages, messages


def test_a_fine_tune_that_validates_worse_is_not_put_to_use(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Trained on wrong labels (background marked as nucleus), validated on a correctly labelled plane:
    the new model is saved but the bundled model stays in use, until the user says otherwise."""
    from napari_nuclei_unet.training import split_validation

    monkeypatch.setattr(finetune_module, "show_info", lambda message: None)
    fields = [nuclei_field((128, 160), count=14, diameter=20, seed=seed) for seed in (31, 32, 33, 34)]
    _, held = split_validation(list(range(4)), FINETUNE_DEFAULTS.val_fraction, FINETUNE_DEFAULTS.seed)
    labels = np.stack([truth if i in held else (truth == 0).astype(np.int32) for i, (_, truth) in enumerate(fields)])
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([image for image, _ in fields]), name="cells")
    viewer.add_labels(labels, name="cells nuclei")
    _dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    qtbot.waitUntil(lambda: "nuclei-unet-default" in widget.model.summary.value and widget.hub.idle, timeout=TIMEOUT_MS)
    widget.output_folder.value, widget.model_name.value = str(tmp_path / "models"), "wrong"
    widget.epochs.value, widget.iterations.value = 2, 5
    widget.patch_size.value, widget.batch_size.value, widget.learning_rate.value = 64, 4, 3e-3
    widget.keep_other_types.value = False
    bundled = segment.model.path()
    widget.start()
    wait(widget, qtbot)
    out = tmp_path / "models" / "wrong"
    assert (out / "model.safetensors").is_file()  # kept on disk
    assert "no better" in widget.status.value and "not put to use" in widget.status.value, widget.status.value
    assert segment.model.path() == bundled and widget.model.path() == bundled  # nothing switched
    assert not widget.use_anyway_button.native.isHidden() and widget.use_anyway_button.enabled  # shown, usable
    widget.use_anyway()  # the user's call, both numbers seen
    assert segment.model.path() == widget.model.path() == str(out / "model.safetensors")
    assert widget.use_anyway_button.native.isHidden()
    qtbot.waitUntil(  # both widgets load it (no load left running when the viewer closes)
        lambda: widget.hub.idle and "wrong" in widget.model.summary.value and "wrong" in segment.model.summary.value,
        timeout=TIMEOUT_MS,
    )


DSB_NAME = "0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9"  # 64 characters, as DSB2018's


@pytest.mark.parametrize("size", [(1280, 800), (1600, 1000)])
def test_the_dock_fits_its_controls_after_add_pair_with_long_names(make_napari_viewer, qtbot, size):
    """Item 4: the pairs line did not wrap, so the dock needed 1305 px and cut off everything below it."""
    viewer = make_napari_viewer()
    window = viewer.window._qt_window
    window.resize(*size)
    window.show()
    image, labels = nuclei_field((96, 128), count=6, diameter=16, seed=2)
    viewer.add_image(image, name=DSB_NAME)
    viewer.add_labels(labels, name=f"{DSB_NAME} nuclei (edited)")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.reset_choices()
    widget.add_pair_button.clicked.emit()
    widget.add_pair_button.clicked.emit()
    assert widget.pairs_label.value.count(DSB_NAME[:10]) >= 2
    qtbot.waitUntil(lambda: widget.native.parentWidget() is not None and widget.native.parentWidget().width() > 0)
    qtbot.wait(300)
    viewport = widget.native.parentWidget()  # the scroll area's viewport, as wide as the dock shows
    assert widget.native.width() <= 0.45 * 1280
    assert widget.native.minimumSizeHint().width() <= viewport.width()  # nothing needs more than is shown
    assert widget.pairs_label.native.geometry().right() <= viewport.width()
