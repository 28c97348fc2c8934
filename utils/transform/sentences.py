"""The Python API for notebooks: an AnnData in memory -> cell sentences, in memory.

``adata_to_sentences`` runs exactly the transform of ``transform.py`` (the same QC,
input-kind detection, normalization, gene exclusion and seeded tie-breaking, through the same
``plan_run`` and compiled kernels), without files: for the same input and seed its sentences
are those of the script (tested), so it is also the reference the streamed path is tested
against. ``CellSentences.save`` writes the script's data contract.

>>> import scanpy as sc                                              # doctest: +SKIP
>>> from utils import adata_to_sentences
>>> cs = adata_to_sentences(sc.datasets.pbmc3k(), label_column=None)  # doctest: +SKIP
>>> cs.sentences[0][:40]                                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm.auto import tqdm

from utils.cli import InputError
from utils.contract import TRANSFORM, VOCAB, preprocessed_name, split_files, transform_names
from utils.publish import staged_outputs
from utils.transform.fit import RankExpressionFit
from utils.transform.outputs import (
    fit_points,
    preprocessed_obs,
    write_evaluation,
    write_qc_by_label,
    write_vocab,
)
from utils.transform.pipeline import (
    SPLITS,
    PassContext,
    TransformOptions,
    assign_splits,
    ordered_map,
    plan_run,
)
from utils.transform.preprocess import TARGET_SUM, QCParams
from utils.transform.readers import InMemorySource
from utils.transform.sentence_chunk import SentenceChunk, rank_chunk, write_text

__all__ = ["CellSentences", "adata_to_sentences"]

logger = logging.getLogger("cell2sentence")

MAX_DEFAULT_THREADS = 8  # n threads hold n + 1 chunks in flight (~100 MB each at 2,000 genes a cell)


def default_threads() -> int:
    """``adata_to_sentences``' default ``num_proc``: the cores this process may use (all of
    them where the OS cannot say, as on macOS and Windows), at most ``MAX_DEFAULT_THREADS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_DEFAULT_THREADS)


