"""The "Segment nuclei" dock widget.

Thin by design: it turns the controls into a :class:`SegmentRequest`, runs
:func:`napari_nuclei_unet.segment.segment_planes` (the CLI's dispatcher) in a napari thread
worker, and writes the results into layers. Predictions are cached so that
post-processing controls re-label live without running the network again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSlider, Label, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from ..errors import Cancelled, nuclei_text
from ..io import channel_axis, take_channel
from ..measure import fingerprint
from ..params import (
    AUTO,
    IMAGE_TYPES,
    STAINS,
    NetworkKey,
    PostprocessParams,
    SegmentParams,
    TilingParams,
    field_metadata,
)
from ..plane import PlanePrediction
from ..postprocess import MAX_UNSURE_SHARE
from ..segment import Segmentation, TimeLapse, recorded_thresholds, segment_planes, segment_time_points
from ._common import (
    DOCK_MAX_WIDTH,
    ModelPicker,
    Relay,
    _unless_closed,
    elide_middle,
    field_control,
    hub_of,
    image_id,
    layer_choices,
    result_metadata,
    scroll_when_docked,
)

if TYPE_CHECKING:
    import napari

CURRENT_PLANE = "current plane"
WHOLE_STACK = "whole stack, plane by plane"  # a time-lapse or separate fields: each plane on its own
Z_STACK = "Z-stack (3D)"  # one 3D labelling: one ID per nucleus through the planes
COLOUR_IMAGE = "all (colour image)"
NO_CHANNEL = "none (Z/T stack)"
# A (C, Y, X) layer with at most this many planes may hold channels rather than a Z/T stack; a (Z or T, C, Y, X)
# layer with at most this many on its second axis holds channels there (ImageJ's hyperstack order).
MAX_CHANNELS = 6
_RGB_NAMES = ("red", "green", "blue", "alpha")
ALL_CHANNELS = (
    -1
)  # the channel choice for "all": a colour image, or a stack (not None: magicgui emits no change for None)
# Debounce for live re-labelling while a slider is dragged, in ms.
RELABEL_DELAY_MS = 150
# The nuclei's measurements are refreshed this long after the last paint, fill or erase of the nuclei layer, for
# layers of up to this many pixels (a 5800 x 5800 image, 128 MB of labels copied and measured per pause); larger
# ones are measured again when re-labelled.
MEASURE_DELAY_MS = 500
MEASURE_AFTER_EDITS_MAX = 2**25
MEASURING = " · measuring the nuclei…"  # added to the status while the table of the nuclei shown is computed


SEGMENT_JOB = "segmenting"
_DEFAULTS = SegmentParams()  # the controls start at the parameter dataclasses' defaults


@dataclass
class SegmentRequest:
    """What one run segments and how; everything the worker needs, no Qt."""

    image: Any  # the layer's 2D plane or stack (numpy, dask, zarr), its nuclear channel when one is picked
    plane: int | None  # index in the stack, or None for a 2D image / the whole stack
    params: SegmentParams
    model_path: str
    source: Any = None  # the layer's data the run was started on
    channel: int | None = None  # the nuclear channel of a multichannel layer; None: all / not multichannel
    channel_axis: int | None = None  # where the layer's channels are (_channel_axis), when one is picked
    pixel_size: float | None = None  # µm per pixel when the layer has a scale, for the measurements

    def network_key(self) -> CacheKey:
        """Runs with equal keys share cached probabilities."""
        return CacheKey(self.model_path, self.params.network_key(), self.channel)


@dataclass(frozen=True)
class CacheKey:
    """The model, the network settings and the nuclear channel: what the cached probabilities were made with."""

    model_path: str
    network: NetworkKey
    channel: int | None


@dataclass
class _Cache:
    """Probabilities of one source layer: ``None`` -> whole 2D image, int -> stack plane."""

    layer: Image
    request: SegmentRequest  # the latest run on them (same layer data and network key): re-labelling repeats it
    outputs: tuple[str, ...]
    model_name: str
    used: dict = field(default_factory=dict)  # what "auto" became in the run (Segmentation.record)
    planes: dict[int | None, PlanePrediction] = field(default_factory=dict)

    @property
    def key(self) -> CacheKey:
        return self.request.network_key()


class SegmentWidget(Container):
    """Segment the nuclei of an image layer into instance and mask Labels layers."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.native.setMaximumWidth(DOCK_MAX_WIDTH)
        scroll_when_docked(self.native)  # scrolls on a short screen: Start stays reachable
        self.viewer = napari_viewer
        self.hub = hub_of(napari_viewer)
        self._create_input_controls()
        self._create_network_controls()
        self._create_postprocess_controls()
        self._lay_out()
        self._create_run_state()
        self._connect()

    def _create_input_controls(self) -> None:
        """The image, its stack and channel, and the model."""
        self.image_layer = ComboBox(
            label="image", choices=self._image_layers, tooltip="2D grey/RGB image or a T/Z stack"
        )
        self.scope = ComboBox(
            label="stack",
            choices=[CURRENT_PLANE, WHOLE_STACK, Z_STACK],
            value=CURRENT_PLANE,
            tooltip="a stack's planes: the one shown, each on its own (time-lapse), or a Z-stack labelled in 3D "
            "(set from the layer's axis labels when they say z or t)",
        )
        self.channel = ComboBox(
            label="nuclear channel",
            choices=self._channel_choices,
            tooltip="for multichannel images: the channel with the nuclear stain (DAPI, Hoechst), guessed when the "
            "image is picked",
        )
        self.model = ModelPicker(self.hub)

    def _create_network_controls(self) -> None:
        """How the network runs: tiles, nucleus size, image type and stain, precision."""
        tiling = _DEFAULTS.tiling
        self.tile_size = field_control(TilingParams, "tile_size", "tile size", tiling.tile_size)
        self.overlap = field_control(TilingParams, "overlap", "tile overlap", tiling.overlap)
        self.auto_diameter = CheckBox(
            text="estimate nucleus diameter",
            value=True,
            tooltip="measure the nuclei first and rescale the image so they match the model's training size",
        )
        self.diameter = field_control(
            SegmentParams,
            "diameter",
            "nucleus diameter (px)",
            0.0,
            enabled=False,
            tooltip="shows the estimate; untick 'estimate' to type your own. 0 = use the image at its own scale",
        )
        self.diameter_unit = ComboBox(
            label="diameter in",
            choices=["px", "µm"],
            value="px",
            enabled=False,
            tooltip="µm: the image layer's scale converts it to pixels (only for layers with a scale)",
        )
        self.image_type = ComboBox(
            label="image type",
            choices=IMAGE_TYPES,
            value=_DEFAULTS.image_type,
            tooltip=_help(SegmentParams, "image_type"),
        )
        self.stain = ComboBox(
            label="stain", choices=STAINS, value=_DEFAULTS.stain, tooltip=_help(SegmentParams, "stain")
        )
        self.tta = CheckBox(text="test-time augmentation (4 network passes)", value=tiling.tta)
        self.int8 = CheckBox(
            text="8-bit network on the CPU (faster)",
            value=tiling.precision == "int8",
            tooltip=_help(TilingParams, "precision") + ". GPUs always run float32",
        )

    def _create_postprocess_controls(self) -> None:
        """From probabilities to nuclei: threshold, size, splitting, confidence."""
        post = _DEFAULTS.postprocess
        self.auto_threshold = CheckBox(text="automatic threshold (Otsu)", value=post.threshold == AUTO)
        self.threshold = field_control(
            PostprocessParams, "threshold", "threshold", 0.5, FloatSlider, enabled=post.threshold != AUTO
        )
        self.min_size = field_control(PostprocessParams, "min_size", "min size (px)", post.min_size)
        self.markers = ComboBox(
            label="split by",
            choices=list(field_metadata(PostprocessParams, "markers")["choices"]),
            value=post.markers,
            tooltip=_help(PostprocessParams, "markers"),
        )
        self.split_h = field_control(PostprocessParams, "h", "split height", post.h)
        self.auto_confidence = CheckBox(
            text="model's min confidence",
            value=post.min_confidence == AUTO,
            tooltip="drop objects the network is unsure of (folds, debris) below the level calibrated for the model on "
            "its own data",
        )
        self.min_confidence = field_control(
            PostprocessParams,
            "min_confidence",
            "min confidence",
            0.0,
            FloatSlider,
            enabled=False,
            tooltip="objects whose mean foreground probability is below this are dropped; 0 keeps every object",
        )

    def _lay_out(self) -> None:
        """The controls in order, the advanced ones last (hidden until asked for)."""
        self.show_probability = CheckBox(text="add probability layer", value=False)
        self.advanced = CheckBox(text="show advanced settings", value=False)
        self._advanced_widgets = [
            self.tile_size,
            self.overlap,
            self.tta,
            self.int8,
            self.markers,
            self.split_h,
            self.show_probability,
        ]
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend(
            [
                self.image_layer,
                self.channel,
                self.scope,
                *self.model.widgets,
                self.auto_diameter,
                self.diameter,
                self.diameter_unit,
                self.image_type,
                self.stain,
                self.auto_threshold,
                self.threshold,
                self.min_size,
                self.auto_confidence,
                self.min_confidence,
                self.run_button,
                self.cancel_button,
                self.status,
                self.advanced,
                *self._advanced_widgets,
            ]
        )

    def _create_run_state(self) -> None:
        """What a run and live re-labelling keep between events."""
        self._cache: _Cache | None = None
        self._running_layer = None  # the image layer the current run segments
        self._adding_results = False  # our own result layers are being added (not an image the user opened)
        self._cancel_event = threading.Event()
        self._worker = None
        self._relabel_worker = None
        self._relabel_again = False
        self._progress = None
        self._relay = Relay()
        self._relay.message.connect(self._on_progress)
        self._relabel_timer = QTimer()
        self._relabel_timer.setSingleShot(True)
        self._relabel_timer.setInterval(RELABEL_DELAY_MS)
        self._relabel_timer.timeout.connect(self.relabel)
        self._painted = None  # the nuclei layer last edited, whose measurements are refreshed when the edits pause
        self._measuring = None
        self._measure_timer = QTimer()
        self._measure_timer.setSingleShot(True)
        self._measure_timer.setInterval(MEASURE_DELAY_MS)
        self._measure_timer.timeout.connect(self._remeasure)
        self.native.destroyed.connect(self._cancel_event.set)  # the window closed: stop a run between tiles

    def _connect(self) -> None:
        """Controls, layers and the job hub wired to the handlers; the first model load."""
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.image_layer.changed.connect(self._guess_channel)
        self.image_layer.changed.connect(self._update_scope)
        self.channel.changed.connect(self._update_scope)
        self.image_layer.changed.connect(self._forget_estimate)
        self.advanced.changed.connect(self._show_advanced)
        self.auto_threshold.changed.connect(lambda value: setattr(self.threshold, "enabled", not value))
        self.auto_diameter.changed.connect(lambda value: setattr(self.diameter, "enabled", not value))
        self.auto_confidence.changed.connect(lambda value: setattr(self.min_confidence, "enabled", not value))
        for control in (
            self.auto_threshold,
            self.threshold,
            self.min_size,
            self.markers,
            self.split_h,
            self.auto_confidence,
            self.min_confidence,
        ):
            control.changed.connect(self._schedule_relabel)
        self.viewer.layers.events.inserted.connect(self.reset_choices)
        self.viewer.layers.events.inserted.connect(self._pick_new_image)
        self.viewer.layers.events.removed.connect(self.reset_choices)
        self.viewer.layers.events.removed.connect(self._stop_if_source_closed)
        self.hub.model_saved.connect(self.model.use_checkpoint_folder)
        self.hub.segment_requested.connect(self.run)
        self.model.on_choice = self._share_model
        self.model.on_loaded = self._show_model_level
        self.reset_choices()
        self._guess_channel()
        self._update_scope()
        self._show_advanced(False)
        self.model.load_async()

    # ------------------------------------------------------------------ inputs
    def _show_model_level(self, checkpoint) -> None:
        """The loaded model's calibrated min confidence, on the slider before the first run (what "auto" will use);
        the diameter controls only for a model that records its training nucleus size (others run images at their own
        scale)."""
        if self.auto_confidence.value:
            with self.min_confidence.changed.blocked():
                self.min_confidence.value = checkpoint.min_confidence
        sized = bool(checkpoint.nucleus_diameter)
        self.auto_diameter.enabled = sized
        self.diameter.enabled = sized and not self.auto_diameter.value
        self.auto_diameter.tooltip = (
            "measure the nuclei first and rescale the image so they match the model's training size"
            if sized
            else f"{checkpoint.name} records no training nucleus size: images are segmented at their own scale"
        )

    def _share_model(self, path: str) -> None:
        """Tell the hub which model is in use, so a fine-tune starts from it."""
        self.hub.segment_model = path

    def _image_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return layer_choices(layer for layer in self.viewer.layers if isinstance(layer, Image))

    def _show_advanced(self, value: bool) -> None:
        for widget in self._advanced_widgets:
            widget.visible = bool(value)

    def _channel_choices(self, _widget=None) -> list[tuple[str, int]]:
        layer = self.image_layer.value
        axis = None if layer is None else _channel_axis(layer)
        if axis is None:
            return [(NO_CHANNEL, ALL_CHANNELS)]
        count = _layer_data(layer).shape[axis]
        if axis == -1:
            return [(COLOUR_IMAGE, ALL_CHANNELS), *((f"channel {i} ({_RGB_NAMES[i]})", i) for i in range(count))]
        channels = [(f"channel {i}", i) for i in range(count)]
        maybe_stack = axis == 0 and _layer_data(layer).ndim == 3  # a few planes: channels, or a short stack
        return [(NO_CHANNEL, ALL_CHANNELS), *channels] if maybe_stack else channels  # else one must be picked

    def _picked_channel(self, layer: Image) -> int | None:
        return self.channel.value if _channel_axis(layer) is not None and self.channel.value != ALL_CHANNELS else None

    def _guess_channel(self, *_) -> None:
        """A new image: offer its channels, and pick the one that looks like a nuclear stain.

        RGB 8-bit images (H&E, brightfield) are segmented in colour; other RGB images,
        (C, Y, X) layers whose first axis is labelled as channels or whose few (up to 4) planes
        look like different stains (``io.planes_look_alike``), (Z, C, Y, X) hyperstacks and (Y, X, 2)
        images (grey + alpha) get their nuclear channel guessed (``io.guess_nuclear_channel``); the
        rest are Z/T stacks.
        """
        from ..io import guess_nuclear_channel, looks_like_channels, middle_plane

        layer = self.image_layer.value
        self.channel.reset_choices()
        axis = None if layer is None else _channel_axis(layer)
        self.channel.visible = axis is not None
        if axis is None:
            return
        data = _layer_data(layer)
        planes = [middle_plane(take_channel(data, axis, i)) for i in range(data.shape[axis])]
        label = str(getattr(layer, "axis_labels", ("",) * data.ndim)[0]).lower()
        named_channels = label in ("c", "ch", "channel", "channels")
        stack = (
            axis == 0
            and data.ndim == 3
            and not named_channels
            and (_stated_stack(layer) != "" or not looks_like_channels(planes))
        )
        if (axis == -1 and data.dtype == np.uint8) or stack:
            self.channel.value = ALL_CHANNELS
            return
        self.channel.value = guess_nuclear_channel(planes)

    def _update_scope(self, *_):
        layer = self.image_layer.value
        stated = _stated_stack(layer) if layer is not None else ""
        if stated:  # the layer, or the file it was opened from, says what its stack is
            self.scope.value = Z_STACK if stated == "z" else WHOLE_STACK
        picked = None if layer is None else self._picked_channel(layer)
        self.scope.enabled = layer is not None and len(_spatial_shape(layer, picked)) == 3
        self.stain.enabled = layer is not None and layer.rgb and picked is None
        self.diameter_unit.enabled = layer is not None and _pixel_size(layer) != 1.0
        if not self.diameter_unit.enabled:
            self.diameter_unit.value = "px"

    def _show_threshold(self, used) -> None:
        """Otsu's threshold, on the slider (one plane; a stack's planes each have their own, in the metadata)."""
        if self.auto_threshold.value and isinstance(used, float):
            with self.threshold.changed.blocked():
                self.threshold.value = used

    def _forget_estimate(self, *_) -> None:
        """Another image: the diameter shown was the previous image's estimate."""
        if self.auto_diameter.value:
            self.diameter.value = 0.0

    def _diameter_in_pixels(self, layer: Image) -> float | None:
        value = float(self.diameter.value)
        if not value:
            return None
        return value / _pixel_size(layer) if self.diameter_unit.value == "µm" else value

    def postprocess_params(self) -> PostprocessParams:
        return PostprocessParams(
            threshold="auto" if self.auto_threshold.value else float(self.threshold.value),
            min_size=int(self.min_size.value),
            markers=self.markers.value,
            h=float(self.split_h.value),
            min_confidence="auto" if self.auto_confidence.value else float(self.min_confidence.value),
        )

    def request(self) -> SegmentRequest:
        """Collect the controls; raises ValueError with a user-facing message."""
        layer = self.image_layer.value
        if layer is None:
            raise ValueError("open an image first (File > Open, or File > Open Sample)")
        source = data = _layer_data(layer)
        time_lapse = _is_time_lapse_of_stacks(layer)  # (T, Z, Y, X): every time point labelled in 3D on its own
        channel = None if time_lapse else self._picked_channel(layer)
        if channel is not None:
            data = take_channel(data, _channel_axis(layer), channel)
        colour = layer.rgb and channel is None
        if data.ndim - (1 if colour else 0) > 3 and not time_lapse:
            raise ValueError(
                f"{layer.name}: {data.ndim}D data; choose a 2D image, a single T/Z stack, or a time-lapse of Z-stacks "
                "(axis labels t, z, y, x)"
            )
        plane = None
        if data.ndim - (1 if colour else 0) == 3 and self.scope.value == CURRENT_PLANE:
            plane = self._current_plane(layer, data.shape[0])
        stack = "tz" if time_lapse else "z" if self.scope.value == Z_STACK else "planes"
        in_3d = stack == "tz" or (stack == "z" and data.ndim - colour == 3)
        params = SegmentParams(
            tiling=TilingParams(
                tile_size=int(self.tile_size.value),
                overlap=int(self.overlap.value),
                device=self.model.device.value,
                tta=bool(self.tta.value),
                precision="int8" if self.int8.value else "float32",
            ),
            postprocess=self.postprocess_params(),
            diameter=AUTO if self.auto_diameter.value else self._diameter_in_pixels(layer),
            image_type=self.image_type.value,
            stain=self.stain.value if colour else "none",
            stack=stack,
            voxel_size=_voxel_size(layer, channel) if in_3d else None,
        )
        pixel_size = _pixel_size(layer) if _pixel_size(layer) != 1.0 else None
        axis = None if channel is None else _channel_axis(layer)
        return SegmentRequest(data, plane, params, self.model.path(), source, channel, axis, pixel_size)

    def _current_plane(self, layer: Image, count: int) -> int:
        position = layer.world_to_data(self.viewer.dims.point)
        return int(np.clip(round(float(position[0])), 0, count - 1))

    # ---------------------------------------------------------------- running
    def run(self, *_) -> None:
        """Start segmenting in a thread worker (one long job at a time in the window)."""
        if self._worker is not None:
            return
        layer = self.image_layer.value
        try:
            request = self.request()
        except ValueError as error:
            show_error(f"Segment nuclei: {error}")
            return
        if not self.hub.start_or_wait(SEGMENT_JOB, self.run, lambda text: setattr(self.status, "value", text)):
            return
        self._cancel_event.clear()
        self._running_layer = layer
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"segmenting {layer.name}…"
        started = time.perf_counter()  # the status says how long the user waited, layers written included
        self._progress = cancelable_progress(  # a long name would push the activity dialog's Cancel out of view
            total=0, desc=f"Segmenting {elide_middle(layer.name)}", cancel_callback=self.cancel
        )
        cache = self._cache if self._cache_matches(layer, request) else None
        worker = _segment_worker(
            request,
            self.model,
            cache.planes if cache else {},
            self._cancel_event.is_set,
            lambda done, total: self._relay.message.emit((done, total)),
        )
        worker.returned.connect(
            lambda result: _unless_closed(self._on_segmented, layer, request, result, started)
        )  # the window may be closed by then
        worker.errored.connect(lambda error: _unless_closed(self._on_error, error))
        worker.finished.connect(lambda: _unless_closed(self._on_finished))
        self._worker = worker
        worker.start()

    def cancel(self, *_) -> None:
        """Stop between tiles; no layer is touched."""
        self._cancel_event.set()
        self.status.value = "cancelling…"

    def _pick_new_image(self, event) -> None:
        """An image the user opens is the one Segment works on next (not the one picked before it)."""
        layer = getattr(event, "value", None)
        if isinstance(layer, Image) and not self._adding_results and layer in self.viewer.layers:
            self.image_layer.value = layer

    def _stop_if_source_closed(self, event) -> None:
        """The image being segmented was closed: stop the run at the next tile, instead of finishing it for nothing."""
        if self._worker is not None and getattr(event, "value", None) is self._running_layer:
            self._cancel_event.set()
            self.status.value = "stopping: the image layer being segmented was closed"

    def _on_progress(self, message: tuple[int, int]) -> None:
        done, total = message
        if self._progress is not None:
            if self._progress.total != total:
                self._progress.total = total
            self._progress.update(done - self._progress.n)

    def _on_error(self, error: Exception) -> None:
        if isinstance(error, Cancelled):
            closed = self._running_layer is not None and self._running_layer not in self.viewer.layers
            self.status.value = "stopped: the image layer was closed" if closed else "cancelled; layers unchanged"
            show_info("Segment nuclei: cancelled; no layers were changed")
        else:
            self.status.value = f"failed: {error}"
            show_error(f"Segment nuclei: {error}")

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._worker = self._running_layer = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        _unless_closed(self.hub.finish, SEGMENT_JOB)

    def _cache_matches(self, layer: Image, request: SegmentRequest) -> bool:
        cache = self._cache
        return (
            cache is not None
            and cache.layer is layer
            and cache.request.source is request.source
            and cache.key == request.network_key()
        )

    def _on_segmented(self, layer: Image, request: SegmentRequest, outcome: tuple, started: float) -> None:
        checkpoint, result, device = outcome
        if layer not in self.viewer.layers or _layer_data(layer) is not request.source:
            what = "closed" if layer not in self.viewer.layers else "given new data"
            self.status.value = (
                f"result discarded: the image layer '{elide_middle(layer.name)}' was {what} during the run"
            )
            show_warning(f"Segment nuclei: {self.status.value}")
            return
        used = {**result.record(), "channel": request.channel, "channel_axis": request.channel_axis}
        if not self._cache_matches(layer, request):
            self._cache = _Cache(layer, request, checkpoint.outputs, checkpoint.name)
        self._cache.used, self._cache.request = used, request
        self._cache.planes.update({i: p.prediction for i, p in result.planes.items() if p.prediction is not None})
        labelled = {i: (p.mask, p.labels) for i, p in result.planes.items()}
        written, counted = _counted(self._write_layers(labelled, request.params.postprocess, used), used.get("stack"))
        if self.auto_confidence.value:
            with self.min_confidence.changed.blocked():  # shown (untick to override); the labels already use it
                self.min_confidence.value = result.min_confidence
        self._show_threshold(used["threshold"])
        diameter, factor, seconds = result.diameter, result.factor, time.perf_counter() - started
        if request.params.diameter == AUTO and diameter is not None:  # shown; untick 'estimate' to override
            self.diameter.value = round(diameter * (_pixel_size(layer) if self.diameter_unit.value == "µm" else 1.0), 2)
        size = (
            ""
            if diameter is None
            else f"; nuclei ~{diameter:.0f} px{' (estimated)' if request.params.diameter == AUTO else ''}"
        )
        detected = " (detected)" if request.params.image_type == AUTO else ""
        size += f"; {used['image_type']}{detected}" + (f", {used['stain']} channel" if used["stain"] != "none" else "")
        speed = (
            f" ({result.megapixels / max(seconds, 1e-9):.3g} MP/s)"
            if result.megapixels
            else " (from cached probabilities)"
        )
        self.status.value = (
            f"{counted} in {seconds:.1f} s{speed} on {device}{size}"
            + (f", rescaled x{factor:.2f}" if factor != 1.0 else "")
        ) + _unsure_warning(written, result.unsure, result.min_confidence)
        self._measure(_measured_labels(result), result.volume)
        if self.postprocess_params() != request.params.postprocess:  # a control changed during the run
            self.relabel()

    # ------------------------------------------------------------- re-labelling
    def _schedule_relabel(self, *_) -> None:
        if self._worker is not None:
            self.status.value = "segmenting…; the changed settings are applied when the run finishes"
            return
        self._relabel_timer.start()

    def relabel(self, *_) -> None:
        """Re-run post-processing on the cached probabilities (no network), in a worker; the newest settings win."""
        cache = self._cache
        if cache is not None and cache.used.get("stack") == "tz" and cache.layer in self.viewer.layers:
            self.status.value = (
                "a time-lapse of Z-stacks is not re-labelled live: press Segment to apply these settings"
            )
            return
        if cache is None or cache.layer not in self.viewer.layers or not cache.planes:
            return
        if self._relabel_worker is not None:
            self._relabel_again = True
            return
        nuclei = f"{cache.layer.name} nuclei"
        if nuclei in self.viewer.layers and is_edited(self.viewer.layers[nuclei]):
            self.status.value = (
                f"not re-labelled: '{elide_middle(nuclei)}' has your edits. Press Segment to apply these settings "
                f"(fast, from cached probabilities); your edited layer is then kept as '… nuclei (edited)'"
            )
            return
        self.status.value = "re-labelling from cached probabilities…"
        run = cache.request
        request = replace(run, params=replace(run.params, postprocess=self.postprocess_params()))
        worker = _relabel_worker(request, self.model, dict(cache.planes))
        worker.returned.connect(lambda result: _unless_closed(self._on_relabelled, result))
        worker.errored.connect(lambda error: _unless_closed(self._on_error, error))
        worker.finished.connect(lambda: _unless_closed(self._on_relabel_finished))
        self._relabel_worker = worker
        worker.start()

    def _on_relabelled(self, result: Segmentation) -> None:
        labelled, params = result.planes, result.params.postprocess
        thresholds = recorded_thresholds(plane.threshold for plane in labelled.values())
        used = {**self._cache.used, "threshold": thresholds, "min_confidence": float(params.min_confidence)}
        maxima = self._write_layers({i: (p.mask, p.labels) for i, p in labelled.items()}, params, used)
        count, counted = _counted(maxima, used.get("stack"))
        unsure = sum(p.unsure for p in labelled.values())
        self._show_threshold(thresholds)
        self.status.value = f"{counted} (re-labelled from cached probabilities)" + _unsure_warning(
            count, unsure, float(params.min_confidence)
        )
        self._measure(_measured_labels(result), result.volume)

    def _on_relabel_finished(self) -> None:
        self._relabel_worker = None
        if self._relabel_again:
            self._relabel_again = False
            self.relabel()

    # ------------------------------------------------------------------ output
    def _write_layers(self, labelled: dict, params: PostprocessParams, used: dict) -> list[int]:
        """Write planes ``{index: (mask, labels)}`` into the result layers; returns each plane's highest label. The
        nuclei layer's ``features`` table is emptied: its nuclei are measured once they are shown (``_measure``)."""
        self._adding_results = True
        try:
            return self._write_result_layers(labelled, params, used)
        finally:
            self._adding_results = False

    def _write_result_layers(self, labelled: dict, params: PostprocessParams, used: dict) -> int:
        cache = self._cache
        source = cache.layer
        shape = _spatial_shape(source, cache.request.channel)
        axes = _spatial_axes(source, cache.request.channel)
        metadata = result_metadata(cache.model_name, cache.key, params, used, image_id(source))
        metadata["pixel_size"] = cache.request.pixel_size  # µm, for measurements made without the widget
        layers = {}
        for suffix, position, dtype in (("nuclei", 1, np.int32), ("mask", 0, np.uint8)):
            layer = layers[suffix] = self._result_layer(source, suffix, Labels, shape, dtype, axes)
            data = layer.data
            for index, planes in labelled.items():
                target = data if index is None else data[index]
                if planes[position] is not None:
                    target[...] = planes[position]
            layer.metadata["nuclei_unet"] = {**metadata, "edited": False, "written": fingerprint(layer.data)}
            layer.refresh()
        maxima = [int(labels.max()) for _mask, labels in labelled.values()]
        if self.show_probability.value:
            layer = self._result_layer(source, "probability", Image, shape, np.float32, axes)
            for index in labelled:
                target = layer.data if index is None else layer.data[index]
                if index in cache.planes:  # planes done block by block keep no probabilities
                    target[...] = cache.planes[index].probabilities[cache.outputs.index("foreground")]
            layer.metadata["nuclei_unet"] = metadata
            layer.refresh()
        layers["nuclei"].features = {}  # no stale table: measured again once shown, unless planes are labelled alone
        layers["nuclei"].selected_label = max(maxima, default=0) + 1  # the brush paints a new nucleus
        self.viewer.layers.selection.active = layers["nuclei"]  # what a user paints next (the mask layer is hidden)
        return maxima

    def _result_layer(self, source: Image, suffix: str, kind: type, shape: tuple, dtype, axes: list[int]) -> Any:
        """The layer ``"<image> <suffix>"``, reused when it fits; a hand-edited one is kept under a new name.
        It takes the scale and translation of the image layer's ``axes`` (:func:`_spatial_axes`)."""
        name = f"{source.name} {suffix}"
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        if existing is not None and (
            not isinstance(existing, kind) or existing.data.shape != shape or existing.data.dtype != dtype
        ):
            existing.name = f"{name} (previous)"
            existing = None
        if existing is not None and is_edited(existing):
            existing.name = f"{name} (edited)"
            show_warning(f"Kept your edited layer as '{existing.name}'; new results are in '{name}'")
            existing = None
        scale, translate = [source.scale[i] for i in axes], [source.translate[i] for i in axes]
        if existing is not None:
            existing.scale, existing.translate = scale, translate
            return existing
        data = np.zeros(shape, dtype)
        common = dict(name=name, scale=scale, translate=translate)
        if kind is Image:
            return self.viewer.add_image(data, colormap="magma", blending="additive", contrast_limits=(0, 1), **common)
        layer = self.viewer.add_labels(data, opacity=0.5 if suffix == "mask" else 0.7, **common)
        if suffix == "mask":
            layer.visible = False
        if hasattr(layer.events, "paint"):
            layer.events.paint.connect(lambda *_: self._on_painted(layer, suffix))
        return layer

    def _on_painted(self, layer: Labels, suffix: str) -> None:
        """A result layer edited with napari's tools: it is never overwritten; the nuclei's measurements follow the
        edits once they pause (``MEASURE_DELAY_MS``), so an export carries the corrected nuclei's."""
        layer.metadata.setdefault("nuclei_unet", {}).update(edited=True)
        if suffix == "nuclei":
            self._painted = layer
            self._measure_timer.start()

    def _remeasure(self) -> None:
        """The edited nuclei layer's features table, measured again in a thread on the image it was segmented on."""
        layer, cache = self._painted, self._cache
        if layer is None or layer not in self.viewer.layers or cache is None or cache.layer not in self.viewer.layers:
            return
        if layer.name != f"{cache.layer.name} nuclei" or not layer.metadata.get("nuclei_unet", {}).get("measured"):
            return  # no table to keep up to date
        if layer.data.size > MEASURE_AFTER_EDITS_MAX:
            return
        labels = np.array(layer.data)
        self._start_measuring(layer, labels, fingerprint(labels), cache.used.get("stack") == "z")

    def _measure(self, labels: np.ndarray | None, volume: bool) -> None:
        """Measure the nuclei just written and shown (``labels``: a 2D image's or a Z-stack's; None for planes labelled
        each on their own, which get no table), in a thread: the user sees the labels without waiting for it."""
        layer = self.viewer.layers[f"{self._cache.layer.name} nuclei"]
        meta = layer.metadata["nuclei_unet"]
        meta["measured"] = labels is not None
        if labels is not None:
            self._start_measuring(layer, labels, meta["written"], volume)

    def _start_measuring(self, layer: Labels, labels: np.ndarray, digest: str, volume: bool) -> None:
        """The features table of ``labels`` (``digest``: their fingerprint), set on ``layer`` if it still holds them
        when measured: a table that a later re-labelling or edit outdated is dropped."""
        request = self._cache.request
        worker = _measure_worker(labels, request.image, request.pixel_size, volume, request.params)
        worker.returned.connect(lambda features: _unless_closed(self._set_features, layer, features, digest))
        shown = self.status.value.removesuffix(MEASURING)
        self.status.value = shown + MEASURING
        worker.finished.connect(lambda: _unless_closed(self._on_measured, worker, shown))
        self._measuring = worker  # the latest measurement, while it runs
        worker.start()

    def _set_features(self, layer: Labels, features: dict | None, digest: str) -> None:
        if features is not None and layer in self.viewer.layers and fingerprint(layer.data) == digest:
            layer.features = features
            layer.metadata["nuclei_unet"]["table"] = digest  # the labels it describes: exports check it

    def _on_measured(self, worker, shown: str) -> None:
        """A measurement ended: the status it extended says no more that the table is coming."""
        if self.status.value == shown + MEASURING:
            self.status.value = shown
        if self._measuring is worker:
            self._measuring = None


