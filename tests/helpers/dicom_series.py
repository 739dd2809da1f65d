"""Write a volume as a DICOM series with SimpleITK's ``ImageSeriesWriter`` (the "DICOM series from array"
recipe of the SimpleITK examples): one file per axial slice, its position, orientation and UIDs set per slice."""
from __future__ import annotations

import locale
import time
from pathlib import Path

import numpy as np

from backend.io.volume import Volume


def write_dicom_series(volume: Volume, folder: str | Path, *, modality: str = "MR", study_uid: str | None = None,
                       series_uid: str | None = None, frame_uid: str | None = None, patient_id: str = "SEMISEG1",
                       series_number: int = 1, description: str = "semiseg test") -> dict[str, str]:
    """Write ``volume`` (int16 voxels) to ``folder/slice_<k>.dcm``; returns the study, series and frame UIDs."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": study_uid or generate_uid(), "series": series_uid or generate_uid(),
            "frame": frame_uid or generate_uid()}
    image = Volume(np.asarray(volume.array).astype(np.int16), volume.spacing, volume.origin,
                   volume.direction).to_sitk()
    direction = np.asarray(volume.direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    common = [
        ("0010|0010", "Semiseg^Test"), ("0010|0020", patient_id), ("0010|0030", "19700101"), ("0010|0040", "O"),
        ("0020|000d", uids["study"]), ("0020|000e", uids["series"]), ("0020|0052", uids["frame"]),
        ("0008|0020", now[0]), ("0008|0030", now[1]), ("0008|0021", now[0]), ("0008|0031", now[1]),
        ("0008|0050", "A1"), ("0020|0010", "1"), ("0008|0090", ""), ("0008|0060", modality),
        ("0008|103e", description), ("0020|0011", str(series_number)), ("0020|0037", orientation),
        ("0018|0050", f"{volume.spacing[2]:.6f}"), ("0018|0088", f"{volume.spacing[2]:.6f}"),
        ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL"),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # our study/series/frame UIDs, not GDCM's fresh ones
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the process locale to "C" (ASCII text)
    try:
        _write_slices(writer, image, common, folder, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return uids


def _write_slices(writer, image, common: list[tuple[str, str]], folder: Path, modality: str) -> None:
    from pydicom.uid import generate_uid

    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in common:
            piece.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        piece.SetMetaData("0020|0032", "\\".join(f"{p:.6f}" for p in position))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", generate_uid())
        piece.SetMetaData("0008|0016", "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4")
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(piece)
