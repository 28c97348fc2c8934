"""Synthetic single-cell count matrices of realistic sparsity, written chunk by chunk.

``write_synthetic_h5ad`` writes an AnnData h5ad whose ``X`` is a CSR float32 matrix of integer
counts, one chunk of cells at a time, so a 1,000,000-cell file (2e9 non-zeros, ~16 GB) needs
only one chunk's memory. What the data looks like:

- each cell expresses about ``genes_per_cell`` genes (uniformly ±20% per cell), drawn with a
  Zipf-like gene popularity (a few genes in nearly every cell, a long tail of rare ones);
- counts are geometric with a gene-specific mean scaled by a per-cell size factor: most
  non-zeros are 1 or 2 (many ties), popular and mitochondrial genes reach hundreds;
- 13 mitochondrial genes (``MT-ND1`` ... ``MT-CYB``) among the popular ones, the other genes
  named ``GENE00001``...; no ``var["feature_name"]``;
- ``obs["cell_type"]`` with ``n_cell_types`` labels, each with 20 marker genes expressed in
  80% of its cells at about 6x the usual level, so the cell types are learnable.

Cells are generated in fixed blocks of 1,000 seeded by ``(seed, block)``, so the matrix does
not depend on ``chunk_size`` (which only sets how many cells are written at once).
Speed on the 2-core machine: 20,000 cells (40 M non-zeros, 330 MB) in 11.5 s, about
3.5 M non-zeros/s including the write, so 1,000,000 cells take about 10 minutes and 16 GB.
Generation is memory-bound (a cells x genes boolean mask per block); a process pool of two
workers was slower (19.6 s), so it stays serial.

Example::

    from bench.synthetic import write_synthetic_h5ad
    write_synthetic_h5ad("data/bench/x.h5ad", n_cells=20_000)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

logger = logging.getLogger("cell2sentence")

MT_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)  # fmt: skip
BLOCK = 1_000  # cells per seeded generation block
MARKERS_PER_TYPE = 20
MARKER_RATE = 0.8
MARKER_BOOST = 6.0
_TABLE_SIZE = 1 << 22  # resolution of the gene popularity lookup table


@dataclass(frozen=True)
class _Genes:
    """Gene-level parameters shared by all cells (depend on the seed only)."""

    names: list[str]
    table: np.ndarray  # gene index per slot: sampling a slot uniformly samples by popularity
    mean: np.ndarray  # geometric mean extra count per gene (float64)
    markers: np.ndarray  # (n_cell_types, MARKERS_PER_TYPE) gene indices
    is_marker: np.ndarray  # (n_cell_types, n_genes) bool
    draws_for: tuple[np.ndarray, np.ndarray]  # (expected distinct genes, draws) for np.interp


def _gene_params(n_genes: int, genes_per_cell: int, n_cell_types: int, seed: int) -> _Genes:
    rng = np.random.default_rng([seed, 0])
    width = max(5, len(str(n_genes)))
    names = [f"GENE{i + 1:0{width}d}" for i in range(n_genes)]
    # Zipf-like popularity by rank; a random permutation spreads popular genes over the index.
    rank = np.arange(1, n_genes + 1, dtype=np.float64)
    popularity_by_rank = 1.0 / (rank + 20.0) ** 1.1
    order = rng.permutation(n_genes)  # order[r] = gene index of popularity rank r
    popularity = np.empty(n_genes)
    popularity[order] = popularity_by_rank
    # Mitochondrial genes among the 100 most popular (as in real data), renamed MT-...
    mt = order[rng.choice(min(100, n_genes), size=len(MT_GENES), replace=False)]
    for gene, name in zip(mt, MT_GENES, strict=True):
        names[gene] = name
    # Markers from mid-popularity ranks, distinct across types and never MT.
    mid = np.setdiff1d(order[n_genes // 20 : n_genes // 2], mt)
    n_markers = n_cell_types * MARKERS_PER_TYPE
    markers = rng.choice(mid, size=n_markers, replace=False).reshape(n_cell_types, MARKERS_PER_TYPE)
    is_marker = np.zeros((n_cell_types, n_genes), dtype=bool)
    is_marker[np.repeat(np.arange(n_cell_types), MARKERS_PER_TYPE), markers.ravel()] = True
    # Lookup table: gene g fills max(1, round(p_g * size)) slots; that *is* the distribution.
    slots = np.maximum(1, np.round(popularity / popularity.sum() * _TABLE_SIZE)).astype(np.int64)
    table = np.repeat(np.arange(n_genes, dtype=np.int32), slots)
    p = slots / slots.sum()
    # Expected distinct genes after n draws with replacement: sum_g 1 - (1 - p_g)^n.
    draws = np.unique(np.geomspace(1, 50 * genes_per_cell + 10, 400).astype(np.int64))
    distinct = np.array([np.sum(-np.expm1(n * np.log1p(-p))) for n in draws])
    mean = 0.25 + 40.0 * popularity / popularity.max()
    mean[mt] = rng.uniform(20.0, 80.0, size=len(mt))
    return _Genes(names, table, mean, markers, is_marker, (distinct, draws))


def _generate_block(
    genes: _Genes, n: int, *, genes_per_cell: int, n_cell_types: int, seed: int, block: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR pieces (data float32, indices int32, per-row nnz int64, cell type codes) of a block."""
    rng = np.random.default_rng([seed, 1, block])
    n_genes = len(genes.names)
    types = rng.integers(0, n_cell_types, size=n).astype(np.int16)
    target = genes_per_cell * rng.uniform(0.8, 1.2, size=n)
    distinct, draws = genes.draws_for
    n_draws = np.round(np.interp(target, distinct, draws)).astype(np.int64)
    mask = np.zeros((n, n_genes), dtype=bool)
    rows = np.repeat(np.arange(n), n_draws)
    mask[rows, genes.table[rng.integers(0, len(genes.table), size=rows.size)]] = True
    marker_rows = np.repeat(np.arange(n), MARKERS_PER_TYPE)
    keep = rng.random(marker_rows.size) < MARKER_RATE
    mask[marker_rows[keep], genes.markers[types].ravel()[keep]] = True
    # Row-major flat positions: sorted gene indices within each row, as CSR wants.
    flat = np.flatnonzero(mask)
    row_nnz = np.count_nonzero(mask, axis=1)
    rows = np.repeat(np.arange(n), row_nnz)
    cols = (flat - rows * n_genes).astype(np.int32)
    size_factor = rng.lognormal(0.0, 0.3, size=n)
    mean = genes.mean[cols] * size_factor[rows]
    mean[genes.is_marker[types[rows], cols]] *= MARKER_BOOST
    data = rng.geometric(1.0 / (1.0 + mean)).astype(np.float32)  # support 1, 2, ...
    return data, cols, row_nnz.astype(np.int64), types


