"""Example datasets for trying the pipeline: download, bundled fallback and validation.

Two sources:

``dominguez``
    A 1,000-cell subset of the cross-tissue immune cell atlas of Domínguez Conde et al.,
    Science 376 (2022), eabl5197, as published by the original Cell2Sentence project on
    Google Drive (file id ``1PYUM59fKclw-aeN79oL5ghCkU4kn6XvN``). Needs the internet.

``pbmc68k_reduced``
    scanpy's bundled ``sc.datasets.pbmc68k_reduced()`` (ships inside the scanpy package, so
    it works offline): 700 PBMCs from 10x Genomics' "Fresh 68k PBMCs" (Zheng et al., 2017),
    765 genes, labels in ``obs["bulk_labels"]`` (10 types, e.g. 240 "Dendritic",
    129 "CD14+ Monocyte", 95 "CD19+ B"). What it really holds, as inspected:

    - ``.X`` is *scaled* data (per-gene z-scores, min -2.0, max 28.4): not expression,
      negative values, unusable for ranking genes within a cell.
    - ``.raw.X`` (CSR float32, 765 genes, ~249 expressed genes per cell) is the natural-log
      ``log1p`` of library-size-normalized counts, ``ln(1 + 1e4 * counts / n_counts)``, where
      ``obs["n_counts"]`` is the total over *all* genes of the original matrix:
      ``expm1(raw.X) * n_counts / 1e4`` gives integers (all non-zeros within 0.08 of an
      integer, the smallest exactly 1), and the ``expm1`` row sums are 1,093–2,782 (median
      2,007) rather than 10,000 because the 765 genes kept hold 11–28% of each cell's counts.
    - ``uns`` has no ``"log1p"`` entry, so nothing tells a reader the values are logged.

    :func:`prepare_pbmc68k_reduced` therefore copies ``bulk_labels`` to
    ``obs["cell_type"]``, replaces ``.X`` by the log1p values of ``.raw`` (so ``.X``, ``.raw``
    and ``uns["log1p"]`` agree), keeps ``.raw``, and sets ``uns["log1p"] = {"base": None}``
    (scanpy's marker for the natural log), so that transform.py takes the file as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import anndata as ad
import numpy as np
import scipy.sparse as sp

from utils.cli import InputError

logger = logging.getLogger("cell2sentence")

DOMINGUEZ_GDRIVE_ID = "1PYUM59fKclw-aeN79oL5ghCkU4kn6XvN"
DOMINGUEZ_FILENAME = "dominguez_sample.h5ad"
PBMC68K_FILENAME = "pbmc68k_reduced.h5ad"

Downloader = Callable[[BinaryIO], None]


class DownloadUnavailable(Exception):
    """The download could not reach the server or was cut off; the message says why."""


def part_path(dest: Path) -> Path:
    """The partial file a download of ``dest`` is written to: ``<dest>.part``."""
    return dest.with_name(dest.name + ".part")


def download_from_drive(
    file_id: str, out: BinaryIO, *, timeout: float, quiet: bool = False
) -> None:
    """Stream a Google Drive file into ``out`` with gdown (progress bar unless ``quiet``).

    Network failures (no route, DNS, proxy refusal, timeout, a transfer cut off, Drive
    refusing the file) are raised as :class:`DownloadUnavailable`.
    """
    import gdown
    import requests
    from gdown.exceptions import DownloadError

    try:
        gdown.download(id=file_id, output=out, quiet=quiet, timeout=timeout)
    except (requests.exceptions.RequestException, DownloadError) as err:
        raise DownloadUnavailable(_short_reason(err)) from err


def _short_reason(err: BaseException) -> str:
    """A one-line reason from a (possibly very long) network exception."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for marker in (
        "Failed to resolve",
        "Name or service not known",
        "timed out",
        "Connection refused",
    ):
        if marker in text:
            return f"{type(err).__name__}: {marker.lower()}"
    return f"{type(err).__name__}: {text[:200]}"


def counts_matrix(adata: ad.AnnData) -> sp.spmatrix | np.ndarray:
    """The matrix transform.py ranks: ``.raw.X`` when present, else ``.X``."""
    return adata.raw.X if adata.raw is not None else adata.X


def check_example_h5ad(path: Path) -> ad.AnnData:
    """Read ``path`` and check it is an AnnData with cells, genes and expression values.

    "Counts" here means what transform.py accepts: non-negative, finite values with at
    least one non-zero, in ``.raw.X`` when present, else ``.X`` (raw counts, or their
    normalized log1p). Raises :class:`InputError` otherwise.
    """
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a file that is not an h5ad
        raise InputError(
            f"{path} is not a readable h5ad file ({type(err).__name__}); "
            "delete it and fetch it again with --force."
        ) from err
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"{path} holds an empty matrix ({adata.n_obs} x {adata.n_vars}); fetch it again with --force."
        )
    matrix = counts_matrix(adata)
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    where = ".raw.X" if adata.raw is not None else ".X"
    if values.size == 0 or not np.any(values):
        raise InputError(
            f"{path} has no expression values ({where} is all zero); fetch it again with --force."
        )
    if not np.all(np.isfinite(values)) or values.min() < 0:
        raise InputError(
            f"{path} does not hold counts ({where} has negative or non-finite values, "
            "e.g. scaled data); use a file with raw or log-normalized counts."
        )
    return adata


def fetch_to_file(download: Downloader, dest: Path) -> ad.AnnData:
    """Download into ``<dest>.part``, check it is an h5ad with counts, then rename to ``dest``.

    Whatever goes wrong (network error, Ctrl-C, a corrupt file), neither the ``.part`` file
    nor ``dest`` is left behind, so a later run never mistakes half a file for the data.
    """
    part = part_path(dest)
    try:
        with part.open("wb") as handle:
            download(handle)
        adata = check_example_h5ad(part)
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return adata


def prepare_pbmc68k_reduced() -> ad.AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` made ready for transform.py (see module docstring).

    >>> adata = prepare_pbmc68k_reduced()  # doctest: +SKIP
    >>> adata.obs["cell_type"].nunique(), adata.uns["log1p"]  # doctest: +SKIP
    (10, {'base': None})
    """
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    if adata.raw is None or "bulk_labels" not in adata.obs:
        raise InputError(
            "scanpy's pbmc68k_reduced has no .raw or no bulk_labels in this scanpy version; "
            "use --dataset dominguez with internet access instead."
        )
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
    part = part_path(dest)
    try:
        adata.write_h5ad(part)
        check_example_h5ad(part)
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def write_text_atomically(text: str, dest: Path) -> None:
    """Write a small text file through a temporary sibling and an atomic rename."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(dest)
