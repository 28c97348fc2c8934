"""The check that a count matrix holds only finite, non-negative values, chunk by chunk
(``raise_value_problems`` is also the error of the QC statistics kernel's own check)."""

from __future__ import annotations

import scipy.sparse as sp
from numba import njit

from utils.cli import InputError
from utils.transform.readers import MatrixSource


def read_checked_chunk(source: MatrixSource, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop), after checking that every value is finite and non-negative."""
    chunk = source.read_rows(start, stop)
    raise_value_problems(source, start, *_value_problems(chunk.indptr, chunk.data))
    return chunk


def raise_value_problems(source: MatrixSource, start: int, first_nonfinite: int, first_negative: int) -> None:
    """The error for a chunk starting at row ``start`` whose rows ``first_nonfinite`` or
    ``first_negative`` (chunk rows, -1: none) hold NaN, infinite or negative values."""
    if first_nonfinite >= 0:
        raise InputError(f"{source.path}: {source.matrix_name} holds NaN or infinite values (first in cell "
                         f"{start + first_nonfinite}); a count matrix must be finite.")
    if first_negative >= 0:
        raise InputError(f"{source.path}: {source.matrix_name} holds negative values (first in cell "
                         f"{start + first_negative}); give raw counts (e.g. --layer counts), not scaled data.")


@njit(cache=True, nogil=True)
def _value_problems(indptr, data):
    """The first row holding a NaN or infinite value and the first holding a negative one (-1: none),
    counted without early exits, so the inner loop vectorizes."""
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
