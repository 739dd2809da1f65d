"""The real sample projects, installed as the package ``semiseg_sample_data`` (see README.md here)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TASKS = ("brain_tissue", "lesions")
