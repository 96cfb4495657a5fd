"""Any napari contribution of the plugin can be the first one used, in a real window, without a crash.

napari renders with Mesa's llvmpipe under Xvfb; triton (imported by torchvision) loaded after
Mesa's ``libLLVM`` crashes the process. Each contribution of the manifest is opened first in
a fresh process; torch must then load safely (in the widgets' model load, or right after a
reader, writer or sample), and the contribution's own module must not have imported it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = yaml.safe_load((REPO / "napari.yaml").read_text())
HEAVY = ("torch", "torchvision", "triton", "segmentation_models_pytorch", "onnxruntime")

# Runs in a fresh process: open one contribution first, then let torch load, and report.
SCRIPT = r"""
import json, sys, time
import numpy as np
import napari
from qtpy.QtCore import QThreadPool
from qtpy.QtWidgets import QApplication

kind, name, path = sys.argv[1:4]
HEAVY = HEAVY_MODULES
first_torch_import = []  # the thread that imported torch first

class Witness:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not first_torch_import:
            import threading
            first_torch_import.append(threading.current_thread() is threading.main_thread())
        return None

sys.meta_path.insert(0, Witness())

def pump(seconds):
    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.01)

def mesa_llvm():
    with open("/proc/self/maps") as maps:
        return any("libLLVM" in line for line in maps)

viewer = napari.Viewer(show=True)
pump(0.5)  # the canvas is drawn: Mesa's LLVM is mapped now, as in a user's session
mesa = mesa_llvm()
if kind == "widget":
    viewer.window.add_plugin_dock_widget("napari-nuclei-unet", name)
elif kind == "reader":
    viewer.open(path, plugin="napari-nuclei-unet")
elif kind == "writer":
    viewer.add_labels(np.array([[0, 1, 1], [0, 2, 2], [0, 0, 0]] * 4, np.int32), name="nuclei")
    viewer.layers.save(path, plugin="napari-nuclei-unet")
elif kind == "sample":
    viewer.open_sample("napari-nuclei-unet", name)
loaded_by_it = sorted(m for m in HEAVY if sys.modules.get(m) is not None)
if kind == "widget":  # its model load (a worker) imports torch: wait for it
    pump(1.0)
    end = time.time() + 120
    while QThreadPool.globalInstance().activeThreadCount() and time.time() < end:
        pump(0.1)
else:  # whatever comes next in this session imports torch
    import segmentation_models_pytorch
report = {"mesa": mesa, "loaded_by_it": loaded_by_it, "torch_on_gui_thread": first_torch_import[:1] == [True]}
report.update(triton=sys.modules.get("triton") is not None, layers=len(viewer.layers))
print(json.dumps(report))
viewer.close()
""".replace("HEAVY_MODULES", repr(HEAVY))


def _write_inputs(folder: Path) -> dict[str, str]:
    from napari_nuclei_unet.geojson import write_geojson
    from napari_nuclei_unet.rle import write_csv

    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15], labels[20:30, 25:40] = 1, 2
    return {
        "read_rle_csv": str(write_csv(folder / "labels.csv", [("image", labels)])),
        "read_geojson": str(write_geojson(folder / "labels.geojson", labels)),
        "write_rle_csv": str(folder / "out.csv"),
        "write_labels_image": str(folder / "out.tif"),
        "write_geojson": str(folder / "out.geojson"),
    }


def _contributions() -> list[tuple[str, str, str]]:
    """(kind, name, command) for every widget, reader, writer and sample of the manifest."""
    found = [("widget", w["display_name"], w["command"]) for w in MANIFEST["contributions"]["widgets"]]
    found += [
        (kind, "", item["command"]) for kind in ("reader", "writer") for item in MANIFEST["contributions"][kind + "s"]
    ]
    found += [("sample", s["key"], s["command"]) for s in MANIFEST["contributions"]["sample_data"]]
    return found


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DISPLAY"), reason="needs a display (the README's test command runs under xvfb-run)"
)
@pytest.mark.parametrize("kind,name,command", _contributions(), ids=[c[2].split(".")[-1] for c in _contributions()])
def test_each_contribution_opened_first_survives(tmp_path, kind, name, command):
    path = _write_inputs(tmp_path).get(command.split(".")[-1], "")
    env = {**os.environ, "NUCLEI_UNET_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind, name, path],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mesa"], "the window did not render with Mesa's LLVM: this test would prove nothing here"
    assert report["loaded_by_it"] == [] or kind == "widget", report  # readers, writers, samples never need torch
    assert not report["triton"], report  # refused beside Mesa's LLVM, whoever imported torch
    if kind == "widget":  # importing torch on napari's GUI thread froze the window for seconds on docking
        assert not report["torch_on_gui_thread"], report
    if kind in ("reader", "sample"):
        assert report["layers"] >= 1, report
    if kind == "writer":
        assert Path(path).is_file()


@pytest.mark.parametrize(
    "module", sorted({c["python_name"].split(":")[0] for c in MANIFEST["contributions"]["commands"]})
)
def test_contribution_modules_import_without_torch(module):
    script = f"import sys, {module}\nprint(' '.join(m for m in {HEAVY!r} if sys.modules.get(m) is not None))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", (
        f"{module} imports {result.stdout.strip()} (heavy imports belong in the workers)"
    )
