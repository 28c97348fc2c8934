"""Figures of the transform's evaluation (matplotlib, written to PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.fit import RankExpressionFit, check_finite  # noqa: E402

MAX_SCATTER_POINTS = 200_000


def _subsample(n: int, *, seed: int) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_SCATTER_POINTS, replace=False))


def _fixed_margins(fig) -> None:
    # Our labels are fixed, so fixed margins fit them; tight_layout's extra layout pass, and
    # mathtext tick labels ("%g" above), took a third of drawing these figures.
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.11, top=0.93)


def plot_log_rank_fit(
    log_rank: np.ndarray, log_expression: np.ndarray, fit: RankExpressionFit, path: Path, *, seed: int
) -> None:
    """Density of log-rank vs log-expression with the fitted line and the fit threshold."""
    check_finite(f"draw {path.name}", log_rank=log_rank, log_expression=log_expression)
    keep = _subsample(len(log_rank), seed=seed)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    hb = ax.hexbin(log_rank[keep], log_expression[keep], gridsize=70, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, label="points (log scale)", format="%g")
    xs = np.linspace(0, float(log_rank.max(initial=1.0)), 100)
    ax.plot(xs, fit.predict(xs), color="red", lw=2,
            label=f"fit: {fit.intercept:.3f} {fit.slope:+.3f}·x  (R² = {fit.r_squared:.3f})")
    ax.axvline(fit.threshold, color="grey", ls="--", lw=1, label=f"fit threshold ({fit.threshold:g})")
    ax.set_xlabel("log10(1 + rank)   (rank 0 = most expressed gene)")
    ax.set_ylabel("log10(1 + normalized expression)")
    ax.set_title("Gene rank vs expression")
    ax.legend(loc="upper right", fontsize=8)
    _fixed_margins(fig)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reconstruction(
    log_expression: np.ndarray, reconstructed: np.ndarray, fit: RankExpressionFit, path: Path, *, seed: int
) -> None:
    """True vs reconstructed log-expression, with the y = x line."""
    check_finite(f"draw {path.name}", log_expression=log_expression, reconstructed=reconstructed)
    keep = _subsample(len(log_expression), seed=seed)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    hb = ax.hexbin(log_expression[keep], reconstructed[keep], gridsize=70, bins="log", cmap="magma", mincnt=1)
    fig.colorbar(hb, ax=ax, label="points (log scale)", format="%g")
    high = float(max(log_expression.max(initial=1.0), reconstructed.max(initial=1.0)))
    ax.plot([0, high], [0, high], color="black", ls="--", lw=1, label="y = x")
    ax.set_xlabel("log10(1 + normalized expression)")
    ax.set_ylabel("reconstructed from rank")
    ax.set_title(f"Reconstruction: Pearson r = {fit.pearson_r:.3f}, Spearman r = {fit.spearman_r:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    _fixed_margins(fig)
    fig.savefig(path, dpi=120)
    plt.close(fig)
