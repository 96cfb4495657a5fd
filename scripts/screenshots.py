"""Take the user guide's screenshots of the real napari window (run under xvfb on a headless machine).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py [--out docs/images]

Each picture is the whole window (``viewer.screenshot(canvas_only=False)``) after driving
the widgets the way a user would, in a 1600 x 1000 window. The last ones open real DSB2018
images by file (64-character names, as DSB2018's are), an H&E-stained one and a fluorescence
one, segment them with the defaults with both widgets docked, at 1280 x 800 and 1600 x 1000 (and the fluorescence
one saved blue on black),
and show the Fine-tune tab after Add pair; then a Z-stack labelled in 3D and a time-lapse labelled
frame by frame (they need ``../shared/data/dsb2018``; skipped without it). With ``--volumes A.tif B.tif``
(real Z-stacks, ZYX, of one shape; ``--z-step`` their z step in pixels): the last one opened by file with its 3D
measurements, and all of them as one time-lapse of Z-stacks (docs/user-guide.md names the files used).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import warnings
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-nuclei-unet"
DSB2018 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "images"
# DSB2018 val images: stained tissue (H&E-like) and fluorescence.
DSB_TISSUE = "4193474b2f1c72f735b13633b219d9cabdd43c21d9c2bb4dfc4809f104ba4c06"
DSB_FLUORESCENCE = "0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9"
WINDOW_SIZES = ((1280, 800), (1600, 1000))
# The bioimage.io Model Zoo's "UNet 2D Nuclei Broad" package (a foreign model: it segments, but cannot be fine-tuned).
ZOO_PACKAGE = Path(__file__).resolve().parents[2] / "shared" / "models" / "unet2d_nuclei_broad"
# Layer names of the volume views, 64 characters long as real file names can be.
VOLUME_NAME = "mouse_embryo_H2B-mRFP1_nuclei_confocal_zstack_opened_from_file01"
TIME_LAPSE_NAME = "mouse_embryo_H2B-mRFP1_nuclei_confocal_timelapse_of_zstacks_tp01"
warnings.filterwarnings("ignore", message=".*PyQt5.*")  # keep napari's deprecation toast out of the pictures


def wait_for(widget, condition, seconds: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        QApplication.processEvents()
        if time.monotonic() > deadline:
            raise TimeoutError("the widget did not finish in time")
        time.sleep(0.02)
    for _ in range(20):
        QApplication.processEvents()


def segment(widget) -> None:
    """Segment, and wait until the nuclei are shown and measured (the table follows them)."""
    widget.run()
    wait_for(widget, lambda: widget._worker is None and widget._measuring is None)


def save(viewer, path: Path, bottom: bool = False) -> None:
    from qtpy.QtWidgets import QScrollArea

    for dock in viewer.window._qt_window.findChildren(QScrollArea):  # the docked widgets, scrolled to their top
        bar = dock.verticalScrollBar()
        bar.setValue(bar.maximum() if bottom else 0)  # or to the bottom, where the status line is
    for _ in range(10):
        QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False)
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    parser.add_argument("--dsb-only", action="store_true", help="only the DSB2018 views at both window sizes")
    parser.add_argument("--zoo-only", action="store_true", help="only the Model Zoo package views at both window sizes")
    parser.add_argument("--stacks-only", action="store_true", help="only the Z-stack and time-lapse views")
    parser.add_argument("--tint-only", action="store_true", help="only the pseudo-coloured fluorescence view")
    parser.add_argument("--volume-only", action="store_true", help="only the views of --volumes")
    parser.add_argument("--volumes", nargs="*", type=Path, default=[], help="real Z-stacks (ZYX) for the volume views")
    parser.add_argument("--z-step", type=float, default=1.0, help="the z step of --volumes, in pixels")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = {
        "dsb_only": dsb_views,
        "zoo_only": zoo_views,
        "stacks_only": stack_views,
        "tint_only": tint_views,
        "volume_only": functools.partial(volume_file_views, volumes=args.volumes, z_step=args.z_step),
    }
    if args.volume_only and not args.volumes:
        parser.error("--volume-only needs --volumes")
    chosen = [views for flag, views in only.items() if getattr(args, flag)]
    if chosen:
        for size in WINDOW_SIZES:
            for views in chosen:
                views(out, size)
        return

    viewer = napari.Viewer(title="napari-nuclei-unet")
    viewer.window._qt_window.resize(1600, 1000)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    wait_for(widget, lambda: "runs on" in widget.model.summary.value or "could not" in widget.model.summary.value)

    # 1. The generated sample, segmented with the defaults (one click).
    viewer.open_sample(PLUGIN, "synthetic_nuclei")
    widget.image_layer.value = viewer.layers["synthetic nuclei"]
    save(viewer, out / "01-sample-and-widget.png")
    segment(widget)
    viewer.layers.selection.active = viewer.layers["synthetic nuclei nuclei"]
    save(viewer, out / "02-segmented-sample.png")

    # 2. Tuning post-processing live: the probability layer and a stricter split.
    widget.show_probability.value = True
    segment(widget)  # cached: only adds the probability layer
    viewer.layers["synthetic nuclei nuclei"].visible = False
    viewer.layers["synthetic nuclei probability"].opacity = 1.0
    save(viewer, out / "03-probability.png")
    viewer.layers["synthetic nuclei nuclei"].visible = True
    viewer.layers["synthetic nuclei probability"].visible = False
    viewer.layers.selection.active = viewer.layers["synthetic nuclei nuclei"]
    widget.split_h.value = 2.0
    wait_for(widget, lambda: "re-labelled" in widget.status.value)
    save(viewer, out / "04-tuned-split.png")
    widget.split_h.value = 0.5
    wait_for(
        widget,
        lambda: widget._relabel_worker is None and not widget._relabel_timer.isActive() and widget._measuring is None,
    )

    # 3. Correcting with napari's label tools: paint mode on the nuclei layer, zoomed in.
    nuclei = viewer.layers["synthetic nuclei nuclei"]
    viewer.layers.selection.active = nuclei
    nuclei.mode = "paint"
    nuclei.brush_size = 6
    nuclei.selected_label = int(nuclei.data.max()) + 1
    viewer.camera.center = (0, 190, 250)
    viewer.camera.zoom = viewer.camera.zoom * 2.2
    save(viewer, out / "05-correct-labels.png")
    nuclei.mode = "pan_zoom"
    viewer.reset_view()

    # 4. A real brightfield tissue image (scikit-image's immunohistochemistry sample).
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.open_sample(PLUGIN, "immunohistochemistry")
    widget.image_layer.value = viewer.layers["immunohistochemistry"]
    widget.show_probability.value = False  # the defaults: image type and stain "auto"
    segment(widget)
    viewer.layers.selection.active = viewer.layers["immunohistochemistry nuclei"]
    save(viewer, out / "06-immunohistochemistry.png")
    count = int(np.max(viewer.layers["immunohistochemistry nuclei"].data))
    print(f"immunohistochemistry: {count} nuclei; status: {widget.status.value}")

    # 5. Correct and fine-tune: the sample's ground truth stands in for the user's corrections.
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.open_sample(PLUGIN, "synthetic_nuclei")
    widget.image_layer.value = viewer.layers["synthetic nuclei"]
    segment(widget)
    nuclei = viewer.layers["synthetic nuclei nuclei"]
    viewer.add_labels(nuclei.data.copy(), name="before fine-tune", visible=False)
    nuclei.data = viewer.layers["synthetic nuclei ground truth"].data.astype(np.int32)  # "corrected"
    nuclei.metadata["nuclei_unet"]["edited"] = True
    _dock, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    wait_for(tune, lambda: "runs on" in tune.model.summary.value)
    tune.output_folder.value = str(Path(tempfile.mkdtemp()))
    tune.model_name.value = "my-nuclei"
    tune.epochs.value, tune.iterations.value = 8, 10
    tune.start()
    wait_for(tune, lambda: len(tune.plot.losses) >= 4)
    save(viewer, out / "07-fine-tune-running.png")
    wait_for(tune, lambda: tune._worker is None)
    tune.resegment()  # waits for Segment to load the new model, then segments with it
    wait_for(
        widget,
        lambda: (
            viewer.layers["synthetic nuclei nuclei"].metadata.get("nuclei_unet", {}).get("model") == "my-nuclei"
            and widget.hub.idle
        ),
    )
    # Side by side: the image with the labels before (left) and after (right) fine-tuning.
    image = viewer.layers["synthetic nuclei"]
    before, after = viewer.layers["before fine-tune"], viewer.layers["synthetic nuclei nuclei"]
    for layer in [layer for layer in viewer.layers if layer not in (image, before, after)]:
        viewer.layers.remove(layer)
    after.name = "after fine-tune"
    copy = viewer.add_image(image.data, name="synthetic nuclei (copy)", colormap="gray")
    for index, layer in enumerate([image, before, copy, after]):
        viewer.layers.move(viewer.layers.index(layer), index)
        layer.visible = True
    viewer.grid.enabled, viewer.grid.stride = True, 2
    viewer.reset_view()
    save(viewer, out / "08-before-after.png")
    print(
        f"fine-tune: {tune.status.value}; objects before {int(before.data.max())}, after {int(after.data.max())}; "
        f"the new model's min confidence {widget.min_confidence.value:g}"
    )
    viewer.close()
    if DSB2018.is_dir():
        for size in WINDOW_SIZES:
            dsb_views(out, size)
            tint_views(out, size)
            stack_views(out, size)
            if ZOO_PACKAGE.is_dir():
                zoo_views(out, size)
            if args.volumes:
                volume_file_views(out, size, args.volumes, args.z_step)


def dsb_views(out: Path, size: tuple[int, int]) -> None:
    """A real H&E-stained DSB2018 image and a fluorescence one, opened by file and segmented with the
    defaults, both widgets docked, in a window of ``size``."""
    viewer = napari.Viewer(title="napari-nuclei-unet")
    viewer.window._qt_window.resize(*size)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    _dock, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    wait_for(widget, lambda: "runs on" in widget.model.summary.value and "runs on" in tune.model.summary.value)
    for kind, name in (("tissue", DSB_TISSUE), ("fluorescence", DSB_FLUORESCENCE)):
        for layer in list(viewer.layers):
            viewer.layers.remove(layer)
        open_and_segment(viewer, widget, tune, name)
        save(viewer, out / f"09-dsb-{kind}-{size[0]}x{size[1]}.png")
        print(f"{kind} {size}: {widget.status.value}; canvas {viewer.window._qt_viewer.canvas.native.width()} px wide")
        if kind == "fluorescence":  # the Fine-tune tab after Add pair: two 64-character layer names
            fine_tune_pair(viewer, tune, name)
            save(viewer, out / f"13-fine-tune-pair-{size[0]}x{size[1]}.png")
            print(f"fine-tune pair {size}: dock {tune.native.width()} px wide; {tune.pairs_label.value}")
        if kind == "fluorescence" and size == WINDOW_SIZES[-1]:  # the measurements, in napari's own features table
            _dock, _table = viewer.window.add_plugin_dock_widget("napari", "Features table widget")
            save(viewer, out / "10-features-table.png")
    viewer.close()


def tint_views(out: Path, size: tuple[int, int]) -> None:
    """The DSB2018 fluorescence image saved blue on black (as Hoechst often is), opened by file and segmented with the
    defaults: the status line says it was read as fluorescence, through its brightest channel."""
    from PIL import Image

    from napari_nuclei_unet.io import read_image

    folder = Path(tempfile.mkdtemp())
    grey = read_image(DSB2018 / f"{DSB_FLUORESCENCE}.png")
    grey = grey[..., :3].mean(-1) if grey.ndim == 3 else grey
    blue = np.zeros((*grey.shape, 3), np.uint8)
    blue[..., 2] = np.round(grey).astype(np.uint8)
    Image.fromarray(blue).save(folder / f"{DSB_FLUORESCENCE}.png")
    viewer = napari.Viewer(title="napari-nuclei-unet")
    viewer.window._qt_window.resize(*size)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    wait_for(widget, lambda: "runs on" in widget.model.summary.value)
    open_and_segment(viewer, widget, None, DSB_FLUORESCENCE, folder)
    save(viewer, out / f"16-pseudo-colour-{size[0]}x{size[1]}.png", bottom=True)
    print(f"pseudo-colour {size}: {widget.status.value}")
    viewer.close()


def open_and_segment(viewer, widget, tune, name: str, folder: Path = DSB2018) -> None:
    """Open an image by file (a DSB2018 one by default), segment it with the Segment widget, show its nuclei and the
    Segment tab (``tune``: the Fine-tune widget, told of the new layers; None when not docked)."""
    viewer.open(str(folder / f"{name}.png"))
    widget.image_layer.value = viewer.layers[name]
    segment(widget)
    if tune is not None:
        tune.reset_choices()
    viewer.layers.selection.active = viewer.layers[f"{name} nuclei"]
    viewer.reset_view()
    widget.native.parentWidget().parentWidget().parentWidget().raise_()  # the Segment tab: its status line


def fine_tune_pair(viewer, tune, name: str) -> None:
    """The image and its nuclei added as a training pair in the Fine-tune tab, shown."""
    tune.image_layer.value = viewer.layers[name]
    tune.labels_layer.value = viewer.layers[f"{name} nuclei"]
    tune.add_pair_button.clicked.emit()
    tune.native.parentWidget().parentWidget().parentWidget().raise_()


def stack_views(out: Path, size: tuple[int, int]) -> None:
    """A Z-stack (the generated 3D sample: axes z, y, x and a z step of 2 px, as its layer says) segmented in 3D with
    the defaults, shown in 3D; and a time-lapse (the DSB2018 fluorescence image drifting 3 px a frame over 5
    frames, axis t) segmented frame by frame, in a window of ``size``."""
    from imageio.v3 import imread

    viewer = napari.Viewer(title="napari-nuclei-unet")
    viewer.window._qt_window.resize(*size)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    wait_for(widget, lambda: "runs on" in widget.model.summary.value)
    viewer.open_sample(PLUGIN, "synthetic_volume")
    widget.image_layer.value = viewer.layers["synthetic z-stack"]
    segment(widget)
    viewer.dims.ndisplay = 3
    viewer.layers.selection.active = viewer.layers["synthetic z-stack nuclei"]
    viewer.reset_view()
    viewer.camera.angles = (0, 35, 70)  # tilted, so that the nuclei's depth shows
    save(viewer, out / f"14-z-stack-3d-{size[0]}x{size[1]}.png")
    print(f"z-stack {size}: scope {widget.scope.value}; {widget.status.value}")
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.dims.ndisplay = 2
    plane = imread(DSB2018 / f"{DSB_FLUORESCENCE}.png")
    plane = plane[..., :3].mean(-1) if plane.ndim == 3 else plane
    frames = np.stack(
        [plane[3 * t : plane.shape[0] - 12 + 3 * t, 3 * t : plane.shape[1] - 12 + 3 * t] for t in range(5)]
    )
    viewer.add_image(frames, name=DSB_FLUORESCENCE, axis_labels=("t", "y", "x"), colormap="gray")
    widget.image_layer.value = viewer.layers[DSB_FLUORESCENCE]
    segment(widget)
    viewer.dims.set_current_step(0, 2)
    viewer.layers.selection.active = viewer.layers[f"{DSB_FLUORESCENCE} nuclei"]
    viewer.reset_view()
    save(viewer, out / f"15-time-lapse-{size[0]}x{size[1]}.png")
    print(f"time-lapse {size}: scope {widget.scope.value}; {widget.status.value}")
    viewer.close()


def volume_file_views(out: Path, size: tuple[int, int], volumes: list[Path], z_step: float) -> None:
    """Real Z-stacks saved as ImageJ files under 64-character names, with their z step, and opened by file: the last
    one alone (the widget reads Z-stack (3D) and the voxel size from the file, segments it with the defaults, and
    napari's features table shows its nuclei measured in 3D), then all of them as one TZYX time-lapse."""
    import tifffile

    folder = Path(tempfile.mkdtemp())
    stacks = [tifffile.imread(path) for path in volumes]
    volume = stacks[-1]
    path = folder / f"{VOLUME_NAME}.tif"
    tifffile.imwrite(path, volume, imagej=True, metadata={"axes": "ZYX", "spacing": z_step}, resolution=(1.0, 1.0))
    viewer = napari.Viewer(title="napari-nuclei-unet")
    viewer.window._qt_window.resize(*size)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    wait_for(widget, lambda: "runs on" in widget.model.summary.value)
    viewer.open(str(path))
    widget.image_layer.value = viewer.layers[VOLUME_NAME]
    print(f"volume {size}: scope {widget.scope.value}, voxel size {widget.request().params.voxel_size}")
    segment(widget)
    table_dock, _table = viewer.window.add_plugin_dock_widget("napari", "Features table widget")
    viewer.layers.selection.active = viewer.layers[f"{VOLUME_NAME} nuclei"]
    viewer.dims.set_current_step(0, volume.shape[0] // 2)
    for _ in range(20):  # the docks take their room first: the view is fitted to the canvas they leave
        QApplication.processEvents()
    viewer.reset_view()
    save(viewer, out / f"17-volume-file-features-{size[0]}x{size[1]}.png")
    print(f"volume {size}: {widget.status.value}")
    viewer.window.remove_dock_widget(table_dock)  # a time-lapse's nuclei are numbered per time point: no table
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    # The volumes as the time points of one ImageJ TZYX hyperstack: each labelled in 3D on its own.
    series = np.stack(stacks)
    path = folder / f"{TIME_LAPSE_NAME}.tif"
    tifffile.imwrite(path, series, imagej=True, metadata={"axes": "TZYX", "spacing": z_step}, resolution=(1.0, 1.0))
    viewer.open(str(path))
    widget.image_layer.value = viewer.layers[TIME_LAPSE_NAME]
    segment(widget)
    viewer.layers.selection.active = viewer.layers[f"{TIME_LAPSE_NAME} nuclei"]
    viewer.dims.set_current_step(0, len(stacks) - 1)
    viewer.dims.set_current_step(1, series.shape[1] // 2)
    for _ in range(20):
        QApplication.processEvents()
    viewer.reset_view()
    save(viewer, out / f"18-time-lapse-of-z-stacks-{size[0]}x{size[1]}.png", bottom=True)
    print(f"time-lapse of z-stacks {size}: {widget.status.value}")
    viewer.close()


def choose_model(picker, path: Path) -> None:
    """Pick a model file in a widget's model picker, as a user does with 'from file…'."""
    from napari_nuclei_unet._widgets._common import FROM_FILE

    with picker.source.changed.blocked(), picker.file.changed.blocked():
        picker.source.value = FROM_FILE
        picker.file.value = str(path)
    picker.file.visible = True
    picker.load_async()


def zoo_views(out: Path, size: tuple[int, int]) -> None:
    """The Model Zoo package chosen in both widgets, segmenting the DSB2018 fluorescence image; the
    Fine-tune tab says why it cannot train this model (at the larger size)."""
    viewer = napari.Viewer(title="napari-nuclei-unet")
    viewer.window._qt_window.resize(*size)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    _dock, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    wait_for(widget, lambda: "runs on" in widget.model.summary.value and "runs on" in tune.model.summary.value)
    for picker in (widget.model, tune.model):
        choose_model(picker, ZOO_PACKAGE / "bioimageio.yaml")
        wait_for(widget, lambda p=picker: "bioimage.io package" in p.summary.value and widget.hub.idle)
    open_and_segment(viewer, widget, tune, DSB_FLUORESCENCE)
    save(viewer, out / f"11-zoo-package-{size[0]}x{size[1]}.png")
    print(f"zoo {size}: {widget.model.summary.value}; {widget.status.value}")
    if size == WINDOW_SIZES[-1]:
        tune.native.parentWidget().parentWidget().parentWidget().raise_()
        save(viewer, out / "12-zoo-package-fine-tune.png")
        print(f"fine-tune tab: {tune.status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
