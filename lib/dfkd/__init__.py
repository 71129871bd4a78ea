"""dfkd: data-free knowledge distillation for fine-grained visual categorization.

Reference implementation of Shao et al., "Data-free Knowledge Distillation for Fine-grained
Visual Categorization" (ICCV 2023), plus the baselines it compares with, as a small library that
backs the notebooks in ``notebooks/``.

Submodules are imported lazily so that ``import dfkd`` stays cheap (papermill kernels, CLI).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "paths", "config", "seed", "data", "models", "generator", "attention", "losses",
    "methods", "options", "train", "tracking", "batch", "bench", "dist", "viz",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"dfkd.{name}")
    raise AttributeError(f"module 'dfkd' has no attribute {name!r}")


__all__ = ["__version__", *_SUBMODULES]
