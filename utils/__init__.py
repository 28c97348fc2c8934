"""Shared logic of the cell2sentence scripts, and the Python API (``_EXPORTS``, loaded lazily).

numba checks only a cached kernel's own file, not the modules it inlines (``rank_row``), so the
cache lives in a folder named after the hash of every module here: any change starts a fresh one.
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
    for source in sorted(here.rglob("*.py")):
        digest.update(str(source.relative_to(here)).encode())
        digest.update(source.read_bytes())
    from numba import config  # before any module here defines a cached kernel

    config.CACHE_DIR = str(here / "__pycache__" / f"numba-{digest.hexdigest()[:12]}")


_use_cache_of_this_version()

_EXPORTS = {
    "adata_to_sentences": "utils.transform.sentences",
    "CellSentences": "utils.transform.sentences",
    "sentences_to_adata": "utils.inverse",
    "sentences_to_expression": "utils.inverse",
    "load_transform_fit": "utils.inverse",
    "load_vocab": "utils.inverse",
    "RankExpressionFit": "utils.transform.fit",
    "fit_rank_expression": "utils.transform.fit",
    "QCParams": "utils.transform.preprocess",
    # The model API imports transformers (seconds).
    "CellSentenceModel": "utils.models.cell_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'utils' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
