"""A real Orthanc PACS (DICOMweb plugin, basic auth) as the datastore: two real CT series (crops of the sample
lung CT) are stored, ``semiseg pacs pull`` builds a project, a one-labeled-case project trains a tiny model and
infers, a correction started from its pseudo label is accepted, ``semiseg pacs push`` stores the SEGs, and a
search finds them referencing their source series; the SEG read back from the PACS is the accepted label.
A series with a missing slice on the PACS is refused in one line and the project is left as it was."""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import SAMPLE
from helpers.dicom_series import write_dicom_series
from helpers.fault_cases import folder_hash, semiseg
from helpers.orthanc import Orthanc

from backend.dicom.refs import read_refs
from backend.io.volume import Volume, read_volume, write_volume
from backend.project import Project

CT = SAMPLE / "lesions" / "imagesTr" / "radiomics_lung2_0000.nii.gz"
CT_LABEL = SAMPLE / "reference" / "lesions" / "radiomics_lung2.nii.gz"
CROPS = {1: (8, 32, 40), 2: (12, 24, 48)}  # series number -> (z, y, x) corner of a 24 x 96 x 96 crop (the tumour)
USER = {"semiseg": "pacs-test-pw"}
AUTH = {"SEMISEG_PACS_USER": "semiseg", "SEMISEG_PACS_PASSWORD": USER["semiseg"]}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), users=USER)
    try:
        yield server
    finally:
        server.stop()


def _crop(path: Path, corner: tuple[int, int, int]) -> Volume:
    z, y, x = corner
    return Volume.from_sitk(read_volume(path).to_sitk()[x:x + 96, y:y + 96, z:z + 24])


