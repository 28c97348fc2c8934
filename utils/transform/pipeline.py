"""The transform as two streaming passes over row chunks, optionally by worker threads: pass 1
(``plan_run``) runs the QC, pass 2 (``sentence_pass``) ranks every chunk into a sink (files or
memory). The output does not depend on the number of workers."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from utils.cli import InputError
from utils.transform.fit import NonFiniteError, RankExpressionFit, fit_rank_expression
from utils.transform.labels import SPECIAL_TOKEN, dataset_columns
from utils.transform.preprocess import (
    TARGET_SUM,
    Normalization,
    QCAccumulator,
    QCParams,
    QCResult,
    chunk_stats,
    detect_input_kind,
    gene_flags,
    log1p_ceiling,
    log1p_problem,
    log_qc,
    qc_by_label,
    to_linear,
)
from utils.transform.ranking import GeneNameTable
from utils.transform.readers import (
    NO_LOG1P,
    ConcatenatedSource,
    MatrixSource,
    input_paths,
    input_stem,
    open_source,
    raise_value_problems,
    read_checked_chunk,
)
from utils.transform.sentence_chunk import RankedChunk, rank_chunk

logger = logging.getLogger("cell2sentence")

SPLITS = ("train", "valid", "test")
DEFAULT_LABEL_COLUMN = "cell_type"
DETECTION_CELLS = 2_000
MAX_SEED = 2**64 - 1  # the tie-breaking hash takes the seed as an unsigned 64-bit integer


@dataclass(frozen=True)
class TransformOptions:
    """What decides a transform's sentences (``transform.py``'s flags, ``adata_to_sentences``' arguments)."""

    input_kind: str = "auto"
    gene_column: str | None = None
    label_column: str | bool | None = None  # False: no label column (a model's new cells)
    obs_columns: Sequence[str] = ()
    bad_gene_names: str = "replace"
    qc: QCParams = field(default_factory=QCParams)
    max_genes: int | None = None
    exclude_genes: str | None = None  # a regular expression over gene names (re.search)
    target_sum: float = TARGET_SUM
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
    eval_cells: int = 1_000
    seed: int = 1234
    chunk_size: int = 2_048
    num_proc: int = 1

    def check(self, *, prefix: str = "") -> None:
        """Fail with one sentence on an option no run can use; ``prefix`` names them as flags."""
        fractions = tuple(self.split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
            raise InputError(f"{prefix}split_fractions {list(fractions)} must be three non-negative numbers that "
                             "add up to 1, e.g. 0.8 0.1 0.1.")
        for name in ("chunk_size", "num_proc", "eval_cells"):
            if getattr(self, name) < 1:
                raise InputError(f"{prefix}{name} must be at least 1.")
        if self.max_genes is not None and self.max_genes < 1:
            raise InputError(f"{prefix}max_genes must be at least 1 (or left out for full sentences).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"{prefix}seed must be a whole number from 0 to 2**64 - 1 (got {self.seed}); e.g. the "
                             "default, 1234.")
        if not self.target_sum > 0:
            raise InputError(f"{prefix}target_sum must be positive (got {self.target_sum}); the default is "
                             f"{TARGET_SUM:,g}.")


@dataclass
class RunPlan:
    """A run after its QC pass: which cells and genes are kept, and what pass 2 needs."""

    source: MatrixSource
    normalization: Normalization
    seed: int
    max_genes: int | None
    obs_columns: dict[str, str]  # dataset column -> obs column
    columns: dict[str, np.ndarray]  # per input cell, the dataset's columns (see ``dataset_columns``)
    qc: QCResult
    chunks: list[tuple[int, int]]
    kept_names: np.ndarray  # the kept genes' names, in input order
    gene_position: np.ndarray  # per input gene: its kept position, or -1
    names: GeneNameTable
    split_of_cell: np.ndarray  # per input cell: 0 train, 1 valid, 2 test, -1 removed
    eval_mask: np.ndarray  # per input cell: in the fit's sample
    qc_table: pd.DataFrame  # what each filter removed, per label (``qc_by_label``)

    @property
    def n_kept(self) -> int:
        return int(self.qc.cell_mask.sum())

    def first_kept(self, start: int) -> int:
        """The preprocessed row of the first kept cell from input row ``start`` on."""
        return int(np.count_nonzero(self.qc.cell_mask[:start]))


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n_cells)) for s in range(0, n_cells, chunk_size)]


