"""Copy a trained checkpoint into the package as the bundled default model (fp16 safetensors).

    python scripts/bundle_model.py /work/runs/v2 --tissue-stain none \
        --markers fluorescence=boundary,brightfield=boundary,tissue=distance

``--tissue-stain`` records what the model reads RGB stained tissue in when the stain is
"auto" (``stain_by_image_type``), as chosen on the choosing sets with
``benchmarks/generalisation.py --sets val,monuseg_val --stains none,hematoxylin``
(docs/model-card.md). ``--markers`` records the watershed markers "auto" takes per image type
(``markers_by_image_type``), chosen on the same sets (model card, "Markers per image type"). The
training log stays out of the package; the model's metadata keeps
the training record.
"""

import argparse
import os
import shutil
from pathlib import Path

from napari_nuclei_unet.model import BUNDLED_MODEL_DIR, Checkpoint

DESCRIPTION = (
    "Default nuclei model of napari-nuclei-unet for fluorescence, brightfield and H&E/IHC stained tissue, "
    "trained on DSB2018 stage1_train (fixed; train split), 25 MoNuSeg 2018 training tiles and the 46 train images "
    "of the E2F mouse intestine sections (Pecot et al. 2022)."
)
LICENSE = (
    "BSD-3-Clause (weights). Training data: DSB2018/BBBC038 CC0 (Caicedo et al. 2019); "
    "MoNuSeg 2018 training data CC BY-NC-SA 4.0, NON-COMMERCIAL (Kumar et al. 2017, 2020): "
    "check before using these weights in a commercial product; E2F intestine images from a repository under "
    "LGPL-3.0 with no separate data licence (Pecot et al. 2022)."
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="trained checkpoint folder")
    parser.add_argument(
        "--tissue-stain", required=True, choices=["none", "hematoxylin"], help="what 'auto' reads RGB stained tissue in"
    )
    parser.add_argument(
        "--markers",
        default="",
        help="TYPE=MARKERS,... (distance, boundary or centre per image type; types left out take distance)",
    )
    args = parser.parse_args()
    source = Path(args.source)
    checkpoint = Checkpoint.load(source)
    checkpoint.metadata["name"] = "nuclei-unet-default"
    checkpoint.metadata["description"] = DESCRIPTION
    checkpoint.metadata["license"] = LICENSE
    checkpoint.metadata["stain_by_image_type"] = {
        "fluorescence": "none",
        "brightfield": "none",
        "tissue": args.tissue_stain,
    }
    markers = dict(item.split("=", 1) for item in args.markers.split(",") if item)
    if markers:
        checkpoint.metadata["markers_by_image_type"] = markers
    os.environ["NUCLEI_UNET_WRITE_BUNDLED"] = "1"
    shutil.rmtree(BUNDLED_MODEL_DIR, ignore_errors=True)
    checkpoint.save(BUNDLED_MODEL_DIR, half=True)
    (BUNDLED_MODEL_DIR / "README.md").unlink(missing_ok=True)  # SMP's generic card; ours is docs/model-card.md
    size = sum(p.stat().st_size for p in BUNDLED_MODEL_DIR.iterdir()) / 1e6
    print(f"bundled {source} -> {BUNDLED_MODEL_DIR} ({size:.1f} MB): {Checkpoint.load(BUNDLED_MODEL_DIR).summary()}")
