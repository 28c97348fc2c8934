"""Shared, importable logic of the cell2sentence scripts.

numba caches compiled kernels per source file and checks only that file's time stamp, so a
kernel that inlines a function from another module (the sentence kernel calls ``rank_row`` from
``ranking.py``) would keep running the old code after an update. The cache therefore lives in a
folder named after the hash of every module here: any change starts a fresh one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _use_cache_of_this_version() -> None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return  # the user chose a place
    here = Path(__file__).parent
    digest = hashlib.sha1()
    for source in sorted(here.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    from numba import config  # before any module here defines a cached kernel

    config.CACHE_DIR = str(here / "__pycache__" / f"numba-{digest.hexdigest()[:12]}")


_use_cache_of_this_version()


def __getattr__(name: str):
    # The model API imports transformers (seconds): loaded on first use, not with every script.
    if name == "CellSentenceModel":
        from utils.cell_model import CellSentenceModel

        return CellSentenceModel
    raise AttributeError(f"module 'utils' has no attribute {name!r}")