def resolve_gene_names(var: pd.DataFrame, gene_column: str | None, *, bad: str, path: Any) -> np.ndarray:
    """Gene names from var (feature_name when present), unique and free of whitespace."""
    if gene_column is not None and gene_column not in var.columns:
        raise InputError(f"{path}: var has no column {gene_column!r} (it has {list(var.columns)[:8]}); fix --gene_column.")
    column = gene_column or ("feature_name" if "feature_name" in var.columns else None)
    names = pd.Index((var[column] if column else var.index).astype(str))
    logger.info("Gene names from %s.", f"var[{column!r}]" if column else "var_names")
    if (names == "").any() or names.isin(["nan", "None"]).any():
        raise InputError(f"{path}: some gene names are empty or missing; choose another --gene_column.")
    has_space = names.str.contains(r"\s", regex=True)
    if has_space.any():
        example = names[has_space][0]
        if bad == "error":
            raise InputError(f"{path}: {has_space.sum():,} gene names contain whitespace (e.g. {example!r}); "
                             "rename them or pass --bad_gene_names replace.")
        logger.warning("Replaced whitespace by '_' in %s gene names (e.g. %r).", f"{has_space.sum():,}", example)
        names = pd.Index([re.sub(r"\s+", "_", n) for n in names])
    # A gene named like a special token would end or pad a generated cell; renaming it is the user's choice.
    special = names.str.contains(SPECIAL_TOKEN.pattern, regex=True) | names.str.fullmatch(r"<.*>")
    if special.any():
        raise InputError(f"{path}: {special.sum():,} gene names are or hold a tokenizer's special token (e.g. "
                         f"{names[special][0]!r}), which would end or pad the model's cells; rename those genes "
                         "(e.g. without the angle brackets) or choose another --gene_column.")
    if not names.is_unique:
        logger.warning("Made %s duplicated gene names unique by appending -1, -2, ...", f"{names.duplicated().sum():,}")
        names = ad.utils.make_index_unique(names)
    return names.to_numpy(dtype=object)


def resolve_obs_columns(obs: pd.DataFrame, label_column: str | bool | None, extra: Sequence[str], *, path: Any) -> dict[str, str]:
    """Dataset column name -> obs column: cell_type from the label column (False: none), plus extras."""
    if label_column is None:
        label_column = DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in obs.columns else False
        if label_column is False:
            logger.warning("obs has no %r column: the dataset has no cell_type (pass --label_column).",
                           DEFAULT_LABEL_COLUMN)
    elif label_column is not False and label_column not in obs.columns:
        raise InputError(f"{path}: obs has no column {label_column!r} (it has {list(obs.columns)[:8]}); fix --label_column.")
    columns = {} if label_column is False else {"cell_type": label_column}
    for name in extra:
        if name not in obs.columns:
            raise InputError(f"{path}: obs has no column {name!r} asked for by --obs_columns.")
        columns.setdefault(name, name)
    return columns


