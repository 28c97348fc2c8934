"""The rank-to-expression line, log10(1 + expression) ≈ intercept + slope · log10(1 + rank): the
transform fits it, ``inverse.py`` turns sentences back into expression with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METRIC_COLUMNS = ("slope", "intercept", "r_squared", "pearson_r", "spearman_r", "threshold", "n_points")


@dataclass(frozen=True)
class RankExpressionFit:
    """Fitted line and how well it reconstructs expression (a row of ``transformation_metrics.csv``)."""

    slope: float
    intercept: float
    # NaN for a line given without a fit (e.g. read back with only its slope and intercept).
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


class NonFiniteError(ValueError):
    """Points or values given to the fit or a figure are NaN or infinite."""


def check_finite(what: str, **arrays: np.ndarray) -> None:
    """Raise ``NonFiniteError`` (one sentence) when any of ``arrays`` holds NaN or infinity."""
    for name, values in arrays.items():
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise NonFiniteError(f"Cannot {what}: {bad:,} of {np.size(values):,} {name} values are NaN or infinite.")


def fit_rank_expression(log_rank: np.ndarray, log_expression: np.ndarray, *, threshold: float = 3.0
                        ) -> RankExpressionFit:
    """Fit the line on the points with ``log_rank < threshold`` (``n_points``) and score it on every point.

    >>> r = np.log10(1 + np.arange(50.0))
    >>> fit = fit_rank_expression(r, 2.0 - 0.5 * r)
    >>> round(fit.slope, 6), round(fit.intercept, 6), round(fit.r_squared, 6)
    (-0.5, 2.0, 1.0)
    """
    log_rank, log_expression = np.asarray(log_rank), np.asarray(log_expression)
    check_finite("fit the rank-expression line", log_rank=log_rank, log_expression=log_expression)
    in_fit = log_rank < threshold
    x, y = log_rank[in_fit].astype(np.float64), log_expression[in_fit].astype(np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"Cannot fit the rank-expression line: {x.size} point(s) with log-rank below "
                         f"{threshold}.")
    slope, intercept = least_squares_line(x, y)
    scores = score_line(log_rank, log_expression, slope=slope, intercept=intercept)
    return RankExpressionFit(slope=slope, intercept=intercept, **scores, threshold=float(threshold),
                             n_points=int(x.size))


def least_squares_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line, as ``np.polyfit(x, y, 1)`` (to rounding).

    >>> least_squares_line(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0]))
    (2.0, 1.0)
    """
    x_mean, y_mean = x.mean(), y.mean()
    dx = x - x_mean
    slope = float(dx @ (y - y_mean) / (dx @ dx))
    return slope, float(y_mean - slope * x_mean)


def score_line(log_rank: np.ndarray, log_expression: np.ndarray, *, slope: float, intercept: float
               ) -> dict[str, float]:
    """R² (sklearn's ``r2_score``), Pearson and Spearman r of a line's prediction of every point.

    >>> r = np.log10(1 + np.arange(10.0))
    >>> {k: round(v, 6) for k, v in score_line(r, 1.0 - r, slope=-1.0, intercept=1.0).items()}
    {'r_squared': 1.0, 'pearson_r': 1.0, 'spearman_r': 1.0}
    """
    x = np.asarray(log_rank, dtype=np.float64)
    y = np.asarray(log_expression, dtype=np.float64)
    residual = y - (intercept + slope * x)
    total = y - y.mean()
    total_squares = float(total @ total)
    # r2_score's convention for constant targets: 1 when predicted exactly, else 0 (NaN stays NaN).
    if total_squares > 0 or not np.isfinite(total_squares):
        r_squared = 1.0 - float(residual @ residual) / total_squares
    else:
        r_squared = 0.0 if residual.any() else 1.0
    if slope == 0 or np.ptp(x) == 0 or total_squares == 0:
        pearson = spearman = float("nan")
    else:
        # The prediction is the log-rank scaled and shifted: its r is the log-rank's, signed as the slope.
        sign = float(np.sign(slope))
        pearson = sign * correlation(x, y)
        spearman = sign * correlation(average_ranks(log_rank), average_ranks(log_expression))
    return {"r_squared": float(r_squared), "pearson_r": pearson, "spearman_r": spearman}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two non-constant arrays (as ``np.corrcoef(a, b)[0, 1]``, to rounding)."""
    a = a - a.mean()
    b = b - b.mean()
    return float(np.clip(a @ b / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as ``scipy.stats.rankdata``), for Spearman r.

    >>> average_ranks(np.array([10.0, 20.0, 10.0])).tolist()
    [1.5, 3.0, 1.5]
    """
    distinct, counts = np.unique(values, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[np.searchsorted(distinct, values)]
