"""``semiseg serve`` in a subprocess on a copy of the real brain-tissue sample, driven over loopback by a real HTTP
client (RemoteProject and raw httpx): tokens and roles, the review queue, images with content-hash ETags and 304,
accepting labels with If-Match (409 on a stale version), paths refused in URLs, and each connection failure the
client names.  The job half (training, events, cancel, resume, inference, a server restart) is
test_server_jobs.py."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys

import httpx
import numpy as np
import pytest

from backend.errors import InputError, LabelConflictError
from backend.io.volume import read_volume
from backend.project import Project
from backend.project.sample import copy_sample
from backend.remote import (ConnectionRefused, Forbidden, HostNotFound, RemoteProject, RemoteTimeout, TLSFailure,
                            Unauthorized)
from backend.review.corrections import flags, list_drafts, load_draft, save_draft
from backend.review.queue import review_rows
from helpers.orthanc import free_port
from helpers.semiseg_server import SemisegServer, serving

API = "/api/v1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    copy_sample(folder / "project", "brain_tissue")
    with serving(folder / "project", folder / "server") as running:
        yield running


def get(server, path, user="boss", **kwargs):
    return httpx.get(server.url + API + path, headers={**server.headers(user), **kwargs.pop("headers", {})},
                     **kwargs)


def test_tokens_are_stored_hashed_and_required(server):
    assert httpx.get(server.url + API + "/health").json()["status"] == "ok"  # liveness needs no token
    assert httpx.get(server.url + API + "/info").status_code == 401
    assert httpx.get(server.url + API + "/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert get(server, "/cases", headers={"Authorization": f"Basic {server.tokens['ann']}"}).status_code == 401
    info = get(server, "/info", user="ann").json()
    assert (info["user"], info["role"], info["name"]) == ("ann", "annotator", "brain_tissue")
    text = server.tokens_file.read_text()
    assert server.tokens["ann"] not in text and server.tokens["boss"] not in text
    stored = json.loads(text)["users"]["ann"]["sha256"]
    assert stored == hashlib.sha256(server.tokens["ann"].encode()).hexdigest()
    assert stat.S_IMODE(os.stat(server.tokens_file).st_mode) == 0o600


def test_token_cli_adds_a_user_the_running_server_accepts(server):
    out = subprocess.run([sys.executable, "-m", "backend.cli", "token", "add", "carol", "--role", "trainer",
                          "--tokens", str(server.tokens_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]
    assert token not in server.tokens_file.read_text()
    answer = httpx.get(server.url + API + "/info", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.json()["role"] == "trainer"  # no restart needed
    subprocess.run([sys.executable, "-m", "backend.cli", "token", "remove", "carol", "--tokens",
                    str(server.tokens_file)], check=True, capture_output=True, timeout=60)
    assert httpx.get(server.url + API + "/info", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_cases_come_in_the_review_order_with_label_versions(server):
    project = Project.open(server.root)
    rows = server.client("ann").review_rows()
    assert [r["case"] for r in rows] == [r["case"] for r in review_rows(project)]
    assert {r["case"]: r["label_version"] for r in rows} == {c: project.label_version(c) for c in project.case_ids()}
    assert server.client("ann").labeled_cases() == project.labeled_cases()
    assert get(server, "/cases", params={"score": "nonsense"}).status_code == 422
    ann = server.client("ann")
    ann.flag_case("colin27_ch2better", reason="motion")
    assert flags(project)["colin27_ch2better"]["user"] == "ann" and ann.flags() == {"colin27_ch2better": True}
    ann.unflag_case("colin27_ch2better")
    assert flags(project) == {} and not any(r["flagged"] for r in ann.review_rows())


def test_image_has_a_content_etag_and_the_client_caches_it(server):
    project = Project.open(server.root)
    path = project.image_path("colin27_ch2")
    answer = get(server, "/cases/colin27_ch2/image")
    assert answer.status_code == 200 and answer.content == path.read_bytes()
    etag = answer.headers["etag"]
    assert etag == f'"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"'
    again = get(server, "/cases/colin27_ch2/image", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert get(server, "/cases/colin27_ch2/image", headers={"If-None-Match": '"sha256:0"'}).status_code == 200

    client = server.client("ann")
    image = client.read_image("colin27_ch2")
    local = project.read_image("colin27_ch2")
    assert np.array_equal(image.array, local.array) and np.allclose(image.affine_lps, local.affine_lps)
    cached = client.image_path("colin27_ch2")
    before = cached.stat().st_mtime_ns
    assert client.image_path("colin27_ch2") == cached and cached.stat().st_mtime_ns == before  # a 304, not a copy


def test_put_label_with_if_match_and_a_stale_put_conflicts(server):
    project = Project.open(server.root)
    case = "mni152_t1"
    ann = server.client("ann")
    version = ann.label_version(case)
    assert version == project.label_version(case)
    label, label_version = ann.read_label_versioned(case)
    assert label_version == version and np.array_equal(label.array, project.read_label(case).array)
    corrected = label.array.copy()
    corrected[40:44, 50:60, 50:60] = 2
    record = ann.accept(case, corrected, source="diffrect:rectified", start=label.array, seconds=12.0,
                        expected_version=version)
    assert record["user"] == "ann" and record["voxels_edited"] == int(np.count_nonzero(corrected != label.array))
    assert record["label_version"] == project.label_version(case) != version
    assert np.array_equal(read_volume(project.label_path(case)).array, corrected)
    assert project.history(case)[-1]["user"] == "ann"  # the journaled accept's history, provenance = the token

    other = server.client("boss")  # a second reviewer who opened the case before that accept
    with pytest.raises(LabelConflictError, match="changed on disk"):
        other.accept(case, label.array, expected_version=version)
    assert np.array_equal(read_volume(project.label_path(case)).array, corrected)  # nothing lost
    raw = httpx.put(server.url + API + f"/cases/{case}/label", content=b"x", headers=server.headers("ann"))
    assert raw.status_code == 428  # no If-Match: refused, never a blind overwrite

    bad = httpx.put(server.url + API + f"/cases/{case}/label", content=b"not a nifti",
                    headers={**server.headers("ann"), "If-Match": f'"{record["label_version"]}"'})
    assert bad.status_code == 400 and "\n" not in bad.json()["detail"]
    with pytest.raises(InputError, match="does not match its image"):
        ann.accept(case, project.read_image("colin27_ch2").like(corrected[:90, :108, :90]),
                   expected_version=record["label_version"])

    new = "colin27_ch2"  # no label yet: If-None-Match: *; a second "first" label conflicts
    assert ann.label_version(new) is None
    first = np.zeros(project.image_header(new)[0], np.uint8)
    first[30:40, 30:40, 30:40] = 1
    ann.accept(new, first, expected_version=None)
    assert project.is_labeled(new)
    with pytest.raises(LabelConflictError):
        other.accept(new, first, expected_version=None)


def test_a_lost_connection_keeps_the_edit_as_a_local_draft(server, tmp_path):
    project = Project.open(server.root)
    case = "itk_kmeans_t1"
    ann = server.client("ann")
    version = ann.label_version(case)
    edited = ann.read_label(case).array.copy()
    edited[10:20, 10:20, 10:20] = 1
    save_draft(ann, case, ann.image_geometry(case).like(edited), {"started_from": "accepted label"})
    gone = RemoteProject(f"http://127.0.0.1:{free_port()}", server.tokens["ann"], cache_dir=ann.http.cache_dir)
    with pytest.raises(ConnectionRefused):  # the server went away: the accept fails with one line ...
        gone.accept(case, edited, expected_version=version)
    volume, info = load_draft(gone, case)  # ... and the edit is still on this machine, offered again
    assert np.array_equal(volume.array, edited) and info["started_from"] == "accepted label"
    assert list_drafts(ann) == [case] and list_drafts(project) == []  # local only, nothing on the server
    assert project.label_version(case) == version


def test_the_client_does_not_import_torch():
    """napari's process imports backend.remote; it must not load torch (nor must the server, to start fast)."""
    code = "import sys, backend.remote, backend.server.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_case_ids_run_and_job_names_are_not_paths(server):
    for path in ("/cases/..%2F..%2Fdataset.json/image", "/cases/%2E%2E/image", "/cases/..%2Fimages/label",
                 "/cases/nonexistent/image", "/cases/mni152_t1/views/..%2F..%2F/x/y",
                 "/cases/mni152_t1/views/supervised/..%2F..%2Fmodels/prediction",
                 "/runs/supervised/..%2F..%2F..%2Fdataset.json/weights", "/runs/..%2F/0-pretrained/weights",
                 "/jobs/..%2F..%2Fdataset.json", "/jobs/..%2F..%2Fdataset.json/events", "/scores/..%2Fmodels"):
        answer = get(server, path)
        assert answer.status_code == 404, (path, answer.status_code, answer.text)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # a literal ../, unnormalised
        sock.sendall(f"GET {API}/cases/../dataset.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{server.tokens['boss']}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b"\r\n", 1)[0].endswith(b"404 Not Found") and b"numTraining" not in reply


def test_annotator_may_not_start_training(server):
    jobs = Project.open(server.root).jobs_dir
    before = sorted(jobs.iterdir()) if jobs.is_dir() else []
    with pytest.raises(Forbidden, match="annotator"):
        server.client("ann").start_job({"kind": "train", "method": "supervised", "preset": "tiny", "steps": 1})
    answer = httpx.post(server.url + API + "/jobs", json={"method": "supervised"}, headers=server.headers("ann"))
    assert answer.status_code == 403
    assert (sorted(jobs.iterdir()) if jobs.is_dir() else []) == before  # nothing was started
    assert httpx.post(server.url + API + "/jobs", json={"method": "supervised"}).status_code == 401


def test_connection_errors_are_specific(server, tmp_path):
    with pytest.raises(Unauthorized, match="401"):
        RemoteProject(server.url, "wrong", cache_dir=tmp_path).test_connection()
    with pytest.raises(ConnectionRefused, match="refused"):
        RemoteProject(f"http://127.0.0.1:{free_port()}", "t", cache_dir=tmp_path).test_connection()
    with pytest.raises(HostNotFound, match="DNS"):
        RemoteProject("http://no-such-host.invalid:8765", "t", cache_dir=tmp_path).test_connection()
    with pytest.raises(TLSFailure, match="TLS"):  # https to a plain-http server
        RemoteProject(server.url.replace("http:", "https:"), "t", cache_dir=tmp_path).test_connection()
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with pytest.raises(RemoteTimeout, match="no answer"):
            RemoteProject(f"http://127.0.0.1:{silent.getsockname()[1]}", "t", cache_dir=tmp_path,
                          timeout=0.5).test_connection()


def test_tls_server_with_a_self_signed_certificate(server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                           "-out", str(cert)], capture_output=True, timeout=60) if _has_openssl() else None
    if made is None or made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    tls = SemisegServer(server.root, tmp_path / "tls", extra=("--tls-cert", str(cert), "--tls-key", str(key)),
                        scheme="https")
    try:
        assert RemoteProject(tls.url, tls.tokens["ann"], cache_dir=tmp_path / "c", verify=str(cert)) \
            .test_connection()["user"] == "ann"
        with pytest.raises(TLSFailure, match="certificate"):
            RemoteProject(tls.url, tls.tokens["ann"], cache_dir=tmp_path / "c").test_connection()
    finally:
        tls.stop()


def _has_openssl() -> bool:
    from shutil import which

    return which("openssl") is not None


def test_serve_without_users_is_one_line(tmp_path):
    copy_sample(tmp_path / "p", "brain_tissue")
    out = subprocess.run([sys.executable, "-m", "backend.cli", "serve", str(tmp_path / "p"), "--port",
                          str(free_port()), "--tokens", str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "semiseg token add" in out.stderr


def test_choices_are_the_servers_methods_presets_and_devices_for_any_user(server):
    """GET choices: what the training form offers, computed on the server (its devices, not the laptop's)."""
    from backend.jobs.choices import training_choices

    assert httpx.get(server.url + API + "/choices", timeout=30).status_code == 401
    answer = get(server, "/choices", user="ann", timeout=120)
    assert answer.status_code == 200
    assert answer.json() == training_choices()  # the same machine here: the same methods and devices
    assert server.client("ann").training_choices()["methods"]["diffrect"]