def resolve_input_kind(source: MatrixSource, requested: str, *, target_sum: float = TARGET_SUM) -> Normalization:
    """The input kind (auto-detected on the first cells), the log1p base and the target sum."""
    has_uns = source.log1p_base != NO_LOG1P
    base = source.log1p_base if has_uns else None
    sample = read_checked_chunk(source, 0, min(DETECTION_CELLS, source.n_cells))
    if requested != "auto":
        kind, reason = requested, "as asked by --input_kind"
        problem = log1p_problem(sample.data, base) if kind == "log1p" else None
        if problem:
            raise InputError(f"{source.path}: --input_kind log1p, but {source.matrix_name} cannot hold log1p "
                             f"values ({problem}); pass --input_kind counts (or auto).")
    else:
        kind, base, reason = detect_input_kind(sample, has_log1p_uns=has_uns, log1p_base=base)
    if kind == "counts" and sample.nnz and not np.all(sample.data == np.round(sample.data)):
        logger.warning("--input_kind counts, but %s holds non-integer values.", source.matrix_name)
    shown = {"counts": f"raw counts (will be normalized to {target_sum:,g} per cell)",
             "normalized": "already-normalized values (not normalized again)",
             "log1p": f"log1p values (base {base or 'e'}; brought back with expm1)"}[kind]
    logger.info("Input %s read as %s: %s.", source.matrix_name, shown, reason)
    return Normalization(kind, base, float(target_sum))


def _check_not_empty(source: MatrixSource) -> None:
    if source.n_cells == 0 or source.n_genes == 0:
        raise InputError(f"{source.path}: {source.matrix_name} is empty ({source.shape}).")


def plan_run(source: MatrixSource, options: TransformOptions, *, progress: bool = True,
             normalization: Normalization | None = None) -> RunPlan:
    """Pass 1: names, columns, input kind (``normalization``: given by ``open_inputs``, else detected),
    the QC, the splits and the evaluation sample."""
    _check_not_empty(source)
    gene_names = resolve_gene_names(source.var, options.gene_column, bad=options.bad_gene_names, path=source.path)
    obs_columns = resolve_obs_columns(source.obs, options.label_column, options.obs_columns, path=source.path)
    columns, notes = dataset_columns(source.obs, obs_columns, path=source.path)  # before any work: may refuse
    for note in notes:
        logger.warning("%s", note)
    if normalization is None:
        normalization = resolve_input_kind(source, options.input_kind, target_sum=options.target_sum)
    is_mt = np.char.startswith(np.char.upper(gene_names.astype(str)), "MT-")
    excluded = None
    if options.exclude_genes is not None:  # a regular expression searched in each name
        try:
            regex = re.compile(options.exclude_genes)
        except re.error as err:
            raise InputError(f"--exclude_genes {options.exclude_genes!r} is not a valid regular expression "
                             f"({err}).") from err
        excluded = np.fromiter((regex.search(name) is not None for name in gene_names), bool, len(gene_names))
        logger.info("--exclude_genes %r matches %s of %s genes (e.g. %s).", options.exclude_genes,
                    f"{excluded.sum():,}", f"{len(excluded):,}", ", ".join(gene_names[excluded][:5]) or "none")
    chunks = chunk_bounds(source.n_cells, options.chunk_size)

    accumulator = QCAccumulator(source.n_cells, source.n_genes, options.qc)
    task = partial(_stats_task, source, normalization, options.qc, gene_flags(is_mt, excluded))
    with tqdm(total=source.n_cells, desc="QC pass", unit="cells", disable=not progress) as bar:
        for stats in ordered_map(task, chunks, num_proc=options.num_proc):
            accumulator.add(stats)
            bar.update(len(stats.n_genes))
    result = accumulator.finalize(is_mt, excluded)
    qc_table = qc_by_label(result, columns.get("cell_type"))
    log_qc(result, source.n_cells, options.qc, path=source.path, by_label=qc_table if "cell_type" in columns else None)

    # Splits and the evaluation sample are drawn over the kept cells, by input index.
    split_of_cell = np.full(source.n_cells, -1, np.int8)
    split_of_cell[result.cell_mask] = assign_splits(int(result.cell_mask.sum()), options.split_fractions,
                                                    seed=options.seed)
    kept_names = gene_names[result.gene_mask]
    return RunPlan(
        source=source, normalization=normalization, seed=options.seed, max_genes=options.max_genes,
        obs_columns=obs_columns, columns=columns, qc=result, chunks=chunks,
        kept_names=kept_names,
        gene_position=np.where(result.gene_mask, np.cumsum(result.gene_mask) - 1, -1).astype(np.int32),
        names=GeneNameTable(list(kept_names)), split_of_cell=split_of_cell,
        eval_mask=sample_eval_cells(result.cell_mask, options.eval_cells, seed=options.seed), qc_table=qc_table,
    )  # fmt: skip


