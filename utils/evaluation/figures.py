"""Every figure of the project: matplotlib ``Figure`` objects, or PNG files for the transform's evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from utils.contract import sample_rows  # noqa: E402
from utils.evaluation.metrics import normalized, spellings  # noqa: E402
from utils.transform.fit import RankExpressionFit, check_finite  # noqa: E402

if TYPE_CHECKING:
    from utils.evaluation.generation_metrics import GenerationEvaluation


# tab10, then colours of Kelly's list of maximum contrast unlike any of them.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#f3c300", "#875692", "#008856", "#f99379", "#604e97", "#b3446c",
    "#882d17", "#8db600", "#2b3d26", "#e25822",
)


def plot_confusion_matrix(true: Sequence[str], predicted: Sequence[str], *,
                          title: str = "Cell-type prediction") -> Figure:
    """Row-normalized confusion matrix with counts (predictions of no true class: ``(other)``)."""
    t, p = normalized(true), normalized(predicted)
    names = spellings(true)
    classes = sorted(set(t))
    other = any(x not in names for x in p)
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes) + other), dtype=int)
    for a, b in zip(t, p, strict=True):
        counts[index[a], index.get(b, len(classes))] += 1
    with np.errstate(invalid="ignore"):
        frac = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    labels_y = [names[c] for c in classes]
    labels_x = labels_y + ["(other)"] * other
    size = 2.5 + 0.55 * max(len(labels_x), 2)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                color = "white" if frac[i, j] > 0.6 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return fig


def _lab(colour: str) -> np.ndarray:
    """CIELAB (D65) of a matplotlib colour."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _colour_distance(a: str, b: str) -> float:
    """Distance in CIELAB with lightness at half weight: two shades of one hue count as close."""
    d = _lab(a) - _lab(b)
    return float(np.sqrt((d[0] / 2) ** 2 + d[1] ** 2 + d[2] ** 2))


