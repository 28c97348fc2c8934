"""Readers of the transform's input: count matrices served in chunks of rows (a CSR or dense
``.h5ad`` out of core; other formats read into memory by anndata/scanpy), and their value checks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from numba import njit

from utils.cli import InputError
from utils.transform.direct_reader import _DirectReader

logger = logging.getLogger("cell2sentence")

# Marks "uns['log1p'] absent" apart from "present with base None (natural log)".
NO_LOG1P = "absent"


def canonical_rows(chunk: sp.csr_matrix, column_map: np.ndarray | None = None,
                   n_columns: int | None = None) -> sp.csr_matrix:
    """The rows with sorted indices and no explicit zeros or duplicates, column ``c`` renamed
    ``column_map[c]`` among ``n_columns`` when given; ``chunk`` is not changed."""
    if column_map is None:
        if _is_canonical(chunk.indptr, chunk.indices, chunk.data):
            return chunk
        column_map, n_columns = np.arange(chunk.shape[1], dtype=np.int32), chunk.shape[1]
    indices, data = sort_rows(chunk.indptr.astype(np.int64), chunk.indices, chunk.data, column_map, n_columns)
    out = sp.csr_matrix((data, indices, chunk.indptr - chunk.indptr[0]), shape=(chunk.shape[0], n_columns))
    out.has_sorted_indices = True
    out.sum_duplicates()
    out.eliminate_zeros()
    return out


@njit(cache=True, nogil=True)
def _is_canonical(indptr, indices, data):
    """Whether every row's indices strictly increase and no stored value is 0 (no early exits: vectorized)."""
    zeros = 0
    for j in range(data.shape[0]):
        zeros += data[j] == 0
    # Descents over the whole array, minus those where a (non-empty) row starts.
    unsorted = 0
    for j in range(1, indices.shape[0]):
        unsorted += indices[j] <= indices[j - 1]
    base = indptr[0]
    for r in range(1, indptr.shape[0] - 1):
        if indptr[r] - base > 0 and indptr[r] < indptr[r + 1]:
            unsorted -= indices[indptr[r] - base] <= indices[indptr[r] - base - 1]
    return zeros == 0 and unsorted == 0


