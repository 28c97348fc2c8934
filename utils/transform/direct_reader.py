"""Element ranges of an uncompressed HDF5 dataset read with ``os.preadv``, around HDF5 (whose
global lock would serialize the worker threads); others are left to h5py. Kept by the 15% rule
(``bench/README.md``)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from utils.cli import InputError


class _DirectReader:
    """Reads element ranges of an uncompressed 1-D HDF5 dataset straight from the file."""

    def __init__(self, path: Path, dataset: h5py.Dataset, file_offsets: np.ndarray, piece: int):
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.dtype = dataset.dtype
        self._offsets = file_offsets  # file offset of each stored piece (chunk) in order
        self._piece = piece  # elements per piece

    @classmethod
    def open(cls, path: Path, dataset: h5py.Dataset) -> _DirectReader | None:
        """A reader for ``dataset``, or None when it is compressed, filtered, not fully written or
        not a little-endian number array."""
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
        """Ask the OS to read elements ``[lo, lo + n)`` (the next chunks) while the workers compute."""
        if n > 0 and lo // self._piece < len(self._offsets):
            os.posix_fadvise(self._fd, self._file_offset(lo), n * self.dtype.itemsize, os.POSIX_FADV_WILLNEED)

    def _pread_all(self, view: memoryview, offset: int) -> None:
        while len(view):  # a single read returns at most about 2 GB
            got = os.preadv(self._fd, [view], offset)
            if got == 0:  # the file was cut short (a memory-mapped range would make this a SIGBUS)
                raise InputError(f"{self._path} ends early, at byte {offset:,}: the file was truncated, or "
                                 "changed while it was being read; rerun once nothing else writes to it.")
            view, offset = view[got:], offset + got

    def __del__(self, _close=os.close) -> None:  # bound now: at interpreter exit os may be gone
        _close(self._fd)
