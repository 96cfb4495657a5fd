"""Pieces shared by the plugin's widgets: the model picker and result metadata."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from pathlib import Path

from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, Label, SpinBox
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QCoreApplication, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QComboBox, QDockWidget, QFrame, QLabel, QMainWindow, QScrollArea, QSizePolicy, QWidget

from ..devices import available_devices
from ..errors import ModelError, describe
from ..model import Checkpoint, resolve_model_path
from ..params import TilingParams, field_metadata

BUNDLED = "bundled default"
FROM_FILE = "from file…"
# The docked widgets never grow wider than this (px): a 64-character DSB2018 image name would
# otherwise widen the dock until the canvas is a sliver.
DOCK_MAX_WIDTH = 440
# Layer names longer than this are shown elided in the middle, so that both the start of the
# name and its end ("… nuclei" vs "… nuclei (edited)") stay readable.
SHOWN_NAME_LENGTH = 36


_SCROLL_NAME = "napari-nuclei-unet scroll area"


def field_control(owner: type, name: str, label: str, value, kind: type | None = None, **options):
    """A numeric control for the dataclass field ``owner.name``: its range, step and help come from the
    field (``params.field_metadata``), so the widget and the CLI cannot disagree. ``kind``: a spin box
    for the value's type unless given (e.g. ``FloatSlider``); ``options`` override."""
    meta = field_metadata(owner, name)
    kind = kind or (SpinBox if isinstance(value, int) else FloatSpinBox)
    settings = {key: meta[key] for key in ("min", "max", "step") if key in meta}
    settings.setdefault("tooltip", meta.get("help", ""))
    return kind(label=label, value=value, **{**settings, **options})


def scroll_when_docked(native: QWidget) -> None:
    """Put a scroll area between napari's dock and ``native`` once the widget is docked.

    napari docks a magicgui widget's inner QWidget (``widget.native``), so magicgui's own
    ``scrollable`` area is left out, and a dock is then as tall as all its controls: two of
    ours needed 1,490 px and pushed Segment off a 1000 px screen. Called right after the
    widget is made; the wrapping happens on the next turn of the event loop, after napari
    has docked it. A widget that is not in a dock (tests, scripts) is left as it is. The
    plugin's second dock is tabbed with the first, so each gets the window's height.
    """

    def wrap() -> None:
        try:
            dock = native.parentWidget()
        except RuntimeError:  # closed before the event loop came round
            return
        if not isinstance(dock, QDockWidget) or dock.widget() is not native:
            return
        for combo in native.findChildren(QComboBox):  # sized for a few words, not the longest layer name
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
        for label in native.findChildren(QLabel):  # wrapped text (summaries, status) takes the width it is given
            if label.wordWrap():
                label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
                label.setMinimumWidth(120)
        scroll = QScrollArea()
        scroll.setObjectName(_SCROLL_NAME)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        bar = scroll.verticalScrollBar().sizeHint().width()
        scroll.setMinimumWidth(min(native.minimumSizeHint().width() + bar, DOCK_MAX_WIDTH))  # no control cut off
        scroll.setMaximumWidth(DOCK_MAX_WIDTH)
        native.setMaximumWidth(DOCK_MAX_WIDTH - bar)
        dock.setWidget(scroll)
        scroll.setWidget(native)
        window = dock.parentWidget()
        if isinstance(window, QMainWindow):
            ours = [
                d
                for d in window.findChildren(QDockWidget)
                if d is not dock and d.isVisible() and getattr(d.widget(), "objectName", str)() == _SCROLL_NAME
            ]
            if ours and window.dockWidgetArea(ours[0]) == window.dockWidgetArea(dock):
                window.tabifyDockWidget(ours[0], dock)
                QTimer.singleShot(0, dock.raise_)

    QTimer.singleShot(0, wrap)


def elide_middle(name: str, length: int = SHOWN_NAME_LENGTH) -> str:
    """``name`` cut to ``length`` characters with an ellipsis in the middle."""
    if len(name) <= length:
        return name
    tail = (length - 1) // 2
    return f"{name[: length - 1 - tail]}…{name[len(name) - tail :]}"


def layer_choices(layers) -> list[tuple[str, object]]:
    """Combo-box choices for layers: the shown name elided, the layer itself as the value."""
    return [(elide_middle(layer.name), layer) for layer in layers]


_HUB_NAME = "napari-nuclei-unet jobs"
LOADING_JOB = "loading the model"


