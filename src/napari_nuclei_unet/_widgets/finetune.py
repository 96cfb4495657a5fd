"""The "Fine-tune" dock widget: train the model on corrected labels from the open layers.

Thin by design: it turns layers into :class:`~napari_nuclei_unet.data.LabelledImage`
samples and calls :func:`napari_nuclei_unet.train.fit` (the same function as
``nuclei-unet train``) in a thread worker, plotting each epoch as it arrives.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, PushButton
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import thread_worker
from napari.utils import cancelable_progress, progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QWidget

from ..data import LabelledImage
from ..errors import NucleiUnetError, describe
from ..model import BUNDLED_MODEL_DIR, CANNOT_FINETUNE
from ..params import field_metadata
from ..training import FINETUNE_DEFAULTS, TrainConfig, TrainEvent, finetune_config
from ._common import (
    DOCK_MAX_WIDTH,
    FROM_FILE,
    ModelPicker,
    Relay,
    _unless_closed,
    elide_middle,
    field_control,
    hub_of,
    layer_choices,
    scroll_when_docked,
)

if TYPE_CHECKING:
    import napari

DEFAULT_MODELS_DIR = Path.home() / "nuclei-unet-models"
FINETUNE_JOB = "fine-tuning"
EXPORT_JOB = "bioimage.io export"


@dataclass
class FineTuneRequest:
    """Everything the worker needs; built on the GUI thread from the controls."""

    train: list[LabelledImage]
    val: list[LabelledImage] | None
    base_model: str
    out_dir: Path
    config: TrainConfig
    description: str = ""
    keep_on_cancel: bool = False  # keep a cancelled run's model even without a validated improvement


def samples_from_layers(image: Image, labels: Labels, roi: Shapes | None = None) -> list[LabelledImage]:
    """One LabelledImage per plane; raises ValueError with a message naming the layers."""
    if labels is None:
        raise ValueError("choose a labels layer with your corrected nuclei")
    if image is None:
        raise ValueError("choose the image layer that the labels belong to")
    pixels, colour = _segmented_channel(image, labels)
    spatial = tuple(pixels.shape[:-1]) if colour else tuple(pixels.shape)
    label_data = labels.data[0] if labels.multiscale else labels.data
    if tuple(label_data.shape) != spatial:
        raise ValueError(
            f"labels '{labels.name}' have shape {tuple(label_data.shape)}, image '{image.name}' has {spatial}"
        )
    label_array = np.asarray(label_data)
    if not label_array.any():
        raise ValueError(f"labels '{labels.name}' are empty: paint or segment some nuclei first")
    _refuse_masks(labels.name, label_array)
    region = None
    if roi is not None:
        if len(roi.data) == 0:
            raise ValueError(f"region layer '{roi.name}' has no shapes")
        masks = roi.to_masks(mask_shape=spatial[-2:])
        region = np.any(masks, axis=0)
    leading = spatial[:-2]  # a stack's planes (Z or T), or a time-lapse of Z-stacks' (T, Z): each plane a sample
    planes = (
        [(index, np.asarray(pixels[index]), label_array[index]) for index in np.ndindex(*leading)]
        if leading
        else [(None, np.asarray(pixels), label_array)]
    )
    planes = [(index, plane, plane_labels) for index, plane, plane_labels in planes if plane_labels.any()]
    return [
        LabelledImage(
            name=image.name if index is None else f"{image.name}[{', '.join(map(str, index))}]",
            image=plane,
            labels=_one_region_per_label(plane_labels),
            roi=region,
        )
        for index, plane, plane_labels in planes
    ]


def _one_region_per_label(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered so that each separate region of one label is a nucleus of its own: a missed nucleus painted
    with a label already in use (napari's brush keeps the last label) is not taught as part of a far-away one."""
    from skimage.measure import label

    return label(labels, background=0, connectivity=2).astype(np.int32)


