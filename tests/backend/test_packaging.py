"""The installed distribution: napari finds the manifest; the sample data ships inside the package."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def test_npe2_validates_the_installed_manifest():
    npe2 = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    out = subprocess.run([npe2, "validate", "napari-semiseg"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr


def test_manifest_in_package_is_the_repository_root_manifest():
    import napari_semiseg

    from conftest import REPO

    packaged = Path(napari_semiseg.__file__).with_name("napari.yaml")
    assert packaged.read_text() == (REPO / "napari.yaml").read_text()


def test_sample_data_is_importable_package_data():
    from backend.project.sample import sample_root

    root = sample_root()
    assert (root / "brain_tissue" / "dataset.json").is_file()
    assert (root / "lesions" / "imagesTr" / "radiomics_lung2_0000.nii.gz").is_file()