class JobHub(QObject):
    """The plugin's widgets in one napari window: one long job at a time, and the model a fine-tune saved.

    Long jobs (segmenting, fine-tuning, loading a model) share napari's thread pool, which
    has as many threads as cores; two of them side by side starve each other and the
    viewer. A job the user starts while another runs is refused with a message
    (:meth:`try_start`); automatic ones (model loads) wait their turn (:meth:`when_idle`).
    The hub is a child of the window, found by name: no module-level registry.
    """

    model_saved = Signal(str)  # a checkpoint folder a finished fine-tune wrote, for the Segment widget
    segment_requested = Signal()  # "segment again" (the Fine-tune widget asks the Segment widget)
    job_changed = Signal(str)  # the running job's name; "" when idle

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.setObjectName(_HUB_NAME)
        self.job = ""
        self.segment_model = "default"  # the Segment widget's model, where a fine-tune starts from
        self._waiting: list = []

    def try_start(self, job: str) -> bool:
        """Mark ``job`` as running; False (and a warning naming the running job) if one runs."""
        if self.job:
            show_warning(f"{job}: wait until {self.job} has finished, or cancel it")
            return False
        self.job = job
        self.job_changed.emit(job)
        return True

    @property
    def idle(self) -> bool:
        return not self.job and not self._waiting

    def finish(self, job: str) -> None:
        """``job`` is over: start what waited for it."""
        if self.job != job:
            return
        self.job = ""
        self.job_changed.emit("")
        while self._waiting and not self.job:
            self._waiting.pop(0)()

    def start_or_wait(self, job: str, start, report) -> bool:
        """True if ``job`` may start now. While a model loads, ``start`` is called once it has
        loaded (``report`` says so) and False returned; other jobs refuse it with a message."""
        if self.job == LOADING_JOB:
            report("waiting for the model to load…")
            self._waiting.append(start)
            return False
        return self.try_start(job)

    def when_idle(self, callback) -> None:
        """Call ``callback`` now if no job runs, else when the running one finishes."""
        if self.job:
            self._waiting.append(callback)
        else:
            callback()


def image_id(layer) -> str:
    """The name results of ``layer`` are filed under: its file's stem when it came from a file
    (as ``nuclei-unet segment`` names RLE rows), else the layer's name."""
    path = getattr(getattr(layer, "source", None), "path", None)
    return Path(path).stem if path else layer.name


def hub_of(viewer) -> JobHub:
    """The :class:`JobHub` of ``viewer``'s window (made on first use)."""
    real = getattr(viewer, "__wrapped__", viewer)  # napari hands plugins a proxy of the viewer
    window = getattr(getattr(real, "window", None), "_qt_window", None)
    parent = window if window is not None else QCoreApplication.instance()
    hub = parent.findChild(JobHub, _HUB_NAME, Qt.FindChildOption.FindDirectChildrenOnly) if parent is not None else None
    return hub if hub is not None else JobHub(parent)


