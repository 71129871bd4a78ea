"""Every notebook executed through papermill with the smoke parameters (the CI smoke batch).

One session-scoped batch run chains teacher -> synthesis -> distillation (every method) ->
ablations -> reports -> figures, so the file contracts between notebooks are exercised; each
test then checks one job's outputs.
"""
from __future__ import annotations

import json
import math

import pytest

from dfkd import batch, paths

pytestmark = pytest.mark.notebooks
ROOT = paths.project_root()
METHODS = ["dfkd_fgvc", "zskd", "zskt", "dafl", "dfad", "adi", "dfq", "mad", "cmi"]


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("smoke") / "runs"
    # two jobs at once (one thread each): a smoke job is mostly kernel start-up and imports, so on 2
    # cores this halves the batch's wall time; tests/test_batch_executors.py checks that local:2
    # gives the results of the sequential loop
    status = batch.run_batch(ROOT / "batches/smoke.yaml", smoke=True, runs_root=runs, executor="local:2")
    return runs, status


def _finite(obj):
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def _summary(runs, stage, name):
    path = runs / stage / name / "summary.json"
    assert path.exists(), f"{path} missing"
    s = json.loads(path.read_text())
    assert _finite(s), s
    assert (runs / stage / name / "executed.ipynb").exists()
    return s


def test_every_job_finished(smoke_runs):
    _, status = smoke_runs
    bad = {k: v for k, v in status.items() if v not in ("done", "skipped")}
    assert not bad, bad


def test_teacher_and_synthesis_outputs(smoke_runs):
    runs, _ = smoke_runs
    t = _summary(runs, "teacher", "smoke_teacher")
    assert 0 <= t["top1_last"] <= 100
    assert (runs / "teacher/smoke_teacher/weights/last.safetensors").exists()
    s = _summary(runs, "synthesis", "smoke_synthesis")
    assert s["steps"] == 2 and (runs / "synthesis/smoke_synthesis/samples/attention.pt").exists()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_the_same_result_format(smoke_runs, method):
    runs, _ = smoke_runs
    s = _summary(runs, "distill", f"smoke_method_{method}")
    ref = _summary(runs, "distill", "smoke_method_dfkd_fgvc")
    assert s.keys() == ref.keys()
    assert s["method"] == method and s["budget"]["s_steps"] >= 1
    assert (runs / f"distill/smoke_method_{method}/weights/student.safetensors").exists()


def test_method_options_reach_the_method_through_papermill(smoke_runs):
    """A dict parameter survives papermill's injection and params.yaml (what a resume compares)."""
    import yaml
    runs, _ = smoke_runs
    s = _summary(runs, "distill", "smoke_options_cmi")
    params = yaml.safe_load((runs / "distill/smoke_options_cmi/params.yaml").read_text())
    assert s["method"] == params["method"] == "cmi"
    assert params["method_options"] == {"bank_size": 64, "pool_size": 32, "tau": 0.2}
    import torch
    state = torch.load(runs / "distill/smoke_options_cmi/state/last.pt", weights_only=True)
    assert state["method"]["modules"]["cmi_bank"].shape[0] == 64   # the option, not the default 4096


def test_notebook_rejects_a_method_options_typo_before_running(tmp_path):
    """Notebook 30 run directly by papermill (no batch runner to check first): its config cell
    fails on the typo, naming the key, the method and its options, before any run folder exists."""
    import jupytext
    import nbformat
    import papermill
    src = tmp_path / "30.ipynb"
    nbformat.write(jupytext.read(ROOT / "notebooks/30_distillation.py"), src)
    runs = tmp_path / "runs"
    env = {"DFKD_RUNS": str(runs), "TQDM_DISABLE": "1"}
    with batch._environ(env), batch._quiet_papermill():
        with pytest.raises(papermill.PapermillExecutionError) as e:
            papermill.execute_notebook(str(src), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                       parameters={"method": "cmi", "method_options": {"tua": 0.2},
                                                   "teacher_run": "", "run_name": "typo"},
                                       cwd=str(ROOT), progress_bar=False, execution_timeout=120,
                                       config=batch.kernel_config(tmp_path))
    assert e.value.ename == "ConfigError", e.value.ename
    assert "'tua'" in e.value.evalue and "'cmi'" in e.value.evalue and "bank_size" in e.value.evalue
    assert not (runs / "distill" / "typo").exists()


def test_reports_and_figures(smoke_runs):
    runs, _ = smoke_runs
    for name in ("smoke_overview", "smoke_ablations", "smoke_grids", "smoke_tsne", "smoke_gradcam"):
        _summary(runs, "viz", name)
    assert (runs / "viz/smoke_ablations/table5_order.md").exists()
    assert (runs / "viz/smoke_grids/synthetic_grids.png").exists()
    assert (runs / "viz/smoke_tsne/tsne.png").exists()
    assert (runs / "viz/smoke_gradcam/gradcam_smoke_method_dfkd_fgvc.png").exists()
    f = _summary(runs, "figures", "smoke_figures")
    figs = runs / "smoke_figures"
    for name in ("teacher_curves.png", "teacher_curves.pdf", "table1_methods.md", "distill_curves.png",
                 "fig4_synthetic_grids.png", "fig5_tsne.png", "fig6_gradcam.png", "table5_order.md"):
        assert (figs / name).exists(), name
    table = (figs / "table1_methods.md").read_text()
    for m in METHODS:
        assert m in table
    assert f["n_files"] >= 8
    # the notebook shows what it wrote: every PNG as an image, every table as markdown
    import nbformat
    nb = nbformat.read(runs / "figures" / "smoke_figures" / "executed.ipynb", as_version=4)
    data = [o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    pngs = [p for p in f["files"] if p.endswith(".png")]
    assert sum("image/png" in d for d in data) == len(pngs) > 0
    tables = [d["text/markdown"] for d in data if "|---" in d.get("text/markdown", "")]
    assert len(tables) == len([p for p in f["files"] if p.endswith(".md")])
    assert (figs / "table1_methods.md").read_text() in tables