class MatrixSource:
    """Rows of the input's count matrix (``matrix_name``, e.g. ``raw.X``), its obs, var and log1p marker."""

    path: Path
    matrix_name: str
    obs: pd.DataFrame
    var: pd.DataFrame
    log1p_base: Any  # of uns["log1p"] when the matrix is X: NO_LOG1P, None (natural log) or a number
    shape: tuple[int, int]

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        return canonical_rows(self.read_stored_rows(start, stop))

    def read_stored_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as stored: indices maybe unsorted, zeros or duplicates kept."""
        raise NotImplementedError

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_genes(self) -> int:
        return self.shape[1]


def _choose_matrix(has: Any, layer: str | None) -> tuple[str, str]:
    """The key and name of the matrix holding counts (``has``: the keys present): --layer, else .raw.X,
    else layers['counts'], else X."""
    if layer is not None:
        if "/" in layer or f"layers/{layer}" not in has:  # an h5py file also has the paths inside a layer
            raise InputError(f"The input has no layer {layer!r}; drop --layer or name one it has.")
        return f"layers/{layer}", f"layers[{layer!r}]"
    for key, name in (("raw/X", "raw.X"), ("layers/counts", "layers['counts']"), ("X", "X")):
        if key in has:
            return key, name
    raise InputError("The input holds no count matrix (no X, .raw.X or layers).")


class H5adSource(MatrixSource):
    """Out-of-core reader of an .h5ad whose matrix is CSR or dense on disk."""

    def __init__(self, path: Path, *, layer: str | None):
        self.path = path
        # One handle shared by the worker threads: h5py serializes access to it.
        self._file = h5py.File(path, "r")
        self._stamp = _file_stamp(path)
        f = self._file
        if any(isinstance(f.get(key), h5py.Dataset) for key in ("obs", "var", "raw/var")):
            f.close()  # anndata before 0.7 stored them as tables; anndata's own reader still reads those
            raise _NeedsInMemory("it was written by anndata before 0.7")
        self._key, self.matrix_name = _choose_matrix(f, layer)
        node = f[self._key]
        self._dense = isinstance(node, h5py.Dataset)
        self._direct: dict[str, _DirectReader | None] = {}
        if self._dense:
            self.shape = tuple(int(n) for n in node.shape)
        else:
            encoding = _attr(node, "encoding-type") or _attr(node, "h5sparse_format")
            if encoding not in ("csr_matrix", "csr"):
                raise _NeedsInMemory(f"{self.matrix_name} is stored as {encoding}")
            shape = node.attrs["shape"] if "shape" in node.attrs else node.attrs["h5sparse_shape"]
            self.shape = tuple(int(n) for n in shape)
            self._direct = {name: _DirectReader.open(path, node[name]) for name in ("indptr", "indices", "data")}
        self.obs = ad.io.read_elem(f["obs"])
        self.var = ad.io.read_elem(f["raw/var"] if self._key == "raw/X" else f["var"])
        self.log1p_base = NO_LOG1P
        if self._key == "X" and "uns" in f and "log1p" in f["uns"]:  # it describes X only
            self.log1p_base = _log1p_base(ad.io.read_elem(f["uns/log1p"]))

    def read_stored_rows(self, start: int, stop: int) -> sp.csr_matrix:
        try:
            node = self._file[self._key]
            if self._dense:
                chunk = sp.csr_matrix(exact_float(node[start:stop]))
            else:
                indptr = self._read(node, "indptr", start, stop + 1).astype(np.int64)
                lo, hi = int(indptr[0]), int(indptr[-1])
                chunk = sp.csr_matrix((exact_float(self._read(node, "data", lo, hi)), self._read(node, "indices", lo, hi),
                                       indptr - lo), shape=(stop - start, self.shape[1]))
        except (OSError, ValueError) as err:
            self._check_unchanged(start, stop)
            raise InputError(f"{self.path} could not be read at cells {start}-{stop} ({err}); "
                             "the file is damaged.") from err
        # HDF5 reads zeros past the end of a file cut short: a changed file must stop the run.
        self._check_unchanged(start, stop)
        return chunk

    def _read(self, node: h5py.Group, name: str, lo: int, hi: int) -> np.ndarray:
        reader = self._direct.get(name)
        return node[name][lo:hi] if reader is None else reader.read(lo, hi)

    def _check_unchanged(self, start: int, stop: int) -> None:
        now = _file_stamp(self.path)
        if now != self._stamp:
            raise InputError(
                f"{self.path} changed while it was being read (size {self._stamp[0]:,} -> {now[0]:,} bytes, "
                f"noticed at cells {start}-{stop}); rerun once nothing else writes to it.")


def _file_stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:  # deleted or moved away
        return (-1, -1, -1)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class _NeedsInMemory(Exception):
    """The h5ad's layout cannot be streamed by rows (e.g. CSC); read it into memory."""


