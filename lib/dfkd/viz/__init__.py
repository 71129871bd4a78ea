"""Figures for the paper and the notebooks: pure functions that return matplotlib Figures.

- ``style``: paper rcParams and ``save_figure`` (PNG + PDF, byte-identical on regeneration).
- ``grids``: image grids (synthetic samples, "real vs each method", attention overlays).
- ``embed``: t-SNE embeddings and scatter panels.
- ``cams``: Grad-CAM through pytorch-grad-cam, context-managed (hooks released, modes restored).
- ``widgets``: ipywidgets browsers (imported lazily; never needed for a static figure).

Submodules load on first attribute access, so ``import dfkd.viz`` pulls in neither matplotlib,
pytorch-grad-cam (OpenCV) nor ipywidgets. No function here touches pyplot's global figure list.
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("style", "grids", "embed", "cams", "widgets")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"dfkd.viz.{name}")
    raise AttributeError(f"module 'dfkd.viz' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