def distinct_colours(types: Sequence[str], centroids: np.ndarray) -> dict[str, str]:
    """A colour per type such that types close together in the embedding look different (a local search).

    >>> distinct_colours(["a", "b"], np.array([[0.0, 0.0], [1.0, 0.0]]))
    {'a': '#1f77b4', 'b': '#ff7f0e'}
    """
    n = len(types)
    centroids = np.asarray(centroids, dtype=np.float64).reshape(n, -1)
    if n == 0:
        return {}
    d = np.sqrt(((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    scale = float(np.median(d.min(axis=1))) if n > 1 else 1.0
    close = np.exp(-((d / (scale if scale > 0 else 1.0)) ** 2))
    palette = [PALETTE[i % len(PALETTE)] for i in range(max(n, len(PALETTE)))]
    like = np.array([[np.exp(-_colour_distance(a, b) / 40.0) for b in palette] for a in palette])
    pick = list(range(n))  # type i has palette[pick[i]]

    def total(p: list[int]) -> float:
        return float((close * like[np.ix_(p, p)]).sum()) / 2

    current = total(pick)
    for _ in range(100):
        moved = False
        for i in range(n):
            for c in range(len(palette)):
                if c == pick[i]:
                    continue
                trial = pick.copy()
                if c in trial:  # a swap with the type holding c
                    trial[trial.index(c)] = pick[i]
                trial[i] = c
                value = total(trial)
                if value < current - 0.01:  # a clear gain only: tab10 stays where it serves
                    pick, current, moved = trial, value, True
        if not moved:
            break
    return {str(types[i]): palette[pick[i]] for i in range(n)}


def _labels(labels: Sequence[str]) -> np.ndarray:
    return np.asarray([str(x) for x in labels], dtype=object)


def _type_colours(types: list[str], points: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """:func:`distinct_colours` from the centroid of each type's ``points`` (far away when it has none)."""
    centroids = np.array([points[labels == t].mean(axis=0) if (labels == t).any() else np.full(2, np.inf)
                          for t in types]).reshape(len(types), 2)
    centroids[~np.isfinite(centroids)] = 1e6
    return distinct_colours(types, centroids)


def plot_embedding(real: np.ndarray, real_labels: Sequence[str], generated: np.ndarray,
                   generated_labels: Sequence[str], *, title: str = "Real and generated cells (PCA)") -> Figure:
    """2-d scatter of real (dots) and generated (crosses) cells, coloured by cell type."""
    fig = Figure(figsize=(8.5, 6))
    ax = fig.add_subplot()
    types = sorted({str(x) for x in real_labels} | {str(x) for x in generated_labels})
    groups = [  # (points, labels, marker size, alpha, marker, legend suffix)
        (np.asarray(real)[:, :2], _labels(real_labels), 10, 0.5, "o", "real"),
        (np.asarray(generated)[:, :2], _labels(generated_labels), 22, 0.9, "x", "generated"),
    ]
    colors = _type_colours(types, np.vstack([g[0].reshape(-1, 2) for g in groups]),
                           np.concatenate([g[1] for g in groups]))
    for t in types:
        for pts, labs, size, alpha, marker, kind in groups:
            m = labs == t
            if m.any():
                ax.scatter(pts[m, 0], pts[m, 1], s=size, alpha=alpha, color=colors[t],
                           marker=marker, label=f"{t} ({kind})")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def plot_labelled_panels(panels: Sequence[tuple[str, np.ndarray, Sequence[str]]], *,
                         axis_label: str = "PC") -> Figure:
    """Side-by-side 2-d scatters of (title, coordinates, labels), one colour per label in all panels."""
    fig = Figure(figsize=(5.2 * len(panels) + 2.5, 5))
    types = sorted({str(x) for _, _, labels in panels for x in labels})
    colors = _type_colours(types, np.asarray(panels[0][1])[:, :2], _labels(panels[0][2]))
    for i, (title, coords, labels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        coords = np.asarray(coords)
        labs = _labels(labels)
        for t in types:
            m = labs == t
            if m.any():
                ax.scatter(coords[m, 0], coords[m, 1], s=8, alpha=0.7, color=colors[t], label=t)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{axis_label}1")
        ax.set_ylabel(f"{axis_label}2")
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (5.2 * len(panels) + 2.5), 1))
    return fig


def plot_generation(result: GenerationEvaluation, *, split: str, top_k: int):
    """Real ``split`` and generated cells in the PCA of real training cells (None: too few cells)."""
    if result.real_coords.shape[0] < 3 or result.real_coords.shape[1] < 2:
        return None
    return plot_embedding(result.real_coords, result.real_labels, result.generated_coords,
                          result.generated_labels,
                          title=f"Real ({split}) and generated cells: PCA of real training cells, "
                                f"top-{top_k} reconstruction")


MAX_SCATTER_POINTS = 200_000


def _density(x: np.ndarray, y: np.ndarray, path: Path, *, cmap: str, seed: int, **finite: np.ndarray):
    """A hexbin density of (a seeded subsample of) the points, after checking ``finite``."""
    check_finite(f"draw {path.name}", **finite)
    keep = sample_rows(len(x), MAX_SCATTER_POINTS, seed)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    hb = ax.hexbin(x[keep], y[keep], gridsize=70, bins="log", cmap=cmap, mincnt=1)
    fig.colorbar(hb, ax=ax, label="points (log scale)", format="%g")
    return fig, ax


def _save(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, legend: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend, fontsize=8)
    # Fixed margins fit our fixed labels (tight_layout is slow).
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.11, top=0.93)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_log_rank_fit(log_rank: np.ndarray, log_expression: np.ndarray, fit: RankExpressionFit, path: Path, *,
                      seed: int) -> None:
    """Density of log-rank vs log-expression with the fitted line and the fit threshold."""
    fig, ax = _density(log_rank, log_expression, path, cmap="viridis", seed=seed, log_rank=log_rank,
                       log_expression=log_expression)
    xs = np.linspace(0, float(log_rank.max(initial=1.0)), 100)
    ax.plot(xs, fit.predict(xs), color="red", lw=2,
            label=f"fit: {fit.intercept:.3f} {fit.slope:+.3f}·x  (R² = {fit.r_squared:.3f})")
    ax.axvline(fit.threshold, color="grey", ls="--", lw=1, label=f"fit threshold ({fit.threshold:g})")
    _save(fig, ax, path, xlabel="log10(1 + rank)   (rank 0 = most expressed gene)",
          ylabel="log10(1 + normalized expression)", title="Gene rank vs expression", legend="upper right")


def plot_reconstruction(log_expression: np.ndarray, reconstructed: np.ndarray, fit: RankExpressionFit, path: Path,
                        *, seed: int) -> None:
    """True vs reconstructed log-expression, with the y = x line."""
    fig, ax = _density(log_expression, reconstructed, path, cmap="magma", seed=seed,
                       log_expression=log_expression, reconstructed=reconstructed)
    high = float(max(log_expression.max(initial=1.0), reconstructed.max(initial=1.0)))
    ax.plot([0, high], [0, high], color="black", ls="--", lw=1, label="y = x")
    _save(fig, ax, path, xlabel="log10(1 + normalized expression)", ylabel="reconstructed from rank",
          title=f"Reconstruction: Pearson r = {fit.pearson_r:.3f}, Spearman r = {fit.spearman_r:.3f}",
          legend="upper left")
