"""``make lab``'s contents manager: text notebooks open with their kernel's ``language_info``.

JupyterLab writes the kernel's ``language_info`` into a notebook when its kernel starts; a
py:percent notebook has none, so without this every notebook showed as modified on open. The
served ``language_info`` must equal what a real ``python3`` kernel reports (else JupyterLab's write
is a change again), and saving must give back the committed source byte for byte.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from dfkd import batch, lab, lab_contents, paths

ROOT = paths.project_root()
NOTEBOOK = "notebooks/00_overview.py"

pytestmark = pytest.mark.timeout(120)


def test_make_lab_config_selects_the_contents_manager():
    cfg = json.loads((ROOT / lab.CONFIG_DIR / "jupyter_server_config.json").read_text())
    assert cfg["ServerApp"]["contents_manager_class"] == "dfkd.lab_contents.LabContentsManager"
    assert hasattr(lab_contents.LabContentsManager, "formats")   # jupytext's extension keeps it as is


def test_served_language_info_is_what_the_kernel_reports(tmp_path):
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="python3", config=batch.kernel_config(tmp_path))  # no port race
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.kernel_info(reply=True, timeout=60)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["language_info"] == lab_contents.kernel_language_info()


def test_text_notebook_gains_language_info_and_saves_back_unchanged(tmp_path):
    scratch = ROOT / "tests" / f"_lab_contents_{tmp_path.name}"   # under the root, for the manager
    scratch.mkdir()
    try:
        shutil.copy(ROOT / NOTEBOOK, scratch / "nb.py")
        shutil.copy(ROOT / "jupytext.toml", scratch / "jupytext.toml")   # the project's save filters
        cm = lab_contents.LabContentsManager(root_dir=str(ROOT))
        rel = (scratch / "nb.py").relative_to(ROOT).as_posix()
        model = asyncio.run(cm.get(rel, content=True, type="notebook"))
        assert model["content"]["metadata"]["language_info"] == lab_contents.kernel_language_info()
        asyncio.run(cm.save({"type": "notebook", "format": "json", "content": model["content"]}, rel))
        assert (scratch / "nb.py").read_text() == (ROOT / NOTEBOOK).read_text(), "saving changed the source"
        ipynb = {"type": "notebook", "content": {"metadata": {"kernelspec": {"name": "python3"}}}}
        assert "language_info" in lab_contents.add_language_info(ipynb)["content"]["metadata"]
        other = {"type": "notebook", "content": {"metadata": {"kernelspec": {"name": "ir"}}}}
        assert "language_info" not in lab_contents.add_language_info(other)["content"]["metadata"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
