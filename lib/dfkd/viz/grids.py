"""Image grids: synthetic samples (``image_grid``), "real vs each method" (``compare_grid``,
Fig. 4) and attention maps over images (``attention_grid``).

Inputs are torch tensors or numpy arrays shaped (B, 3, H, W) (or (B, 1, H, W)), either in [0, 1]
or normalised with ``mean``/``std`` (``denormalize=True``; the default statistics are ImageNet's,
the normalisation of every dataset and of ``dfkd.generator.to_teacher_input``). Every function
returns a new :class:`~dfkd.viz.style.PaperFigure`; nothing is drawn on pyplot's global state.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from dfkd.viz.style import new_figure, style_context

# same values as dfkd.data.IMAGENET_MEAN / IMAGENET_STD (tested); repeated so that plotting does
# not import the data stack
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor (any device, with or without grad) or array -> float32 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def to_numpy_images(images: Any, *, denormalize: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) -> (B, H, W, 3) float32 in [0, 1] (clipped)."""
    x = to_numpy(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    if denormalize:
        x = x * np.asarray(std, np.float32)[None, :, None, None] + np.asarray(mean, np.float32)[None, :, None, None]
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return np.clip(x.transpose(0, 2, 3, 1), 0.0, 1.0)


def _label_text(labels, class_names, i: int) -> str | None:
    if labels is None:
        return None
    lab = labels[i]
    lab = lab.item() if hasattr(lab, "item") else lab
    if class_names is not None and isinstance(lab, (int, np.integer)):
        return str(class_names[int(lab)])
    return str(lab)


LABEL_PT = 6  # font size of per-image labels


def wrap_label(text: str, max_chars: int, max_lines: int = 4) -> str:
    """``text`` broken at ``_``/spaces into lines of at most ``max_chars`` (long words cut), at most
    ``max_lines`` lines (the last one ends in an ellipsis when text was dropped)."""
    words = [w for w in text.replace("_", " ").split() if w] or [""]
    lines: list[str] = []
    for word in words:
        while len(word) > max_chars:
            lines.append(word[:max_chars])
            word = word[max_chars:]
        if lines and len(lines[-1]) + 1 + len(word) <= max_chars:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(max_chars - 1, 1)].rstrip() + "\u2026"
    return "\n".join(lines)


def _blank(ax) -> None:
    # ticks off but the axis kept, so a y-label (row name) can still be drawn
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _grid_axes(fig, nrows: int, ncols: int, *, hspace: float, left: float = 0.01, title: bool = False,
               label_h: float = 0.0):
    # label_h: inches above each image for its label (kept below the title)
    top = 1.0 - ((0.35 if title else 0.0) + label_h) / fig.get_figheight() - (0.0 if title else 0.005)
    return fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=dict(
        wspace=0.04, hspace=hspace, left=left, right=0.995, bottom=0.005, top=top))


def image_grid(images: Any, labels: Sequence | Any | None = None, *, nrow: int = 8,
               title: str | None = None, class_names: Sequence[str] | None = None,
               denormalize: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, cell: float = 1.0):
    """A grid of images, ``nrow`` per row (torchvision's ``make_grid`` convention).

    Args:
        images: (B, 3, H, W) in [0, 1], or normalised with ``mean``/``std`` if ``denormalize``.
        labels: optional per-image labels (ints, mapped through ``class_names``, or strings).
        cell: inches per image.
    """
    imgs = to_numpy_images(images, denormalize=denormalize, mean=mean, std=std)
    n = len(imgs)
    ncols = max(1, min(nrow, n))
    nrows = max(1, math.ceil(n / ncols))
    # labels wrapped to the cell width (about 0.55 em per character), so neighbours never overlap
    max_chars = max(4, int(cell * 72 / (LABEL_PT * 0.55)))
    texts = [None if labels is None else wrap_label(str(_label_text(labels, class_names, i)), max_chars)
             for i in range(n)]
    n_lines = max((t.count("\n") + 1 for t in texts if t is not None), default=0)
    label_h = (0.04 + n_lines * LABEL_PT * 1.2 / 72) if labels is not None else 0.0
    with style_context():
        fig = new_figure((ncols * cell, nrows * (cell + label_h) + (0.35 if title else 0.0)))
        axes = _grid_axes(fig, nrows, ncols, hspace=(label_h + 0.04) / cell if labels is not None else 0.04,
                          title=bool(title), label_h=label_h)
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i < n:
                ax.imshow(imgs[i], interpolation="nearest")
                if texts[i] is not None:
                    ax.set_title(texts[i], fontsize=LABEL_PT, pad=1.5, linespacing=1.0)
        if title:
            fig.suptitle(title)
    return fig