def is_edited(layer) -> bool:
    """Whether a result layer holds edits: painted, or its data changed in any other way (the console, a
    script, another plugin) since the widget wrote it. Such a layer is never overwritten."""
    meta = layer.metadata.get("nuclei_unet", {})
    return bool(meta.get("edited")) or ("written" in meta and fingerprint(layer.data) != meta["written"])


def _layer_data(layer: Image):
    return layer.data[0] if layer.multiscale else layer.data


def _channel_axis(layer: Image) -> int | None:
    """Where a layer's channels may be: -1 for RGB(A); 0 for a (C, Y, X) layer of a few planes; 1 for a
    (Z or T, C, Y, X) hyperstack of a few channels, 0 for a (C, Z, Y, X) one; 2 for a (Y, X, 2) layer (grey +
    alpha, two stains, ``io.channel_axis``); None: none."""
    if layer.rgb:
        return -1
    data = _layer_data(layer)
    if data.ndim == 3 and data.shape[0] <= MAX_CHANNELS:
        return 0
    if data.ndim == 4 and _is_time_lapse_of_stacks(layer):  # (T, Z, Y, X): no channels, however few planes
        return None
    if data.ndim == 4:  # ImageJ's order (Z or T, C, Y, X), else OME's (C, Z, Y, X); the layer's axis labels say first
        labels = [str(label).lower() for label in getattr(layer, "axis_labels", ())]
        named = [i for i, label in enumerate(labels[:2]) if label in ("c", "ch", "channel", "channels")]
        few = [i for i in (1, 0) if data.shape[i] <= MAX_CHANNELS]
        return (named or few or [None])[0]
    return channel_axis(data, "")


