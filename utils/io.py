"""Reading count matrices chunk by chunk, and writing the transform's outputs incrementally.

An ``.h5ad`` whose matrix is stored as CSR (or dense) is read out of core with h5py, a slice of
rows at a time, so memory does not grow with the number of cells. Other formats (10x ``.h5``,
10x matrix folders, ``.loom``, ``.csv``, CSC-stored h5ad) go through anndata/scanpy readers
into memory and are then served in the same chunks.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import mmap
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from numba import njit

from utils.common import InputError

logger = logging.getLogger("cell2sentence")

# Marks "uns['log1p'] absent" apart from "present with base None (natural log)".
NO_LOG1P = "absent"


def _canonical(chunk: sp.csr_matrix) -> sp.csr_matrix:
    """Sorted indices, no explicit zeros: what the ranking kernel expects."""
    if _is_canonical(chunk.indptr, chunk.indices, chunk.data):
        return chunk
    chunk.sum_duplicates()
    chunk.eliminate_zeros()
    chunk.sort_indices()
    return chunk


@njit(cache=True, nogil=True)
def _is_canonical(indptr, indices, data):
    """Whether every row's indices strictly increase and no stored value is 0 (counted without
    early exits so that the loops vectorize: checking costs a fraction of scipy's in-place
    canonicalization, which runs even when there is nothing to do)."""
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


class _DirectReader:
    """Reads element ranges of an uncompressed 1-D HDF5 dataset straight from the file with
    ``os.preadv``: no HDF5 call, whose global lock would serialize the worker threads, and no
    intermediate copy (4x faster than slicing through h5py here)."""

    def __init__(self, path: Path, dataset: h5py.Dataset, file_offsets: np.ndarray, piece: int):
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._file_size = os.fstat(self._fd).st_size
        # Ranges stored back to back are mapped, not copied (see ``_map``); tests turn it off to
        # check the reading path, which serves ranges stored apart.
        self.mapped = True
        self.dtype = dataset.dtype
        self._offsets = file_offsets  # file offset of each stored piece (chunk) in order
        self._piece = piece  # elements per piece

    @classmethod
    def open(cls, path: Path, dataset: h5py.Dataset) -> _DirectReader | None:
        """A reader for ``dataset``, or None when it is compressed, filtered, not yet fully
        written or not a little-endian number array (h5py reads those)."""
        dtype = dataset.dtype
        if dataset.ndim != 1 or dtype.kind not in "fiu" or dtype.byteorder == ">" or len(dataset) == 0:
            return None
        plist = dataset.id.get_create_plist()
        if plist.get_nfilters() or plist.get_external_count():
            return None
        layout = plist.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = dataset.id.get_offset()
            return None if offset is None else cls(path, dataset, np.array([offset], np.int64), len(dataset))
        if layout != h5py.h5d.CHUNKED:
            return None
        piece = dataset.chunks[0]
        offsets = np.full(-(-len(dataset) // piece), -1, np.int64)

        def visit(info):
            offsets[info.chunk_offset[0] // piece] = info.byte_offset

        dataset.id.chunk_iter(visit)
        return None if (offsets < 0).any() else cls(path, dataset, offsets, piece)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Elements ``[lo, hi)``."""
        mapped = self._map(lo, hi) if self.mapped else None
        if mapped is not None:
            return mapped
        self._read_ahead(hi, 2 * (hi - lo))
        out = np.empty(hi - lo, self.dtype)
        view = memoryview(out).cast("B")
        size = self.dtype.itemsize
        pos = lo
        while pos < hi:
            first = last = pos // self._piece
            stop = min(hi, (first + 1) * self._piece)
            # Pieces stored back to back in the file are read with one call.
            while stop < hi and self._offsets[last + 1] == self._offsets[last] + self._piece * size:
                last += 1
                stop = min(hi, (last + 1) * self._piece)
            self._pread_all(view[(pos - lo) * size : (stop - lo) * size], self._file_offset(pos))
            pos = stop
        return out

    def _file_offset(self, pos: int) -> int:
        """Where element ``pos`` is stored in the file."""
        piece = pos // self._piece
        return int(self._offsets[piece]) + (pos - piece * self._piece) * self.dtype.itemsize

    def _read_ahead(self, lo: int, n: int) -> None:
        """Ask the kernel to start reading elements ``[lo, lo + n)`` (the chunks the workers take
        next) from disk now: reading a file that is not cached went from 0.9 to 1.1 GB/s."""
        if n > 0 and lo // self._piece < len(self._offsets):
            os.posix_fadvise(self._fd, self._file_offset(lo), n * self.dtype.itemsize, os.POSIX_FADV_WILLNEED)

    def _map(self, lo: int, hi: int) -> np.ndarray | None:
        """Elements ``[lo, hi)`` mapped from the file when they are stored back to back: the
        array then uses the page cache's pages, without the copy that reading makes (a
        private mapping, so it stays writable; it is unmapped when the array is freed)."""
        if hi <= lo:
            return None
        size = self.dtype.itemsize
        first, last = lo // self._piece, (hi - 1) // self._piece
        if last > first and (np.diff(self._offsets[first : last + 1]) != self._piece * size).any():
            return None
        start = self._file_offset(lo)
        stop = start + (hi - lo) * size
        if stop > self._file_size:  # a mapping would fault past the end; reading reports it
            return None
        skip = start % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(self._fd, stop - start + skip, offset=start - skip, access=mmap.ACCESS_COPY)
        region.madvise(mmap.MADV_WILLNEED)  # read ahead when the file is not cached yet
        return np.frombuffer(region, self.dtype, hi - lo, skip)

    def _pread_all(self, view: memoryview, offset: int) -> None:
        while len(view):  # a single read returns at most about 2 GB
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise InputError(f"{self._path} ends early; the file is truncated.")
            view, offset = view[got:], offset + got

    def __del__(self, _close=os.close) -> None:  # bound now: at interpreter exit os may be gone
        _close(self._fd)