def _json(*args) -> object:
    out = semiseg(*args, "--json", env=AUTH)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_pull_train_correct_push_and_find_the_seg(tmp_path, pacs):
    assert pacs.remote_status() in (None, 401, 403), "remote access must be off"
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    series = {}
    for number, corner in CROPS.items():
        uids = write_dicom_series(_crop(CT, corner), tmp_path / f"series{number}", modality="CT", study_uid=study,
                                  frame_uid=frame, series_number=number, description=f"lung crop {number}")
        assert pacs.store(tmp_path / f"series{number}") == 24
        series[number] = uids["series"]

    denied = semiseg("pacs", "list", "--url", pacs.url)  # no credentials
    assert denied.returncode == 2 and denied.stderr.count("\n") == 1 and "HTTP 401" in denied.stderr
    rows = _json("pacs", "list", "--url", pacs.url)
    assert sorted((r["SeriesNumber"], r["SeriesInstanceUID"], r["Modality"]) for r in rows) == \
        [(1, series[1], "CT"), (2, series[2], "CT")]

    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "tumour": 1}))
    root = tmp_path / "project"
    pulled = _json("pacs", "pull", root, "--url", pacs.url, "--all", "--labels-json", tmp_path / "labels.json",
                   "--modality", "CT")
    assert pulled["cases"] == {"SEMISEG1_s1": series[1], "SEMISEG1_s2": series[2]}
    project = Project.open(root)
    for number, case in ((1, "SEMISEG1_s1"), (2, "SEMISEG1_s2")):
        crop = _crop(CT, CROPS[number])
        assert np.array_equal(project.read_image(case).array, crop.array)
        assert project.read_image(case).geometry_mismatch(crop, tol=1e-3) is None
        assert read_refs(project, case)["series_instance_uid"] == series[number]
    again = _json("pacs", "pull", root, "--url", pacs.url, "--series", series[2])  # already there: not retrieved
    assert again["cases"] == {"SEMISEG1_s2": series[2]} and len(Project.open(root).case_ids()) == 2

    write_volume(_crop(CT_LABEL, CROPS[1]), tmp_path / "label1.nii.gz")
    assert semiseg("accept", root, "SEMISEG1_s1", tmp_path / "label1.nii.gz").returncode == 0
    from backend.engine.inference import infer
    from backend.engine.training import train
    from backend.review.corrections import accept_correction

    trained = train(project, "supervised", preset="tiny", steps=2, device="cpu")
    run = infer(project, "supervised", run=trained, device="cpu")  # the pseudo-label run the reviewer opens
    scores = project.scores("supervised", run)
    view = scores.get("primary_view") or scores["views"][0]
    pseudo = read_volume(project.pseudo_dir("supervised", run) / "SEMISEG1_s2" / f"{view}.nii.gz").array
    corrected = _crop(CT_LABEL, CROPS[2]).array.astype(np.uint8)  # the reviewer draws the reference tumour
    accept_correction(project, "SEMISEG1_s2", corrected, source=f"supervised:{view}", start=pseudo,
                      extra={"runs": {"supervised": run}})

    pushed = semiseg("pacs", "push", root, "--url", pacs.url, env=AUTH)
    assert pushed.returncode == 0, pushed.stderr
    assert [line.split(":")[0] for line in pushed.stdout.splitlines()] == ["SEMISEG1_s1", "SEMISEG1_s2"]
    segs = _json("pacs", "list", "--url", pacs.url, "--modality", "SEG")
    assert sorted(tuple(r["references"]) for r in segs) == sorted([(series[1],), (series[2],)])

    from dicomweb_client import DICOMwebClient
    import highdicom as hd
    import requests

    session = requests.Session()
    session.auth = next(iter(USER.items()))
    client = DICOMwebClient(pacs.url, session=session)
    seg_row = next(r for r in segs if r["references"] == [series[2]])
    stored = client.retrieve_series(seg_row["StudyInstanceUID"], seg_row["SeriesInstanceUID"])
    assert len(stored) == 1 and stored[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    seg = hd.seg.Segmentation.from_dataset(stored[0])
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "tumour" and segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("supervised", run)
    sources = [i["sop_instance_uid"] for i in read_refs(project, "SEMISEG1_s2")["instances"]]
    assert {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence} == set(sources)
    pixels = seg.get_pixels_by_source_instance(sources, combine_segments=True, dtype=np.uint8)
    assert np.array_equal(pixels, corrected) and corrected.any()
    manual = next(r for r in segs if r["references"] == [series[1]])
    first = client.retrieve_series(manual["StudyInstanceUID"], manual["SeriesInstanceUID"])[0]
    assert first.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"

    # a series with a missing slice on the PACS: one line, the project untouched
    broken = tmp_path / "broken"
    write_dicom_series(_crop(CT, (20, 40, 40)), broken, modality="CT", study_uid=study, frame_uid=frame,
                       series_number=3)
    (broken / "slice_0010.dcm").unlink()
    pacs.store(broken)
    before = folder_hash(root)
    third = next(r["SeriesInstanceUID"] for r in _json("pacs", "list", "--url", pacs.url)
                 if r["SeriesNumber"] == 3)
    refused = semiseg("pacs", "pull", root, "--url", pacs.url, "--series", third, env=AUTH)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "missing slice" in refused.stderr and "SEMISEG1_s3" in refused.stderr
    assert folder_hash(root) == before


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_bearer_token_is_sent_and_a_refusal_is_one_line():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        out = semiseg("pacs", "list", "--url", url, env={"SEMISEG_PACS_TOKEN": "tok-123"})
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "search failed: HTTP 401 (check --user/--token)" in out.stderr and url in out.stderr
    assert _Recorder.seen == ["Bearer tok-123"]


def test_orthanc_dies_with_the_process_that_started_it(tmp_path):
    """A test process killed outright (SIGKILL: no teardown) leaves no Orthanc behind (parent death signal)."""
    code = ("import sys, time; from pathlib import Path; from helpers.orthanc import Orthanc; "
            f"o = Orthanc(Path({str(tmp_path)!r})); print(o.process.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    pid = int(parent.stdout.readline())

    def running() -> bool:  # a zombie (not reaped yet by whoever adopted it) has stopped too
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    assert running()
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 20
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    if running():
        os.kill(pid, signal.SIGKILL)
        pytest.fail("Orthanc outlived the process that started it")
