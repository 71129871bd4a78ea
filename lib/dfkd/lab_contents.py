"""The contents manager of ``make lab``: jupytext's, plus the kernel's ``language_info`` on load.

Why: a py:percent notebook carries no ``language_info`` (``jupytext.toml`` keeps only the
kernelspec and the format in the header: the Python version inside ``language_info`` would churn
between machines). When its kernel starts, JupyterLab writes the kernel's ``language_info`` into
the notebook's metadata, and that change marks the notebook modified the moment it opens.
Serving text notebooks with the ``language_info`` their kernel will report (``python3`` runs with
this interpreter: ``jupyter_config/`` is only used by ``make lab`` from the project's venv) makes
that write a no-op, so a notebook opens unmodified; saving drops the key again (the metadata
filter of ``jupytext.toml``), so the sources never change. ``jupyter_config/
jupyter_server_config.json`` selects this class (``ServerApp.contents_manager_class``).
"""
from __future__ import annotations

from jupytext.async_contentsmanager import AsyncTextFileContentsManager


def kernel_language_info() -> dict:
    """What the ``python3`` kernel (ipykernel, this interpreter) reports as ``language_info``."""
    from ipykernel.ipkernel import IPythonKernel
    return dict(IPythonKernel.language_info)


def add_language_info(model: dict) -> dict:
    """``model`` (a contents-API notebook model) with the kernel's ``language_info`` when its kernel
    is ``python3`` and it has none (a text notebook); other notebooks unchanged."""
    nb = model.get("content") if model.get("type") == "notebook" else None
    if nb is not None and not isinstance(nb, str):
        meta = nb["metadata"]
        if meta.get("kernelspec", {}).get("name") == "python3" and "language_info" not in meta:
            meta["language_info"] = kernel_language_info()
    return model


class LabContentsManager(AsyncTextFileContentsManager):
    """jupytext's contents manager; text notebooks come with their kernel's ``language_info``."""

    async def get(self, path, content=True, type=None, format=None, **kwargs):
        model = await super().get(path, content=content, type=type, format=format, **kwargs)
        return add_language_info(model) if content and not str(path).endswith(".ipynb") else model