class MatrixSource:
    """Rows of the input's count matrix, with its obs, var and log1p marker.

    ``matrix_name`` says which matrix was chosen (``raw.X``, ``layers['counts']`` or ``X``).
    """

    path: Path
    matrix_name: str
    obs: pd.DataFrame
    var: pd.DataFrame
    log1p_base: Any  # of uns["log1p"] when the matrix is X: NO_LOG1P, None (natural log) or a number
    shape: tuple[int, int]

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_genes(self) -> int:
        return self.shape[1]


def _choose_matrix(has: dict[str, bool], layer: str | None) -> str:
    """The matrix holding counts: --layer, else .raw.X (as the original), else
    layers['counts'], else X."""
    if layer is not None:
        if not has.get(f"layers/{layer}"):
            raise InputError(f"The input has no layer {layer!r}; drop --layer or name one it has.")
        return f"layers/{layer}"
    for key in ("raw/X", "layers/counts", "X"):
        if has.get(key):
            return key
    raise InputError("The input holds no count matrix (no X, .raw.X or layers).")


def _display_name(key: str) -> str:
    if key.startswith("layers/"):
        return f"layers[{key.split('/', 1)[1]!r}]"
    return key.replace("/", ".")


class H5adSource(MatrixSource):
    """Out-of-core reader of an .h5ad whose matrix is CSR or dense on disk."""

    def __init__(self, path: Path, *, layer: str | None):
        self.path = path
        # One handle shared by the worker threads: h5py serializes access to it.
        self._file = h5py.File(path, "r")
        f = self._file
        has = {"X": "X" in f, "raw/X": "raw" in f and "X" in f["raw"]}
        if "layers" in f:
            has.update({f"layers/{name}": True for name in f["layers"]})
        self._key = _choose_matrix(has, layer)
        self.matrix_name = _display_name(self._key)
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

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        node = self._file[self._key]
        if self._dense:
            return _canonical(sp.csr_matrix(node[start:stop]))
        indptr = self._read(node, "indptr", start, stop + 1).astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = self._read(node, "data", lo, hi)
        indices = self._read(node, "indices", lo, hi)
        chunk = sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.shape[1]))
        return _canonical(chunk)

    def _read(self, node: h5py.Group, name: str, lo: int, hi: int) -> np.ndarray:
        reader = self._direct.get(name)
        return node[name][lo:hi] if reader is None else reader.read(lo, hi)


