"""The rank-to-expression model: log10(1 + expression) ≈ intercept + slope · log10(1 + rank).

The transform fits it over expressed genes, and ``inverse.py`` uses it to turn generated
sentences back into expression values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METRIC_COLUMNS = (
    "slope",
    "intercept",
    "r_squared",
    "pearson_r",
    "spearman_r",
    "threshold",
    "n_points",
)


@dataclass(frozen=True)
class RankExpressionFit:
    """Fitted line and how well it reconstructs expression (a row of
    ``transformation_metrics.csv``)."""

    slope: float
    intercept: float
    # How well the line reconstructs expression; NaN for a line given without a fit
    # (e.g. read back with only its slope and intercept).
    r_squared: float = float("nan")
    pearson_r: float = float("nan")
    spearman_r: float = float("nan")
    threshold: float = float("nan")
    n_points: int = 0

    def as_row(self) -> dict[str, float]:
        return asdict(self)

    def predict(self, log_rank: np.ndarray) -> np.ndarray:
        """log10(1 + expression) predicted from log10(1 + rank)."""
        return self.intercept + self.slope * np.asarray(log_rank, dtype=np.float64)

    def value(self, rank: np.ndarray | float) -> np.ndarray | float:
        """log10(1 + expression) predicted at ``rank`` (0 = most expressed)."""
        return self.predict(np.log10(1.0 + np.asarray(rank, dtype=np.float64)))


class NonFiniteError(ValueError):
    """Points or values given to the fit or a figure are NaN or infinite."""


def check_finite(what: str, **arrays: np.ndarray) -> None:
    """Raise ``NonFiniteError`` (one sentence) when any of ``arrays`` holds NaN or infinity."""
    for name, values in arrays.items():
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise NonFiniteError(f"Cannot {what}: {bad:,} of {np.size(values):,} {name} values are NaN or infinite.")


def fit_rank_expression(
    log_rank: np.ndarray, log_expression: np.ndarray, *, threshold: float = 3.0
) -> RankExpressionFit:
    """Fit expression on rank in log space and measure the reconstruction.

    The line is fitted on points with ``log_rank < threshold`` (the original's default 3,
    i.e. the top ~1,000 genes; ``n_points`` counts them). As in the original, R² (sklearn's
    ``r2_score``), Pearson and Spearman r measure the line's prediction against every point
    given (all expressed genes of the evaluated cells), not only those of the fit.

    >>> r = np.log10(1 + np.arange(50.0))
    >>> fit = fit_rank_expression(r, 2.0 - 0.5 * r)
    >>> round(fit.slope, 6), round(fit.intercept, 6), round(fit.r_squared, 6)
    (-0.5, 2.0, 1.0)
    """
    log_rank = np.asarray(log_rank, dtype=np.float64)
    log_expression = np.asarray(log_expression, dtype=np.float64)
    check_finite("fit the rank-expression line", log_rank=log_rank, log_expression=log_expression)
    in_fit = log_rank < threshold
    x, y = log_rank[in_fit], log_expression[in_fit]
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(
            f"Cannot fit the rank-expression line: {x.size} point(s) with log-rank below {threshold}."
        )
    slope, intercept = np.polyfit(x, y, deg=1)
    scores = score_line(log_rank, log_expression, slope=float(slope), intercept=float(intercept))
    return RankExpressionFit(
        slope=float(slope),
        intercept=float(intercept),
        **scores,
        threshold=float(threshold),
        n_points=int(x.size),
    )


def score_line(log_rank: np.ndarray, log_expression: np.ndarray, *, slope: float, intercept: float
               ) -> dict[str, float]:
    """R² (sklearn's ``r2_score``), Pearson and Spearman r of a line's prediction of every point.

    >>> r = np.log10(1 + np.arange(10.0))
    >>> {k: round(v, 6) for k, v in score_line(r, 1.0 - r, slope=-1.0, intercept=1.0).items()}
    {'r_squared': 1.0, 'pearson_r': 1.0, 'spearman_r': 1.0}
    """
    log_rank = np.asarray(log_rank, dtype=np.float64)
    log_expression = np.asarray(log_expression, dtype=np.float64)
    reconstructed = intercept + slope * log_rank
    residual = log_expression - reconstructed
    total = log_expression - log_expression.mean()
    # r2_score's convention for constant targets: 1 when predicted exactly, else 0.
    if total.any():
        r_squared = 1.0 - float(residual @ residual) / float(total @ total)
    else:
        r_squared = 0.0 if residual.any() else 1.0
    if np.ptp(reconstructed) == 0 or np.ptp(log_expression) == 0:
        pearson = spearman = float("nan")
    else:
        pearson = float(np.corrcoef(log_expression, reconstructed)[0, 1])
        spearman = float(np.corrcoef(average_ranks(log_expression), average_ranks(reconstructed))[0, 1])
    return {"r_squared": float(r_squared), "pearson_r": pearson, "spearman_r": spearman}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as ``scipy.stats.rankdata``), for Spearman r.

    >>> average_ranks(np.array([10.0, 20.0, 10.0])).tolist()
    [1.5, 3.0, 1.5]
    """
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - (counts - 1) / 2.0)[inverse]).astype(np.float64)