class InMemorySource(MatrixSource):
    """An AnnData loaded into memory, served in row chunks."""

    def __init__(self, adata: ad.AnnData, path: Path, *, layer: str | None):
        self.path = path
        has = {f"layers/{name}" for name in adata.layers}
        has |= {key for key, value in (("X", adata.X), ("raw/X", adata.raw)) if value is not None}
        key, self.matrix_name = _choose_matrix(has, layer)
        matrix = adata.raw.X if key == "raw/X" else adata.X if key == "X" else adata.layers[key.split("/", 1)[1]]
        self.var = (adata.raw.var if key == "raw/X" else adata.var).copy()
        self._matrix = sp.csr_matrix(exact_float(matrix)) if not sp.issparse(matrix) else matrix.tocsr()
        self.shape = self._matrix.shape
        self.obs = adata.obs.copy()
        self.log1p_base = NO_LOG1P
        if key == "X" and "log1p" in adata.uns:  # it describes X only
            self.log1p_base = _log1p_base(adata.uns["log1p"])

    def read_stored_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as views of the matrix (scipy's row slicing copies, slowly)."""
        m = self._matrix
        lo, hi = int(m.indptr[start]), int(m.indptr[stop])
        data = m.data[lo:hi]
        if data.dtype not in (np.float32, np.float64):  # the kernels are compiled for floats
            data = data.astype(np.float64)
        return sp.csr_matrix((data, m.indices[lo:hi], m.indptr[start : stop + 1] - lo),
                             shape=(stop - start, m.shape[1]), copy=False)


def exact_float(values: np.ndarray) -> np.ndarray:
    """float16 values (which scipy.sparse and the kernels do not take) as float32."""
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _attr(node: h5py.Group, name: str) -> str | None:
    value = node.attrs.get(name)
    return value.decode() if isinstance(value, bytes) else value


def _log1p_base(entry: Any) -> float | None:
    base = entry.get("base") if isinstance(entry, dict) else None
    if base is None or (isinstance(base, float) and np.isnan(base)):
        return None
    return float(np.asarray(base).item())


def open_source(path: Path, *, layer: str | None = None) -> MatrixSource:
    """Open the input for chunked reading; one clear ``InputError`` when it cannot be read."""
    if not path.exists():
        raise InputError(f"Input file {path} does not exist; check --data_filepath.")
    suffix = "".join(path.suffixes[-1:]).lower()
    if path.is_file() and suffix == ".h5ad":
        try:
            return H5adSource(path, layer=layer)
        except _NeedsInMemory as why:
            logger.warning("%s cannot be read by rows (%s); loading it into memory.", path, why)
        except (OSError, KeyError) as err:
            raise InputError(f"{path} is not a readable .h5ad file ({err}).") from err
    return InMemorySource(read_with_scanpy(path), path, layer=layer)


def read_with_scanpy(path: Path) -> ad.AnnData:
    """An .h5ad, 10x .h5, 10x matrix folder, .loom or .csv read whole by scanpy/anndata."""
    import scanpy as sc

    suffix = path.suffix.lower()
    read = sc.read_10x_mtx if path.is_dir() else {".h5ad": ad.read_h5ad, ".h5": sc.read_10x_h5,
                                                   ".loom": sc.read_loom, ".csv": sc.read_csv}.get(suffix)
    if read is None:
        raise InputError(f"{path} has an unsupported format; give an .h5ad, 10x .h5, 10x matrix folder, .loom or "
                         ".csv.")
    try:
        return read(path)
    except Exception as err:  # readers raise many kinds; the user needs one sentence
        raise InputError(f"{path} could not be read as {suffix or 'a 10x folder'} ({err}).") from err


class ConcatenatedSource(MatrixSource):
    """Several inputs' cells one after another over the union of their (resolved) ``gene_names``;
    ``obs`` gains a ``dataset`` column naming each cell's file (its stem)."""

    def __init__(self, sources: Sequence[MatrixSource], gene_names: Sequence[np.ndarray], *, path: Path):
        self.path = path
        self._sources = list(sources)
        union = pd.Index(pd.unique(np.concatenate([np.asarray(n, dtype=object) for n in gene_names])))
        self._maps = [union.get_indexer(pd.Index(n)).astype(np.int32) for n in gene_names]
        # A map that keeps the order (the first file's always does) keeps rows sorted.
        self._in_order = [bool(np.all(np.diff(m) > 0)) for m in self._maps]
        self._starts = np.cumsum([0] + [s.n_cells for s in self._sources])
        self.shape = (int(self._starts[-1]), len(union))
        chosen = {s.matrix_name for s in self._sources}
        self.matrix_name = (chosen.pop() if len(chosen) == 1
                            else ", ".join(f"{s.matrix_name} of {s.path.name}" for s in self._sources))
        bases = {repr(s.log1p_base) for s in self._sources}  # the files' uns["log1p"], when they agree
        self.log1p_base = self._sources[0].log1p_base if len(bases) == 1 else NO_LOG1P
        stems = [s.path.stem for s in self._sources]
        obs = [s.obs for s in self._sources]
        if any("dataset" in o.columns for o in obs):
            logger.warning("obs column 'dataset' of the inputs is replaced by the name of each cell's file.")
        self.obs = pd.concat([o.drop(columns="dataset", errors="ignore") for o in obs])
        self.obs["dataset"] = pd.Categorical(np.repeat(stems, [s.n_cells for s in self._sources]), categories=stems)
        self.var = pd.DataFrame(index=union)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        pieces = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for i in range(first, len(self._sources)):
            offset = int(self._starts[i])
            if offset >= stop:
                break
            lo, hi = max(start - offset, 0), min(stop - offset, self._sources[i].n_cells)
            if hi > lo:
                pieces.append(self._remapped(i, self._sources[i].read_stored_rows(lo, hi)))
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")

    read_stored_rows = read_rows  # its files' rows are made canonical as they are remapped

    def _remapped(self, i: int, chunk: sp.csr_matrix) -> sp.csr_matrix:
        if self._in_order[i] and _is_canonical(chunk.indptr, chunk.indices, chunk.data):
            return sp.csr_matrix((chunk.data, self._maps[i][chunk.indices], chunk.indptr),
                                 shape=(chunk.shape[0], self.shape[1]))
        return canonical_rows(chunk, self._maps[i], self.shape[1])


@njit(cache=True, nogil=True)
def sort_rows(indptr, indices, data, column_map, n_columns):
    """(indices, data) of CSR rows, column ``c`` renamed ``column_map[c]`` and each row sorted by an
    LSD radix sort on bytes (far faster than scipy; ``indptr`` may start above 0)."""
    n_rows = indptr.shape[0] - 1
    base = indptr[0]
    out_indices = np.empty(indptr[n_rows] - base, np.int32)
    out_data = np.empty(indptr[n_rows] - base, data.dtype)
    widest = 0
    for r in range(n_rows):
        widest = max(widest, indptr[r + 1] - indptr[r])
    keys, spare_keys = np.empty(widest, np.int32), np.empty(widest, np.int32)
    values, spare_values = np.empty(widest, data.dtype), np.empty(widest, data.dtype)
    n_bytes = 1
    while n_columns > (1 << (8 * n_bytes)):
        n_bytes += 1
    count = np.empty(256, np.int64)
    for r in range(n_rows):
        lo, n = indptr[r] - base, indptr[r + 1] - indptr[r]
        for k in range(n):
            keys[k] = column_map[indices[lo + k]]
            values[k] = data[lo + k]
        src_k, src_v, dst_k, dst_v = keys, values, spare_keys, spare_values
        for byte in range(n_bytes):
            shift = 8 * byte
            count[:] = 0
            for k in range(n):
                count[(src_k[k] >> shift) & 255] += 1
            total = 0
            for b in range(256):
                c = count[b]
                count[b] = total
                total += c
            for k in range(n):
                b = (src_k[k] >> shift) & 255
                dst_k[count[b]] = src_k[k]
                dst_v[count[b]] = src_v[k]
                count[b] += 1
            src_k, src_v, dst_k, dst_v = dst_k, dst_v, src_k, src_v
        out_indices[lo : lo + n] = src_k[:n]
        out_data[lo : lo + n] = src_v[:n]
    return out_indices, out_data


def input_paths(data_filepath: Path | Sequence[Path]) -> list[Path]:
    """The files of ``--data_filepath``: the ones given, or a folder's ``*.h5ad`` (sorted), else the folder."""
    paths = [data_filepath] if isinstance(data_filepath, Path) else list(data_filepath)
    if len(paths) == 1 and paths[0].is_dir():
        found = sorted(paths[0].glob("*.h5ad"))
        return found or paths
    return paths


def input_stem(data_filepath: Path | Sequence[Path]) -> str:
    """The outputs' name: a file's stem, a folder's name, or ``combined`` for several files."""
    paths = [data_filepath] if isinstance(data_filepath, Path) else list(data_filepath)
    if len(paths) > 1:
        return "combined"
    return paths[0].name if input_paths(paths) != paths else paths[0].stem


def read_checked_chunk(source: MatrixSource, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop), after checking that every value is finite and non-negative."""
    chunk = source.read_rows(start, stop)
    raise_value_problems(source, start, *_value_problems(chunk.indptr, chunk.data))
    return chunk


def raise_value_problems(source: MatrixSource, start: int, first_nonfinite: int, first_negative: int) -> None:
    """The error for chunk rows ``first_nonfinite``, ``first_negative`` (-1: none) from row ``start``."""
    if first_nonfinite >= 0:
        raise InputError(f"{source.path}: {source.matrix_name} holds NaN or infinite values (first in cell "
                         f"{start + first_nonfinite}); a count matrix must be finite.")
    if first_negative >= 0:
        raise InputError(f"{source.path}: {source.matrix_name} holds negative values (first in cell "
                         f"{start + first_negative}); give raw counts (e.g. --layer counts), not scaled data.")


@njit(cache=True, nogil=True)
def _value_problems(indptr, data):
    """The first row holding a NaN or infinite value and the first holding a negative one (-1: none)."""
    first_nonfinite = first_negative = -1
    for r in range(indptr.shape[0] - 1):
        nonfinite = 0
        negative = 0
        for j in range(indptr[r], indptr[r + 1]):
            value = data[j]
            nonfinite += (value - value) != 0  # NaN for NaN and infinities
            negative += value < 0
        if nonfinite and first_nonfinite < 0:
            first_nonfinite = r
        if negative and first_negative < 0:
            first_negative = r
    return first_nonfinite, first_negative