def compare_grid(rows: Mapping[str, Any], *, ncol: int = 8, title: str | None = None,
                 denormalize: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, cell: float = 1.0):
    """One row per source ("real", then each method), ``ncol`` images each (Fig. 4).

    Args:
        rows: ``{row name: images (B, 3, H, W)}``; rows may differ in B and resolution.
    """
    data = {k: to_numpy_images(v, denormalize=denormalize, mean=mean, std=std) for k, v in rows.items()}
    if not data:
        raise ValueError("compare_grid needs at least one row")
    ncols = max(1, min(ncol, max(len(v) for v in data.values())))
    with style_context():
        label_w = 0.2 + 0.075 * max(len(k) for k in data)   # inches for the row names
        fig = new_figure((ncols * cell + label_w, len(data) * cell + (0.35 if title else 0.0)))
        axes = _grid_axes(fig, len(data), ncols, hspace=0.04, left=label_w / fig.get_figwidth(),
                          title=bool(title))
        for r, (name, imgs) in enumerate(data.items()):
            for c, ax in enumerate(axes[r]):
                _blank(ax)
                if c < len(imgs):
                    ax.imshow(imgs[c], interpolation="nearest")
            axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", labelpad=4)
        if title:
            fig.suptitle(title)
    return fig


def normalize_maps(maps: Any) -> np.ndarray:
    """(B, H, W) or (B, 1, H, W) -> (B, H, W) float32, each map min-max scaled to [0, 1]."""
    m = to_numpy(maps)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got {tuple(m.shape)}")
    lo = m.reshape(len(m), -1).min(1)[:, None, None]
    hi = m.reshape(len(m), -1).max(1)[:, None, None]
    return (m - lo) / np.maximum(hi - lo, 1e-12)


def attention_grid(maps: Any, images: Any | None = None, *, nrow: int = 8, alpha: float = 0.5,
                   cmap: str = "jet", title: str | None = None, denormalize: bool = False,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   cell: float = 1.0):
    """Attention maps (B, H, W), each scaled to [0, 1], alone or over ``images`` (B, 3, H', W').

    Maps of a lower resolution than the images are stretched over them (bilinear).
    """
    m = normalize_maps(maps)
    imgs = None if images is None else to_numpy_images(images, denormalize=denormalize, mean=mean, std=std)
    if imgs is not None and len(imgs) != len(m):
        raise ValueError(f"{len(m)} maps but {len(imgs)} images")
    n = len(m)
    ncols = max(1, min(nrow, n))
    nrows = math.ceil(n / ncols)
    with style_context():
        fig = new_figure((ncols * cell, nrows * cell + (0.35 if title else 0.0)))
        axes = _grid_axes(fig, nrows, ncols, hspace=0.04, title=bool(title))
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i >= n:
                continue
            if imgs is None:
                ax.imshow(m[i], cmap=cmap, vmin=0, vmax=1, interpolation="bilinear")
            else:
                h, w = imgs[i].shape[:2]
                ax.imshow(imgs[i], interpolation="nearest")
                ax.imshow(m[i], cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation="bilinear",
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        if title:
            fig.suptitle(title)
    return fig
