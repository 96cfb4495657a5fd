"""The training loop: one implementation, used by ``nuclei-unet train`` and the fine-tune widget.

* Targets are derived from instance labels: ``foreground`` and ``boundary`` (the inner
  contour of every nucleus, 2 px, which is also the line between touching nuclei). The
  watershed seeds from ``foreground - boundary``.
* Image and targets are augmented together with ``torchvision.transforms.v2``
  (``tv_tensors.Image`` / ``tv_tensors.Mask``): scale, flips, 90° rotations, brightness,
  contrast, saturation/hue, gamma.
* Loss: BCE + Dice from ``segmentation_models_pytorch.losses``; pixels outside a region
  of interest (or in padding) are ignored.
* Fine-tuning on a few images of one type must not break the others: each patch is also
  redrawn as the other image types, where the model is held to the starting model's output
  (``distill_weight``; learning without forgetting, Li & Hoiem 2016), and the saved model
  mixes a share of the starting weights back in (``start_weight_share``; WiSE-FT).
* The run validates every ``val_every`` epochs with the full segmentation pipeline and
  the Kaggle DSB2018 score, keeps the best checkpoint, logs each epoch to CSV, and can
  resume. ``train_steps`` is a generator of :class:`TrainEvent` (for thread workers);
  ``fit`` drives it with a progress callback and a cancel check. No global state.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import LabelledImage, median_diameter
from ..devices import resolve_device
from ..errors import Cancelled, InputError, ModelError
from ..model import METADATA_FILE, SMP_CONFIG_FILE, WEIGHTS_FILE, Checkpoint
from .calibrate import CALIBRATION_MIN_IMAGES, balanced_score, calibrate, validate_by_type
from .config import TrainConfig, TrainEvent
from .sampler import PatchSampler, reference_nuclei, reference_zooms
from .targets import TARGET_CHANNELS, make_loss

STATE_FILE = "training_state.pt"
LOG_FILE = "training_log.csv"


def split_validation(
    samples: list[LabelledImage], fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Hold out whole images for validation (at least one when there are two or more)."""
    if len(samples) < 2 or fraction <= 0:
        return samples, []
    order = np.random.default_rng(seed).permutation(len(samples))
    count = min(len(samples) - 1, max(1, int(round(fraction * len(samples)))))
    held = set(order[:count].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def _learning_rate(config: TrainConfig, iteration: int, total: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay over iterations or wall-clock time, whichever runs out first."""
    if iteration < config.warmup_iterations:
        return config.learning_rate * (iteration + 1) / config.warmup_iterations
    fraction = iteration / max(total, 1)
    if config.max_minutes:
        fraction = max(fraction, elapsed / (60.0 * config.max_minutes))
    return config.learning_rate * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1.0))))


@dataclass
class _Run:
    """A training run as it goes: what it trains, with what, and how far it has come."""

    checkpoint: Checkpoint
    train: list[LabelledImage]
    val: list[LabelledImage]
    config: TrainConfig
    out_dir: Path
    device: torch.device
    shown_device: str  # for progress reports: the device and, if not float32, the precision
    memory_format: torch.memory_format
    autocast: Any
    model: torch.nn.Module
    trainable: list
    anchor: list | None  # the starting weights (L2-SP)
    teacher: torch.nn.Module | None  # the starting model (distillation)
    start: dict | None  # the starting state, mixed into what is validated and saved (WiSE-FT)
    optimizer: torch.optim.Optimizer
    sampler: PatchSampler
    loss_fn: Callable
    record: dict  # the training record saved with the model
    total: int
    started: float
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    epoch: int = 0
    iteration: int = 0
    best: float = -1.0
    running: float = float("nan")
    lr: float = 0.0
    start_score: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def event(self, kind: str, loss: float | None = None, **fields) -> TrainEvent:
        loss = self.running if loss is None else loss
        fields.setdefault("start_score", self.start_score)
        return TrainEvent(
            kind, self.epoch, self.iteration, self.total, loss, self.elapsed(), self.shown_device, **fields
        )

    def best_score(self) -> float | None:
        return self.best if self.best >= 0 else None

    def save_best(self, scores, memory_format=None) -> None:
        _save_best(
            self.checkpoint,
            self.out_dir,
            self.record,
            scores,
            self.epoch,
            self.iteration,
            self.elapsed(),
            self.device,
            memory_format or torch.contiguous_format,
        )


def train_steps(
    checkpoint: Checkpoint,
    train: list[LabelledImage],
    out_dir: str | os.PathLike,
    val: list[LabelledImage] | None = None,
    config: TrainConfig | None = None,
    resume: bool = True,
    base_model: str | None = None,
    data_description: str | None = None,
    cancel: Callable[[], bool] | None = None,
    keep_on_cancel: bool = False,
) -> Iterator[TrainEvent]:
    """Train ``checkpoint`` in place, yielding a :class:`TrainEvent` after every iteration and epoch.

    ``cancel()`` is checked after every event, and between the tiles of every image validated
    or calibrated on: the run then ends with a "done" event whose ``cancelled`` is set, keeping
    what :func:`_stop` decides. Closing the generator stops it
    too, keeping the best model so far (``training_state.pt`` allows resuming).
    """
    run = _start(checkpoint, train, Path(out_dir), val, config or TrainConfig(), resume, base_model, data_description)

    def stopped() -> bool:
        return cancel is not None and cancel()

    if run.val and run.start_epoch == 0:  # what training has to beat: a cancelled run is kept only if it did
        try:
            by_type = validate_by_type(checkpoint, run.val, str(run.device), cancel=stopped)
        except Cancelled:
            yield replace(run.event("done"), cancelled=True, saved=_stop(run, keep_on_cancel))
            return
        run.start_score = _selection(run.config, by_type)
        run.record["start_score"] = round(run.start_score, 5)
        yield run.event("start", float("nan"), scores=by_type["all"])
    cancelled = stopped()
    try:
        for epoch in range(run.start_epoch + 1, run.config.epochs + 1):
            if cancelled:  # at the start event
                break
            run.epoch, losses = epoch, []
            for _ in range(run.config.iterations_per_epoch):
                losses.append(_step(run))  # how well the labels are fitted (BCE + Dice), without the anchor's penalty
                run.running = float(np.mean(losses))
                yield run.event("iteration", losses[-1])
                if cancelled := stopped():
                    break
            if cancelled:
                break
            try:
                out_of_time, event = _end_epoch(run, stopped)
            except Cancelled:  # during validation: the epoch's weights are not known to be better
                cancelled = True
                break
            yield event
            if (cancelled := stopped()) or out_of_time:
                break
    except GeneratorExit:
        _stop(run, keep=True)
        raise
    finally:
        run.model.eval().to(memory_format=torch.contiguous_format)
    if cancelled:
        yield replace(run.event("done", best_score=run.best_score()), cancelled=True, saved=_stop(run, keep_on_cancel))
        return
    yield from _finish(run, stopped, keep_on_cancel)


def _start(checkpoint, train, out_dir: Path, val, config: TrainConfig, resume, base_model, data_description) -> _Run:
    """Check the run's inputs and settings, then set it up: device, model, optimiser, sampler (and resume)."""
    if not train:
        raise InputError("no training images with labels")
    if not any(int(s.labels.max()) > 0 for s in train):
        raise InputError("the training labels contain no nuclei")
    untrainable = [name for name in checkpoint.outputs if name not in TARGET_CHANNELS]
    if untrainable:
        raise InputError(
            f"no training target for the model's output {', '.join(untrainable)} (trainable: "
            f"{', '.join(TARGET_CHANNELS)})"
        )
    if val is None:
        train, val = split_validation(train, config.val_fraction, config.seed)
    device = resolve_device(config.device)
    precision = training_precision(config.precision, device)
    if not 0.0 <= config.start_weight_share < 1.0:
        raise InputError(
            f"the share of the starting weights must be at least 0 and below 1, got {config.start_weight_share}"
        )
    _check_writable(out_dir)  # after the settings are checked, so a bad one leaves no empty folder
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    # Channels-last convolutions train faster on CPUs (oneDNN); weights are saved contiguous.
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model = checkpoint.model.to(device, memory_format=memory_format)
    _set_training_mode(model, config.freeze_batchnorm)
    trainable = _trainable_parameters(model, config.freeze_encoder)
    anchor = [p.detach().clone() for p in trainable] if config.anchor_weight > 0 else None
    teacher = _frozen_copy(model) if config.distill_weight > 0 else None
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.start_weight_share > 0 else None
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=0.0 if anchor else config.weight_decay
    )
    resumed = _resume(out_dir / STATE_FILE, model, optimizer, device) if resume else None
    start_epoch = resumed["epoch"] if resumed else 0
    rng = np.random.default_rng(config.seed + start_epoch)
    zooms = reference_zooms(checkpoint, train) if config.zoom_to_reference else None
    sampler = PatchSampler(
        train, config, checkpoint.config.in_channels, checkpoint.percentiles, rng, zooms, checkpoint.outputs
    )
    record = _training_record(checkpoint, train, val, config, precision, base_model, data_description)
    run = _Run(
        checkpoint,
        train,
        val,
        config,
        out_dir,
        device,
        f"{device} ({precision})" if precision != "float32" else str(device),
        memory_format,
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"),
        model,
        trainable,
        anchor,
        teacher,
        start,
        optimizer,
        sampler,
        make_loss(checkpoint.outputs, config.touch_weight),
        record,
        config.epochs * config.iterations_per_epoch,
        time.perf_counter() - (resumed["elapsed"] if resumed else 0.0),
    )
    if resumed:
        run.start_epoch = run.epoch = start_epoch
        run.iteration, run.best, run.history = resumed["iteration"], resumed["best"], _read_log(out_dir / LOG_FILE)
    return run


def _resume(state_path: Path, model, optimizer, device) -> dict | None:
    """Load a run's saved state into ``model`` and ``optimizer``: its epoch, iteration, best score and time."""
    if not state_path.exists():
        return None
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as error:
        raise ModelError(
            f"{state_path}: cannot resume ({str(error).splitlines()[0][:200]}); delete it to start over"
        ) from None
    return {
        "epoch": int(state["epoch"]),
        "iteration": int(state["iteration"]),
        "best": float(state["best"]),
        "elapsed": float(state["elapsed"]),
    }


def _training_record(checkpoint, train, val, config, precision, base_model, data_description) -> dict:
    """What the saved model says of how it was trained; pools the checkpoint's nucleus size with the data's."""
    nuclei = int(sum(int(np.unique(s.labels).size - (1 if (s.labels == 0).any() else 0)) for s in train))
    data_diameter = median_diameter([s.labels for s in train])
    base_nuclei = reference_nuclei(checkpoint)
    checkpoint.nucleus_diameter = pooled_diameter(checkpoint.nucleus_diameter, base_nuclei, data_diameter, nuclei)
    return {
        "base_model": base_model or checkpoint.source or "new",
        "data": data_description or f"{len(train)} images",
        "images": len(train),
        "nuclei": nuclei,
        "data_nucleus_diameter": data_diameter,  # median of these images; nucleus_diameter pools it with the base's
        "reference_nuclei": base_nuclei + nuclei,
        "validation_images": len(val),
        "precision": precision,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    }


def _step(run: _Run) -> float:
    """One optimiser step on a batch of patches; returns its data loss."""
    config, model, device, memory_format = run.config, run.model, run.device, run.memory_format
    run.lr = _learning_rate(config, run.iteration, run.total, run.elapsed())
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    images, targets, indices = run.sampler.batch()
    images, targets = images.to(device, memory_format=memory_format), targets.to(device)
    if run.teacher is None:
        with run.autocast:
            logits = model(images)
        data_loss = loss = run.loss_fn(logits.float(), targets)
    else:
        restyled = run.sampler.restyle(images.cpu(), indices).to(device, memory_format=memory_format)
        with torch.no_grad(), run.autocast:
            kept = torch.sigmoid(run.teacher(restyled).float())
        with run.autocast:
            logits, other_looks = model(torch.cat([images, restyled])).float().split(len(images))
        data_loss = run.loss_fn(logits, targets)
        distill = torch.nn.functional.binary_cross_entropy_with_logits(other_looks, kept)
        loss = data_loss + config.distill_weight * distill
    if run.anchor is not None:
        loss = loss + config.anchor_weight * sum(((p - p0) ** 2).sum() for p, p0 in zip(run.trainable, run.anchor))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.iteration += 1
    return float(data_loss.detach())


def _selection(config: TrainConfig, by_type: dict) -> float:
    """The score that picks the best epoch: the mean over image types, or the plain score."""
    return balanced_score(by_type) if config.balance_image_types else by_type["all"].kaggle_score


def _end_epoch(run: _Run, cancel: Callable[[], bool]) -> tuple[bool, TrainEvent]:
    """Validate (when due; ``cancel`` stops it with :class:`Cancelled`), save the best model, the resume state and
    the log; whether time is up, and the event."""
    config, epoch = run.config, run.epoch
    elapsed = run.elapsed()
    out_of_time = bool(config.max_minutes and elapsed >= 60.0 * config.max_minutes)
    scores, improved, by_type = None, False, {}
    with mixed_with_start(run.model, run.start, config.start_weight_share):  # what is validated is what is saved
        if run.val and (epoch % config.val_every == 0 or epoch == config.epochs or out_of_time):
            by_type = validate_by_type(run.checkpoint, run.val, str(run.device), cancel=cancel)
            scores, selection = by_type["all"], _selection(config, by_type)
            improved = selection > run.best
        elif not run.val:
            improved = True  # nothing to validate on: keep the latest
        if improved:
            run.best = selection if scores is not None else run.best
            run.save_best(scores, run.memory_format)
    row = {
        "epoch": epoch,
        "iteration": run.iteration,
        "train_loss": run.running,
        "lr": run.lr,
        "seconds": round(elapsed, 1),
    }
    if scores is not None:
        row.update({k: round(v, 5) if isinstance(v, float) else v for k, v in scores.as_dict().items()})
        row.update({f"kaggle_score_{kind}": round(s.kaggle_score, 5) for kind, s in by_type.items() if kind != "all"})
        row["selection_score"] = round(selection, 5)
    run.history.append(row)
    _save_state(run.out_dir / STATE_FILE, run.model, run.optimizer, epoch, run.iteration, run.best, elapsed)
    _write_log(run.out_dir / LOG_FILE, run.history)
    event = run.event("epoch", scores=scores, best_score=run.best_score(), improved=improved, history=list(run.history))
    return out_of_time, event


def _stop(run: _Run, keep: bool) -> bool:
    """What a stopped run keeps, decided here only; whether a model was kept.

    Its best model when validation showed it beats the starting model, or with ``keep``
    (then the latest model if no epoch was saved yet): not calibrated, and its record says so.
    Otherwise, or when no epoch ended, nothing: what the run wrote is removed.
    """
    weights = run.out_dir / WEIGHTS_FILE
    if keep and run.history and not weights.exists():
        with mixed_with_start(run.model, run.start, run.config.start_weight_share):
            run.save_best(None)
    improved = run.start_score is not None and run.best_score() is not None and run.best > run.start_score
    if not (weights.exists() and (improved or keep)):
        _remove_run_files(run.out_dir)
        return False
    best = Checkpoint.load(run.out_dir)
    inherited = best.metadata.get("postprocess") or {}
    if inherited:  # the starting model's level, not calibrated for this one
        base = best.metadata["training"]["base_model"]
        best.metadata["postprocess"] = {
            **inherited,
            "calibrated_on": f"not calibrated (run cancelled); level of {base}",
        }
    best.metadata["training"]["cancelled"] = True
    best.save(run.out_dir, overwrite=True)
    run.checkpoint.model.load_state_dict(best.model.state_dict())
    run.checkpoint.metadata, run.checkpoint.source = best.metadata, str(run.out_dir)
    return True


def _finish(run: _Run, stopped: Callable[[], bool], keep_on_cancel: bool) -> Iterator[TrainEvent]:
    """The best model back into the checkpoint, its min confidence calibrated first (a cancel skips that)."""
    best = Checkpoint.load(run.out_dir, device=run.device)
    if run.config.calibrate:
        yield run.event("calibrating", best_score=run.best_score(), history=list(run.history))
        # A few held-out images are too few to pick a level from: then the training images count too.
        val, train = run.val, run.train
        samples, kind = (
            (val, "validation")
            if len(val) >= CALIBRATION_MIN_IMAGES
            else (train + val, "training and validation" if val else "training")
        )
        description = f"{len(samples)} {kind} image{'s' if len(samples) != 1 else ''}"
        cancelled = stopped()
        if not cancelled:
            try:
                calibrate(best, samples, description, str(run.device), cancel=stopped)
            except Cancelled:
                cancelled = True
        if cancelled:
            yield replace(
                run.event("done", best_score=run.best_score()), cancelled=True, saved=_stop(run, keep_on_cancel)
            )
            return
        best.save(run.out_dir, overwrite=True)
    run.checkpoint.model.load_state_dict(best.model.state_dict())
    run.checkpoint.metadata, run.checkpoint.source = best.metadata, str(run.out_dir)
    yield run.event("done", best_score=run.best_score(), history=list(run.history))


@contextlib.contextmanager
def mixed_with_start(model: torch.nn.Module, start: dict[str, torch.Tensor] | None, share: float) -> Iterator[None]:
    """Within the block, ``model`` holds ``(1 - share) x`` its weights ``+ share x start`` (WiSE-FT); after it, its own
    again.

    Every floating-point entry of the state is mixed, BatchNorm statistics included; counters
    stay as trained. ``start`` None or ``share`` 0: the block sees the model as it is.
    """
    if start is None or share <= 0:
        yield
        return
    state = model.state_dict()
    trained = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for name, value in state.items():
            if value.is_floating_point():
                value.lerp_(start[name].to(value.device, value.dtype), share)
    try:
        yield
    finally:
        model.load_state_dict(trained)


def training_precision(setting: str, device: torch.device) -> str:
    """ "float32" or "bfloat16": what the forward and backward passes run in for :attr:`TrainConfig.precision` on
    ``device``."""
    if setting in ("float32", "bfloat16"):
        return setting
    if setting != "auto":
        raise InputError(f"training precision must be auto, float32 or bfloat16, got {setting!r}")
    return "bfloat16" if device.type == "cpu" and _cpu_has_native_bfloat16() else "float32"


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively; elsewhere bfloat16 is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: stay with float32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pooled_diameter(base: float | None, base_nuclei: int, data: float | None, data_nuclei: int) -> float | None:
    """The reference nucleus size of a model trained on ``data_nuclei`` nuclei of median ``data`` px,
    starting from one whose reference ``base`` came from ``base_nuclei`` nuclei.

    A new model (no base) takes its data's median. A fine-tuned one has still learnt mostly
    from its base's nuclei: its reference moves towards the new median by the new nuclei's
    share (on a log scale), so a few corrected images do not re-scale every other image the
    model segments (setting it to the few images' median cost the other images accuracy:
    docs/user-guide.md, section 8).
    """
    if not base or not base_nuclei or data is None:
        return data or base
    share = data_nuclei / (data_nuclei + base_nuclei)
    return float(np.exp((1.0 - share) * np.log(base) + share * np.log(data)))


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _trainable_parameters(model: torch.nn.Module, freeze_encoder: bool) -> list[torch.nn.Parameter]:
    encoder = getattr(model, "encoder", None)
    frozen = {id(p) for p in encoder.parameters()} if freeze_encoder and encoder is not None else set()
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return [p for p in model.parameters() if p.requires_grad]


def _set_training_mode(model: torch.nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def fit(
    checkpoint: Checkpoint,
    train: list[LabelledImage],
    out_dir: str | os.PathLike,
    val: list[LabelledImage] | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    keep_on_cancel: bool = False,
    **kwargs,
) -> TrainEvent:
    """Run :func:`train_steps` to the end, reporting each event to ``progress``; its last event.

    ``cancel()`` is checked after every event: a cancelled run keeps its best model only when
    validation showed it beats the starting model, or with ``keep_on_cancel`` (``_stop``).
    """
    last = None
    for last in train_steps(
        checkpoint, train, out_dir, val, config, cancel=cancel, keep_on_cancel=keep_on_cancel, **kwargs
    ):
        if progress is not None:
            progress(last)
    return last


def _remove_run_files(out_dir: Path) -> None:
    """Remove what a run wrote into its output folder (model, log, resume state), and the folder if that empties it."""
    for name in (
        WEIGHTS_FILE,
        SMP_CONFIG_FILE,
        METADATA_FILE,
        "README.md",
        LOG_FILE,
        STATE_FILE,
    ):  # README: smp's model card
        with contextlib.suppress(OSError):
            (out_dir / name).unlink()
    _remove_if_empty(out_dir)


def _remove_if_empty(folder: Path) -> None:
    """Remove a run's output folder when it holds nothing (a run cancelled before it saved)."""
    with contextlib.suppress(OSError):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{out_dir}: output folder is not writable ({error.strerror})") from None


def _save_best(
    checkpoint, out_dir, record, scores, epoch, iteration, elapsed, device, memory_format=torch.contiguous_format
) -> None:
    checkpoint.metadata.setdefault("name", out_dir.name)
    checkpoint.metadata["training"] = {
        **record,
        "epochs": epoch,
        "iterations": iteration,
        "seconds": round(elapsed, 1),
        "device": str(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if scores is not None:
        checkpoint.metadata["metrics"] = {
            k: round(v, 5) if isinstance(v, float) else v for k, v in scores.as_dict().items()
        }
        checkpoint.metadata["metrics"]["measured_on"] = "validation images"
    checkpoint.model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    checkpoint.save(out_dir, overwrite=True)
    checkpoint.model.to(memory_format=memory_format)


def _save_state(path, model, optimizer, epoch, iteration, best, elapsed) -> None:
    tmp = path.with_suffix(".part")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "best": best,
            "elapsed": elapsed,
        },
        tmp,
    )
    os.replace(tmp, path)


def _write_log(path: Path, history: list[dict]) -> None:
    from ..io import atomic_write

    columns = list(dict.fromkeys(k for row in history for k in row))
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]