def _spatial_axes(layer: Image, channel: int | None = None) -> list[int]:
    """The layer's axes (as its scale counts them) that the result layers have: all but the channel axis when one
    channel was segmented (an RGB layer's colour axis is not one of its axes)."""
    axis = None if channel is None or layer.rgb else _channel_axis(layer)
    return [i for i in range(layer.ndim) if i != axis]


def _spatial_shape(layer: Image, channel: int | None = None) -> tuple[int, ...]:
    """Shape of the result layers: the layer's, less its colour axis or its channel axis when one channel was
    segmented."""
    data = _layer_data(layer)
    if layer.rgb:
        return tuple(data.shape[:-1])
    return tuple(data.shape[i] for i in _spatial_axes(layer, channel))


def _help(owner: type, name: str) -> str:
    return field_metadata(owner, name).get("help", "")


@thread_worker(ignore_errors=True)  # errors are shown as notifications by the widget
def _segment_worker(
    request: SegmentRequest, model: ModelPicker, cached: dict, cancel, progress
) -> tuple[object, Segmentation | TimeLapse, str]:
    """The core's dispatcher on the requested planes, reusing cached predictions."""
    from ..devices import resolve_device

    checkpoint = model.checkpoint(request.model_path)
    planes = None if request.plane is None else [request.plane]
    if request.params.stack == "tz":  # no cache: each time point is segmented again
        result = segment_time_points(checkpoint, request.image, request.params, progress=progress, cancel=cancel)
    else:
        result = segment_planes(
            checkpoint, request.image, request.params, planes_to_do=planes, cached=cached, progress=progress,
            cancel=cancel,
        )  # fmt: skip
    tiling = request.params.tiling
    return checkpoint, result, checkpoint.device_line(resolve_device(tiling.device), tiling)


