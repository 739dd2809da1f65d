"""Latency of ``semiseg serve`` over loopback (issue 20): list the cases, get an image (the whole NIfTI, and a
revalidation answered 304), put a corrected label (the client encodes it, the server validates it and runs the
journaled accept), for the real sample case and for a synthetic 512x512x300 case (the real MNI152 volume
resampled, so it compresses like a scan, and its label likewise).

The server runs as ``semiseg serve`` in a subprocess on 127.0.0.1; the client is :class:`backend.remote.RemoteProject`
(and raw httpx for the cold downloads).  Prints a markdown table (median and p95 of N requests each).

    python bench/server.py                       # N=20 (5 for the big case's transfers)
    python bench/server.py --n 50 --out bench/results/server-cpu-2core.md
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.io.volume import Volume, write_volume  # noqa: E402
from backend.project import Project  # noqa: E402
from backend.project.sample import copy_sample  # noqa: E402
from backend.remote import RemoteProject  # noqa: E402
from backend.review.corrections import accept_correction  # noqa: E402
from backend.server.auth import add_token  # noqa: E402

SAMPLE_CASE = "mni152_t1"
BIG_CASE = "synthetic_512"
BIG_SHAPE = (300, 512, 512)  # z, y, x


def big_case(project) -> None:
    """The sample's MNI152 image and label resampled to :data:`BIG_SHAPE` (linear / nearest)."""
    from scipy.ndimage import zoom

    image, label = project.read_image(SAMPLE_CASE), project.read_label(SAMPLE_CASE)
    factors = [n / s for n, s in zip(BIG_SHAPE, image.shape)]
    spacing = tuple(sp * s / n for sp, s, n in zip(image.spacing, image.shape[::-1], BIG_SHAPE[::-1]))
    big = Volume(zoom(image.array.astype(np.float32), factors, order=1).astype(np.int16), spacing, image.origin,
                 image.direction)
    project.add_case(BIG_CASE, big, big.like(zoom(label.array, factors, order=0).astype(np.uint8)))


def start_server(project_root: Path, folder: Path) -> tuple[subprocess.Popen, str, str]:
    import socket

    token = add_token(folder / "tokens.json", "bench", "trainer")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", str(project_root), "--port", str(port),
                             "--tokens", str(folder / "tokens.json"), "--log-level", "warning"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                return proc, url, token
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("semiseg serve did not start")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure(client: RemoteProject, url: str, token: str, case: str, n: int,
            project_root: Path) -> list[tuple[str, int, int, list]]:
    headers = {"Authorization": f"Bearer {token}"}
    raw = httpx.Client(base_url=url + "/api/v1", headers=headers, timeout=300)
    rows = []
    size = len(raw.get(f"/cases/{case}/image").content)
    rows.append(("get image (whole file)", size, n, timed(lambda: raw.get(f"/cases/{case}/image").content, n)))
    etag = raw.get(f"/cases/{case}/image").headers["etag"]
    rows.append(("get image again (If-None-Match: 304)", 0, n,
                 timed(lambda: raw.get(f"/cases/{case}/image", headers={"If-None-Match": etag}), n)))
    client.read_image(case)  # the client's ETag cache now holds it
    rows.append(("RemoteProject.read_image, cached (304 + decode)", 0, n, timed(lambda: client.read_image(case), n)))
    label = client.read_label(case).array.copy()
    state = {"version": client.label_version(case), "flip": 0}

    def put() -> None:
        state["flip"] ^= 1
        label[0, 0, 0] = state["flip"]  # a real change each time
        state["version"] = client.accept(case, label, source="bench", expected_version=state["version"])[
            "label_version"]
    encoded = client.http.cache_dir / "encoded.nii.gz"
    write_volume(client.image_geometry(case).like(label), encoded)
    rows.append(("put label (encode, upload, validate, journaled accept)", encoded.stat().st_size, n, timed(put, n)))
    project = Project.open(project_root)

    def local() -> None:  # the same accept without the server: what the network and HTTP add is the difference
        state["flip"] ^= 1
        label[0, 0, 0] = state["flip"]
        accept_correction(project, case, label, source="bench")
    rows.append(("(baseline) local accept_correction, no server", 0, n, timed(local, n)))
    raw.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="requests per row (sample case)")
    parser.add_argument("--n-big", type=int, default=5, help="requests per row (512x512x300 case)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        project = copy_sample(tmp / "project", "brain_tissue")
        t0 = time.perf_counter()
        big_case(project)
        prep = time.perf_counter() - t0
        proc, url, token = start_server(project.root, tmp)
        try:
            client = RemoteProject(url, token, cache_dir=tmp / "cache")
            list_ms = timed(lambda: client.review_rows(), args.n)
            results = [("list cases (review queue, 5 cases)", "-", 0, args.n, list_ms)]
            for case, n in ((SAMPLE_CASE, args.n), (BIG_CASE, args.n_big)):
                shape = "x".join(map(str, project.image_header(case)[0][::-1]))
                for what, size, count, ms in measure(client, url, token, case, n, project.root):
                    results.append((what, f"{case} ({shape})", size, count, ms))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [f"# semiseg serve latency over loopback ({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), load average "
             f"{os.getloadavg()[0]:.1f} at the end; python {platform.python_version()}, httpx {httpx.__version__}",
             f"- server: `semiseg serve` (uvicorn, one process) on 127.0.0.1, client `RemoteProject` / httpx in "
             f"another process; synthetic case made in {prep:.0f} s", "",
             "| operation | case | bytes | n | median | p95 |", "|---|---|---|---|---|---|"]
    for what, case, size, n, ms in results:
        nbytes = "-" if not size else (f"{size / 1e6:.1f} MB" if size > 1e5 else f"{size / 1e3:.0f} kB")
        lines.append(f"| {what} | {case} | {nbytes} | {n} | {np.median(ms):.0f} ms | "
                     f"{np.percentile(ms, 95):.0f} ms |")
    lines += ["", "bytes: what crosses the wire (the gzipped NIfTI as stored; a put sends the label gzipped by the "
              "client). The baseline row is the same accept in the bench's own process, without HTTP."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