def _check(n_cells: int, n_genes: int, genes_per_cell: int, n_cell_types: int, chunk_size: int):
    if n_cells < 1 or chunk_size < 1 or n_cell_types < 1:
        raise ValueError("n_cells, chunk_size and n_cell_types must be positive")
    if n_genes < len(MT_GENES) + n_cell_types * MARKERS_PER_TYPE + 100:
        raise ValueError(
            f"n_genes={n_genes} is too small for {n_cell_types} cell types "
            f"({MARKERS_PER_TYPE} markers each) and {len(MT_GENES)} MT genes"
        )
    if not 1 <= genes_per_cell * 1.2 <= 0.5 * n_genes:
        raise ValueError(f"genes_per_cell={genes_per_cell} must be at most n_genes / 2.4")


def write_synthetic_h5ad(path: str | Path, *, n_cells: int, n_genes: int = 33_000, genes_per_cell: int = 2_000,
                         n_cell_types: int = 10, chunk_size: int = 10_000, seed: int = 0,
                         progress: bool = True) -> Path:
    """Write a synthetic count matrix as an AnnData h5ad at ``path``, chunk by chunk.

    The file is written to ``<path>.part`` and renamed when complete. Returns ``path``.
    The same parameters and seed give the same matrix for any ``chunk_size``.

    >>> write_synthetic_h5ad("x.h5ad", n_cells=100, n_genes=2_000, genes_per_cell=200)  # doctest: +SKIP
    """
    from anndata.io import write_elem

    _check(n_cells, n_genes, genes_per_cell, n_cell_types, chunk_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    genes = _gene_params(n_genes, genes_per_cell, n_cell_types, seed)
    types = np.empty(n_cells, dtype=np.int16)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    memo: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def block_pieces(b: int):
        if b not in memo:
            memo.clear()  # keep one block: a chunk boundary inside a block reuses it once
            n = min(BLOCK, n_cells - b * BLOCK)
            memo[b] = _generate_block(
                genes, n, genes_per_cell=genes_per_cell, n_cell_types=n_cell_types,
                seed=seed, block=b,
            )  # fmt: skip
        return memo[b]

    try:
        with h5py.File(part, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            x = f.create_group("X")
            x.attrs["encoding-type"] = "csr_matrix"
            x.attrs["encoding-version"] = "0.1.0"
            x.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
            h5_chunk = (1 << 20,)
            data_ds = x.create_dataset(
                "data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=h5_chunk
            )
            idx_ds = x.create_dataset(
                "indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=h5_chunk
            )
            nnz = 0
            starts = range(0, n_cells, chunk_size)
            for start in tqdm(starts, desc="synthetic cells", unit="chunk", disable=not progress):
                stop = min(start + chunk_size, n_cells)
                datas, indices = [], []
                for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
                    data, cols, row_nnz, block_types = block_pieces(b)
                    lo, hi = (
                        max(start, b * BLOCK) - b * BLOCK,
                        min(stop, (b + 1) * BLOCK) - b * BLOCK,
                    )
                    offsets = np.concatenate([[0], np.cumsum(row_nnz)])
                    datas.append(data[offsets[lo] : offsets[hi]])
                    indices.append(cols[offsets[lo] : offsets[hi]])
                    first = b * BLOCK + lo
                    indptr[first + 1 : first + 1 + hi - lo] = row_nnz[lo:hi]
                    types[first : first + hi - lo] = block_types[lo:hi]
                chunk_data, chunk_idx = np.concatenate(datas), np.concatenate(indices)
                data_ds.resize((nnz + chunk_data.size,))
                idx_ds.resize((nnz + chunk_data.size,))
                data_ds[nnz:] = chunk_data
                idx_ds[nnz:] = chunk_idx
                nnz += chunk_data.size
            np.cumsum(indptr, out=indptr)
            x.create_dataset("indptr", data=indptr)
            labels = [f"type_{t}" for t in range(n_cell_types)]
            width = len(str(n_cells))
            obs = pd.DataFrame(
                {"cell_type": pd.Categorical.from_codes(types, categories=labels)},
                index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_cells)], dtype=str),
            )
            write_elem(f, "obs", obs)
            write_elem(f, "var", pd.DataFrame(index=pd.Index(genes.names, dtype=str)))
            write_elem(
                f, "uns",
                {"synthetic": {
                    "n_genes": n_genes, "genes_per_cell": genes_per_cell,
                    "n_cell_types": n_cell_types, "seed": seed,
                    "markers": genes.markers.astype(np.int64),
                }},
            )  # fmt: skip
        part.replace(path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    logger.info(
        "Wrote %s: %s cells x %s genes, %s non-zeros (%.0f per cell).",
        path, f"{n_cells:,}", f"{n_genes:,}", f"{nnz:,}", nnz / n_cells,
    )  # fmt: skip
    return path


def synthetic_filename(
    *, n_cells: int, n_genes: int, genes_per_cell: int, n_cell_types: int, seed: int
) -> str:
    """The cache file name for one set of parameters (chunk size does not change the data)."""
    return f"synthetic_c{n_cells}_g{n_genes}_k{genes_per_cell}_t{n_cell_types}_s{seed}_v1.h5ad"


def cached_synthetic_h5ad(cache_dir: str | Path, *, n_cells: int, n_genes: int = 33_000, genes_per_cell: int = 2_000,
                          n_cell_types: int = 10, chunk_size: int = 10_000, seed: int = 0) -> Path:
    """Path of the synthetic file for these parameters under ``cache_dir``, written if missing."""
    path = Path(cache_dir) / synthetic_filename(
        n_cells=n_cells, n_genes=n_genes, genes_per_cell=genes_per_cell,
        n_cell_types=n_cell_types, seed=seed,
    )  # fmt: skip
    if path.exists():
        logger.info("Reusing %s.", path)
        return path
    return write_synthetic_h5ad(
        path, n_cells=n_cells, n_genes=n_genes, genes_per_cell=genes_per_cell,
        n_cell_types=n_cell_types, chunk_size=chunk_size, seed=seed,
    )  # fmt: skip


def cached_split_inputs(path: str | Path, n_files: int, *, seed: int = 0) -> Path:
    """A folder next to the synthetic file ``path`` holding its cells as ``n_files`` h5ad files of
    consecutive cells (``part0.h5ad``, ...), written if missing: the input of a several-file run.
    Every file after the first has its genes in another (seeded) order, so that the transform
    matches them by name, as it must for files from different sources."""
    import anndata as ad

    path = Path(path)
    folder = path.with_name(f"{path.stem}_split{n_files}_s{seed}")
    if folder.is_dir() and len(list(folder.glob("part*.h5ad"))) == n_files:
        logger.info("Reusing %s.", folder)
        return folder
    part_dir = folder.with_name(folder.name + ".part")
    shutil.rmtree(part_dir, ignore_errors=True)
    part_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    source = ad.read_h5ad(path, backed="r")
    bounds = np.linspace(0, source.n_obs, n_files + 1).round().astype(int)
    try:
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            cells = source[start:stop].to_memory()
            if i:
                cells = cells[:, rng.permutation(cells.n_vars)].copy()
            cells.write_h5ad(part_dir / f"part{i}.h5ad")
        shutil.rmtree(folder, ignore_errors=True)
        part_dir.rename(folder)
    finally:
        source.file.close()
        shutil.rmtree(part_dir, ignore_errors=True)
    logger.info("Wrote %s: the cells of %s as %s files.", folder, path.name, n_files)
    return folder
