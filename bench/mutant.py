"""The one-line bug kept by the mutation benches (:mod:`bench.mutants`, :mod:`bench.mutants_paper`)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A one-line bug: ``old`` (an exact piece of one line of ``file``, unique in it) becomes ``new``."""

    file: str
    old: str
    new: str
    why: str
