"""Pieces shared by the plugin's widgets: the model picker and result metadata."""

from __future__ import annotations

import sys
import threading
from dataclasses import asdict
from pathlib import Path

from magicgui.widgets import ComboBox, FileEdit, Label
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from ..model import Checkpoint, available_devices, resolve_model_path
from ..postprocess import PostprocessParams

BUNDLED = "bundled default"
FROM_FILE = "from file…"


def avoid_triton_llvm_clash() -> None:
    """Keep torch from importing triton into a process that already renders with Mesa's LLVM.

    torchvision (under segmentation-models-pytorch) imports ``torch._dynamo``, which imports
    triton; loading triton's bundled LLVM next to the ``libLLVM`` that Mesa's llvmpipe
    has mapped for napari's canvas crashes the process (segfault, seen with Mesa 22 and
    triton 3). triton only serves ``torch.compile``, which the plugin does not use, so in
    that case torch is told it is absent. Processes without Mesa's LLVM keep triton.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            mesa_llvm = any("libLLVM" in line for line in maps)
    except OSError:
        return
    if mesa_llvm:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError


class ModelPicker:
    """Model source (bundled or a file), a one-line summary, and the device; loads lazily, off the GUI thread.

    Checkpoint folders are picked through their ``model.safetensors`` or ``config.json``;
    a plain ``.pth`` state_dict of an ``smp.Unet`` works too.
    """

    def __init__(self):
        avoid_triton_llvm_clash()
        import segmentation_models_pytorch  # noqa: F401  (once, here, rather than racing in workers)

        self.source = ComboBox(label="model", choices=[BUNDLED, FROM_FILE], value=BUNDLED)
        self.file = FileEdit(label="model file", mode="r", filter="*.safetensors *.json *.pth *.pt *.ckpt *.bin", visible=False)
        self.summary = Label(label="", value="loading model…")
        self.summary.native.setWordWrap(True)
        self.device = ComboBox(label="device", choices=available_devices(), value="auto", tooltip="auto: CUDA, then Apple MPS, then CPU")
        self.widgets = [self.source, self.file, self.summary, self.device]
        self._loaded: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()
        self.source.changed.connect(self._on_source)
        self.file.changed.connect(lambda *_: self.load_async())
        self.device.changed.connect(lambda *_: self._show_summary())

    def path(self) -> str:
        """``'default'`` or the chosen file; raises ValueError when 'from file' has none."""
        if self.source.value == BUNDLED:
            return "default"
        chosen = str(self.file.value or "")
        if chosen in ("", "."):
            raise ValueError("choose a model file (a checkpoint's model.safetensors / config.json, or a .pth state_dict)")
        return chosen

    def checkpoint(self, path: str) -> Checkpoint:
        """The loaded checkpoint for ``path`` (thread-safe; loads once)."""
        with self._lock:
            if path not in self._loaded:
                self._loaded[path] = Checkpoint.load(resolve_model_path(path))
            return self._loaded[path]

    def use_checkpoint_folder(self, folder) -> None:
        """Switch to a (new or re-written) checkpoint folder and load it."""
        chosen = str(Path(folder) / "model.safetensors")
        with self._lock:
            self._loaded.pop(chosen, None)
        self.source.value = FROM_FILE
        self.file.value = chosen
        self.load_async()

    def load_async(self) -> None:
        """Load the chosen model in a worker and show its summary; errors become notifications."""
        try:
            path = self.path()
        except ValueError:
            self.summary.value = "choose a model file"
            return
        self.summary.value = "loading model…"
        worker = thread_worker(self._load_and_prepare, ignore_errors=True)(path, self.device.value)
        worker.returned.connect(lambda _: _unless_closed(self._show_summary))
        worker.errored.connect(lambda error: _unless_closed(self._on_error, error))
        worker.start()
        self._load_worker = worker  # keep a reference while it runs

    def _load_and_prepare(self, path: str, device: str) -> Checkpoint:
        """Load the model and, on the CPU, export (and quantise) its network now, so the first
        Segment does not spend ~3 s on it. An export problem is reported when segmenting."""
        from ..model import resolve_device
        from ..onnx_backend import cpu_network

        checkpoint = self.checkpoint(path)
        try:
            on_cpu = resolve_device(device).type == "cpu"
        except Exception:  # a device that vanished: the summary says so
            on_cpu = False
        if on_cpu:
            cpu_network(checkpoint.model.eval(), checkpoint.config.in_channels)
        return checkpoint

    def _on_source(self, value: str) -> None:
        self.file.visible = value == FROM_FILE
        self.load_async()

    def _show_summary(self) -> None:
        from ..model import resolve_device
        from ..onnx_backend import describe_device

        try:
            checkpoint = self._loaded.get(self.path())
        except ValueError:
            return
        if checkpoint is None:
            return
        try:
            device = describe_device(resolve_device(self.device.value))
        except Exception as error:  # a device that vanished (e.g. eGPU unplugged)
            device = f"unavailable ({error})"
        self.summary.value = f"{checkpoint.summary()} | runs on {device}"

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


def result_metadata(model_name: str, network_key: tuple, postprocess: PostprocessParams) -> dict:
    """What produced a result layer, stored in ``layer.metadata['nuclei_unet']``."""
    model_path, tiling, diameter, stain = network_key
    return {
        "model": model_name,
        "model_path": model_path,
        "tiling": tiling,
        "diameter": diameter,
        "stain": stain,
        "postprocess": asdict(postprocess),
    }