@dataclass
class CellSentences:
    """The cell sentences of an AnnData's kept cells (input order), with what made them.

    ``sentence_array`` holds the sentences as the kernels wrote them, Arrow strings (one chunk
    per chunk of cells); ``.sentences`` makes Python strings of them when first asked, and
    ``to_dataset_dict`` uses them as they are. ``columns`` holds the dataset's columns per kept
    cell (``cell_name``, ``cell_type`` when there is a label, further ``obs_columns``);
    ``labels`` is its ``cell_type`` or None; ``qc_table`` says per label what each QC filter
    removed (``eval/qc_by_label.csv`` of ``save``).
    """

    # The large fields stay out of the repr (a notebook prints it).
    sentence_array: pa.ChunkedArray = field(repr=False)
    cell_names: list[str] = field(repr=False)
    labels: list[str] | None = field(repr=False)
    preprocessed: ad.AnnData  # kept cells x kept genes, log10(1 + normalized), CSR float32
    fit: RankExpressionFit
    columns: dict[str, np.ndarray] = field(repr=False)
    options: TransformOptions
    eval_points: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (log-rank, log-expression) of the fit's sample
    kept_rows: np.ndarray | None = field(default=None, repr=False)  # the kept cells' rows in the input
    qc_table: pd.DataFrame | None = field(default=None, repr=False)  # what QC removed per label (``qc_by_label``)
    _sentences: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.sentence_array)

    @property
    def sentences(self) -> list[str]:
        """One string per kept cell, in input order (made on first use and kept: Python strings
        of full sentences take about as long to make as the sentences themselves)."""
        if self._sentences is None:
            self._sentences = self.sentence_array.to_pylist()
        return self._sentences

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sentences": None}  # pickled once, as Arrow strings

    @property
    def genes(self) -> list[str]:
        """The vocabulary: the kept genes, in the preprocessed AnnData's order."""
        return self.preprocessed.var_names.tolist()

    def split_of_cells(self, split_fractions: Sequence[float] | None = None, seed: int | None = None) -> np.ndarray:
        """Per cell, 0 train, 1 valid or 2 test; drawn as ``transform.py`` draws them, so the
        same fractions and seed give the script's splits."""
        fractions = self.options.split_fractions if split_fractions is None else tuple(split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
            raise InputError(f"split_fractions {fractions} must be three non-negative fractions adding up to 1.")
        return assign_splits(len(self), fractions, seed=self.options.seed if seed is None else seed)

    def to_dataset_dict(self, split_fractions: Sequence[float] | None = None, seed: int | None = None):
        """A ``datasets.DatasetDict`` with splits train/valid/test and the script's columns
        (``cell_name``, ``cell_sentence``, ``cell_type`` when labelled, further obs columns)."""
        import datasets  # seconds to import: only when asked for
        from datasets.fingerprint import generate_random_fingerprint

        split = self.split_of_cells(split_fractions, seed)
        features = _features(self.columns)
        # One Arrow table of the kernels' strings: Dataset.from_dict would encode them row by row.
        columns = {n: pa.array(v, type=features[n].pa_type) for n, v in self.columns.items()}
        columns = {"cell_name": columns.pop("cell_name"), "cell_sentence": self.sentence_array, **columns}
        table = pa.table(columns)
        info = datasets.DatasetInfo(features=features)
        # The splits share the table through an indices mapping, as datasets' own `select` and
        # `train_test_split` make them (taking the rows would copy every sentence); a fingerprint
        # is given, else datasets hashes the whole table.
        return datasets.DatasetDict({
            name: datasets.Dataset(table, info=info, indices_table=pa.table({"indices": np.flatnonzero(split == i)
                                                                             .astype(np.uint64)}),
                                   fingerprint=generate_random_fingerprint())
            for i, name in enumerate(SPLITS)
        })

    def save(self, output_dir: Path | str, *, name: str = "adata", split_fractions: Sequence[float] | None = None,
             seed: int | None = None, overwrite: bool = False) -> Path:
        """Write the data contract of ``transform.py`` under ``output_dir`` (``cell_sentences/``,
        ``cell_sentences_hf/``, ``eval/``, ``<name>_preprocessed.h5ad``, ``transform_args.json``),
        staged and moved into place at the end; returns ``output_dir``."""
        output_dir = Path(output_dir)
        split = self.split_of_cells(split_fractions, seed)
        names = transform_names(name)
        with staged_outputs(output_dir, names, overwrite=overwrite) as tmp:
            text_dir = tmp / TRANSFORM.sentences
            text_dir.mkdir()
            for i, s in enumerate(SPLITS):
                rows = np.flatnonzero(split == i)
                with (text_dir / split_files(s).text).open("w") as text:  # a few thousand Python strings at a time
                    for batch in range(0, len(rows), 4_096):
                        taken = self.sentence_array.take(pa.array(rows[batch : batch + 4_096])).to_pylist()
                        text.write("".join(t + "\n" for t in taken))
                (text_dir / split_files(s).barcodes).write_text("".join(self.cell_names[r] + "\n" for r in rows))
                np.save(text_dir / split_files(s).indices, rows.astype(np.int64))
            write_vocab(tmp / VOCAB, np.asarray(self.genes, dtype=object),
                        self.preprocessed.var["n_cells"].to_numpy())
            self.to_dataset_dict(split_fractions, seed).save_to_disk(str(tmp / TRANSFORM.dataset))
            write_evaluation(tmp, self.fit, *self.eval_points, seed=self.options.seed)
            if self.qc_table is not None:
                write_qc_by_label(tmp, self.qc_table)
            preprocessed = self.preprocessed.copy()
            preprocessed.obs["split"] = pd.Categorical(np.array(SPLITS, dtype=object)[split], categories=SPLITS)
            preprocessed.write_h5ad(tmp / preprocessed_name(name))
            recorded = {**asdict(self.options), "split_fractions": list(self.options.split_fractions
                                                                         if split_fractions is None else split_fractions)}
            if seed is not None and seed != self.options.seed:  # "seed" made the sentences' tie-breaking
                recorded["split_seed"] = seed
            (tmp / TRANSFORM.args).write_text(json.dumps(recorded, indent=2, sort_keys=True, default=str) + "\n")
        return output_dir


def _features(columns: dict[str, np.ndarray]):
    import datasets

    features = {"cell_name": datasets.Value("string"), "cell_sentence": datasets.Value("string")}
    for name, values in columns.items():
        if name != "cell_name":
            features[name] = datasets.Value("string" if values.dtype == object else str(values.dtype))
    return datasets.Features(features)


def adata_to_sentences(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    input_kind: str = "auto",
    gene_column: str | None = None,
    label_column: str | bool | None = None,
    obs_columns: Sequence[str] = (),
    qc: QCParams | bool = True,
    max_genes: int | None = None,
    exclude_genes: str | None = None,
    target_sum: float = TARGET_SUM,
    seed: int = 1234,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    fit_threshold: float = 3.0,
    eval_cells: int = 1_000,
    bad_gene_names: str = "replace",
    chunk_size: int = 2_048,
    num_proc: int | None = None,
    progress: bool = False,
) -> CellSentences:
    """Cell sentences of an in-memory AnnData, as ``transform.py`` makes them.

    Parameters mirror the script's flags: ``layer`` (default ``.raw.X``, else
    ``layers["counts"]``, else ``X``), ``input_kind`` (``auto``, ``counts``, ``normalized``,
    ``log1p``), ``gene_column`` (default ``var["feature_name"]`` when present, else
    ``var_names``), ``label_column`` (default ``cell_type`` when present; False: none), ``qc`` (True: the
    original's QC, False: none, or a ``QCParams``), ``max_genes`` (top K genes per sentence),
    ``exclude_genes`` (a regular expression, e.g. ``"^MT-|^RP[SL]"``: matching genes are left
    out after QC, before normalization and ranking), ``target_sum`` (counts are normalized to
    it), ``seed`` (tie-breaking, splits, the fit's sample). ``split_fractions`` and ``seed`` are
    the defaults of ``to_dataset_dict`` and ``save``. ``chunk_size`` and ``num_proc`` (worker
    threads; default: the cores this process may use, at most ``MAX_DEFAULT_THREADS``) change
    speed and memory only, never the result.

    Returns a ``CellSentences``: ``.sentences`` (kept cells, input order), ``.cell_names``,
    ``.labels``, ``.preprocessed``, ``.fit``, ``.to_dataset_dict()``, ``.save(output_dir)``.
    The input is not modified; a backed one (``read_h5ad(path, backed="r")``) is read into memory
    (``transform.py`` streams a file from disk).
    """
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"adata_to_sentences takes an AnnData, not {type(adata).__name__}.")
    if isinstance(qc, QCParams):
        params = qc
    elif isinstance(qc, bool | np.bool_):
        params = QCParams(enabled=bool(qc))
    else:  # bool("no") is True: anything but a bool or QCParams would silently mean some QC
        raise InputError(f"qc must be True (the original's QC), False (none) or a QCParams, not {qc!r}.")
    if adata.isbacked:  # its matrix is on disk, where rows cannot be served as views
        logger.info("Reading the backed AnnData %s into memory.", adata.filename)
        adata = adata.to_memory()
    if num_proc is None:  # a notebook user gets every core: the sentences do not depend on it
        num_proc = default_threads()
    options = TransformOptions(
        input_kind=input_kind, gene_column=gene_column, label_column=label_column, obs_columns=tuple(obs_columns),
        bad_gene_names=bad_gene_names, qc=params, max_genes=max_genes, exclude_genes=exclude_genes,
        target_sum=float(target_sum), split_fractions=tuple(split_fractions), eval_cells=eval_cells, seed=seed,
        chunk_size=chunk_size, num_proc=num_proc,
    )  # fmt: skip
    options.check()
    source = InMemorySource(adata, "the AnnData", layer=layer)
    plan = plan_run(source, options, progress=progress)
    # The preprocessed matrix's size is known after the QC pass: the kernel writes each chunk's
    # rows into their place in it.
    indptr = np.zeros(plan.n_kept + 1, np.int64)
    np.cumsum(plan.qc.n_stored[plan.qc.cell_mask], out=indptr[1:])
    matrix = sp.csr_matrix((np.empty(indptr[-1], np.float32), np.empty(indptr[-1], np.int32), indptr),
                           shape=(plan.n_kept, len(plan.kept_names)))
    context = PassContext(source, plan.settings, plan=plan, outputs=matrix)
    sentence_chunks: list[pa.StringArray] = []
    gene_cells = np.zeros(len(plan.kept_names), np.int64)
    points: list[tuple[np.ndarray, np.ndarray]] = []
    with tqdm(total=source.n_cells, desc="Cell sentences", unit="cells", disable=not progress) as bar:
        for (start, stop), chunk in zip(plan.chunks, ordered_map(_sentence_task, plan.chunks, num_proc=num_proc,
                                                                 context=context), strict=True):
            # The kernel ran every kept cell as split 0: its Arrow strings are the sentences in
            # input order, taken without a copy.
            sentence_chunks.append(pa.StringArray.from_buffers(
                len(chunk.kept), pa.py_buffer(chunk.arrow_offsets[0]), pa.py_buffer(chunk.arrow_text[0])))
            gene_cells += chunk.gene_cells
            points.append((chunk.eval_log_rank, chunk.eval_log_expression))
            bar.update(stop - start)
    log_rank = np.concatenate([p[0] for p in points])
    log_expression = np.concatenate([p[1] for p in points])
    fit = fit_points(log_rank, log_expression, threshold=fit_threshold, path=source.path)

    kept = plan.qc.cell_mask
    columns = {n: v[kept] for n, v in plan.columns.items()}
    preprocessed = ad.AnnData(
        X=matrix, obs=preprocessed_obs(plan, plan.columns["cell_name"]),
        var=pd.DataFrame({"n_cells": gene_cells}, index=pd.Index(plan.kept_names.astype(str))),
        uns={"log1p": {"base": 10.0}},
    )
    labels = columns["cell_type"].tolist() if "cell_type" in columns else None
    return CellSentences(pa.chunked_array(sentence_chunks, pa.string()), columns["cell_name"].tolist(), labels,
                         preprocessed, fit, columns, options, (log_rank, log_expression), np.flatnonzero(kept),
                         plan.qc_table)