@thread_worker(ignore_errors=True)  # errors are shown as notifications by the widget
def _relabel_worker(request: SegmentRequest, model: ModelPicker, cached: dict) -> Segmentation:
    """The dispatcher again on the cached planes with new post-processing: the network does not run."""
    checkpoint = model.checkpoint(request.model_path)
    planes = None if list(cached) == [None] else sorted(cached)
    return segment_planes(checkpoint, request.image, request.params, planes_to_do=planes, cached=cached)


def _measured_labels(result: Segmentation | TimeLapse) -> np.ndarray | None:
    """The labels a segmentation's measurements table describes: a 2D image's, or a Z-stack's in 3D; None for
    planes (or the Z-stacks of a time-lapse) labelled each on their own, whose nuclei are numbered from 1 in each."""
    if not result.volume and list(result.planes) != [None]:
        return None
    return result.labels if result.volume else result.planes[None].labels


def _features(labels, image, pixel_size: float | None, volume: bool, voxel_size) -> dict:
    """The measurements of a 2D image's nuclei (``measure.measure``) or of a Z-stack's in 3D (``measure_volume``:
    volume, z/y/x centroid, first and last plane), as a napari features table: the label as ``index``, napari's key,
    and not again as ``label``. µm columns when ``pixel_size`` (µm per x pixel) is known: a Z-stack's ``voxel_size``
    (the scale it was segmented with, in any one unit) is converted through it."""
    from ..measure import measure, measure_volume, voxel_in_micrometres

    if volume:
        grey = np.asarray(image) if len(image.shape) == 3 else None  # the intensity of a grey stack
        table = measure_volume(labels, grey, voxel_in_micrometres(voxel_size, pixel_size))
    else:
        table = measure(labels, image, pixel_size)
    return {"index": table.pop("label"), **table}


