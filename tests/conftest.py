"""Shared fixtures: a tiny untrained U-Net, generated images, and the real DSB2018 folder when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DSB2018 = REPO.parent / "shared" / "data" / "dsb2018"


@pytest.fixture(autouse=True, scope="session")
def _own_network_cache(tmp_path_factory):
    """Exported networks go to a folder of this test session, not the user's cache."""
    import os

    saved = os.environ.get("NUCLEI_UNET_CACHE")
    os.environ["NUCLEI_UNET_CACHE"] = str(tmp_path_factory.mktemp("onnx-cache"))
    yield
    if saved is None:
        os.environ.pop("NUCLEI_UNET_CACHE", None)
    else:
        os.environ["NUCLEI_UNET_CACHE"] = saved


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_config():
    from napari_nuclei_unet.model import ModelConfig

    # The smallest smp.Unet that still has the real structure: fast enough for unit tests.
    return ModelConfig(
        encoder_name="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), outputs=("foreground", "boundary")
    )


@pytest.fixture
def tiny_checkpoint(tiny_config):
    from napari_nuclei_unet.model import Checkpoint

    return Checkpoint.create(tiny_config)


@pytest.fixture
def dsb2018() -> Path:
    if not (DSB2018 / "train_labels.csv").is_file():
        pytest.skip("../shared/data/dsb2018 is not available")
    return DSB2018


def disks(shape=(96, 128), centres=((48, 45), (48, 80)), radius=20) -> np.ndarray:
    """Instance labels of disks (1..N), overlapping disks keep the first label."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for index, (cy, cx) in enumerate(centres, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        labels[inside & (labels == 0)] = index
    return labels