class _NeedsInMemory(Exception):
    """The h5ad's layout cannot be streamed by rows (e.g. CSC); read it into memory."""


class InMemorySource(MatrixSource):
    """An AnnData loaded into memory, served in row chunks."""

    def __init__(self, adata: ad.AnnData, path: Path, *, layer: str | None):
        self.path = path
        has = {"X": adata.X is not None, "raw/X": adata.raw is not None}
        has.update({f"layers/{name}": True for name in adata.layers})
        key = _choose_matrix(has, layer)
        self.matrix_name = _display_name(key)
        if key == "raw/X":
            matrix, self.var = adata.raw.X, adata.raw.var.copy()
        elif key == "X":
            matrix, self.var = adata.X, adata.var.copy()
        else:
            matrix, self.var = adata.layers[key.split("/", 1)[1]], adata.var.copy()
        self._matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
        self.shape = self._matrix.shape
        self.obs = adata.obs.copy()
        self.log1p_base = NO_LOG1P
        if key == "X" and "log1p" in adata.uns:  # it describes X only
            self.log1p_base = _log1p_base(adata.uns["log1p"])

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as views of the matrix (scipy's row slicing copies, through a
        routine that also handles columns: 5 s for 20,000 cells); copied only when they must be
        made canonical, so the caller's AnnData is never changed."""
        m = self._matrix
        lo, hi = int(m.indptr[start]), int(m.indptr[stop])
        data = m.data[lo:hi]
        if data.dtype not in (np.float32, np.float64):  # the kernels are compiled for floats
            data = data.astype(np.float64)
        chunk = sp.csr_matrix((data, m.indices[lo:hi], m.indptr[start : stop + 1] - lo),
                              shape=(stop - start, m.shape[1]), copy=False)
        if _is_canonical(chunk.indptr, chunk.indices, chunk.data):
            return chunk
        return _canonical(chunk.copy())


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
    return InMemorySource(_read_with_scanpy(path), path, layer=layer)


def _read_with_scanpy(path: Path) -> ad.AnnData:
    import scanpy as sc

    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return sc.read_10x_mtx(path)
        if suffix == ".h5ad":
            return ad.read_h5ad(path)
        if suffix == ".h5":
            return sc.read_10x_h5(path)
        if suffix == ".loom":
            return sc.read_loom(path)
        if suffix == ".csv":
            return sc.read_csv(path)
    except Exception as err:  # readers raise many kinds; the user needs one sentence
        raise InputError(f"{path} could not be read as {suffix or 'a 10x folder'} ({err}).") from err
    raise InputError(
        f"{path} has an unsupported format; give an .h5ad, 10x .h5, 10x matrix folder, .loom or .csv."
    )