@thread_worker(ignore_errors=True)  # a table that cannot be measured stays empty or as it was
def _measure_worker(labels: np.ndarray, image, pixel_size: float | None, volume: bool, params) -> dict | None:
    if volume != (labels.ndim == 3) or labels.shape != tuple(image.shape[: labels.ndim]):
        return None
    return _features(labels, image, pixel_size, volume, params.voxel_size if volume else None)


def _voxel_size(layer: Image, channel: int | None = None) -> tuple[float, float, float] | None:
    """A Z-stack layer's (z, y, x) scale, when it has one (napari's default scale of 1 says nothing), else the voxel
    size of the file it was opened from; a hyperstack's without its channel axis."""
    scale = tuple(float(layer.scale[i]) for i in _spatial_axes(layer, channel)[-3:])
    return _source_metadata(layer)[1] if scale == (1.0, 1.0, 1.0) else scale


def _stated_stack(layer: Image) -> str:
    """What the layer's first axis is as its axis label says ("z" or "t"), else as the file it was opened from says
    (ImageJ / OME axes, ``io.file_stack``); "" when neither says."""
    label = str(getattr(layer, "axis_labels", ("",))[0]).lower()
    if label in ("z", "t", "time"):
        return label[0]
    return {"z": "z", "planes": "t"}.get(_source_metadata(layer)[0], "")


