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
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..data import LabelledImage, median_diameter
from ..devices import resolve_device
from ..errors import InputError, ModelError
from ..model import METADATA_FILE, SMP_CONFIG_FILE, WEIGHTS_FILE, Checkpoint
from .calibrate import CALIBRATION_MIN_IMAGES, balanced_score, calibrate, validate_by_type
from .config import TrainConfig, TrainEvent
from .sampler import PatchSampler, reference_nuclei, reference_zooms
from .targets import make_loss

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


def train_steps(
    checkpoint: Checkpoint,
    train: list[LabelledImage],
    out_dir: str | os.PathLike,
    val: list[LabelledImage] | None = None,
    config: TrainConfig | None = None,
    resume: bool = True,
    base_model: str | None = None,
    data_description: str | None = None,
) -> Iterator[TrainEvent]:
    """Train ``checkpoint`` in place, yielding a :class:`TrainEvent` after every iteration and epoch.

    Closing the generator (or stopping to iterate) is the cancel: the best checkpoint so far
    stays in ``out_dir`` and ``training_state.pt`` allows resuming.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    if not train:
        raise InputError("no training images with labels")
    if not any(int(s.labels.max()) > 0 for s in train):
        raise InputError("the training labels contain no nuclei")
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
    rng = np.random.default_rng(config.seed)
    # Channels-last convolutions train ~30% faster on CPUs (oneDNN); weights are saved contiguous.
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    shown_device = f"{device} ({precision})" if precision != "float32" else str(device)  # for progress reports
    model = checkpoint.model.to(device, memory_format=memory_format)
    _set_training_mode(model, config.freeze_batchnorm)
    trainable = _trainable_parameters(model, config.freeze_encoder)
    anchor = [p.detach().clone() for p in trainable] if config.anchor_weight > 0 else None  # the starting weights
    teacher = _frozen_copy(model) if config.distill_weight > 0 else None  # the starting model, for distillation
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.start_weight_share > 0 else None
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=0.0 if anchor else config.weight_decay
    )
    total = config.epochs * config.iterations_per_epoch
    history: list[dict] = []
    start_epoch, iteration, best, spent = 0, 0, -1.0, 0.0
    state_path = out_dir / STATE_FILE
    if resume and state_path.exists():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except Exception as error:
            raise ModelError(
                f"{state_path}: cannot resume ({str(error).splitlines()[0][:200]}); delete it to start over"
            ) from None
        start_epoch, iteration, best, spent = (
            int(state["epoch"]),
            int(state["iteration"]),
            float(state["best"]),
            float(state["elapsed"]),
        )
        history = _read_log(out_dir / LOG_FILE)
        rng = np.random.default_rng(config.seed + start_epoch)
    zooms = reference_zooms(checkpoint, train) if config.zoom_to_reference else None
    sampler = PatchSampler(train, config, checkpoint.config.in_channels, checkpoint.percentiles, rng, zooms)
    loss_fn = make_loss()
    nuclei = int(sum(int(np.unique(s.labels).size - (1 if (s.labels == 0).any() else 0)) for s in train))
    data_diameter = median_diameter([s.labels for s in train])
    base_nuclei = reference_nuclei(checkpoint)
    checkpoint.nucleus_diameter = pooled_diameter(checkpoint.nucleus_diameter, base_nuclei, data_diameter, nuclei)
    started = time.perf_counter() - spent
    record = {
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
    epoch = start_epoch
    running = float("nan")
    finished = False
    start_score = None
    if val and start_epoch == 0:  # what training has to beat: a cancelled run is kept only if it did
        by_type = validate_by_type(checkpoint, val, str(device))
        start_score = balanced_score(by_type) if config.balance_image_types else by_type["all"].kaggle_score
        record["start_score"] = round(start_score, 5)
        yield TrainEvent(
            "start",
            0,
            0,
            total,
            float("nan"),
            time.perf_counter() - started,
            shown_device,
            by_type["all"],
            start_score=start_score,
        )
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            losses = []
            for _ in range(config.iterations_per_epoch):
                elapsed = time.perf_counter() - started
                lr = _learning_rate(config, iteration, total, elapsed)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, targets, indices = sampler.batch()
                images, targets = images.to(device, memory_format=memory_format), targets.to(device)
                if teacher is None:
                    with autocast:
                        logits = model(images)
                    data_loss = loss_fn(logits.float(), targets)
                    loss = data_loss
                else:
                    restyled = sampler.restyle(images.cpu(), indices).to(device, memory_format=memory_format)
                    with torch.no_grad(), autocast:
                        kept = torch.sigmoid(teacher(restyled).float())
                    with autocast:
                        logits, other_looks = model(torch.cat([images, restyled])).float().split(len(images))
                    data_loss = loss_fn(logits, targets)
                    loss = data_loss + config.distill_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                        other_looks, kept
                    )
                if anchor is not None:
                    loss = loss + config.anchor_weight * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, anchor))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                iteration += 1
                # Reported: how well the labels are fitted (BCE + Dice), without the anchor's penalty.
                losses.append(float(data_loss.detach()))
                running = float(np.mean(losses))
                yield TrainEvent(
                    "iteration", epoch, iteration, total, losses[-1], time.perf_counter() - started, shown_device
                )
            elapsed = time.perf_counter() - started
            out_of_time = bool(config.max_minutes and elapsed >= 60.0 * config.max_minutes)
            scores, improved = None, False
            with mixed_with_start(model, start, config.start_weight_share):  # what is validated is what is saved
                if val and (epoch % config.val_every == 0 or epoch == config.epochs or out_of_time):
                    by_type = validate_by_type(checkpoint, val, str(device))
                    scores = by_type["all"]
                    selection = balanced_score(by_type) if config.balance_image_types else scores.kaggle_score
                    improved = selection > best
                elif not val:
                    improved = True  # nothing to validate on: keep the latest
                if improved:
                    best = selection if scores is not None else best
                    _save_best(checkpoint, out_dir, record, scores, epoch, iteration, elapsed, device, memory_format)
            row = {
                "epoch": epoch,
                "iteration": iteration,
                "train_loss": running,
                "lr": lr,
                "seconds": round(elapsed, 1),
            }
            if scores is not None:
                row.update({k: round(v, 5) if isinstance(v, float) else v for k, v in scores.as_dict().items()})
                row.update(
                    {f"kaggle_score_{kind}": round(s.kaggle_score, 5) for kind, s in by_type.items() if kind != "all"}
                )
                row["selection_score"] = round(selection, 5)
            history.append(row)
            _save_state(state_path, model, optimizer, epoch, iteration, best, elapsed)
            _write_log(out_dir / LOG_FILE, history)
            yield TrainEvent(
                "epoch",
                epoch,
                iteration,
                total,
                running,
                elapsed,
                shown_device,
                scores,
                best if best >= 0 else None,
                improved,
                history=list(history),
            )
            if out_of_time:
                break
        finished = True
    finally:
        model.eval().to(memory_format=torch.contiguous_format)
        # Cancelled (generator closed) after an epoch: keep a usable model. Cancelled before
        # the first epoch ended: nothing is saved (the user asked for no half-trained model).
        if not finished and history:
            if not (out_dir / "model.safetensors").exists():
                with mixed_with_start(model, start, config.start_weight_share):
                    _save_best(
                        checkpoint, out_dir, record, None, epoch, iteration, time.perf_counter() - started, device
                    )
    best_checkpoint = Checkpoint.load(out_dir, device=device)
    if config.calibrate:
        yield TrainEvent(
            "calibrating",
            epoch,
            iteration,
            total,
            running,
            time.perf_counter() - started,
            shown_device,
            best_score=best if best >= 0 else None,
            history=list(history),
        )
        # A few held-out images are too few to pick a level from: then the training images count too.
        samples, kind = (
            (val, "validation")
            if len(val) >= CALIBRATION_MIN_IMAGES
            else (train + val, "training and validation" if val else "training")
        )
        calibrate(
            best_checkpoint, samples, f"{len(samples)} {kind} image{'s' if len(samples) != 1 else ''}", str(device)
        )
        best_checkpoint.save(out_dir, overwrite=True)
    checkpoint.model.load_state_dict(best_checkpoint.model.state_dict())
    checkpoint.metadata, checkpoint.source = best_checkpoint.metadata, str(out_dir)
    yield TrainEvent(
        "done",
        epoch,
        iteration,
        total,
        running,
        time.perf_counter() - started,
        shown_device,
        best_score=best if best >= 0 else None,
        history=list(history),
    )


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
    model segments. Measured on the DSB2018 val split (docs/user-guide.md, section 8): with
    the reference set to the median of 3 tissue images (23.4 px instead of 19.8) and the
    weights left as they were, the other 7 tissue images lost 0.016 DSB score and the
    fluorescence images 0.008.
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
    """Run :func:`train_steps` to the end; ``cancel()`` is checked after every iteration.

    A cancelled run keeps its best model only when validation showed it beats the starting
    model, or with ``keep_on_cancel``; the kept model is not calibrated, and its record says so.
    """
    steps = train_steps(checkpoint, train, out_dir, val, config, **kwargs)
    last, start_score = None, None
    for event in steps:
        last = event
        start_score = event.start_score if event.kind == "start" else start_score
        if progress is not None:
            progress(event)
        if event.kind == "done":
            return event
        if cancel is not None and cancel():
            steps.close()
            last.kind, last.cancelled, last.start_score = "done", True, start_score
            out_dir = Path(out_dir)
            improved = start_score is not None and last.best_score is not None and last.best_score > start_score
            if (out_dir / WEIGHTS_FILE).exists() and (improved or keep_on_cancel):
                best = Checkpoint.load(out_dir)
                inherited = best.metadata.get("postprocess") or {}
                if inherited:  # the starting model's level, not calibrated for this one
                    base = best.metadata["training"]["base_model"]
                    best.metadata["postprocess"] = {
                        **inherited,
                        "calibrated_on": f"not calibrated (run cancelled); level of {base}",
                    }
                best.metadata["training"]["cancelled"] = True
                best.save(out_dir, overwrite=True)
                checkpoint.model.load_state_dict(best.model.state_dict())
                checkpoint.metadata, checkpoint.source = best.metadata, str(out_dir)
            else:
                last.saved = False
                _remove_run_files(out_dir)
            return last
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
