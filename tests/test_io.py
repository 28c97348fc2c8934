"""Out-of-core reading and writing: direct reads, the preallocated h5ad writer, odd layouts."""

from __future__ import annotations

import errno
import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import utils.transform.filewriter
from tests.helpers import synthetic_counts, write_h5ad
from tests.test_transform import _read_all, run
from utils.transform.filewriter import DirectWriter, OrderedAppendFile, OutputAborted, OutputFile
from utils.transform.formats import ArrowSplitWriter, H5adCSRWriter
from utils.transform.readers import _DirectReader, _is_canonical, open_source


@pytest.mark.parametrize(
    "layout",
    [{"chunks": (7,)}, {"chunks": None}, {"chunks": (95,)}],
    ids=["small_chunks", "contiguous", "one_chunk"],
)
def test_direct_reads_match_h5py(tmp_path, layout):
    values = np.random.default_rng(0).standard_normal(95).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("v", data=values, **layout)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        reader = _DirectReader.open(tmp_path / "a.h5", f["v"])
        assert reader is not None
        for lo, hi in [(0, 95), (0, 1), (6, 8), (13, 14), (3, 90), (94, 95), (50, 50)]:
            assert np.array_equal(reader.read(lo, hi), values[lo:hi])


def test_reads_of_chunks_stored_apart(tmp_path):
    # Two datasets filled in turns: their chunks alternate in the file, so a range spanning
    # chunks is read piece by piece.
    values = np.arange(80, dtype=np.int32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        a = f.create_dataset("a", shape=(80,), dtype="<i4", chunks=(10,))
        b = f.create_dataset("b", shape=(80,), dtype="<i4", chunks=(10,))
        for start in range(0, 80, 10):
            a[start : start + 10] = values[start : start + 10]
            b[start : start + 10] = -values[start : start + 10]
            f.flush()  # chunks get their places in the file now, in turns
    with h5py.File(tmp_path / "a.h5", "r") as f:
        reader = _DirectReader.open(tmp_path / "a.h5", f["a"])
        for lo, hi in [(0, 80), (12, 18), (5, 35), (70, 80)]:
            assert np.array_equal(reader.read(lo, hi), values[lo:hi])


def test_compressed_datasets_are_left_to_h5py(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("v", data=np.arange(50.0), chunks=(10,), compression="gzip")
        f.create_dataset("big_endian", data=np.arange(50, dtype=">f4"))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert _DirectReader.open(tmp_path / "a.h5", f["v"]) is None
        assert _DirectReader.open(tmp_path / "a.h5", f["big_endian"]) is None


def test_compressed_and_non_canonical_inputs_give_the_same_outputs(tmp_path):
    adata = synthetic_counts(120, 300, seed=4)
    plain = write_h5ad(adata, tmp_path / "tiny.h5ad")
    reference = run(plain, tmp_path / "plain", "--min_genes_per_cell", "50")
    assert reference["n_points"] > 0

    compressed = tmp_path / "gz" / "tiny.h5ad"
    compressed.parent.mkdir()
    adata.write_h5ad(compressed, compression="gzip")
    run(compressed, tmp_path / "gz_out", "--min_genes_per_cell", "50", "--chunk_size", "17", "--num_proc", "2")

    # The same matrix stored with shuffled indices, an explicit zero and a value split in two.
    X = adata.X.tocsr()
    rng = np.random.default_rng(1)
    indices, data, indptr = [], [], [0]
    for r in range(X.shape[0]):
        genes, values = X.indices[X.indptr[r] : X.indptr[r + 1]], X.data[X.indptr[r] : X.indptr[r + 1]]
        order = rng.permutation(len(genes))
        genes, values = [*genes[order], genes[0], genes[0]], [*values[order], 0.0, 0.0]
        values[0] /= 2
        values[-1] = values[0]  # gene genes[0] now appears twice, its value in two halves
        genes[-1] = genes[0]
        indices += genes
        data += values
        indptr.append(len(indices))
    messy = sp.csr_matrix((np.array(data, np.float32), np.array(indices), np.array(indptr)), shape=X.shape)
    (tmp_path / "messy").mkdir()
    messy_path = write_h5ad(ad.AnnData(X=messy, obs=adata.obs, var=adata.var), tmp_path / "messy" / "tiny.h5ad")
    with h5py.File(messy_path) as f:  # stored as given
        assert (np.diff(f["X/indices"][: f["X/indptr"][1]].astype(int)) < 0).any()
        assert (f["X/data"][:] == 0).any()
    run(messy_path, tmp_path / "messy_out", "--min_genes_per_cell", "50")

    expected = _read_all(tmp_path / "plain")
    assert _read_all(tmp_path / "gz_out") == expected
    assert _read_all(tmp_path / "messy_out") == expected


def test_h5ad_writer_places_rows_written_out_of_order(tmp_path):
    rng = np.random.default_rng(2)
    matrix = sp.random(40, 30, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    matrix.data[:] = rng.random(matrix.nnz)
    matrix.data[matrix.indptr[3] : matrix.indptr[4]] = 0  # an empty row
    matrix.eliminate_zeros()
    writer = H5adCSRWriter(tmp_path / "x.h5ad", 30, np.diff(matrix.indptr))
    blocks = [(0, 9), (9, 10), (10, 33), (33, 40)]

    def write(block):
        start, stop = block
        lo, hi = matrix.indptr[start], matrix.indptr[stop]
        writer.write_rows(start, matrix.indices[lo:hi], matrix.data[lo:hi])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, blocks[::-1]))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(40)])
    writer.finish(obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)]), uns={"log1p": {"base": 10.0}})
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    assert back.X.dtype == np.float32
    assert np.array_equal(back.X.toarray(), matrix.toarray())
    assert back.uns["log1p"]["base"] == 10.0
    with pytest.raises(ValueError, match="do not fit"):
        H5adCSRWriter(tmp_path / "y.h5ad", 30, np.array([1, 1])).write_rows(1, np.arange(2), np.ones(2))


