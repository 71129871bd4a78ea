"""Where things live: project root, data root, runs and figures folders.

Every path a notebook or the library uses comes from here, so results do not depend on the
current working directory (JupyterLab, papermill and pytest all start kernels elsewhere).
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout's root: the first parent of this file (or of the cwd) holding pyproject.toml.

    Falls back to the current directory for an installed (non-editable) package.
    """
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for p in (start, *start.parents):
            if (p / "pyproject.toml").is_file() and (p / "lib" / "dfkd").is_dir():
                return p
    return Path.cwd().resolve()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Folder that holds the datasets (``CUB_200_2011/``, ``stanford_cars/``, ...).

    Order: the ``root`` argument, else ``$DFKD_DATA``, else ``<project>/data``.
    """
    if root not in (None, ""):
        return Path(root).expanduser()
    env = os.environ.get("DFKD_DATA")
    if env:
        return Path(env).expanduser()
    return project_root() / "data"


def runs_dir(runs_root: str | os.PathLike | None = None) -> Path:
    """Root of the run folders: argument, else ``$DFKD_RUNS``, else ``<project>/runs``."""
    if runs_root not in (None, ""):
        return Path(runs_root).expanduser()
    env = os.environ.get("DFKD_RUNS")
    return Path(env).expanduser() if env else project_root() / "runs"


def figures_dir(figures_root: str | os.PathLike | None = None) -> Path:
    """Where report figures go: argument, else ``$DFKD_FIGURES``, else ``<project>/figures``.

    A relative ``figures_root`` lies inside the runs root (``runs/<figures_root>``), so demo and
    smoke batches never touch the committed ``figures/``.
    """
    if figures_root not in (None, ""):
        p = Path(figures_root).expanduser()
        return p if p.is_absolute() else runs_dir() / p
    env = os.environ.get("DFKD_FIGURES")
    return Path(env).expanduser() if env else project_root() / "figures"