def _is_time_lapse_of_stacks(layer: Image) -> bool:
    """Whether a 4D layer is (T, Z, Y, X), as its axis labels or the file it was opened from say."""
    if layer.ndim != 4 or layer.rgb:
        return False
    labels = [str(label).lower()[:1] for label in getattr(layer, "axis_labels", ())[:2]]
    return labels == ["t", "z"] or _source_metadata(layer)[0] == "tz"


def _source_metadata(layer: Image) -> tuple[str, tuple[float, float, float] | None, float | None]:
    """``(stack, voxel size, pixel size)`` as the TIFF or zarr the layer was opened from states them: napari's own
    TIFF reader keeps neither the axes nor the calibration. ``("auto", None, None)`` for a layer of no such file."""
    from pathlib import Path

    from ..io import TIFF_READ_SUFFIXES

    path = getattr(getattr(layer, "source", None), "path", None)
    suffix = Path(str(path)).suffix.lower()
    if not path or not (suffix in TIFF_READ_SUFFIXES or suffix == ".zarr") or not Path(path).exists():
        return AUTO, None, None
    return _file_metadata(str(path), Path(path).stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _file_metadata(path: str, _modified: int) -> tuple[str, tuple[float, float, float] | None, float | None]:
    from ..io import file_pixel_size, file_stack

    stack, voxel_size = file_stack(path)
    return stack, voxel_size, file_pixel_size(path)


def _pixel_size(layer: Image) -> float:
    """The layer's pixel size along x in µm: its scale in its unit when that is a length (napari's ``units``), or a
    scale other than 1 in napari's default unit (microscopy images are scaled in µm); else the one the file it was
    opened from states; 1 when nothing says."""
    scale = float(layer.scale[-1])
    unit = getattr(layer, "units", None)
    if unit is not None and str(unit[-1]) != "pixel":
        try:
            return scale * float((1 * unit[-1]).to("micrometer").magnitude)
        except Exception:  # noqa: BLE001 (pint: a unit that is not a length)
            return scale
    if scale == 1.0:
        return _source_metadata(layer)[2] or 1.0
    return scale


def _counted(maxima: list[int], stack: str | None) -> tuple[int, str]:
    """The nucleus count of written planes (their highest labels) and how the status line says it: a Z-stack's IDs
    run through its planes; planes labelled each on their own (a time-lapse) are counted per plane, and the Z-stacks
    of a time-lapse of them per time point."""
    if stack == "tz":
        total = sum(maxima)
        return total, (
            f"{nuclei_text(total)} in {len(maxima)} time points ({min(maxima)}-{max(maxima)} per time point, each "
            "labelled in 3D on its own: IDs restart at 1; no tracking)"
        )
    if stack == "z":
        return max(maxima, default=0), f"{nuclei_text(max(maxima, default=0))} in 3D ({len(maxima)} planes)"
    if len(maxima) <= 1:
        return max(maxima, default=0), nuclei_text(max(maxima, default=0))
    total = sum(maxima)
    return total, (
        f"{nuclei_text(total)} in {len(maxima)} planes ({min(maxima)}-{max(maxima)} per plane; each plane labelled on "
        "its own, so IDs restart at 1 in every plane: no tracking)"
    )


def _unsure_warning(kept: int, unsure: int, level: float) -> str:
    """A sentence for the status line when the min confidence dropped ``postprocess.MAX_UNSURE_SHARE`` of the
    objects or more (in 2D, as many as it may): the image is unlike what the model knows (an unfamiliar stain
    such as H-DAB, or modality)."""
    if unsure == 0 or unsure < int(MAX_UNSURE_SHARE * (kept + unsure)):
        return ""
    return (
        f". Warning: the model is unsure of many objects here ({unsure} dropped below its min confidence {level:g}; "
        f"in 2D it drops {MAX_UNSURE_SHARE:.0%} at most): this image is unlike what it knows. Untick "
        '"model\'s min confidence" to see them all, or correct a few and fine-tune'
    )