def _segmented_channel(image: Image, labels: Labels) -> tuple[object, bool]:
    """The image's pixels the labels were segmented on, and whether they are colour: the nuclear channel of a
    multichannel image when the Segment widget picked one (its metadata says which), else the whole image."""
    from ..io import take_channel

    pixels = image.data[0] if image.multiscale else image.data
    used = labels.metadata.get("nuclei_unet", {}).get("used", {})
    channel, axis = used.get("channel"), used.get("channel_axis")
    if channel is None or axis is None or not -len(pixels.shape) <= axis < len(pixels.shape):
        return pixels, image.rgb
    if not 0 <= channel < pixels.shape[axis]:  # labels of another image: the shape check names the mismatch
        return pixels, image.rgb
    return take_channel(pixels, axis, channel), False


def _refuse_masks(name: str, labels: np.ndarray) -> None:
    """A mask (one label for many separate objects) taught as instances would teach merged nuclei."""
    from scipy import ndimage as ndi

    values = np.unique(labels)
    if values.size == 2:  # background and one label
        _objects, count = ndi.label(labels > 0)
        if count > 1:
            raise ValueError(
                f"labels '{name}' hold one label for {count} separate objects: a mask, not one label per nucleus; "
                "choose the '… nuclei' layer, or give each nucleus its own label"
            )