def open_inputs(data_filepath: Path | Sequence[Path], options: TransformOptions, *,
                layer: str | None = None) -> tuple[MatrixSource, TransformOptions, Normalization | None]:
    """The input of ``--data_filepath``, the options to plan it with, and the input kind several files
    agreed on (None: one file); several files become one ``ConcatenatedSource``."""
    paths = input_paths(data_filepath)
    if paths == [data_filepath]:
        return open_source(data_filepath, layer=layer), options, None
    stems = [p.stem for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise InputError(f"Several inputs are named {repeated[0]!r}; the dataset column names cells by their file's "
                         "name, so give files of different names.")
    sources = [open_source(p, layer=layer) for p in paths]
    for source in sources:
        _check_not_empty(source)
    gene_names = [resolve_gene_names(s.var, options.gene_column, bad=options.bad_gene_names, path=s.path)
                  for s in sources]
    normalization = None
    if options.input_kind == "auto":
        kinds = [resolve_input_kind(s, "auto", target_sum=options.target_sum) for s in sources]
        if len({(k.input_kind, k.log1p_base) for k in kinds}) > 1:
            groups: dict[str, list[str]] = {}
            for path, kind in zip(paths, kinds, strict=True):
                base = f" (base {kind.log1p_base or 'e'})" if kind.input_kind == "log1p" else ""
                groups.setdefault(f"{kind.input_kind}{base}", []).append(path.name)
            raise InputError("The input files hold different kinds of values (" + "; ".join(
                f"{kind}: {', '.join(names)}" for kind, names in groups.items())
                + "); give files of one kind, or pass --input_kind to read them all as one.")
        normalization = kinds[0]
    where = data_filepath if isinstance(data_filepath, Path) else Path(input_stem(data_filepath))
    source = ConcatenatedSource(sources, gene_names, path=where)
    logger.info("Joined %s files into %s cells x %s genes (genes matched by name); QC runs over all cells "
                "together, and obs column 'dataset' names each cell's file.", len(sources),
                f"{source.n_cells:,}", f"{source.n_genes:,}")
    # Names are resolved per file already; the union is the var index.
    columns = tuple(options.obs_columns) + (() if "dataset" in options.obs_columns else ("dataset",))
    return source, dataclasses.replace(options, gene_column=None, obs_columns=columns), normalization


def _stats_task(source: MatrixSource, normalization: Normalization, qc: QCParams, flags: np.ndarray, index: int,
                bounds: tuple[int, int]):
    start, stop = bounds
    params = dict(row_offset=start, is_mt=None, params=qc, flags=flags)
    if normalization.input_kind == "log1p":  # check the values as stored, before they are brought back
        chunk = read_checked_chunk(source, start, stop)
        top = chunk.data.max(initial=0.0)
        if top > log1p_ceiling(normalization.log1p_base):  # e.g. counts past the detection sample
            raise InputError(
                f"{source.path}: {source.matrix_name} was read as log1p values, but cells from {start} on "
                f"reach {top:g}, beyond log1p of any normalized matrix; pass --input_kind counts "
                "(or normalized)."
            )
        chunk.data = to_linear(chunk.data, input_kind="log1p", log1p_base=normalization.log1p_base)
        return chunk_stats(chunk, **params)
    # The statistics kernel checks the values on its way (one pass over them, not two).
    stats = chunk_stats(source.read_rows(start, stop), **params)
    raise_value_problems(source, start, stats.first_nonfinite, stats.first_negative)
    return stats


def ordered_map(task: Callable[[int, tuple[int, int]], Any], chunks: Sequence[tuple[int, int]], *,
                num_proc: int) -> Iterator[Any]:
    """``task(i, chunks[i])`` for every chunk, results in order, at most ``num_proc + 1`` chunks in flight."""
    if num_proc <= 1 or len(chunks) <= 1:
        for i, bounds in enumerate(chunks):
            yield task(i, bounds)
        return
    # Threads, not processes: the numba kernels release the GIL, and results need no pickling.
    pool = ThreadPoolExecutor(num_proc, thread_name_prefix="chunk")
    try:
        pending: deque = deque()
        for i, bounds in enumerate(chunks):
            pending.append(pool.submit(task, i, bounds))
            if len(pending) > num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Return only when the running chunks have stopped: the caller then closes their files.
        pool.shutdown(wait=True, cancel_futures=True)


def rank_rows(plan: RunPlan, chunk: Any, start: int, row_split: np.ndarray,
              out_arrays: tuple[np.ndarray, np.ndarray] | None = None) -> RankedChunk:
    """``rank_chunk`` of the input rows ``chunk`` (from row ``start`` on), as the plan says."""
    stop = start + chunk.shape[0]
    return rank_chunk(
        chunk.indptr, chunk.indices, chunk.data, row_split=row_split, row_eval=plan.eval_mask[start:stop],
        cell_ids=np.arange(start, stop), gene_position=plan.gene_position, names=plan.names,
        normalization=plan.normalization, seed=plan.seed, max_genes=plan.max_genes,
        out_arrays=out_arrays,
    )  # fmt: skip


def sentence_pass(plan: RunPlan, sink: Any, *, num_proc: int, fit_threshold: float, progress: bool = True
                  ) -> tuple[np.ndarray, RankExpressionFit, tuple[np.ndarray, np.ndarray]]:
    """Pass 2 of every chunk into ``sink`` (``sink.task(ticket, bounds)`` in a worker, ``sink.add(chunk,
    start)`` in input order, ``sink.abort()`` on a failure). Returns the genes' cell counts, the fit, its points."""
    gene_cells = np.zeros(len(plan.kept_names), np.int64)
    points: list[tuple[np.ndarray, np.ndarray]] = []
    results = ordered_map(sink.task, plan.chunks, num_proc=num_proc)
    try:
        with tqdm(total=plan.source.n_cells, desc="Cell sentences", unit="cells", disable=not progress) as bar:
            for (start, stop), chunk in zip(plan.chunks, results, strict=True):
                sink.add(chunk, start)
                gene_cells += chunk.gene_cells
                points.append((chunk.eval_log_rank, chunk.eval_log_expression))
                bar.update(stop - start)
    except BaseException:
        sink.abort()  # release workers waiting for their turn to write
        results.close()  # wait for the running workers: they write to the sink
        raise
    log_rank, log_expression = (np.concatenate(arrays) for arrays in zip(*points, strict=True))
    try:
        fit = fit_rank_expression(log_rank, log_expression, threshold=fit_threshold)
    except NonFiniteError as err:
        raise InputError(f"{plan.source.path}: {err} Check --input_kind against what the matrix holds.") from err
    except ValueError as err:
        raise InputError(f"{plan.source.path}: {err} Lower --min_genes_per_cell or give more cells.") from err
    return gene_cells, fit, (log_rank, log_expression)


def assign_splits(n_cells: int, fractions: Sequence[float], *, seed: int) -> np.ndarray:
    """Split (0 train, 1 valid, 2 test) of each of ``n_cells`` cells, seeded; test takes the remainder."""
    order = np.random.default_rng(seed).permutation(n_cells)
    n_train = int(round(fractions[0] * n_cells))
    n_valid = int(round(fractions[1] * n_cells))
    split = np.full(n_cells, 2, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train : n_train + n_valid]] = 1
    return split


def sample_eval_cells(cell_mask: np.ndarray, n_eval: int, *, seed: int) -> np.ndarray:
    """Boolean mask of a seeded sample of at most ``n_eval`` kept cells for the fit."""
    kept = np.flatnonzero(cell_mask)
    mask = np.zeros(cell_mask.shape[0], bool)
    if len(kept) <= n_eval:
        mask[kept] = True
    else:
        mask[np.random.default_rng(seed + 1).choice(kept, size=n_eval, replace=False)] = True
    return mask
