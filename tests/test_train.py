"""The training core on a generated sample: fast, tiny model, few iterations."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_nuclei_unet import InputError
from napari_nuclei_unet.data import LabelledImage
from napari_nuclei_unet.model import Checkpoint
from napari_nuclei_unet.synthetic import nuclei_field
from napari_nuclei_unet.training import (
    IGNORE,
    TrainConfig,
    calibrate_min_confidence,
    fit,
    loss_targets,
    make_loss,
    make_targets,
    train_steps,
)


@pytest.fixture
def samples():
    return [LabelledImage(f"s{i}", *nuclei_field((128, 128), count=12, seed=i)) for i in range(3)]


def test_targets_mark_borders_between_touching_nuclei():
    labels = np.zeros((10, 10), np.int32)
    labels[2:8, 1:5], labels[2:8, 5:9] = 1, 2
    foreground, boundary, valid, centre, touching = make_targets(labels)
    assert foreground.sum() == 48 and valid.all()
    assert boundary[4, 4] and boundary[4, 5]  # both sides of the touching line
    assert not boundary[0, 0]
    assert centre[4, 4] == centre[4, 5] == 0 and centre[labels == 1].max() == centre[labels == 2].max() == 255
    # Touching: the 2 px on each side of the line between the nuclei, not their outer edges.
    assert touching[2:8, 3:7].all() and touching.sum() == 24
    assert not touching[:, :3].any() and not touching[:, 7:].any()


def test_the_touch_weight_weighs_up_the_boundary_between_touching_nuclei():
    labels = np.zeros((16, 16), np.int32)
    labels[4:12, 2:8], labels[4:12, 8:14] = 1, 2
    outputs = ("foreground", "boundary")
    plain = loss_targets(torch.from_numpy(make_targets(labels)), outputs)
    with_touch = loss_targets(torch.from_numpy(make_targets(labels)), outputs, with_touching=True)
    assert with_touch.shape[0] == 3 and torch.equal(with_touch[:2], plain)
    logits = torch.zeros(1, 2, 16, 16)
    missed_line = logits.clone()
    missed_line[0, 1] = torch.where(plain[1] > 0, 4.0, -4.0)  # every boundary right...
    missed_line[0, 1, 4:12, 6:10] = -4.0  # ...but the line between the nuclei
    unweighted, weighted = make_loss(outputs), make_loss(outputs, touch_weight=10.0)
    assert torch.isclose(weighted(logits, plain[None]), unweighted(logits, plain[None]))  # no channel, no weight
    assert torch.isclose(unweighted(missed_line, with_touch[None]), unweighted(missed_line, plain[None]))
    gap = weighted(missed_line, with_touch[None]) - unweighted(missed_line, plain[None])
    right = missed_line.clone()
    right[0, 1, 4:12, 6:10] = 4.0
    assert gap > 0.5 and weighted(right, with_touch[None]) < unweighted(missed_line, plain[None])


def test_loss_ignores_pixels_outside_roi():
    loss = make_loss()
    logits = torch.randn(1, 2, 16, 16)
    target = (torch.rand(1, 2, 16, 16) > 0.5).float()
    target[..., :, 8:] = IGNORE
    changed = logits.clone()
    changed[..., :, 8:] = torch.randn(1, 2, 16, 8) * 10  # predictions outside the ROI change wildly
    assert torch.allclose(loss(logits, target), loss(changed, target))


def test_fit_decreases_loss_and_writes_loadable_checkpoint(tmp_path, tiny_checkpoint, samples):
    config = TrainConfig(
        epochs=3,
        iterations_per_epoch=6,
        patch_size=64,
        batch_size=4,
        learning_rate=3e-3,
        warmup_iterations=2,
        device="cpu",
        precision="float32",
    )
    events = []
    result = fit(
        tiny_checkpoint, samples[:2], tmp_path / "model", val=samples[2:], config=config, progress=events.append
    )
    losses = [e.loss for e in events if e.kind == "epoch"]
    assert result.kind == "done" and not result.cancelled and result.device == "cpu"
    assert losses[-1] < losses[0]
    loaded = Checkpoint.load(tmp_path / "model")
    assert loaded.metadata["training"]["images"] == 2 and "kaggle_score" in loaded.metadata["metrics"]
    assert loaded.nucleus_diameter and 12 < loaded.nucleus_diameter < 24
    assert (tmp_path / "model" / "training_log.csv").read_text().count("\n") == 4
    # The model's min confidence was calibrated (one validation image is too few: the training
    # images count too), saved and loaded back.
    calibration = loaded.metadata["postprocess"]
    assert calibration["calibrated_on"] == "3 training and validation images" and [e.kind for e in events][-2:] == [
        "calibrating",
        "done",
    ]
    scores = {float(k): v for k, v in calibration["kaggle_score_by_min_confidence"].items()}
    assert loaded.min_confidence == tiny_checkpoint.min_confidence == max(scores, key=lambda c: (scores[c], -c))


def test_calibration_picks_the_lowest_min_confidence_that_drops_the_unsure_objects(tiny_checkpoint, monkeypatch):
    from napari_nuclei_unet import segment

    truth = np.zeros((64, 64), np.int32)
    truth[4:20, 4:20], truth[40:56, 40:56] = 1, 2
    probability = np.full((2, 64, 64), 0.02, np.float32)
    probability[0][truth > 0] = 0.97
    probability[0, 4:20, 40:56] = 0.72  # a fold the network is unsure of
    monkeypatch.setattr(segment, "predict_plane", lambda *args, **kwargs: segment.PlanePrediction(probability, None))
    value, scores = calibrate_min_confidence(
        tiny_checkpoint, [LabelledImage("folds", np.zeros((64, 64), np.uint8), truth)]
    )
    assert scores[0.0] < scores[0.75] == scores[0.95] == 1.0
    assert value == 0.75  # ties go to the lowest value: drop no more than needed


def test_training_without_calibration_keeps_the_starting_min_confidence(tmp_path, tiny_checkpoint, samples):
    tiny_checkpoint.metadata["postprocess"] = {"min_confidence": 0.8}
    config = TrainConfig(epochs=1, iterations_per_epoch=2, patch_size=64, batch_size=2, device="cpu", calibrate=False)
    events = []
    fit(tiny_checkpoint, samples[:2], tmp_path / "m", val=samples[2:], config=config, progress=events.append)
    assert "calibrating" not in [e.kind for e in events] and Checkpoint.load(tmp_path / "m").min_confidence == 0.8


def test_cancel_keeps_a_usable_model_and_resume_continues(tmp_path, tiny_checkpoint, samples):
    config = TrainConfig(epochs=4, iterations_per_epoch=3, patch_size=64, batch_size=2, device="cpu")
    seen = []
    result = fit(
        tiny_checkpoint,
        samples[:2],
        tmp_path / "m",
        val=samples[2:],
        config=config,
        progress=seen.append,
        cancel=lambda: len([e for e in seen if e.kind == "epoch"]) >= 1,
        keep_on_cancel=True,
    )
    assert result.cancelled and result.epoch == 1  # stopped right after the first epoch's report
    assert Checkpoint.load(tmp_path / "m").metadata["training"]["epochs"] == 1
    resumed = list(train_steps(tiny_checkpoint, samples[:2], tmp_path / "m", val=samples[2:], config=config))
    epochs = [e.epoch for e in resumed if e.kind == "epoch"]
    assert epochs == [2, 3, 4]  # picks up after the last completed epoch


def test_bad_training_input(tmp_path, tiny_checkpoint, samples):
    empty = [LabelledImage("e", samples[0].image, np.zeros_like(samples[0].labels))]
    with pytest.raises(InputError, match="no nuclei"):
        fit(tiny_checkpoint, empty, tmp_path / "x")
    with pytest.raises(InputError, match="does not match image shape"):
        LabelledImage("bad", samples[0].image, samples[0].labels[:10])
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(InputError, match="not writable"):
        fit(tiny_checkpoint, samples, blocked / "sub")
    with pytest.raises(InputError, match="precision must be auto, float32 or bfloat16"):
        fit(tiny_checkpoint, samples, tmp_path / "never", config=TrainConfig(precision="fp8"))
    with pytest.raises(InputError, match="share of the starting weights must be at least 0 and below 1"):
        fit(tiny_checkpoint, samples, tmp_path / "never", config=TrainConfig(start_weight_share=1.0))
    assert not (tmp_path / "never").exists()  # a bad setting leaves no empty model folder


def test_freeze_batchnorm_keeps_the_starting_statistics(tmp_path, tiny_checkpoint, samples):
    def running_means(checkpoint):
        return [m.running_mean.clone() for m in checkpoint.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    config = TrainConfig(epochs=1, iterations_per_epoch=3, patch_size=64, batch_size=2, warmup_iterations=1)
    frozen = Checkpoint.create(tiny_checkpoint.config)
    start = running_means(frozen)
    fit(
        frozen,
        samples,
        tmp_path / "frozen",
        val=[],
        config=TrainConfig(**{**config.__dict__, "freeze_batchnorm": True}),
    )
    assert all(torch.equal(a, b) for a, b in zip(start, running_means(frozen)))
    fit(tiny_checkpoint, samples, tmp_path / "free", val=[], config=config)
    assert not all(torch.equal(a, b) for a, b in zip(start, running_means(tiny_checkpoint)))


def test_low_resolution_augmentation_blurs_the_image_only():
    from torchvision import tv_tensors

    from napari_nuclei_unet.training.augment import RandomLowResolution

    rng = np.random.default_rng(5)
    image = tv_tensors.Image(torch.from_numpy(rng.random((3, 64, 80), dtype=np.float32)))
    mask = tv_tensors.Mask(torch.from_numpy((rng.random((3, 64, 80)) > 0.5).astype(np.uint8)))
    blurred, same_mask = RandomLowResolution((2.0, 2.0))(image, mask)
    assert blurred.shape == image.shape and torch.equal(same_mask, mask)

    # Detail is gone: neighbouring pixels of white noise become strongly correlated.
    def neighbour_difference(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert neighbour_difference(blurred) < 0.5 * neighbour_difference(image)
    assert abs(float(blurred.mean()) - float(image.mean())) < 0.02  # brightness kept


def _distance_from(checkpoint, start):
    """Squared distance of the weights from ``start``; BatchNorm's running statistics are not weights the anchor
    pulls."""
    return float(sum(((p.detach() - start[name]) ** 2).sum() for name, p in checkpoint.model.named_parameters()))


def test_anchor_keeps_fine_tuned_weights_near_the_start(tmp_path, tiny_checkpoint, samples):
    base = {k: v.clone() for k, v in tiny_checkpoint.model.state_dict().items()}
    config = dict(
        epochs=1, iterations_per_epoch=4, patch_size=64, batch_size=2, warmup_iterations=1, learning_rate=3e-3
    )
    free, anchored = Checkpoint.create(tiny_checkpoint.config), Checkpoint.create(tiny_checkpoint.config)
    for checkpoint in (free, anchored):
        checkpoint.model.load_state_dict(base)
    fit(free, samples, tmp_path / "free", val=[], config=TrainConfig(**config))
    fit(anchored, samples, tmp_path / "anchored", val=[], config=TrainConfig(**config, anchor_weight=100.0))
    assert 0 < _distance_from(anchored, base) < 0.5 * _distance_from(free, base)


def test_freeze_encoder_trains_only_the_decoder(tmp_path, tiny_checkpoint, samples):
    start = {k: v.clone() for k, v in tiny_checkpoint.model.state_dict().items()}
    config = TrainConfig(
        epochs=1,
        iterations_per_epoch=2,
        patch_size=64,
        batch_size=2,
        warmup_iterations=1,
        freeze_encoder=True,
        freeze_batchnorm=True,
    )
    fit(tiny_checkpoint, samples, tmp_path / "out", val=[], config=config)
    after = tiny_checkpoint.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in start.items() if k.startswith("encoder."))
    assert not all(torch.equal(after[k], v) for k, v in start.items() if k.startswith("decoder."))


def test_finetune_config_applies_overrides():
    from napari_nuclei_unet.training import FINETUNE_DEFAULTS, finetune_config

    config = finetune_config(learning_rate=5e-5)
    assert config.learning_rate == 5e-5 and config.freeze_batchnorm
    assert config.batch_size == FINETUNE_DEFAULTS.batch_size


def test_fine_tuning_pools_the_reference_size_with_the_base_model():
    from napari_nuclei_unet.training import pooled_diameter

    assert pooled_diameter(None, 0, 12.0, 50) == 12.0  # a new model: its data's median
    assert pooled_diameter(20.0, 0, 12.0, 50) == 12.0  # base of unknown provenance: as before
    assert pooled_diameter(20.0, 1000, None, 0) == 20.0  # no nuclei measured: unchanged
    # 100 new nuclei against 900 the base learnt from: a tenth of the way (log scale).
    assert pooled_diameter(20.0, 900, 40.0, 100) == pytest.approx(20.0 * 2.0**0.1)


def test_fit_records_the_data_median_and_the_pooled_reference(tmp_path, tiny_checkpoint, samples):
    tiny_checkpoint.nucleus_diameter = 30.0
    tiny_checkpoint.metadata["training"] = {"nuclei": 10_000}
    config = TrainConfig(epochs=1, iterations_per_epoch=1, patch_size=64, batch_size=2, warmup_iterations=1)
    fit(tiny_checkpoint, samples, tmp_path / "out", val=[], config=config)
    saved = Checkpoint.load(tmp_path / "out")
    training = saved.metadata["training"]
    assert training["data_nucleus_diameter"] < 25 and training["reference_nuclei"] == 10_000 + training["nuclei"]
    assert training["data_nucleus_diameter"] < saved.nucleus_diameter < 30.0
    assert saved.nucleus_diameter == pytest.approx(30.0, rel=0.05)  # a few nuclei barely move it


def test_zoom_to_reference_shows_nuclei_at_the_zoom_segmentation_uses(tiny_checkpoint):
    from napari_nuclei_unet.data import median_diameter
    from napari_nuclei_unet.segment import rescale_factor
    from napari_nuclei_unet.training.sampler import PatchSampler
    from napari_nuclei_unet.training.sampler import reference_zooms as _reference_zooms

    tiny_checkpoint.nucleus_diameter = 20.0
    large = LabelledImage("large", *nuclei_field((256, 256), count=6, diameter=48, seed=1))  # zoomed to 1.6 x 20 px
    typical = LabelledImage("typical", *nuclei_field((256, 256), count=20, diameter=20, seed=2))  # in the band: as is
    zooms = _reference_zooms(tiny_checkpoint, [large, typical])
    assert (
        zooms[0] == pytest.approx(rescale_factor(tiny_checkpoint, median_diameter([large.labels]))) and zooms[0] < 0.8
    )
    assert zooms[1] == 1.0
    config = TrainConfig(patch_size=128, batch_size=1, augment=False, zoom_to_reference=True)
    sampler = PatchSampler([large], config, 1, tiny_checkpoint.percentiles, np.random.default_rng(0), zooms[:1])
    # Without augmentation a patch is patch_size / zoom image pixels shrunk to patch_size: its
    # nuclei have the size segmentation will show the network (nuclei cut by the edge aside).
    shown = [ndi.label(sampler.patch()[1][0].numpy() == 1)[0] for _ in range(10)]
    whole = [
        np.where(np.isin(objects, np.unique(np.r_[objects[0], objects[-1], objects[:, 0], objects[:, -1]])), 0, objects)
        for objects in shown
    ]
    assert median_diameter(whole) == pytest.approx(median_diameter([large.labels]) * zooms[0], rel=0.15)
    tiny_checkpoint.nucleus_diameter = None
    assert _reference_zooms(tiny_checkpoint, [large]) == [1.0]  # no reference: as before


def test_training_reads_pseudo_coloured_fluorescence_as_segmentation_does():
    """A fine-tune on a Hoechst image saved blue on black learns from the grey the network is shown when segmenting
    it, not from a colour it never sees."""
    from napari_nuclei_unet.training.sampler import PatchSampler

    image, labels = nuclei_field((96, 96), count=8, seed=4)
    grey = (255 * image.astype(np.float32) / float(image.max())).astype(np.uint8)
    blue = np.stack([np.zeros_like(grey), np.zeros_like(grey), grey], -1)
    config = TrainConfig(patch_size=96, batch_size=1, augment=False)
    samplers = [
        PatchSampler([LabelledImage(name, pixels, labels)], config, 3, (1.0, 99.8), np.random.default_rng(0))
        for name, pixels in (("grey", grey), ("blue", blue))
    ]
    assert [s.types for s in samplers] == [["fluorescence"], ["fluorescence"]]
    assert torch.equal(samplers[0].images[0], samplers[1].images[0])


def test_restyle_redraws_patches_as_the_other_image_types():
    from napari_nuclei_unet.data import image_type
    from napari_nuclei_unet.training.sampler import PatchSampler

    image, labels = nuclei_field((128, 128), count=12, seed=3)
    brightfield = LabelledImage("bf", (image.max() - image).astype(np.uint16), labels)
    sampler = PatchSampler(
        [brightfield],
        TrainConfig(patch_size=128, batch_size=24, augment=False, distill_weight=1.0),
        3,
        (1.0, 99.8),
        np.random.default_rng(0),
    )
    assert sampler.types == ["brightfield"]
    patches, targets, indices = sampler.batch()
    restyled = sampler.restyle(patches, indices)
    assert restyled.shape == patches.shape and 0.0 <= float(restyled.min()) and float(restyled.max()) <= 1.0
    looks = set()
    for patch, target in zip(restyled, targets):
        nuclei = target[0] == 1
        look = image_type((patch.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        looks.add(look)
        grey = patch.mean(0)
        # The nuclei stay where they were: brighter than the background in fluorescence, darker otherwise.
        contrast = float(grey[nuclei].mean() - grey[~nuclei].mean())
        assert contrast > 0.2 if look == "fluorescence" else contrast < -0.2
    assert looks == {"fluorescence", "tissue"}  # never its own type


def test_distillation_holds_the_other_image_types_to_the_starting_model(tmp_path, tiny_config, samples):
    brightfield = [LabelledImage(s.name, (s.image.max() - s.image).astype(np.uint16), s.labels) for s in samples]
    fluorescence = torch.from_numpy(
        np.stack([s.image.astype(np.float32) / s.image.max() for s in samples])[:, None].repeat(3, axis=1)
    )
    # A fixed starting model, float32, 30 steps and a seeded run, so the ratio below is the same
    # every time (0.17; without distillation it would be 1). A fresh random model each run gave
    # 0.04-1.1; over six fixed starting models this setup gives 0.14-0.57.
    torch.manual_seed(0)
    starting = Checkpoint.create(tiny_config).model
    base = {k: v.clone() for k, v in starting.state_dict().items()}
    start = starting.eval()(fluorescence).sigmoid().detach()
    config = dict(
        epochs=1,
        iterations_per_epoch=30,
        patch_size=64,
        batch_size=2,
        warmup_iterations=1,
        learning_rate=3e-3,
        freeze_batchnorm=True,
        precision="float32",
    )
    changes = []
    for weight in (0.0, 5.0):
        checkpoint = Checkpoint.create(tiny_config)
        checkpoint.model.load_state_dict(base)
        fit(
            checkpoint,
            brightfield,
            tmp_path / f"w{weight}",
            val=[],
            config=TrainConfig(**config, distill_weight=weight),
        )
        changes.append(float((checkpoint.model.eval()(fluorescence).sigmoid().detach() - start).abs().mean()))
        assert Checkpoint.load(tmp_path / f"w{weight}").model.state_dict()["segmentation_head.0.weight"].is_contiguous()
    assert changes[1] < 0.5 * changes[0]


def test_training_precision_follows_the_setting_and_the_cpu(monkeypatch):
    from napari_nuclei_unet.training import loop as train

    cpu = torch.device("cpu")
    assert train.training_precision("float32", cpu) == "float32"
    assert train.training_precision("bfloat16", cpu) == "bfloat16"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(train, "_cpu_has_native_bfloat16", lambda native=native: native)
        assert train.training_precision("auto", cpu) == expected


def test_bfloat16_training_keeps_float32_weights_and_learns(tmp_path, tiny_checkpoint, samples):
    config = TrainConfig(
        epochs=3,
        iterations_per_epoch=6,
        patch_size=64,
        batch_size=4,
        learning_rate=3e-3,
        warmup_iterations=2,
        device="cpu",
        precision="bfloat16",
    )
    events, computed_in = [], set()
    hook = tiny_checkpoint.model.segmentation_head.register_forward_hook(
        lambda _module, _inputs, output: computed_in.add(output.dtype)
    )
    fit(tiny_checkpoint, samples, tmp_path / "bf16", val=[], config=config, progress=events.append)
    hook.remove()
    assert computed_in == {torch.bfloat16}  # every training forward pass ran in bfloat16
    losses = [e.loss for e in events if e.kind == "epoch"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert events[-1].device == "cpu (bfloat16)"  # the widget's status line shows it
    weights = Checkpoint.load(tmp_path / "bf16").model.state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())


def test_mixed_with_start_holds_the_blend_only_inside_the_block(tiny_checkpoint):
    from napari_nuclei_unet.training import mixed_with_start

    model = tiny_checkpoint.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for value in model.state_dict().values():
            value.add_(1)  # the "trained" weights: start + 1, BatchNorm statistics and counters included
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with mixed_with_start(model, start, 0.25):
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name])  # its own weights again after the block
        if value.is_floating_point():
            assert torch.allclose(inside[name], start[name] + 0.75)
        else:
            assert torch.equal(inside[name], trained[name])  # counters stay as trained
    with mixed_with_start(model, None, 0.25):
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_the_saved_and_validated_model_mixes_the_starting_weights_back_in(
    tmp_path, tiny_checkpoint, samples, monkeypatch
):
    from napari_nuclei_unet.training import loop as train

    validated = []

    def recording_validate(checkpoint, *args, **kwargs):
        validated.append({k: v.clone() for k, v in checkpoint.model.state_dict().items()})
        return real_validate(checkpoint, *args, **kwargs)

    real_validate = train.validate_by_type
    monkeypatch.setattr(train, "validate_by_type", recording_validate)
    start = {k: v.clone() for k, v in tiny_checkpoint.model.state_dict().items()}
    config = TrainConfig(
        epochs=2,
        iterations_per_epoch=3,
        patch_size=64,
        batch_size=2,
        warmup_iterations=1,
        learning_rate=3e-3,
        start_weight_share=0.25,
    )
    for val, out in (([], "saved"), (samples[2:], "validated")):
        tuned = Checkpoint.create(tiny_checkpoint.config)
        tuned.model.load_state_dict(start)
        fit(tuned, samples[:2], tmp_path / out, val=val, config=config)
        trained = torch.load(tmp_path / out / "training_state.pt", weights_only=True)[
            "model"
        ]  # kept unmixed, for resuming
        floating = [k for k, v in start.items() if v.is_floating_point()]
        assert any(not torch.allclose(trained[k], start[k]) for k in floating)
        mixed = (
            validated[-1] if val else Checkpoint.load(tmp_path / out).model.state_dict()
        )  # the last epoch's weights, in both
        for name in floating:
            assert torch.allclose(mixed[name], 0.75 * trained[name] + 0.25 * start[name], atol=1e-6)
    assert len(validated) == 3  # the starting model (what a cancelled run must beat), then each epoch
    assert all(
        torch.equal(v, tuned.model.state_dict()[k])
        for k, v in Checkpoint.load(tmp_path / "validated").model.state_dict().items()
    )  # fit leaves what it saved
    assert Checkpoint.load(tmp_path / "saved").metadata["training"]["config"]["start_weight_share"] == 0.25


def test_training_with_the_same_seed_is_repeatable(tmp_path, tiny_config, samples):
    torch.manual_seed(1)
    base = {k: v.clone() for k, v in Checkpoint.create(tiny_config).model.state_dict().items()}
    config = TrainConfig(
        epochs=1,
        iterations_per_epoch=4,
        patch_size=64,
        batch_size=2,
        warmup_iterations=1,
        precision="float32",
        low_resolution=1.0,
    )
    weights = []
    for run in range(2):
        np.random.seed(run)  # numpy's global generator must not matter (the gamma augmentation drew from it)
        checkpoint = Checkpoint.create(tiny_config)
        checkpoint.model.load_state_dict(base)
        fit(checkpoint, samples, tmp_path / f"run{run}", val=[], config=config)
        weights.append(checkpoint.model.state_dict())
    assert any(not torch.equal(v, base[k]) for k, v in weights[0].items())
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())


def _tissue_patch(seed=0):
    """A pink-and-purple H&E-like patch: eosin background, hematoxylin discs."""
    from skimage.color import hed2rgb

    stains = np.zeros((64, 64, 3), np.float32)
    stains[..., 1] = 0.15  # eosin everywhere
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in ((16, 16), (40, 44), (50, 14)):
        stains[..., 0][(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 0.25
    return torch.from_numpy(hed2rgb(stains).astype(np.float32)).permute(2, 0, 1)


def test_hed_jitter_changes_the_stains_of_colour_patches_only():
    from skimage.color import rgb2hed
    from torchvision import tv_tensors

    from napari_nuclei_unet.training.augment import RandomHEDJitter

    tissue = tv_tensors.Image(_tissue_patch())
    mask = tv_tensors.Mask(torch.ones(2, 64, 64))
    jitter = RandomHEDJitter(0.25)
    params = {"scale": np.array([1.25, 1.0, 1.0], np.float32), "shift": np.zeros(3, np.float32)}
    stronger = jitter.transform(tissue, params)
    before = rgb2hed(tissue.permute(1, 2, 0).numpy())
    after = rgb2hed(stronger.permute(1, 2, 0).numpy())
    nuclei = before[..., 0] > 0.2
    assert np.isclose(after[..., 0][nuclei].mean() / before[..., 0][nuclei].mean(), 1.25, rtol=0.05)  # more hematoxylin
    assert np.allclose(after[..., 1], before[..., 1], atol=0.01)  # eosin as it was
    grey = tv_tensors.Image(tissue.mean(0, keepdim=True).expand(3, -1, -1).clone())
    assert torch.equal(jitter.transform(grey, params), grey)  # fluorescence and brightfield keep their grey
    out, same_mask = jitter(tissue, mask)
    assert torch.equal(same_mask, mask) and out.shape == tissue.shape


def test_invert_grey_and_noise_touch_the_image_only():
    from torchvision import tv_tensors

    from napari_nuclei_unet.training.augment import RandomInvertGrey, RandomNoise

    grey = tv_tensors.Image(torch.rand(1, 32, 32).expand(3, -1, -1).clone())
    mask = tv_tensors.Mask(torch.ones(2, 32, 32))
    inverted, same_mask = RandomInvertGrey()(grey, mask)
    assert torch.allclose(inverted, 1 - grey) and torch.equal(same_mask, mask)
    tissue = tv_tensors.Image(_tissue_patch())
    assert torch.equal(RandomInvertGrey()(tissue), tissue)  # stained tissue is never inverted
    noisy, same_mask = RandomNoise((0.05, 0.05))(grey, mask)
    assert torch.equal(same_mask, mask)
    assert 0.03 < float((noisy - grey).std()) < 0.07 and torch.equal(noisy[0], noisy[1])  # grey stays grey


def test_tint_renders_dark_grey_patches_in_one_pseudo_colour_only():
    from torchvision import tv_tensors

    from napari_nuclei_unet.training.augment import TINTS, RandomTint

    fluorescence = tv_tensors.Image((torch.rand(1, 32, 32) * 0.4).expand(3, -1, -1).clone())
    mask = tv_tensors.Mask(torch.ones(2, 32, 32))
    for tint in TINTS:
        params = {"tint": torch.tensor(tint)}
        out = RandomTint().transform(fluorescence, params)
        for channel, weight in enumerate(tint):  # the grey level in the tint's channels, nothing in the others
            assert torch.allclose(out[channel], fluorescence[channel] * weight)
    tinted, same_mask = RandomTint()(fluorescence, mask)
    assert torch.equal(same_mask, mask) and not torch.equal(tinted, fluorescence)
    brightfield = tv_tensors.Image(1.0 - fluorescence)
    tissue = tv_tensors.Image(_tissue_patch())
    for untouched in (brightfield, tissue):  # a bright background or a stain is not fluorescence
        assert torch.equal(RandomTint()(untouched), untouched)


def test_uneven_illumination_ramps_the_image_only_across_the_patch():
    from torchvision import tv_tensors

    from napari_nuclei_unet.training.augment import RandomIllumination, build_augmentation
    from napari_nuclei_unet.training.config import TrainConfig

    flat = tv_tensors.Image(torch.full((3, 32, 48), 0.5))
    mask = tv_tensors.Mask(torch.ones(2, 32, 48))
    dimmed = RandomIllumination().transform(flat, {"angle": 0.0, "additive": False, "strength": 0.4})
    assert torch.allclose(dimmed[:, :, 0], torch.tensor(0.5)) and torch.allclose(dimmed[:, :, -1], torch.tensor(0.3))
    assert torch.all(dimmed[:, :, 1:] <= dimmed[:, :, :-1])  # darker from left to right, the same down each column
    assert torch.equal(dimmed[:, 0], dimmed[:, -1])
    hazy = RandomIllumination().transform(flat, {"angle": math.pi / 2, "additive": True, "strength": 0.3})
    assert torch.allclose(hazy[:, 0], torch.tensor(0.5)) and torch.allclose(hazy[:, -1], torch.tensor(0.8))
    lit, same_mask = RandomIllumination()(flat, mask)
    assert torch.equal(same_mask, mask) and float(lit.min()) >= 0 and float(lit.max()) <= 1
    names = lambda config: [type(t).__name__ for t in build_augmentation(config).transforms]  # noqa: E731
    assert "RandomApply" in names(TrainConfig(uneven_illumination=0.2))
    assert len(names(TrainConfig(uneven_illumination=0.2))) == len(names(TrainConfig())) + 1  # off by default


def test_a_split_csv_is_keyed_by_image_id_or_by_stem(tmp_path):
    from napari_nuclei_unet.data import read_split

    (tmp_path / "ids.csv").write_text("ImageId,split\na,train\nb,val\n")
    (tmp_path / "stems.csv").write_text("stem,split\na,train\nb,test\n")
    (tmp_path / "other.csv").write_text("name,split\na,train\n")
    assert read_split(tmp_path / "ids.csv") == {"a": "train", "b": "val"}
    assert read_split(tmp_path / "stems.csv") == {"a": "train", "b": "test"}
    with pytest.raises(InputError, match="other.csv: expected columns ImageId,split"):
        read_split(tmp_path / "other.csv")


def test_patch_weights_give_every_image_type_an_equal_share():
    from napari_nuclei_unet.training.sampler import patch_weights

    pixels = [256 * 256] * 8 + [1000 * 1000]
    types = ["fluorescence"] * 8 + ["tissue"]
    by_area = patch_weights(pixels, None, 256)
    assert by_area[-1] == pytest.approx(by_area[0] * 1000 * 1000 / 256**2)
    balanced = patch_weights(pixels, types, 256)
    assert balanced.sum() == pytest.approx(1.0)
    assert balanced[-1] == pytest.approx(0.5) and balanced[:8].sum() == pytest.approx(0.5)


def test_balanced_score_counts_each_image_type_the_same():
    from napari_nuclei_unet.metrics import Scores
    from napari_nuclei_unet.training.calibrate import balanced_score

    def scores(value):
        return Scores(value, value, 1, 1, 1, 1, 1, 1, 1, 1)

    by_type = {"all": scores(0.6), "fluorescence": scores(0.7), "tissue": scores(0.1)}
    assert balanced_score(by_type) == pytest.approx(0.4)  # not 0.6: 9 fluorescence images do not outvote 1 tissue image


def test_validate_by_type_scores_each_image_type_apart(tiny_checkpoint, monkeypatch):
    from napari_nuclei_unet.training.calibrate import balanced_score, validate_by_type

    samples = [LabelledImage(f"s{i}", *nuclei_field((64, 64), count=4, seed=i)) for i in range(3)]
    tissue = samples[2]
    signal = tissue.image.astype(np.float32)[..., None] / float(tissue.image.max())
    pink, purple = np.array([235, 190, 215]), np.array([90, 40, 150])
    samples[2] = LabelledImage(
        "rgb", (pink + (purple - pink) * signal).astype(np.uint8), tissue.labels
    )  # purple nuclei on pink: stained tissue (purple on black would be pseudo-coloured fluorescence)

    class Perfect:  # labels exactly the truth for the grey images, nothing for the coloured one
        def __init__(self, image):
            self.labels = (
                next(s.labels for s in samples if s.image is image)
                if image.ndim == 2
                else np.zeros(image.shape[:2], np.int32)
            )

    monkeypatch.setattr(
        "napari_nuclei_unet.segment.segment", lambda checkpoint, image, params, cancel=None: Perfect(image)
    )
    found = validate_by_type(tiny_checkpoint, samples, "cpu")
    assert set(found) == {"all", "fluorescence", "tissue"}
    assert found["fluorescence"].kaggle_score == 1.0 and found["tissue"].kaggle_score == 0.0
    assert found["all"].kaggle_score == pytest.approx(2 / 3)
    assert balanced_score(found) == pytest.approx(0.5)


@pytest.mark.parametrize(("balance", "kept_epoch"), [(True, 2), (False, 1)])
def test_training_keeps_the_epoch_with_the_best_per_type_mean(
    tmp_path, tiny_checkpoint, samples, monkeypatch, balance, kept_epoch
):
    """Epoch 1: 0.6 over all images but 0.1 on tissue; epoch 2: 0.5 everywhere. Balanced, epoch 2 wins."""
    from napari_nuclei_unet.metrics import Scores
    from napari_nuclei_unet.training import loop

    def scores(value):
        return Scores(value, value, 1, 1, 1, 1, 1, 1, 1, 1)

    rounds = iter(
        [
            {"all": scores(0.0), "fluorescence": scores(0.0), "tissue": scores(0.0)},  # the starting model
            {"all": scores(0.6), "fluorescence": scores(0.7), "tissue": scores(0.1)},
            {"all": scores(0.5), "fluorescence": scores(0.5), "tissue": scores(0.5)},
        ]
    )
    monkeypatch.setattr(loop, "validate_by_type", lambda *args, **kwargs: next(rounds))
    config = TrainConfig(
        epochs=2,
        iterations_per_epoch=1,
        patch_size=64,
        batch_size=2,
        warmup_iterations=1,
        calibrate=False,
        balance_image_types=balance,
    )
    fit(tiny_checkpoint, samples[:2], tmp_path / "run", val=samples[2:], config=config)
    assert Checkpoint.load(tmp_path / "run").metadata["training"]["epochs"] == kept_epoch


def _scripted_validation(monkeypatch, scores: list[float]) -> None:
    """validate_by_type returns these DSB scores in turn (the starting model's first)."""
    import dataclasses

    from napari_nuclei_unet.metrics import Scores
    from napari_nuclei_unet.training import loop

    queue = list(scores)

    def validate(*_args, **_kwargs):
        value = queue.pop(0) if queue else scores[-1]
        result = Scores(**{f.name: 0 for f in dataclasses.fields(Scores)})
        result.kaggle_score = value
        return {"all": result, "fluorescence": result}

    monkeypatch.setattr(loop, "validate_by_type", validate)


@pytest.mark.parametrize(("scores", "kept"), [([0.5, 0.4], False), ([0.3, 0.4], True)])
def test_a_cancelled_run_is_saved_only_with_a_validated_improvement(
    tmp_path, tiny_checkpoint, samples, monkeypatch, scores, kept
):
    _scripted_validation(monkeypatch, scores)
    tiny_checkpoint.metadata["postprocess"] = {"min_confidence": 0.85, "calibrated_on": "the base model's images"}
    config = TrainConfig(epochs=4, iterations_per_epoch=2, patch_size=64, batch_size=2, device="cpu", calibrate=False)
    seen = []
    result = fit(
        tiny_checkpoint,
        samples[:2],
        tmp_path / "m",
        val=samples[2:],
        config=config,
        progress=seen.append,
        cancel=lambda: any(e.kind == "epoch" for e in seen),
    )
    assert seen[0].kind == "start" and seen[0].start_score == scores[0]
    assert result.cancelled and result.start_score == scores[0] and result.best_score == scores[1]
    assert result.saved is kept and (tmp_path / "m" / "model.safetensors").exists() is kept
    if kept:  # its record is true: trained from the base, cancelled, min confidence not calibrated for it
        metadata = Checkpoint.load(tmp_path / "m").metadata
        assert metadata["training"]["cancelled"] and metadata["training"]["start_score"] == scores[0]
        assert metadata["postprocess"]["min_confidence"] == 0.85 and metadata["postprocess"][
            "calibrated_on"
        ].startswith("not calibrated")
    else:
        assert not (tmp_path / "m").exists()


def test_a_cancelled_run_without_validation_keeps_nothing_unless_asked(tmp_path, tiny_checkpoint, samples):
    config = TrainConfig(epochs=4, iterations_per_epoch=2, patch_size=64, batch_size=2, device="cpu", calibrate=False)
    for keep in (False, True):
        seen = []
        result = fit(
            tiny_checkpoint,
            samples,
            tmp_path / f"m{keep}",
            val=[],
            config=config,
            progress=seen.append,
            cancel=lambda seen=seen: any(e.kind == "epoch" for e in seen),
            keep_on_cancel=keep,
        )
        assert result.cancelled and result.start_score is None and result.saved is keep
        assert (tmp_path / f"m{keep}" / "model.safetensors").exists() is keep


@pytest.mark.parametrize("when", ["start", "epoch", "calibration"])
def test_cancel_acts_within_validation_and_calibration_not_after_them(
    tmp_path, tiny_checkpoint, samples, monkeypatch, when
):
    """Cancel took 19 s to act: validation and calibration ran every image first. Now the image being segmented
    stops at its next tile, and the run keeps only what was validated better before."""
    from napari_nuclei_unet import segment as segment_module

    calls, phase = [], {"now": "start"}
    original = segment_module.segment_planes

    def counted(*args, **kwargs):
        calls.append(phase["now"])
        return original(*args, **kwargs)

    monkeypatch.setattr(segment_module, "segment_planes", counted)
    config = TrainConfig(epochs=2, iterations_per_epoch=2, patch_size=64, batch_size=2, device="cpu")
    val = [LabelledImage(f"v{i}", *nuclei_field((128, 128), count=12, seed=10 + i)) for i in range(4)]
    seen = []

    def progress(event):
        seen.append(event)
        phase["now"] = {"start": "epoch", "epoch": "epoch", "calibrating": "calibration"}.get(event.kind, phase["now"])

    result = fit(
        tiny_checkpoint,
        samples,
        tmp_path / "m",
        val=val,
        config=config,
        progress=progress,
        cancel=lambda: calls.count(when) >= 1,  # pressed while the first image of that phase is segmented
    )
    assert result.cancelled
    assert calls.count(when) == 1  # the other images of that phase were not segmented
    if when == "start":
        assert not any(e.kind == "epoch" for e in seen) and not result.saved
    if when == "calibration":
        assert [e.kind for e in seen].count("epoch") == 2


def test_a_centre_output_grown_onto_a_trained_model_keeps_its_predictions_and_trains(
    tmp_path, tiny_checkpoint, samples
):
    from napari_nuclei_unet.io import Normalizer
    from napari_nuclei_unet.tiling import TilingParams, predict

    grown = tiny_checkpoint.with_outputs(("foreground", "boundary", "centre"))
    assert grown.outputs == ("foreground", "boundary", "centre") and tiny_checkpoint.outputs == (
        "foreground",
        "boundary",
    )
    image = samples[0].image
    normalizer = Normalizer.from_image(image, 3)
    exact = TilingParams(device="cpu", backend="torch")
    before = predict(tiny_checkpoint, image, normalizer, exact)
    after = predict(grown, image, normalizer, exact)
    assert np.allclose(after[:2], before, atol=1e-5) and np.allclose(after[2], 0.5)  # old channels kept, new at 0.5
    config = TrainConfig(epochs=2, iterations_per_epoch=4, patch_size=64, batch_size=2, device="cpu", calibrate=False)
    result = fit(grown, samples[:2], tmp_path / "centre", val=samples[2:], config=config)
    saved = Checkpoint.load(tmp_path / "centre")
    assert result.iteration == 8 and saved.outputs == ("foreground", "boundary", "centre")
    trained = predict(saved, image, normalizer, exact)[2]
    assert not np.allclose(trained, 0.5)  # the centre channel learnt something
    targets = loss_targets(make_targets(samples[0].labels), saved.outputs)
    assert targets.shape[0] == 3 and float(targets[2].max()) == 1.0


def test_a_model_output_without_a_training_target_is_a_clear_error(tmp_path, tiny_config, samples):
    from napari_nuclei_unet.model import ModelConfig

    odd = Checkpoint.create(ModelConfig(**{**vars(tiny_config), "outputs": ("foreground", "flow")}))
    with pytest.raises(InputError, match="no training target for the model's output flow"):
        fit(odd, samples, tmp_path / "m", val=[], config=TrainConfig(epochs=1, iterations_per_epoch=1, device="cpu"))