def _sentence_task(context: PassContext, index: int, bounds: tuple[int, int]) -> SentenceChunk:
    start, stop = bounds
    plan, settings, matrix = context.plan, context.settings, context.outputs
    chunk = plan.source.read_rows(start, stop)
    first = matrix.indptr[np.count_nonzero(plan.qc.cell_mask[:start])]  # where the chunk's rows go
    # The kernel needs room for every stored entry of the chunk, kept or not: near the end of
    # the matrix that room is not there, and the chunk's rows are made apart and copied in.
    in_place = first + chunk.nnz <= len(matrix.data)
    ranked = rank_chunk(
        chunk.indptr, chunk.indices, chunk.data, row_split=np.where(plan.split_of_cell[start:stop] >= 0, 0, -1),
        row_eval=plan.eval_mask[start:stop], cell_ids=np.arange(start, stop), gene_position=plan.gene_position,
        names=plan.names, normalization=settings.normalization, seed=settings.seed, max_genes=settings.max_genes,
        out_arrays=(matrix.indices[first:], matrix.data[first:]) if in_place else None,
    )  # fmt: skip
    if not in_place:
        matrix.indices[first : first + len(ranked.indices)] = ranked.indices
        matrix.data[first : first + len(ranked.data)] = ranked.data
    return write_text(ranked, plan.names)