class ModelPicker:
    """Model source (bundled or a file), a one-line summary, and the device; loads lazily, off the GUI thread.

    Checkpoint folders are picked through their ``model.safetensors`` or ``config.json``;
    a plain ``.pth`` state_dict of an ``smp.Unet`` works too.
    """

    def __init__(self, hub: JobHub):
        self.source = ComboBox(label="model", choices=[BUNDLED, FROM_FILE], value=BUNDLED)
        self.file = FileEdit(
            label="model file",
            mode="r",
            filter="*.safetensors *.json *.pth *.pt *.ckpt *.bin *.zip *.yaml",
            visible=False,
            tooltip="a checkpoint's model.safetensors or config.json, a .pth state_dict, or a bioimage.io package "
            "(.zip, or its bioimageio.yaml / rdf.yaml)",
        )
        self.summary = Label(label="", value="loading model…")
        self.summary.native.setWordWrap(True)
        # GPUs are listed once the model has loaded: asking torch here would freeze the window for seconds.
        self.device = ComboBox(
            label="device", choices=["auto", "cpu"], value="auto", tooltip="auto: CUDA, then Apple MPS, then CPU"
        )
        self.widgets = [self.source, self.file, self.summary, self.device]
        self._loaded: dict[str, Checkpoint] = {}  # the chosen model only (older ones are dropped)
        self._lock = threading.Lock()
        self._hub = hub
        self.on_choice = None  # called with the chosen path whenever a model is chosen (the Segment widget shares it)
        self.on_loaded = None  # called with the checkpoint once it is loaded and shown
        self.source.changed.connect(self._on_source)
        self.file.changed.connect(lambda *_: self.load_async())
        self.device.changed.connect(lambda *_: self._show_summary())

    def path(self) -> str:
        """``'default'`` or the chosen file; raises ValueError when 'from file' has none."""
        if self.source.value == BUNDLED:
            return "default"
        chosen = str(self.file.value or "")
        if chosen in ("", "."):
            raise ValueError(
                "choose a model file (a checkpoint's model.safetensors / config.json, a .pth state_dict, or a "
                "bioimage.io package .zip / rdf.yaml)"
            )
        return chosen

    def checkpoint(self, path: str) -> Checkpoint:
        """The loaded checkpoint for ``path`` (thread-safe; loads once)."""
        with self._lock:
            if path not in self._loaded:
                checkpoint = Checkpoint.load(resolve_model_path(path))
                self._loaded = {path: checkpoint}  # one model in memory per picker
            return self._loaded[path]

    def use_checkpoint_folder(self, folder) -> None:
        """Switch to a (new or re-written) checkpoint folder and load it."""
        chosen = str(Path(folder) / "model.safetensors")
        with self._lock:
            self._loaded.pop(chosen, None)
        with self.source.changed.blocked(), self.file.changed.blocked():  # one load, not one per control
            self.source.value = FROM_FILE
            self.file.value = chosen
        self.file.visible = True
        self.load_async()

    def load_async(self) -> None:
        """Load the chosen model in a worker, once no other job runs, and show its summary; errors become
        notifications."""
        try:
            path = self.path()
        except ValueError:
            self.summary.value = "choose a model file"
            return
        self.summary.value = "loading model…"
        if self.on_choice is not None:
            self.on_choice(path)
        self._hub.when_idle(lambda: self._start_load(path))

    def _start_load(self, path: str) -> None:
        job = LOADING_JOB
        if not self._hub.try_start(job):
            return
        worker = thread_worker(self._load_and_prepare, ignore_errors=True)(path, self.device.value)
        worker.returned.connect(lambda devices: _unless_closed(self._show_loaded, devices))
        worker.errored.connect(lambda error: _unless_closed(self._on_error, error))
        worker.finished.connect(lambda: _unless_closed(self._hub.finish, job))
        worker.start()
        self._load_worker = worker  # keep a reference while it runs

    def _load_and_prepare(self, path: str, device: str) -> list[str]:
        """Load the model and, on the CPU, export (and quantise) its network now, so the first
        Segment does not wait for it; return the devices to offer. An export problem is reported
        when segmenting."""
        from ..devices import resolve_device

        checkpoint = self.checkpoint(path)
        try:
            on_cpu = resolve_device(device).type == "cpu"
        except ModelError as error:  # a device that vanished: the summary says so
            logging.getLogger(__name__).info("device %s: %s", device, describe(error))
            on_cpu = False
        if on_cpu:
            checkpoint.network.prepare(TilingParams(device="cpu"))
        return available_devices()

    def _show_loaded(self, devices: list[str]) -> None:
        if list(self.device.choices) != devices:
            with self.device.changed.blocked():
                chosen = self.device.value
                self.device.choices = devices
                self.device.value = chosen if chosen in devices else "auto"
        self._show_summary()

    def _on_source(self, value: str) -> None:
        self.file.visible = value == FROM_FILE
        self.load_async()

    def _show_summary(self) -> None:
        from ..devices import resolve_device

        try:
            checkpoint = self._loaded.get(self.path())
        except ValueError:
            return
        if checkpoint is None:
            return
        try:
            device = checkpoint.device_line(resolve_device(self.device.value), TilingParams(device=self.device.value))
        except ModelError as error:  # a device that vanished (e.g. eGPU unplugged)
            device = f"unavailable ({error})"
        self.summary.value = f"{checkpoint.summary()} | runs on {device}"
        if self.on_loaded is not None:
            self.on_loaded(checkpoint)

    def _on_error(self, error: Exception) -> None:
        self.summary.value = f"could not load: {error}"
        show_error(f"Model: {error}")


class Relay(QObject):
    """Carries reports from a worker thread to the GUI thread (a queued signal)."""

    message = Signal(object)


def _unless_closed(callback, *args) -> None:
    """Run a GUI update unless its widgets were closed meanwhile (a load can outlive the viewer)."""
    try:
        callback(*args)
    except RuntimeError as error:
        if "has been deleted" not in str(error):
            raise


def result_metadata(model_name: str, key, postprocess, used: dict, image_id: str) -> dict:
    """What produced a result layer, stored in ``layer.metadata['nuclei_unet']``: the settings
    as asked (``"auto"`` included), under ``used`` the numbers every "auto" became, and the
    ``image_id`` that RLE rows and file names take (the image's file stem, as the CLI writes)."""
    network = key.network  # the segment widget's CacheKey
    return {
        "image_id": image_id,
        "model": model_name,
        "model_path": key.model_path,
        "tiling": asdict(network.tiling),
        "diameter": network.diameter,
        "image_type": network.image_type,
        "stain": network.stain,
        "postprocess": asdict(postprocess),
        "used": used,
    }
