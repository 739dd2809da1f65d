"""Rebuild ``sample_data/`` from the real volumes in ``../shared/sample-sources`` (developers only).

The committed result is what users and tests read; nothing at run or test time reads ``../shared``.

* ``brain_tissue/``: T1 MR brain tissue task (1 GM, 2 WM).  ``mni152_t1`` is labeled; ``itk_kmeans_t1`` and
  ``colin27_ch2`` are unlabeled.  ``itk_kmeans_t1``'s k-means label (CSF mapped to background) is kept aside in
  ``reference/brain_tissue/`` so benchmarks can play the clinician and score held-out Dice.
* ``lesions/``: tumour review on other organs and modalities (1 tumour): ``radiomics_brain1`` (MR) is labeled,
  ``radiomics_lung2`` (CT) is unlabeled with its reference label kept aside.  Modality ``other``: per-case z-score.

Usage: ``python sample_data/build.py [SOURCES]``
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.project import Project  # noqa: E402
from backend.io.volume import read_volume, write_volume  # noqa: E402

HERE = Path(__file__).resolve().parent


def build(sources: Path) -> None:
    for name in ("brain_tissue", "lesions", "reference"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    brain = Project.create(HERE / "brain_tissue", labels={0: "background", 1: "GM", 2: "WM"}, modality="MR",
                           name="brain_tissue", description="T1 MR grey/white matter (real volumes, 2 mm)")
    brain.add_case("mni152_t1", read_volume(sources / "mni152_t1_image.nii.gz"),
                   read_volume(sources / "mni152_t1_label.nii.gz"))
    brain.add_case("itk_kmeans_t1", read_volume(sources / "itk_kmeans_t1_image.nii.gz"))
    brain.add_case("colin27_ch2", read_volume(sources / "colin27_ch2_image.nii.gz"))
    kmeans = read_volume(sources / "itk_kmeans_t1_label.nii.gz")
    kmeans.array = np.where(kmeans.array == 3, 0, kmeans.array).astype(np.uint8)  # CSF -> background
    write_volume(kmeans, HERE / "reference" / "brain_tissue" / "itk_kmeans_t1.nii.gz")

    lesions = Project.create(HERE / "lesions", labels={0: "background", 1: "tumour"}, modality="other",
                             name="lesions", description="MR brain and CT lung tumours (pyradiomics)")
    lesions.add_case("radiomics_brain1", read_volume(sources / "radiomics_brain1_image.nii.gz"),
                     read_volume(sources / "radiomics_brain1_label.nii.gz"))
    lesions.add_case("radiomics_lung2", read_volume(sources / "radiomics_lung2_image.nii.gz"))
    write_volume(read_volume(sources / "radiomics_lung2_label.nii.gz"),
                 HERE / "reference" / "lesions" / "radiomics_lung2.nii.gz")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[1] / "shared" / "sample-sources")