class H5adCSRWriter:
    """Writes an AnnData .h5ad whose X is a CSR float32 matrix of known row lengths.

    The sizes are known after the QC pass, so ``data`` and ``indices`` are allocated up front
    as contiguous datasets and rows are written straight to their place in the file with
    ``os.pwrite``: from any thread, in any order, without HDF5's lock or its chunk cache
    (which made appending through h5py cost as much as ranking).
    """

    def __init__(self, path: Path, n_genes: int, row_lengths: np.ndarray, *, direct: DirectWriter | None = None):
        self.path = path
        self.n_genes = n_genes
        self.indptr = np.zeros(len(row_lengths) + 1, np.int64)
        np.cumsum(row_lengths, out=self.indptr[1:])
        self._file = h5py.File(path, "w")
        x = self._file.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = (len(row_lengths), n_genes)
        x.create_dataset("indptr", data=self.indptr)
        nnz = int(self.indptr[-1])
        self._places = {name: _preallocated(x, name, dtype, nnz) for name, dtype in (("data", "<f4"), ("indices", "<i4"))}
        self._file.flush()  # the datasets' places are final; our own descriptor writes there
        self._out = OutputFile(path, direct=direct, create=False)
        for offset, dtype in self._places.values():
            self._out.reserve(nnz * dtype.itemsize, offset=offset)

    def row_arrays(self, first_row: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Empty indices and data arrays for up to ``n`` entries of rows ``first_row, ...``,
        placed so that ``write_rows`` writes them without a copy (see ``phased_empty``)."""
        start = int(self.indptr[first_row])
        (indices_offset, indices_dtype), (data_offset, data_dtype) = self._places["indices"], self._places["data"]
        return (phased_empty(n, indices_dtype, indices_offset + start * indices_dtype.itemsize),
                phased_empty(n, data_dtype, data_offset + start * data_dtype.itemsize))

    def write_rows(self, first_row: int, indices: np.ndarray, data: np.ndarray) -> None:
        """Write the entries of rows ``first_row, first_row + 1, ...`` (any thread, any order)."""
        start = int(self.indptr[first_row])
        if start + len(data) > self.indptr[-1] or len(indices) != len(data):
            raise ValueError("rows do not fit the row lengths the writer was made for")
        for name, values in (("data", data), ("indices", indices)):
            offset, dtype = self._places[name]
            self._out.pwrite(np.ascontiguousarray(values, dtype=dtype), offset + start * dtype.itemsize)

    def finish(self, *, obs: pd.DataFrame, var: pd.DataFrame, uns: dict[str, Any]) -> None:
        """Write obs, var and uns and close the file (after ``DirectWriter.flush``)."""
        self._out.close()
        self._file.attrs["encoding-type"] = "anndata"
        self._file.attrs["encoding-version"] = "0.1.0"
        ad.io.write_elem(self._file, "obs", obs)
        ad.io.write_elem(self._file, "var", var)
        ad.io.write_elem(self._file, "uns", uns)
        for empty in ("obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(self._file, empty, {})
        self._file.close()

    def close(self) -> None:
        """Release the file without finishing it (a failed run)."""
        self._out.close()
        self._file.close()


def _preallocated(group: h5py.Group, name: str, dtype: str, size: int) -> tuple[int, np.dtype]:
    """A contiguous 1-D dataset whose file space is allocated now and never filled by HDF5;
    returns its byte offset in the file and its dtype."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # no timestamps: the same input gives the same file
    dataset = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)),
                              h5py.h5s.create_simple((size,)), dcpl=dcpl)
    offset = dataset.get_offset()
    return (0 if offset is None else int(offset)), np.dtype(dtype)


class OutputAborted(RuntimeError):
    """Another chunk failed, so this one's turn to append will never come."""