def test_source_reads_rows_of_a_large_chunked_file(tmp_path: Path):
    adata = synthetic_counts(200, 100, seed=5)
    path = write_h5ad(adata, tmp_path / "a.h5ad")
    source = open_source(path)
    assert np.array_equal(source.read_rows(37, 151).toarray(), adata.X[37:151].toarray())


@pytest.mark.parametrize(
    ("indices", "data", "canonical"),
    [
        ([1, 5, 0, 3], [1, 1, 1, 1], True),  # row 1 is empty: rows 0 and 2 touch
        ([1, 5, 3, 0], [1, 1, 1, 1], False),  # row 2 unsorted
        ([5, 1, 0, 3], [1, 1, 1, 1], False),  # row 0 unsorted
        ([5, 5, 0, 3], [1, 1, 1, 1], False),  # a duplicate
        ([1, 5, 0, 3], [1, 0, 1, 1], False),  # an explicit zero
    ],
)
def test_is_canonical(indices, data, canonical):
    indptr = np.array([0, 2, 2, 4])
    assert _is_canonical(indptr, np.array(indices, np.int32), np.array(data, np.float32)) == canonical
    # the same rows inside a larger file: indptr not starting at 0
    assert _is_canonical(indptr + 7, np.array(indices, np.int32), np.array(data, np.float32)) == canonical


def test_ordered_append_file_keeps_ticket_order_and_aborts(tmp_path):
    appender = OrderedAppendFile(tmp_path / "lines.txt")
    parts = {ticket: f"chunk {ticket}\n".encode() * (ticket + 1) for ticket in range(8)}
    with ThreadPoolExecutor(8) as pool:  # all running at once, started in reverse: still in order
        list(pool.map(lambda t: appender.append(t, parts[t]), range(7, -1, -1)))
    appender.close()
    assert (tmp_path / "lines.txt").read_bytes() == b"".join(parts[t] for t in range(8))

    waiting = OrderedAppendFile(tmp_path / "other.txt")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(waiting.append, 1, b"never")  # waits for ticket 0
        waiting.abort()
        with pytest.raises(OutputAborted):
            pending.result(timeout=10)
    waiting.close()


def test_abort_releases_only_the_chunks_after_the_failed_one(tmp_path):
    appender = OrderedAppendFile(tmp_path / "x.txt")
    with ThreadPoolExecutor(2) as pool:
        before = pool.submit(appender.append, 1, b"one\n")  # waits for ticket 0
        after = pool.submit(appender.append, 3, b"three\n")  # waits for ticket 2
        appender.abort(2)  # ticket 2 failed
        with pytest.raises(OutputAborted):
            after.result(timeout=10)
        appender.append(0, b"zero\n")  # earlier chunks still finish
        before.result(timeout=10)
    appender.close()
    assert (tmp_path / "x.txt").read_bytes() == b"zero\none\n"


def _write_pieces_from_threads(path: Path, *, n_buffers: int = 2, buffer_bytes: int = 1 << 20):
    """Pieces of random bytes, some under and some over the O_DIRECT threshold, written side by
    side from 4 threads in reverse order, starting at an odd offset; returns what was expected."""
    rng = np.random.default_rng(3)
    sizes = [(3 << 20) + 17, 1 << 20, 100, (5 << 20) + 4095, 4096, (2 << 20) + 1]
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    writer = DirectWriter(n_buffers=n_buffers, buffer_bytes=buffer_bytes)
    file = OutputFile(path, direct=writer)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: file.pwrite(data[starts[i] : starts[i] + sizes[i]], 7 + starts[i]),
                      range(len(sizes) - 1, -1, -1)))
    try:
        writer.flush()
    finally:
        writer.close()
        file.close()
    return b"\0" * 7 + data.tobytes()


