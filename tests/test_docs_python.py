"""docs/python.md runs as written: its Python blocks, one after another, in a folder with the files it names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile

from napari_nuclei_unet.synthetic import nuclei_field, nuclei_volume

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def test_the_python_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    image, truth = nuclei_field((192, 224), count=16, diameter=18, seed=5)
    tifffile.imwrite(tmp_path / "cells.tif", image)
    tifffile.imwrite(tmp_path / "cells_masks.tif", truth.astype(np.uint16))
    volume, _ = nuclei_volume((16, 96, 96), count=8, seed=2)
    tifffile.imwrite(tmp_path / "volume.tif", volume)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (the guide's own code)
    out = capsys.readouterr().out
    assert f"{namespace['result'].count} nuclei" in out and "nuclei in 3D" in out
    assert namespace["scores"].ap50 > 0.8  # the generated cells are easy: the guide's pipeline really segments
    for name in ("cells_nuclei.csv", "cells_predicted.tif", "predictions.csv", "cells.geojson", "my_model"):
        assert (tmp_path / name).exists(), name
    assert len(namespace["table"]["label"]) == namespace["result"].count
    assert namespace["in_3d"].labels.shape == volume.shape and namespace["tuned"].outputs
