"""Copy a trained checkpoint into the package as the bundled default model (fp16 safetensors).

    python scripts/bundle_model.py runs/default-v1

The training log stays out of the package; the model's metadata keeps the training record.
"""

import os
import shutil
import sys
from pathlib import Path

from napari_nuclei_unet.model import BUNDLED_MODEL_DIR, Checkpoint

if __name__ == "__main__":
    source = Path(sys.argv[1])
    checkpoint = Checkpoint.load(source)
    checkpoint.metadata["name"] = "nuclei-unet-default"
    checkpoint.metadata["description"] = "Default nuclei model of napari-nuclei-unet, trained on DSB2018 stage1_train (fixed), train split."
    checkpoint.metadata["license"] = "BSD-3-Clause (weights); training data CC0 (BBBC038, Caicedo et al. 2019)"
    os.environ["NUCLEI_UNET_WRITE_BUNDLED"] = "1"
    shutil.rmtree(BUNDLED_MODEL_DIR, ignore_errors=True)
    checkpoint.save(BUNDLED_MODEL_DIR, half=True)
    (BUNDLED_MODEL_DIR / "README.md").unlink(missing_ok=True)  # SMP's generic card; ours is docs/model-card.md
    size = sum(p.stat().st_size for p in BUNDLED_MODEL_DIR.iterdir()) / 1e6
    print(f"bundled {source} -> {BUNDLED_MODEL_DIR} ({size:.1f} MB): {Checkpoint.load(BUNDLED_MODEL_DIR).summary()}")
