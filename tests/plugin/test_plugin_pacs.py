"""*Open from PACS* in the review dock against a real Orthanc (napari viewer under Xvfb): list the PACS's series,
open one (it is pulled into a new project, which opens on that case), and export the accepted label as DICOM-SEG
from the dock; a PACS that does not answer is one line in the dock."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from conftest import SAMPLE
from helpers.dicom_series import write_dicom_series
from helpers.orthanc import orthanc  # noqa: F401  (the fixture: a real Orthanc for this module)
from helpers.orthanc import free_port

from backend.io.volume import Volume, read_volume
from napari_semiseg.review import ReviewDock

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers
pytestmark = pytest.mark.gui

CT = SAMPLE / "lesions" / "imagesTr" / "radiomics_lung2_0000.nii.gz"
CT_LABEL = SAMPLE / "reference" / "lesions" / "radiomics_lung2.nii.gz"


@pytest.fixture(autouse=True)
def _answered(answers):
    return answers


def _crop(path, z=8, y=32, x=40) -> Volume:
    return Volume.from_sitk(read_volume(path).to_sitk()[x:x + 96, y:y + 96, z:z + 24])


def test_open_from_pacs_lists_opens_and_exports_dicom_seg(make_napari_viewer, qtbot, tmp_path, orthanc):
    uids = write_dicom_series(_crop(CT), tmp_path / "series", modality="CT", description="lung crop")
    orthanc.store(tmp_path / "series")
    viewer = make_napari_viewer()
    dock = ReviewDock(viewer)
    viewer.window.add_dock_widget(dock, name="Review pseudo labels")
    panel = dock.pacs

    panel.url_edit.setText(f"http://127.0.0.1:{free_port()}/dicom-web")  # nothing listens there
    panel.list_button.click()
    qtbot.waitUntil(lambda: "search failed" in dock.status.text(), timeout=30000)
    assert "\n" not in dock.status.text() and panel.series_list.count() == 0

    panel.url_edit.setText(orthanc.url)
    with qtbot.waitSignal(panel.listed, timeout=30000):
        panel.list_button.click()
    assert panel.series_list.count() == 1
    item = panel.series_list.item(0)
    assert "SEMISEG1  CT  #1  lung crop  (24 images)" == item.text()
    panel.series_list.setCurrentItem(item)
    assert panel.open_button.isEnabled()
    panel.folder_edit.setText(str(tmp_path / "from-pacs"))
    with qtbot.waitSignal(dock.case_loaded, timeout=60000) as loaded:
        panel.open_button.click()
    assert loaded.args == ["SEMISEG1_s1"] and dock.project.root == (tmp_path / "from-pacs").resolve()
    assert np.array_equal(dock.image.array, _crop(CT).array)
    assert json.loads((dock.project.semiseg / "dicom" / "SEMISEG1_s1.json").read_text())["series_instance_uid"] \
        == uids["series"]

    label = _crop(CT_LABEL).array.astype(np.uint8)
    dock.project.accept("SEMISEG1_s1", label, source="manual")
    assert [dock.export_format.itemText(i) for i in range(dock.export_format.count())][-1] == "dicom-seg"
    dock.export_format.setCurrentText("dicom-seg")
    with qtbot.waitSignal(dock.exported, timeout=60000) as blocker:
        dock.export_to(tmp_path / "out")
    assert blocker.args == [[str(tmp_path / "out" / "SEMISEG1_s1.seg.dcm")]]
    seg = pydicom.dcmread(tmp_path / "out" / "SEMISEG1_s1.seg.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.FrameOfReferenceUID == uids["frame"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 24
