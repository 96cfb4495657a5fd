"""The package as users get it: a built wheel carries napari.yaml, and the core stays headless."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """Build the wheel and install it (no dependencies) into a separate folder."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
    )
    wheel = next(dist.glob("napari_nuclei_unet-*.whl"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    return wheel, target


def test_wheel_contains_manifest_and_samples(installed_wheel):
    wheel, target = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_nuclei_unet/napari.yaml" in names
    shipped = target / "napari_nuclei_unet" / "napari.yaml"
    assert shipped.is_file() and not shipped.is_symlink()
    assert shipped.read_text() == (REPO / "napari.yaml").read_text()


def test_npe2_finds_manifest_in_installed_wheel(installed_wheel):
    _, target = installed_wheel
    script = textwrap.dedent(
        f"""
        import importlib.metadata as md, sys
        sys.path.insert(0, {str(target)!r})
        from npe2 import PluginManifest
        dist = md.distribution("napari-nuclei-unet")  # the wheel's copy comes first on sys.path
        assert str(dist.locate_file("")).startswith({str(target)!r}), dist.locate_file("")
        manifest = PluginManifest.from_distribution("napari-nuclei-unet")
        manifest.validate_imports()
        import napari_nuclei_unet
        assert napari_nuclei_unet.__file__.startswith({str(target)!r}), napari_nuclei_unet.__file__
        c = manifest.contributions
        print(manifest.name, [w.display_name for w in c.widgets], len(c.readers), len(c.writers), len(c.sample_data))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip() == "napari-nuclei-unet ['Segment nuclei', 'Fine-tune'] 2 3 3"
    )  # readers: RLE CSV, GeoJSON; writers: CSV, label image, GeoJSON; samples: 2D, IHC, Z-stack


def test_runtime_dependencies_have_no_qt_binding():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["cluster"]  # what a dask worker gets
    bindings = ("pyqt5", "pyqt6", "pyside2", "pyside6", "napari")
    assert not [d for d in dependencies if d.lower().startswith(bindings)]


def test_manifest_valid_in_editable_install():
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("napari-nuclei-unet")
    manifest.validate_imports()
    assert manifest.contributions.readers


def core_modules() -> list[str]:
    """Every module of the package but the napari layer (``_widgets``, readers, writers, samples), found by
    ``pkgutil``."""
    import pkgutil

    import napari_nuclei_unet

    found = [info.name for info in pkgutil.walk_packages(napari_nuclei_unet.__path__, "napari_nuclei_unet.")]
    return sorted(name for name in found if not name.split(".")[1].startswith("_"))


def test_core_imports_neither_qt_nor_napari():
    core = core_modules()
    assert {"napari_nuclei_unet.model_zoo", "napari_nuclei_unet.training.loop", "napari_nuclei_unet.cli"} <= set(
        core
    )  # the walk finds them
    script = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in core)
        + textwrap.dedent(
            """
        gui = ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui')
        bad = sorted(m for m in sys.modules if m.split('.')[0] in gui)
        print(' '.join(bad))
        """
        )
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "napari_nuclei_unet.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "export-bioimageio" in result.stdout
