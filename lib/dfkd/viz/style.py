"""Paper style and reproducible figure files.

``PAPER_RC`` fixes fonts, sizes and DPI; :func:`style_context` applies it to one figure without
touching global state (every plot function in ``dfkd.viz`` builds its figure inside it), and
:func:`apply_style` is the explicit opt-in for a notebook's own pyplot figures.

:func:`save_figure` writes ``figures/<name>.png`` and ``.pdf`` with a fixed DPI and no
timestamps or version strings in the metadata, so regenerating an unchanged figure gives
byte-identical files (and no git diff); files whose bytes did not change are not rewritten.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib
from matplotlib.figure import Figure

from dfkd import paths

SAVE_DPI = 300
PAPER_RC: dict = {
    "figure.dpi": 100,                 # on screen; files use SAVE_DPI
    "savefig.dpi": SAVE_DPI,
    "font.family": "DejaVu Sans",      # ships with matplotlib: same glyphs on every machine
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 10,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,                # TrueType in PDFs: editable text, accepted by venues
    "ps.fonttype": 42,
    "svg.hashsalt": "dfkd",            # deterministic SVG ids
    "image.cmap": "viridis",
}
# metadata=None entries drop matplotlib's defaults (creation date, version strings)
_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": "dfkd", "Producer": "dfkd", "CreationDate": None, "ModDate": None},
    "svg": {"Date": None, "Creator": "dfkd"},
}


class PaperFigure(Figure):
    """A plain matplotlib Figure (no pyplot registration) that Jupyter displays as a PNG.

    Figures made without pyplot have no image repr in IPython (only ``<Figure ...>`` text) until
    pyplot activates the inline backend; ``_repr_png_`` makes ``fig`` as a cell's last expression
    (or ``display(fig)``) show the image in JupyterLab and in ``executed.ipynb``.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=self.dpi)
        return buf.getvalue()


def apply_style() -> None:
    """Set ``PAPER_RC`` globally (for a notebook's own pyplot figures)."""
    matplotlib.rcParams.update(PAPER_RC)


@contextlib.contextmanager
def style_context() -> Iterator[None]:
    """``PAPER_RC`` for the figures created inside the block; global rcParams are restored."""
    with matplotlib.rc_context(PAPER_RC):
        yield


def new_figure(figsize: tuple[float, float], **kwargs) -> PaperFigure:
    """A :class:`PaperFigure` (call inside :func:`style_context` so artists pick up the style)."""
    return PaperFigure(figsize=figsize, **kwargs)


def figure_bytes(fig: Figure, fmt: str, *, dpi: int = SAVE_DPI) -> bytes:
    """The file content ``save_figure`` would write for one format."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": PAPER_RC["svg.hashsalt"]}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=_METADATA.get(fmt))
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # same bytes: keep the mtime, so make/git see no change
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Figure, name: str, figures_root: str | os.PathLike | None = None,
                formats: Sequence[str] = ("png", "pdf"), *, dpi: int = SAVE_DPI,
                size: tuple[float, float] | None = None) -> list[Path]:
    """Write ``<figures_dir>/<name>.<fmt>`` for each format; return the paths.

    Args:
        fig: the figure (any matplotlib Figure).
        name: file stem, may contain sub-folders (``"fig4/cub"``); a known suffix is dropped.
        figures_root: argument > ``$DFKD_FIGURES`` > ``<project>/figures`` (``dfkd.paths``).
        formats: any of ``png``, ``pdf``, ``svg``.
        dpi: raster resolution (PNG, and images embedded in PDF).
        size: ``(width, height)`` in inches to set before saving; default keeps the figure's size.
    """
    stem = Path(name)
    if stem.suffix.lstrip(".") in _METADATA:
        stem = stem.with_suffix("")
    if stem.is_absolute() or ".." in stem.parts:
        raise ValueError(f"figure name {name!r} must be relative to the figures folder")
    if size is not None:
        fig.set_size_inches(*size)
    root = paths.figures_dir(figures_root)
    out = []
    for fmt in formats:
        if fmt not in _METADATA:
            raise ValueError(f"unsupported figure format {fmt!r}; use one of {sorted(_METADATA)}")
        path = root / stem.parent / f"{stem.name}.{fmt}"
        _write_if_changed(path, figure_bytes(fig, fmt, dpi=dpi))
        out.append(path)
    return out
