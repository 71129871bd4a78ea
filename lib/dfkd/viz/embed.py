"""t-SNE embeddings of features and their scatter plots (Fig. 5: one panel per method).

``tsne_embed`` is deterministic for a given ``seed`` and works on tiny inputs: scikit-learn
refuses ``perplexity >= n_samples`` (``TSNE._check_params_vs_input``), so the perplexity is
clamped to ``(N - 1) / 3`` (below N/3, the usual "about a third of the points" upper bound at
which each point's neighbourhood still excludes most of the set). The smoke settings use 24
points, where a requested perplexity of 30 becomes 7.67.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from dfkd.viz.grids import to_numpy, wrap_label
from dfkd.viz.style import new_figure, style_context


EXACT_BELOW = 200
LEGEND_CHARS = 22  # legend labels are wrapped to lines of at most this many characters


def effective_perplexity(perplexity: float, n: int) -> float:
    """``perplexity`` clamped below ``n / 3`` (and to at least 1) so that t-SNE accepts it."""
    return float(max(1.0, min(perplexity, (n - 1) / 3.0)))


def tsne_embed(features: Any, *, seed: int = 0, perplexity: float = 30.0, pca_dim: int = 50,
               max_iter: int = 1000) -> np.ndarray:
    """Embed (N, D) features (tensor or array, any D; flattened if more dims) into (N, 2) float32.

    Features wider than ``pca_dim`` are first reduced with PCA (the standard t-SNE recipe: faster,
    less noise). ``max_iter`` (>= 250) is scikit-learn's optimisation budget. Raises
    ``ValueError`` for fewer than 3 points.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = to_numpy(features)
    x = x.reshape(len(x), -1)
    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    if x.shape[1] > pca_dim and n > pca_dim:
        x = PCA(n_components=pca_dim, random_state=seed).fit_transform(x)
    # exact t-SNE below EXACT_BELOW points: O(N^2) but single-threaded and instant for smoke sizes,
    # where Barnes-Hut's OpenMP threads cost seconds on a busy 2-core machine
    tsne = TSNE(n_components=2, perplexity=effective_perplexity(perplexity, n), init="pca",
                learning_rate="auto", random_state=seed, max_iter=max_iter,
                method="exact" if n < EXACT_BELOW else "barnes_hut")
    return tsne.fit_transform(x).astype(np.float32)


def _colors(k: int) -> list:
    import matplotlib
    name = "tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"
    cmap = matplotlib.colormaps[name]
    return [cmap(i) if k <= 20 else cmap(i / max(k - 1, 1)) for i in range(k)]


def scatter_embedding(xy: Any, labels: Any, class_names: Sequence[str] | None = None,
                      title: str | None = None, ax=None, *, s: float = 6.0, legend: bool | None = None,
                      num_classes: int | None = None):
    """Scatter (N, 2) points coloured by integer ``labels`` (N,); returns the Figure.

    Draws into ``ax`` when given (its figure is returned), else into a new figure. The legend
    is shown for at most 20 classes unless ``legend`` says otherwise. ``num_classes`` fixes the
    colour map when several panels must share colours.
    """
    xy = to_numpy(xy)
    labels = to_numpy(labels).astype(int).reshape(-1)
    if len(xy) != len(labels):
        raise ValueError(f"{len(xy)} points but {len(labels)} labels")
    classes = np.unique(labels)
    k = max(num_classes or 0, int(classes.max()) + 1 if len(classes) else 0)
    colors = _colors(k)
    with style_context():
        if ax is None:
            fig = new_figure((3.2, 3.0), layout="constrained")
            ax = fig.add_subplot()
        for c in classes:
            sel = labels == c
            name = wrap_label(str(class_names[c]), LEGEND_CHARS, max_lines=3) if class_names is not None else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=colors[c], label=name, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title)
        if legend if legend is not None else len(classes) <= 20:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, frameon=False,
                      handletextpad=0.2, borderaxespad=0.2)
    return ax.figure


def tsne_panels(data: Mapping[str, tuple[Any, Any]], *, seed: int = 0, perplexity: float = 30.0,
                class_names: Sequence[str] | None = None, ncols: int | None = None,
                title: str | None = None, panel: float = 2.2, max_iter: int = 1000):
    """One t-SNE panel per method: ``{method: (features (N, D), labels (N,))}`` (Fig. 5).

    Each method is embedded separately (t-SNE coordinates are not comparable across runs); the
    class colours are shared, and one legend is drawn beside the last panel.
    """
    if not data:
        raise ValueError("tsne_panels needs at least one method")
    ncols = ncols or min(len(data), 4)
    nrows = math.ceil(len(data) / ncols)
    with style_context():
        k = max(int(to_numpy(labels).max()) + 1 for _, labels in data.values())
        # room for the legend beside the last panel: its longest (wrapped) line at 7 pt
        longest = max((len(line) for c in (class_names or [])[:k]
                       for line in wrap_label(str(c), LEGEND_CHARS, max_lines=3).split("\n")), default=3)
        legend_w = 0.35 + 0.055 * longest if k <= 20 else 0.0
        fig = new_figure((ncols * panel + max(0.8, legend_w), nrows * panel + (0.3 if title else 0.0)),
                         layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, (name, (feats, labels)) in enumerate(data.items()):
            xy = tsne_embed(feats, seed=seed, perplexity=perplexity, max_iter=max_iter)
            scatter_embedding(xy, labels, class_names, title=name, ax=axes.flat[i], num_classes=k,
                              legend=i == len(data) - 1 and k <= 20)
        for ax in axes.flat[len(data):]:
            ax.set_axis_off()
        if title:
            fig.suptitle(title)
    return fig
