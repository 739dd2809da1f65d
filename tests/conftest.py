"""Shared fixtures: real sample projects copied to a temp folder, small thread counts for 2-core CI."""
from __future__ import annotations

import locale
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


_LOCALE_AT_START = locale.setlocale(locale.LC_ALL)


@pytest.fixture(autouse=True)
def _restore_locale():
    """SimpleITK's DICOM (GDCM) writer, which tests use to make DICOM series, sets the process locale to "C",
    after which Python's default text encoding is ASCII; put back the locale the session started with, before and
    after each test, so no test depends on the order (a module-scoped fixture that writes a series runs before
    this fixture: saving the locale here would save its "C")."""
    def restore() -> None:
        if locale.setlocale(locale.LC_ALL) != _LOCALE_AT_START:
            locale.setlocale(locale.LC_ALL, _LOCALE_AT_START)

    restore()
    yield
    restore()


@pytest.fixture
def brain_project(tmp_path):
    """A fresh copy of the real brain-tissue sample project."""
    from backend.project.sample import copy_sample

    return copy_sample(tmp_path / "brain", "brain_tissue")


@pytest.fixture
def lesion_project(tmp_path):
    from backend.project.sample import copy_sample

    return copy_sample(tmp_path / "lesions", "lesions")


@pytest.fixture
def one_torch_thread():
    """For tests of tiny nets: one intra-op thread is as fast, and on a shared, loaded 2-core machine two threads
    wait on each other at every one of a step's ~1000 small ops (measured: 0.3 s -> 4-10 s per tiny step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