def next_free_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``… : the first that names no non-empty folder in ``folder``."""
    stem, candidate, number = name, name, 1
    if "-" in name and name.rsplit("-", 1)[1].isdigit() and len(name.rsplit("-", 1)[1]) < 3:
        stem, number = name.rsplit("-", 1)[0], int(name.rsplit("-", 1)[1])
    while (folder / candidate).exists() and any((folder / candidate).iterdir()):
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


class CurvePlot(QWidget):
    """Training loss and validation score per epoch, with their values on the axes (QPainter; no plotting dependency).

    Epoch 0 is the starting model's validation score: what training has to beat.
    """

    def __init__(self):
        super().__init__()
        self.setMinimumHeight(160)
        self.losses: list[tuple[int, float]] = []
        self.scores: list[tuple[int, float]] = []
        self.note = ""  # shown when there is nothing to plot a score for

    def clear(self, note: str = "") -> None:
        self.losses, self.scores, self.note = [], [], note
        self.update()

    def add(self, epoch: int, loss: float | None, score: float | None) -> None:
        if loss is not None and np.isfinite(loss):
            self.losses.append((epoch, loss))
        if score is not None:
            self.scores.append((epoch, score))
        self.update()

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        left, right, top, bottom = 44, 40, 8, 22
        width, height = self.width() - left - right, self.height() - top - bottom
        painter.setPen(QPen(QColor("#888888"), 1))
        painter.drawRect(left, top, width, height)
        epochs = [e for e, _ in self.losses] + [e for e, _ in self.scores]
        first, last = (min(epochs), max(epochs)) if epochs else (0, 1)
        last = max(last, first + 1)
        painter.drawText(left - 4, top + height + 16, str(first))
        painter.drawText(left + width - 8, top + height + 16, str(last))
        painter.drawText(left + width // 2 - 16, top + height + 16, "epoch")

        def point(epoch: int, value: float, low: float, high: float) -> QPointF:
            x = left + width * (epoch - first) / (last - first)
            y = top + height * (1.0 - (value - low) / max(high - low, 1e-9))
            return QPointF(x, y)

        def curve(points: list[QPointF]) -> None:
            for a, b in itertools.pairwise(points):
                painter.drawLine(a, b)
            for p in points:
                painter.drawEllipse(p, 2.5, 2.5)

        if self.losses:
            low, high = min(v for _, v in self.losses), max(v for _, v in self.losses)
            painter.setPen(QPen(QColor("#f0a030"), 2))
            curve([point(e, v, low, high) for e, v in self.losses])
            painter.drawText(2, top + 10, f"{high:.3f}")
            painter.drawText(2, top + height, f"{low:.3f}")
            painter.drawText(left + 4, top + 14, f"loss {self.losses[-1][1]:.3f}")
        if self.scores:
            painter.setPen(QPen(QColor("#40b0ff"), 2))
            curve([point(e, v, 0.0, 1.0) for e, v in self.scores])
            painter.drawText(left + width + 4, top + 10, "1.0")
            painter.drawText(left + width + 4, top + height, "0.0")
            painter.drawText(
                left + 4, top + 30, f"val DSB score {self.scores[-1][1]:.3f} (start {self.scores[0][1]:.3f})"
            )
        elif self.note:
            painter.setPen(QPen(QColor("#cccccc"), 1))
            painter.drawText(left + 4, top + 30, self.note)
        painter.end()


def _help(name: str) -> str:
    return field_metadata(TrainConfig, name)["help"]


def _config_control(name: str, label: str):
    """A spin box for a :class:`TrainConfig` field, at its fine-tuning default."""
    return field_control(TrainConfig, name, label, getattr(FINETUNE_DEFAULTS, name))


class FineTuneWidget(Container):
    """Fine-tune a model on (image, corrected labels) pairs from the viewer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.native.setMaximumWidth(DOCK_MAX_WIDTH)
        scroll_when_docked(self.native)  # scrolls on a short screen: Start stays reachable
        self.viewer = napari_viewer
        self.hub = hub_of(napari_viewer)
        self._create_pair_controls()
        self._create_training_controls()
        self._create_action_controls()
        self._lay_out()
        self._create_run_state()
        self._connect()

    def _create_pair_controls(self) -> None:
        """The image / corrected labels pairs to train on, and the model."""
        self.image_layer = ComboBox(label="image", choices=lambda _w: layer_choices(self._layers(Image)))
        self.labels_layer = ComboBox(label="corrected labels", choices=lambda _w: layer_choices(self._layers(Labels)))
        self.roi_layer = ComboBox(
            label="checked region",
            choices=lambda _w: [("none", None), *layer_choices(self._layers(Shapes))],
            value=None,
            tooltip="optional Shapes layer: only pixels inside its shapes count; elsewhere the labels are not trusted",
        )
        self.add_pair_button = PushButton(text="Add pair")
        self.clear_pairs_button = PushButton(text="Clear pairs")
        self.pairs_label = Label(value="pairs: the image/labels above")
        self.pairs_label.native.setWordWrap(True)  # one line per pair would widen the dock past the window
        self.model = ModelPicker(self.hub)

    def _create_training_controls(self) -> None:
        """The run's settings: the fine-tuning defaults and ranges of TrainConfig."""
        self.epochs = _config_control("epochs", "epochs")
        self.iterations = _config_control("iterations_per_epoch", "iterations / epoch")
        self.learning_rate = _config_control("learning_rate", "learning rate")
        self.patch_size = _config_control("patch_size", "patch size")
        self.batch_size = _config_control("batch_size", "batch size")
        self.augment = CheckBox(text="augmentation", value=FINETUNE_DEFAULTS.augment, tooltip=_help("augment"))
        self.keep_other_types = CheckBox(
            text="keep the other image types (distillation, slower)",
            value=FINETUNE_DEFAULTS.distill_weight > 0,
            tooltip=_help("distill_weight"),
        )
        self.start_share = _config_control("start_weight_share", "starting weights kept")
        self.val_fraction = _config_control("val_fraction", "validation fraction")
        self.keep_on_cancel = CheckBox(
            text="keep a cancelled run's model even if not validated better",
            value=False,
            tooltip="by default Cancel saves the model only when the held-out images show it beats the starting model",
        )

    def _create_action_controls(self) -> None:
        """Where the model goes, the buttons, the status line and the loss curve."""
        self.output_folder = FileEdit(label="save in", mode="d", value=str(DEFAULT_MODELS_DIR))
        self.model_name = LineEdit(label="model name", value=f"finetuned-{datetime.now():%Y%m%d-%H%M}")
        self.advanced = CheckBox(text="show advanced settings", value=False)
        self.start_button = PushButton(text="Start fine-tuning")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.cancel_button.tooltip = (
            "stop after this step; the best model so far is kept only if the held-out images show it beats the "
            "starting model"
        )
        self.resegment_button = PushButton(text="Segment again with the new model", enabled=False)
        self.use_anyway_button = PushButton(text="Use the new model anyway", visible=False, enabled=False)
        self.use_anyway_button.tooltip = "the run validated no better than the model it started from; use it anyway"
        self.export_button = PushButton(text="Export for bioimage.io…", enabled=False)
        self.export_button.tooltip = (
            "write the chosen model as a bioimage.io Model Zoo package (.zip) for deepImageJ, ilastik, QuPath, Fiji "
            "or BiaPy, checked with bioimageio.spec and bioimageio.core (~30 s); its test image is a crop of the image "
            "above"
        )
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.plot = CurvePlot()

    def _lay_out(self) -> None:
        """The controls in order, the advanced ones hidden until asked for, the curve and buttons last."""
        self._advanced_widgets = [
            self.learning_rate,
            self.patch_size,
            self.batch_size,
            self.augment,
            self.keep_other_types,
            self.start_share,
            self.val_fraction,
            self.keep_on_cancel,
        ]
        self.extend(
            [
                self.image_layer,
                self.labels_layer,
                self.roi_layer,
                self.add_pair_button,
                self.clear_pairs_button,
                self.pairs_label,
                *self.model.widgets,
                self.epochs,
                self.iterations,
                self.advanced,
                *self._advanced_widgets,
                self.output_folder,
                self.model_name,
                self.start_button,
                self.cancel_button,
                self.status,
            ]
        )
        self.native.layout().addWidget(self.plot)
        self.append(self.use_anyway_button)
        self.append(self.resegment_button)
        self.append(self.export_button)

    def _create_run_state(self) -> None:
        """What a run and an export keep between events."""
        self._pairs: list[tuple[Image, Labels, Shapes | None]] = []
        self._cancel = threading.Event()
        self._worker = None
        self._progress = None
        self._relay = Relay()
        self._relay.message.connect(self._on_event)
        self._export_relay = Relay()  # export stages, from the export worker
        self._export_relay.message.connect(
            lambda text: _unless_closed(setattr, self.status, "value", f"exporting for bioimage.io: {text}…")
        )
        self._export_worker = None
        self._rejected: str | None = None  # a finished model that validated no better than its start
        self._finetunable = True  # the chosen model is one of ours (a foreign bioimage.io package is not)
        self.native.destroyed.connect(self._cancel.set)  # the window closed: stop training after this step

    def _connect(self) -> None:
        """Buttons, layers and the model picker wired to the handlers; the first model load."""
        self.add_pair_button.changed.connect(self._add_pair)
        self.clear_pairs_button.changed.connect(self._clear_pairs)
        self.start_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.resegment_button.changed.connect(self.resegment)
        self.use_anyway_button.changed.connect(self.use_anyway)
        self.export_button.changed.connect(self.export)
        self.model.on_loaded = self._on_model_loaded
        self.advanced.changed.connect(self._show_advanced)
        self.viewer.layers.events.inserted.connect(self.reset_choices)
        self.viewer.layers.events.removed.connect(self.reset_choices)
        self._show_advanced(False)
        self._use_segment_widget_model()
        self.model.load_async()
        self.reset_choices()
        self._pick_corrected_pair()

    # ------------------------------------------------------------------ inputs
    def _layers(self, kind: type) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, kind)]

    def _show_advanced(self, value: bool) -> None:
        for widget in self._advanced_widgets:
            widget.visible = bool(value)

    def _use_segment_widget_model(self) -> None:
        """Start from the model the Segment widget is using (the 'current' model)."""
        if self.hub.segment_model != "default":
            self.model.file.value = self.hub.segment_model
            self.model.source.value = FROM_FILE

    def _pick_corrected_pair(self) -> None:
        """Preselect '<image> nuclei' and its image when they are open."""
        for labels in self._layers(Labels):
            base = labels.name.removesuffix(" nuclei")
            if base != labels.name and base in self.viewer.layers and isinstance(self.viewer.layers[base], Image):
                self.labels_layer.value, self.image_layer.value = labels, self.viewer.layers[base]
                return

    def _add_pair(self, *_) -> None:
        try:
            samples_from_layers(self.image_layer.value, self.labels_layer.value, self.roi_layer.value)
        except ValueError as error:
            show_error(f"Fine-tune: {error}")
            return
        self._pairs.append((self.image_layer.value, self.labels_layer.value, self.roi_layer.value))
        self._show_pairs()

    def _clear_pairs(self, *_) -> None:
        self._pairs = []
        self._show_pairs()

    def _show_pairs(self) -> None:
        if not self._pairs:
            self.pairs_label.value = "pairs: the image/labels above"
            return
        self.pairs_label.value = "pairs: " + "; ".join(
            f"{elide_middle(image.name)} + {elide_middle(labels.name)}"
            + (f" in {elide_middle(roi.name)}" if roi is not None else "")
            for image, labels, roi in self._pairs
        )

    def request(self) -> FineTuneRequest:
        """Collect the controls; raises ValueError with a user-facing message."""
        pairs = self._pairs or [(self.image_layer.value, self.labels_layer.value, self.roi_layer.value)]
        samples = [s for image, labels, roi in pairs for s in samples_from_layers(image, labels, roi)]
        name = str(self.model_name.value).strip()
        if not name or any(c in name for c in "/\\:"):
            raise ValueError("give the new model a name without slashes or colons")
        out_dir = Path(str(self.output_folder.value)).expanduser() / name
        if out_dir.resolve().is_relative_to(BUNDLED_MODEL_DIR.resolve()):
            raise ValueError("the bundled model's folder cannot be overwritten; choose another folder")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(f"{out_dir} already exists and is not empty; choose another model name")
        config = finetune_config(
            epochs=int(self.epochs.value),
            iterations_per_epoch=int(self.iterations.value),
            learning_rate=float(self.learning_rate.value),
            patch_size=int(self.patch_size.value),
            batch_size=int(self.batch_size.value),
            augment=bool(self.augment.value),
            val_fraction=float(self.val_fraction.value),
            device=self.model.device.value,
            val_every=1,
            distill_weight=FINETUNE_DEFAULTS.distill_weight if self.keep_other_types.value else 0.0,
            start_weight_share=float(self.start_share.value),
            warmup_iterations=min(FINETUNE_DEFAULTS.warmup_iterations, int(self.iterations.value)),
        )
        val = None if len(samples) > 1 and config.val_fraction > 0 else []
        nuclei = sum(int(len(np.unique(s.labels)) - 1) for s in samples)
        description = f"{len(samples)} corrected image(s) from napari ({nuclei} nuclei): " + ", ".join(
            s.name for s in samples[:5]
        )
        return FineTuneRequest(
            samples, val, self.model.path(), out_dir, config, description, bool(self.keep_on_cancel.value)
        )

    # ---------------------------------------------------------------- running
    def start(self, *_) -> None:
        """Start fine-tuning in a thread worker, unless another long job runs in the window."""
        if self._worker is not None:
            return
        try:
            request = self.request()
        except ValueError as error:
            show_error(f"Fine-tune: {error}")
            return
        if not self.hub.start_or_wait(FINETUNE_JOB, self.start, lambda text: setattr(self.status, "value", text)):
            return
        self._cancel.clear()
        self._rejected = None  # a new run: the last one's "use anyway" no longer applies
        self.use_anyway_button.visible = self.use_anyway_button.enabled = False
        validated = request.val is None
        self.plot.clear("" if validated else "no validation score: one image, nothing is held out")
        self.start_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"fine-tuning on {len(request.train)} image(s)…" + (
            "" if validated else " Nothing is held out, so the new model is not validated: check it on another image"
        )
        total = request.config.epochs * request.config.iterations_per_epoch
        self._progress = cancelable_progress(total=total, desc="Fine-tuning", cancel_callback=self.cancel)
        worker = _finetune_worker(request, self.model, self._cancel.is_set, self._relay.message.emit)
        worker.returned.connect(
            lambda event: _unless_closed(self._on_done, request, event)
        )  # the window may be closed by then
        worker.errored.connect(lambda error: _unless_closed(self._on_error, error))
        worker.finished.connect(lambda: _unless_closed(self._on_finished))
        self._worker = worker
        worker.start()

    def cancel(self, *_) -> None:
        self._cancel.set()
        self.status.value = "cancelling after this step…"

    def _on_event(self, event: TrainEvent) -> None:
        if self._progress is not None:
            self._progress.update(event.iteration - self._progress.n)
        if event.kind == "start":
            self.plot.add(0, None, event.scores.kaggle_score)
            self.status.value = (
                f"the starting model scores {event.scores.kaggle_score:.3f} (val DSB) on the held-out images; training…"
            )
        if event.kind == "calibrating":
            self.status.value = f"calibrating the new model's min confidence on the corrected images… ({event.device})"
        if event.kind == "epoch":
            score = event.scores.kaggle_score if event.scores is not None else None
            self.plot.add(event.epoch, event.loss, score)
            self.status.value = (
                f"epoch {event.epoch}: loss {event.loss:.3f}"
                + (f", val DSB score {score:.3f}" if score is not None else "")
                + f" on {event.device}"
            )

    def _on_done(self, request: FineTuneRequest, event: TrainEvent) -> None:
        """Report the run. A finished run's model goes to the Segment widget; a cancelled one's is
        only kept on disk (as the button says), and nothing is loaded or switched."""
        best = f", best val DSB score {event.best_score:.3f}" if event.best_score is not None else ""
        took = f"{event.iteration} iterations in {event.elapsed:.0f} s on {event.device}{best}"
        if event.cancelled and not event.saved:
            if event.start_score is None:
                why = "nothing was validated"
            elif event.best_score is None:
                why = "no epoch was validated yet"
            else:
                why = (
                    f"its best validation score {event.best_score:.3f} did not beat the starting model's "
                    f"{event.start_score:.3f}"
                )
            self.status.value = (
                f"cancelled ({took}): {why}, so nothing was saved (advanced: 'keep a cancelled run's model')"
            )
            show_info(f"Fine-tune cancelled: {why}; nothing was saved")
            return
        if event.cancelled:
            self.status.value = (
                f"cancelled ({took}); the best model so far is saved in {request.out_dir}, not calibrated and not put "
                "to use"
            )
            show_info(
                f"Fine-tune cancelled: the best model so far is in {request.out_dir} (choose it under 'model' to use "
                "it)"
            )
            return
        verdict, better = event.gain()
        if better is False:  # validated, and no better than where it started: kept on disk, not put to use
            self._rejected = str(request.out_dir)
            self.use_anyway_button.visible = self.use_anyway_button.enabled = True
            self.status.value = (
                f"done: {took}. {verdict}, so it is saved in {request.out_dir} but not put to use ('Use the new model "
                "anyway' switches to it)"
            )
            show_info(f"Fine-tune done: {verdict}; the model in use stays")
            return
        self.status.value = f"done: {took}. {verdict}. Saved to {request.out_dir}, now in use"
        show_info(f"Fine-tune done: {verdict}; model saved to {request.out_dir} and put to use")
        self._put_to_use(str(request.out_dir))

    def _put_to_use(self, folder: str) -> None:
        """The new model for the next round of corrections here and for the Segment widget."""
        self.model.use_checkpoint_folder(folder)
        self.hub.model_saved.emit(folder)
        self.resegment_button.enabled = self.hub.receivers(self.hub.segment_requested) > 0
        self.use_anyway_button.visible = self.use_anyway_button.enabled = False

    def use_anyway(self, *_) -> None:
        """Put a fine-tuned model to use that validated no better than its start: the user's call, both numbers seen."""
        if self._rejected is not None:
            folder, self._rejected = self._rejected, None
            self.status.value = f"using {folder} (your choice; it validated no better than the model it started from)"
            self._put_to_use(folder)

    def _on_error(self, error: Exception) -> None:
        self.status.value = f"failed: {error}"
        show_error(f"Fine-tune: {error}")

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        folder = Path(str(self.output_folder.value)).expanduser()
        self.model_name.value = next_free_name(
            folder, str(self.model_name.value).strip()
        )  # Start again does not hit "already exists"
        self._worker = None
        self.start_button.enabled = self._finetunable
        self.cancel_button.enabled = False
        _unless_closed(self.hub.finish, FINETUNE_JOB)

    def _on_model_loaded(self, checkpoint) -> None:
        """Only our own U-Nets can be fine-tuned and exported; a foreign bioimage.io package only segments."""
        self._finetunable = checkpoint.can_finetune
        running = self._worker is not None or self._export_worker is not None
        self.start_button.enabled = self._finetunable and not running
        self.export_button.enabled = self._finetunable and not running
        if not self._finetunable:
            self.status.value = (
                f"{checkpoint.name}: {CANNOT_FINETUNE}. Choose the bundled model or one of ours to fine-tune."
            )
        elif CANNOT_FINETUNE in str(self.status.value):
            self.status.value = ""

    # ---------------------------------------------------------------- export
    def ask_export_path(self) -> str:
        """The package file to write, from a save dialog ('' when cancelled)."""
        from qtpy.QtWidgets import QFileDialog

        start = Path(str(self.output_folder.value)).expanduser() / f"{self.model_name.value}.zip"
        chosen, _ = QFileDialog.getSaveFileName(
            self.native, "Export for bioimage.io", str(start), "bioimage.io package (*.zip)"
        )
        return chosen

    def _export_image(self):
        """The plane the package's test tensors and cover are cut from: the (first pair's) image layer's middle
        plane."""
        layer = self._pairs[0][0] if self._pairs else self.image_layer.value
        if layer is None:
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        while data.ndim > (3 if layer.rgb else 2):
            data = data[data.shape[0] // 2]
        return data

    def export(self, *_) -> None:
        """Export the chosen model as a bioimage.io package in a worker (a job of its own: nothing else runs
        meanwhile)."""
        chosen = self.ask_export_path()
        if not chosen:
            return
        out = Path(chosen if chosen.lower().endswith(".zip") else f"{chosen}.zip")
        try:
            model_path = self.model.path()
        except ValueError as error:
            show_error(f"Export: {error}")
            return
        if not self.hub.try_start(EXPORT_JOB):
            return
        self.export_button.enabled = self.start_button.enabled = False
        self.status.value = "exporting for bioimage.io…"
        self._progress = progress(
            total=0, desc="Exporting for bioimage.io"
        )  # stages in the status line; no Cancel (library calls)
        worker = _export_worker(self.model, model_path, out, self._export_image(), self._export_relay.message.emit)
        worker.returned.connect(lambda written: _unless_closed(self._on_exported, written))
        worker.errored.connect(lambda error: _unless_closed(self._on_error, error))
        worker.finished.connect(lambda: _unless_closed(self._on_export_finished))
        self._export_worker = worker
        worker.start()

    def _on_exported(self, written: Path) -> None:
        self.status.value = f"exported {written}: bioimage.io format validated and model test passed"
        show_info(f"Exported for bioimage.io: {written}")

    def _on_export_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._export_worker = None
        self.export_button.enabled = self.start_button.enabled = self._finetunable
        _unless_closed(self.hub.finish, EXPORT_JOB)

    def resegment(self, *_) -> None:
        """Run the Segment widget with the new model; the corrected layer stays for comparison."""
        if self.hub.receivers(self.hub.segment_requested) == 0:
            show_error("Fine-tune: open the Segment nuclei widget to re-segment")
            return
        self.hub.segment_requested.emit()


@thread_worker(ignore_errors=True)  # errors are shown as notifications by the widget
def _export_worker(model: ModelPicker, model_path: str, out: Path, image, report) -> Path:
    from ..bioimageio_export import export_package

    # The save dialog has asked before replacing a file; the old one stays until the new one passes the checks.
    return export_package(model.checkpoint(model_path), out, progress=report, image=image, overwrite=True)


@thread_worker(ignore_errors=True)  # errors are shown as notifications by the widget
def _finetune_worker(request: FineTuneRequest, model: ModelPicker, cancel, report) -> Any:
    from copy import deepcopy

    from ..training import fit  # torch: in the worker, never on import

    try:
        checkpoint = deepcopy(model.checkpoint(request.base_model))  # the loaded base model stays as it was
        checkpoint.metadata = {**checkpoint.metadata, "name": request.out_dir.name}
        checkpoint.metadata.pop("metrics", None)
        return fit(
            checkpoint,
            request.train,
            request.out_dir,
            request.val,
            request.config,
            progress=report,
            cancel=cancel,
            keep_on_cancel=request.keep_on_cancel,
            resume=False,
            base_model=request.base_model,
            data_description=request.description,
        )
    except NucleiUnetError:
        raise
    except RuntimeError as error:  # e.g. out of memory on a GPU
        raise NucleiUnetError(f"training failed: {describe(error)}") from error
