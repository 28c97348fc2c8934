"""Writers of other libraries' formats, filled chunk by chunk: an AnnData ``.h5ad`` with a CSR X of
known row lengths, and a ``datasets.DatasetDict`` as ``save_to_disk`` leaves it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa

from utils.transform.filewriter import DirectWriter, OutputFile, _Turns


class H5adCSRWriter:
    """Writes an AnnData .h5ad whose X is a CSR float32 matrix of known row lengths: ``data`` and
    ``indices`` are allocated up front, and rows written to their place with ``os.pwrite`` (any
    thread, any order, without HDF5's lock)."""

    def __init__(self, path: Path, n_genes: int, row_lengths: np.ndarray, *, direct: DirectWriter | None = None):
        self.path = path
        self.indptr = np.zeros(len(row_lengths) + 1, np.int64)
        np.cumsum(row_lengths, out=self.indptr[1:])
        self._file = h5py.File(path, "w")
        x = self._file.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": (len(row_lengths), n_genes)})
        x.create_dataset("indptr", data=self.indptr)
        nnz = int(self.indptr[-1])
        self._places = {name: _preallocated(x, name, dtype, nnz) for name, dtype in (("data", "<f4"), ("indices", "<i4"))}
        self._file.flush()  # the datasets' places are final; our own descriptor writes there
        self._out = OutputFile(path, direct=direct, create=False)

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
        self._file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        for key, value in {"obs": obs, "var": var, "uns": uns, "obsm": {}, "varm": {}, "obsp": {}, "varp": {},
                           "layers": {}}.items():
            ad.io.write_elem(self._file, key, value)
        self._file.close()

    def close(self) -> None:
        """Release the file without finishing it (a failed run)."""
        self._out.close()
        self._file.close()


def _preallocated(group: h5py.Group, name: str, dtype: str, size: int) -> tuple[int, np.dtype]:
    """A contiguous 1-D dataset allocated now and never filled by HDF5: its byte offset and dtype."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # no timestamps: the same input gives the same file
    dataset = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)),
                              h5py.h5s.create_simple((size,)), dcpl=dcpl)
    offset = dataset.get_offset()
    return (0 if offset is None else int(offset)), np.dtype(dtype)


_ARROW_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class ArrowSplitWriter:
    """One split of a ``datasets.DatasetDict`` on disk: Arrow IPC stream shards that chunks append
    record batches to in chunk order, from any thread; ``finish`` writes the metadata."""

    def __init__(self, folder: Path, schema: pa.Schema, *, shard_bytes: int = 500 << 20,
                 direct: DirectWriter | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True)
        # datasets.Value dtypes of plain Arrow types (without importing datasets: seconds)
        dtypes = {"double": "float64", "float": "float32", "halffloat": "float16"}
        self.features = {f.name: {"dtype": dtypes.get(str(f.type), str(f.type)), "_type": "Value"}
                         for f in schema}
        metadata = {"huggingface": json.dumps({"info": {"features": self.features}})}
        self.schema = schema.with_metadata(metadata)
        self._schema_message = self.schema.serialize()
        self.shard_bytes = shard_bytes
        self._direct = direct
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
        # Into glibc's heap, which keeps freed memory for reuse; Arrow's pool hands its pages back.
        message = batch.serialize(memory_pool=pa.system_memory_pool())
        if message.size != size:  # its place in the shard was taken for `size` bytes
            raise RuntimeError(f"Arrow made a {message.size}-byte message, {size} expected")
        file.pwrite(message, offset)

    def _new_shard(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.arrow"
        file = OutputFile(path, direct=self._direct)
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
        fingerprint = hashlib.sha1(f"{self.folder.name}:{self.n_rows}".encode()).hexdigest()[:16]
        state = {"_data_files": names, "_fingerprint": fingerprint, "_format_columns": None, "_format_kwargs": {},
                 "_format_type": None, "_output_all_columns": False, "_split": None}
        info = {"citation": "", "description": "", "features": self.features, "homepage": "", "license": ""}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))
        (self.folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def write_dataset_dict_index(folder: Path, splits: list[str]) -> None:
    """The ``dataset_dict.json`` listing the splits of a saved ``DatasetDict``."""
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