def test_direct_writes_land_in_place(tmp_path, monkeypatch):
    aligned_writes = []
    original = OutputFile.write_aligned

    def spy(self, data, offset):
        aligned_writes.append((offset, len(data)))
        original(self, data, offset)

    monkeypatch.setattr(OutputFile, "write_aligned", spy)
    expected = _write_pieces_from_threads(tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == expected
    # the three pieces over 1 MiB went through the aligned path, in page-aligned parts of <= 1 MiB
    assert len(aligned_writes) >= 3
    assert all(offset % 4096 == 0 and 0 < n <= 1 << 20 and n % 4096 == 0 for offset, n in aligned_writes)


def test_a_file_system_refusing_direct_writes_gets_plain_ones(tmp_path, monkeypatch):
    original = utils.transform.filewriter._pwrite_all
    refused = []

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        original(fd, data, offset)

    monkeypatch.setattr(utils.transform.filewriter, "_pwrite_all", refuse_direct)
    expected = _write_pieces_from_threads(tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert refused or not _supports_direct_io(tmp_path)


def _supports_direct_io(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except (AttributeError, OSError):
        return False


def test_a_write_after_close_is_refused(tmp_path):
    writer = DirectWriter(n_buffers=1, buffer_bytes=1 << 20)
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.write(None, memoryview(bytes(8192)), 0)


def test_a_failed_direct_write_is_raised(tmp_path, monkeypatch):
    def full_disk(self, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OutputFile, "write_aligned", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write_pieces_from_threads(tmp_path / "out.bin", n_buffers=1)


def test_transform_outputs_are_the_same_with_every_write_direct(tmp_path, monkeypatch):
    adata = synthetic_counts(120, 400, seed=9)
    path = write_h5ad(adata, tmp_path / "tiny.h5ad")
    run(path, tmp_path / "plain", "--min_genes_per_cell", "5")
    monkeypatch.setattr(utils.transform.filewriter, "_DIRECT_MIN_BYTES", 0)  # even a few KB go direct
    run(path, tmp_path / "direct", "--min_genes_per_cell", "5", "--chunk_size", "23", "--num_proc", "2")
    assert _read_all(tmp_path / "direct") == _read_all(tmp_path / "plain")


def test_arrow_shards_hold_every_batch(tmp_path):
    import pyarrow as pa

    schema = pa.schema([pa.field("cell_name", pa.string()), pa.field("cell_sentence", pa.string())])
    writer = ArrowSplitWriter(tmp_path / "train", schema, shard_bytes=1 << 20,
                              direct=(direct := DirectWriter(n_buffers=2, buffer_bytes=1 << 20)))
    rng = np.random.default_rng(6)
    batches = []
    for ticket in range(5):
        n = int(rng.integers(1, 400))
        words = [" ".join(f"G{g}" for g in rng.integers(0, 999, 300)) for _ in range(n)]
        batches.append(pa.RecordBatch.from_arrays([pa.array([f"c{ticket}_{i}" for i in range(n)]), pa.array(words)],
                                                  schema=schema))
    with ThreadPoolExecutor(5) as pool:  # all at once, started out of order: still in order
        list(pool.map(lambda t: writer.append(t, batches[t]), [4, 2, 0, 3, 1]))
    direct.flush()
    direct.close()
    writer.finish()
    shards = sorted((tmp_path / "train").glob("data-*.arrow"))
    assert len(shards) > 1  # 1 MB shards: the batches spread over several
    table = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in shards)
    assert table.column("cell_name").to_pylist() == [v for b in batches for v in b.column(0).to_pylist()]
    assert table.column("cell_sentence").to_pylist() == [v for b in batches for v in b.column(1).to_pylist()]


TRUNCATE_BETWEEN_THE_PASSES = """
import sys
from pathlib import Path
import transform
from utils.cli import run_cli

path = Path(sys.argv[1])
plan_run = transform.plan_run


def plan_then_cut_the_input(source, options, **kw):  # the hook: after pass 1, before pass 2
    plan = plan_run(source, options, **kw)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return plan


transform.plan_run = plan_then_cut_the_input
sys.argv = ["transform.py", "--data_filepath", str(path), "--output_dir", sys.argv[2], "--min_genes_per_cell", "50"]
run_cli(transform.main, transform.parse_args)
"""


def test_an_input_cut_short_during_the_run_stops_with_one_sentence_and_leaves_nothing(tmp_path):
    # Before: the second pass read mapped pages past the new end of the file (SIGBUS, exit 135,
    # staging left behind). HDF5 itself reads zeros there, so the reader checks the file.
    import subprocess
    import sys

    path = write_h5ad(synthetic_counts(300, 400, seed=4), tmp_path / "cells.h5ad")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", TRUNCATE_BETWEEN_THE_PASSES, str(path), str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "cells.h5ad" in last and "changed while it was being read" in last and "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir())  # no output, no .staging-* folder
