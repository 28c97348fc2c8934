"""Example datasets (docs/retrieve_example_data.md): the Domínguez Conde sample from Google Drive and
scanpy's bundled ``pbmc68k_reduced`` (offline); download, fallback and validation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import anndata as ad
import numpy as np
import scipy.sparse as sp

from utils.cli import InputError
from utils.contract import EXAMPLE

logger = logging.getLogger("cell2sentence")

DOMINGUEZ_GDRIVE_ID = "1PYUM59fKclw-aeN79oL5ghCkU4kn6XvN"
DOMINGUEZ_FILENAME, PBMC68K_FILENAME = EXAMPLE.dominguez, EXAMPLE.pbmc68k

Downloader = Callable[[BinaryIO], None]


class DownloadUnavailable(Exception):
    """The download could not reach the server or was cut off; the message says why."""


def download_from_drive(file_id: str, out: BinaryIO, *, timeout: float, quiet: bool = False) -> None:
    """Stream a Google Drive file into ``out`` with gdown; network failures raise ``DownloadUnavailable``."""
    import gdown
    import requests
    from gdown.exceptions import DownloadError

    try:
        gdown.download(id=file_id, output=out, quiet=quiet, timeout=timeout)
    except (requests.exceptions.RequestException, DownloadError) as err:
        raise DownloadUnavailable(_short_reason(err)) from err


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for marker in ("Failed to resolve", "Name or service not known", "timed out", "Connection refused"):
        if marker in text:
            return f"{type(err).__name__}: {marker.lower()}"
    return f"{type(err).__name__}: {text[:200]}"


def check_example_h5ad(path: Path) -> ad.AnnData:
    """Read ``path``; :class:`InputError` unless it holds cells, genes and what transform.py accepts
    (non-negative, finite values, some non-zero) in ``.raw.X`` when present, else ``.X``."""
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a file that is not an h5ad
        raise InputError(f"{path} is not a readable h5ad file ({type(err).__name__}); "
                         "delete it and fetch it again with --force.") from err
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{path} holds an empty matrix ({adata.n_obs} x {adata.n_vars}); fetch it again with --force.")
    matrix = adata.raw.X if adata.raw is not None else adata.X  # what transform.py ranks
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    where = ".raw.X" if adata.raw is not None else ".X"
    if values.size == 0 or not np.any(values):
        raise InputError(f"{path} has no expression values ({where} is all zero); fetch it again with --force.")
    if not np.all(np.isfinite(values)) or values.min() < 0:
        raise InputError(f"{path} does not hold counts ({where} has negative or non-finite values, "
                         "e.g. scaled data); use a file with raw or log-normalized counts.")
    return adata


def fetch_to_file(download: Downloader, dest: Path) -> ad.AnnData:
    """Download into ``<dest>.part``, check it, then rename to ``dest``; nothing is left on failure."""

    def write(part: Path) -> None:
        with part.open("wb") as handle:
            download(handle)

    return _write_checked(write, dest)


def _write_checked(write: Callable[[Path], object], dest: Path) -> ad.AnnData:
    part = dest.with_name(dest.name + ".part")
    try:
        write(part)
        adata = check_example_h5ad(part)
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return adata


def prepare_pbmc68k_reduced() -> ad.AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` made ready for transform.py: ``bulk_labels`` as
    ``obs["cell_type"]`` (10 types), the log1p values of ``.raw`` in ``.X``, ``uns["log1p"] = {"base": None}``."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    if adata.raw is None or "bulk_labels" not in adata.obs:
        raise InputError("scanpy's pbmc68k_reduced has no .raw or no bulk_labels in this scanpy version; "
                         "use --dataset dominguez with internet access instead.")
    adata.obs["cell_type"] = adata.obs["bulk_labels"].astype(str).astype("category")
    raw = adata.raw.to_adata()
    # Same 765 genes in the same order, so .X can take the log1p values of .raw.
    if list(raw.var_names) != list(adata.var_names):
        adata = adata[:, raw.var_names].copy()
    adata.X = sp.csr_matrix(raw.X, dtype=np.float32)
    adata.uns["log1p"] = {"base": None}
    return adata


def write_h5ad_atomically(adata: ad.AnnData, dest: Path) -> None:
    """Write ``adata`` to ``<dest>.part``, check it, then rename; nothing is left on failure."""
    _write_checked(adata.write_h5ad, dest)


def write_text_atomically(text: str, dest: Path) -> None:
    """Write a small text file through a temporary sibling and an atomic rename."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(dest)