class _Turns:
    """Hands out places in a sequence of appends in chunk order: chunk i gets its place as soon
    as chunk i - 1 has taken its own, so workers write their bytes side by side and only the
    cheap bookkeeping is serialized."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next = 0
        self._failed = None  # the first ticket that failed; later tickets give up

    @contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self._next == ticket or self._gave_up(ticket))
            if self._next != ticket:
                raise OutputAborted("an earlier chunk failed")
            yield
            self._next += 1
            self._condition.notify_all()

    def _gave_up(self, ticket: int) -> bool:
        return self._failed is not None and ticket > self._failed

    def abort(self, failed_ticket: int = -1) -> None:
        """Chunk ``failed_ticket`` will never take its turn: release the chunks after it
        (earlier chunks still finish, so their errors, not this one, reach the user first)."""
        with self._condition:
            self._failed = failed_ticket if self._failed is None else min(self._failed, failed_ticket)
            self._condition.notify_all()


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _reserve_blocks(fd: int, offset: int, length: int) -> bool:
    """Give ``[offset, offset + length)`` of the file its disk blocks now (Linux ``fallocate``;
    the file grows to cover the range). ``O_DIRECT`` writes into reserved blocks ran 10% faster
    here than writes that grow the file. Best effort: False where the file system cannot (glibc's
    ``posix_fallocate`` would instead write zeros over the range)."""
    if length <= 0 or _LIBC is None or not hasattr(_LIBC, "fallocate"):
        return False
    return _LIBC.fallocate(fd, 0, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc: no reservation
    _LIBC = None


# O_DIRECT needs file offsets, lengths and memory addresses aligned to the device's block size;
# a page is a multiple of every common one.
_DIRECT_ALIGN = 4096
_DIRECT_MIN_BYTES = 1 << 20  # smaller writes go through the page cache


class DirectWriter:
    """Writes the page-aligned middle of large writes with ``O_DIRECT``, from one background
    thread, so that the output bypasses the page cache while workers go on computing.

    Writing through the page cache cost 1.5–3 s of kernel time per GB on our machines (copying
    into fresh cache pages, then writeback); ``O_DIRECT`` ran at the disk's 1.7 GB/s with almost
    no CPU (``bench/transform_bench.py``). The data is copied into a few page-aligned buffers
    (which bound the memory in flight); ``flush`` waits for the queue and raises the first error.
    Data already placed in memory like in the file (see ``phased_empty``) is written from where
    it is, without the copy, ``buffer_bytes`` at a time and at most ``n_buffers`` such pieces in
    flight.
    """

    def __init__(self, *, n_buffers: int = 8, buffer_bytes: int = 16 << 20):
        self._buffer_bytes = buffer_bytes
        self._uncopied = threading.BoundedSemaphore(n_buffers)
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            raw = np.empty(buffer_bytes + _DIRECT_ALIGN, np.uint8)
            skip = -raw.ctypes.data % _DIRECT_ALIGN
            self._free.put(raw[skip : skip + buffer_bytes])
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="direct-writer", daemon=True)
        self._thread.start()

    def write(self, file: OutputFile, data: memoryview, offset: int) -> None:
        """Queue ``data`` (aligned length) for ``file`` at ``offset`` (aligned)."""
        if not self._thread.is_alive():
            raise RuntimeError("DirectWriter.write after close: nothing would write it")
        source = np.frombuffer(data, np.uint8)
        if (source.ctypes.data - offset) % _DIRECT_ALIGN == 0:
            self._write_in_place(file, source, offset)
            return
        done = 0
        while done < len(source):
            buffer = self._free.get()
            if self._error is not None:
                self._free.put(buffer)
                raise self._error
            n = min(len(buffer), len(source) - done)
            np.copyto(buffer[:n], source[done : done + n])
            self._jobs.put((file, buffer, n, offset + done, True))
            done += n

    def _write_in_place(self, file: OutputFile, source: np.ndarray, offset: int) -> None:
        # The job keeps the caller's array alive until it is written; the semaphore bounds how
        # much of it the workers can have in flight.
        for done in range(0, len(source), self._buffer_bytes):
            self._uncopied.acquire()
            if self._error is not None:
                self._uncopied.release()
                raise self._error
            piece = source[done : done + self._buffer_bytes]
            self._jobs.put((file, piece, len(piece), offset + done, False))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            file, data, n, offset, pooled = job
            try:
                if self._error is None:
                    file.write_aligned(data[:n], offset)
            except BaseException as err:  # noqa: BLE001 - handed to the caller by flush/write
                self._error = err
            finally:
                if pooled:
                    self._free.put(data)
                else:
                    self._uncopied.release()
                self._jobs.task_done()
        self._jobs.task_done()

    def flush(self) -> None:
        """Wait until every queued write is on disk; raise the first error of any."""
        self._jobs.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread (queued writes are still done; errors are dropped: call ``flush``)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def phased_empty(n: int, dtype: Any, file_offset: int) -> np.ndarray:
    """An empty array of ``n`` elements placed in memory at the same offset within a page as
    ``file_offset`` in its file, so that ``DirectWriter`` writes it without copying it (a plain
    array when the offset does not suit the dtype's alignment)."""
    dtype = np.dtype(dtype)
    if file_offset % dtype.itemsize:
        return np.empty(n, dtype)
    raw = np.empty(n * dtype.itemsize + _DIRECT_ALIGN, np.uint8)
    skip = (file_offset - raw.ctypes.data) % _DIRECT_ALIGN
    return raw[skip : skip + n * dtype.itemsize].view(dtype)


def phased_pieces(offsets: Sequence[int], sizes: Sequence[int], *, slack: int) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 buffer holding pieces of ``sizes`` bytes, in order and each followed by at
    least ``slack`` spare bytes, each placed like its file offset in ``offsets`` (see
    ``phased_empty``); returns the buffer and where each piece starts in it."""
    buffer = np.empty(int(sum(sizes)) + len(sizes) * (_DIRECT_ALIGN + slack), np.uint8)
    starts, pos = [], 0
    for offset, n in zip(offsets, sizes, strict=True):
        pos += (offset - (buffer.ctypes.data + pos)) % _DIRECT_ALIGN
        starts.append(pos)
        pos += int(n) + slack
    return buffer, np.array(starts, np.int64)


class OutputFile:
    """A file written with ``pwrite`` from any thread; with a ``DirectWriter``, the aligned
    middle of large writes goes around the page cache (file systems that refuse ``O_DIRECT``,
    such as tmpfs, get plain writes)."""

    def __init__(self, path: Path, *, direct: DirectWriter | None = None, create: bool = True):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
        self._direct = direct
        self._direct_fd = None
        self._direct_refused = False
        if direct is not None and hasattr(os, "O_DIRECT"):
            with suppress(OSError):  # e.g. tmpfs: plain writes then
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)

    def pwrite(self, data: Any, offset: int) -> None:
        """Write ``data`` at ``offset``. Large writes may be queued and written later from the
        memory itself: leave ``data`` unchanged until ``DirectWriter.flush``."""
        view = memoryview(data).cast("B")
        first = -(-offset // _DIRECT_ALIGN) * _DIRECT_ALIGN
        last = (offset + view.nbytes) // _DIRECT_ALIGN * _DIRECT_ALIGN
        if self._direct_fd is None or last - first < _DIRECT_MIN_BYTES:
            _pwrite_all(self._fd, view, offset)
            return
        # The partial pages at both ends share pages with the neighbouring writes: those go
        # through the page cache, which merges them; the whole pages between go direct.
        _pwrite_all(self._fd, view[: first - offset], offset)
        _pwrite_all(self._fd, view[last - offset :], last)
        self._direct.write(self, view[first - offset : last - offset], first)

    def write_aligned(self, data: np.ndarray, offset: int) -> None:
        """Write page-aligned ``data`` at page-aligned ``offset`` (the ``DirectWriter``'s thread)."""
        if not self._direct_refused:
            try:
                _pwrite_all(self._direct_fd, data, offset)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._direct_refused = True  # opened, but refused: go through the page cache
        _pwrite_all(self._fd, data, offset)

    def reserve(self, length: int, *, offset: int = 0) -> None:
        """Reserve bytes ``[offset, offset + length)`` on disk (see ``_reserve_blocks``); pass
        the real size to ``close``, which gives back what was reserved beyond it."""
        _reserve_blocks(self._fd, offset, length)

    def close(self, final_size: int | None = None) -> None:
        # fstat, not only what was reserved: a reservation that failed part-way (a full disk) can
        # still have grown the file.
        if self._fd is not None and final_size is not None and final_size < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, final_size)
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None


class OrderedAppendFile:
    """A file that chunks append to in chunk order (``ticket`` 0, 1, 2, ...), each from its own
    thread: every ticket must append exactly once, possibly nothing."""

    def __init__(self, path: Path, *, direct: DirectWriter | None = None):
        self.path = path
        self._out = OutputFile(path, direct=direct)
        self._turns = _Turns()
        self.size = 0

    def append(self, ticket: int, data: Any) -> None:
        self.write_at(data, self.place(ticket, memoryview(data).nbytes))

    def place(self, ticket: int, n: int) -> int:
        """Take ticket's turn: reserve its ``n`` bytes and return where they go (``write_at``)."""
        with self._turns.turn(ticket):
            offset = self.size
            self.size += n
        return offset

    def write_at(self, data: Any, offset: int) -> None:
        self._out.pwrite(data, offset)

    def reserve(self, size: int) -> None:
        """Reserve ``size`` bytes on disk ahead of the appends (an estimate: the file ends up
        exactly as long as what was appended)."""
        self._out.reserve(size)

    def abort(self, failed_ticket: int = -1) -> None:
        self._turns.abort(failed_ticket)

    def close(self) -> None:
        self._out.close(final_size=self.size)


_ARROW_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class ArrowSplitWriter:
    """One split of a ``datasets.DatasetDict`` on disk: Arrow IPC stream shards that chunks
    append record batches to in chunk order, each from its own thread (see
    ``OrderedAppendFile``); ``finish`` writes the metadata that ``datasets.load_from_disk``
    reads."""

    def __init__(self, folder: Path, schema: pa.Schema, *, shard_bytes: int = 500 << 20,
                 direct: DirectWriter | None = None, expected_bytes: int = 0):
        self.folder = folder
        self.folder.mkdir(parents=True)
        self.features = {f.name: {"dtype": _value_dtype(f.type), "_type": "Value"} for f in schema}
        metadata = {"huggingface": json.dumps({"info": {"features": self.features}})}
        self.schema = schema.with_metadata(metadata)
        self._schema_message = self.schema.serialize()
        self.shard_bytes = shard_bytes
        self._direct = direct
        self._unreserved = expected_bytes  # an estimate of the split's size, reserved shard by shard
        self._shards: list[tuple[Path, OutputFile, int]] = []  # (path, file, bytes so far)
        self._turns = _Turns()
        self.n_rows = 0

    def append(self, ticket: int, batch: pa.RecordBatch | None) -> None:
        """Append ``batch`` (None: nothing, but the ticket is used)."""
        size = 0
        if batch is not None:
            batch = batch.replace_schema_metadata(self.schema.metadata)
            size = pa.ipc.get_record_batch_size(batch)  # the message's size, without making it
        with self._turns.turn(ticket):
            if batch is None:
                return
            if not self._shards or self._shards[-1][2] >= self.shard_bytes:
                self._new_shard()
            path, file, offset = self._shards[-1]
            self._shards[-1] = (path, file, offset + size)
            self.n_rows += batch.num_rows
        file.pwrite(self._message(batch, size, offset), offset)

    def _message(self, batch: pa.RecordBatch, size: int, offset: int) -> Any:
        """The IPC message of ``batch``, made where the direct writer writes it without a copy:
        Arrow's stream writer serializes into a buffer placed like the file (see
        ``phased_empty``), after the schema message it always writes first."""
        head = self._schema_message.size
        buffer = phased_empty(head + size + len(_ARROW_END_OF_STREAM), np.uint8, offset - head)
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(buffer))
        with pa.ipc.new_stream(sink, self.schema) as stream:
            stream.write_batch(batch)
        if sink.tell() == len(buffer) and buffer[:head].tobytes() == self._schema_message.to_pybytes():
            return buffer[head : head + size]
        # Not the layout expected: Arrow's own message (glibc's heap, which keeps freed memory;
        # Arrow's pool handed pages back, and faulting them in again cost 0.4 s per 200k cells).
        message = batch.serialize(memory_pool=pa.system_memory_pool())
        if message.size != size:  # its place in the shard was taken for `size` bytes
            raise RuntimeError(f"Arrow made a {message.size}-byte message, {size} expected")
        return message

    def _new_shard(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.arrow"
        file = OutputFile(path, direct=self._direct)
        reserve = min(self.shard_bytes, self._unreserved)
        file.reserve(reserve)
        self._unreserved -= reserve
        file.pwrite(self._schema_message, 0)
        self._shards.append((path, file, self._schema_message.size))

    def abort(self, failed_ticket: int = -1) -> None:
        self._turns.abort(failed_ticket)

    def close(self) -> None:
        """Release the shards without finishing them (a failed run)."""
        for _, file, _ in self._shards:
            file.close()

    def finish(self) -> None:
        if not self._shards:  # an empty split still gets one file
            self._new_shard()
        names = []
        for i, (path, file, size) in enumerate(self._shards):
            file.pwrite(_ARROW_END_OF_STREAM, size)
            file.close(final_size=size + len(_ARROW_END_OF_STREAM))
            name = f"data-{i:05d}-of-{len(self._shards):05d}.arrow"
            path.rename(self.folder / name)
            names.append({"filename": name})
        state = {
            "_data_files": names,
            "_fingerprint": hashlib.sha1(f"{self.folder.name}:{self.n_rows}".encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        info = {"citation": "", "description": "", "features": self.features,
                "homepage": "", "license": ""}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))
        (self.folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def _value_dtype(arrow_type: pa.DataType) -> str:
    """The ``datasets.Value`` dtype of a plain Arrow type (without importing datasets, which
    costs seconds at start-up)."""
    names = {"double": "float64", "float": "float32", "halffloat": "float16"}
    return names.get(str(arrow_type), str(arrow_type))


def write_dataset_dict_index(folder: Path, splits: list[str]) -> None:
    """The ``dataset_dict.json`` listing the splits of a saved ``DatasetDict``."""
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
