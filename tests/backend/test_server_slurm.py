"""`semiseg serve --backend slurm`: the jobs a client starts over HTTP go to SLURM through submitit (a fake sbatch
on PATH records the script), and the server reports them queued from sacct, as the CLI does."""
from __future__ import annotations

import httpx

from helpers.fake_slurm import install_fake_slurm
from helpers.semiseg_server import SemisegServer

from backend.jobs.store import JobPaths
from backend.project.sample import copy_sample

API = "/api/v1"


def test_a_job_started_over_http_lands_in_a_slurm_submission_with_the_servers_resources(tmp_path, monkeypatch):
    record = install_fake_slurm(tmp_path, monkeypatch)  # before the server starts: it inherits PATH
    project = copy_sample(tmp_path / "project", "brain_tissue")
    server = SemisegServer(project.root, tmp_path / "server",
                           extra=("--backend", "slurm", "--partition", "gpu-a100", "--gpus", "2", "--time", "30"))
    try:
        headers = server.headers("boss")
        info = httpx.get(server.url + API + "/info", headers=headers, timeout=30).json()
        assert info["job_backend"] == "slurm"
        spec = {"kind": "train", "method": "supervised", "preset": "tiny", "steps": 2, "device": "cpu", "nproc": 2}
        answer = httpx.post(server.url + API + "/jobs", json=spec, headers=headers, timeout=60)
        assert answer.status_code == 201, answer.text
        job = answer.json()
        assert job["state"] == "queued" and job["backend"] == "slurm"
        script = (record / "script.sh").read_text().splitlines()
        for flag in ("--partition=gpu-a100", "--gpus-per-node=2", "--time=30", "--requeue"):
            assert f"#SBATCH {flag}" in script, flag
        assert JobPaths.existing(project.root, job["id"]).backend_record()["scheduler_job"] == "4242"
        # an annotator cannot submit; the trainer's cancel reaches scancel
        assert httpx.post(server.url + API + "/jobs", json=spec, headers=server.headers("ann"),
                          timeout=30).status_code == 403
        done = httpx.post(server.url + API + f"/jobs/{job['id']}/cancel", headers=headers, timeout=60).json()
        assert done["state"] == "cancelled" and (record / "scancel.calls").read_text().split() == ["4242"]
    finally:
        server.stop()
