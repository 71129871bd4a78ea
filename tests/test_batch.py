"""dfkd.batch: manifest parsing, parameter layering and validation (fast, no kernels), and a
small end-to-end batch through papermill (6 notebook executions in total, marked `notebooks`).

Every test builds its own tiny project in tmp_path (params/, notebooks/, a manifest) and passes
``root=`` so nothing in the checkout is read or written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfkd import batch

# A compute-notebook stand-in: counts its executions, fails on demand, writes summary.json
# where dfkd.tracking.start_run would put it ($DFKD_RUNS/<stage>/<run_name>/).
OK_NB = '''\
# %% [markdown]
# # test notebook

# %% tags=["parameters"]
run_name: str = "dev"       # folder under runs/<stage>/
stage: str = "teacher"      # which stage folder to write to
seed: int = 0
lr: float = 0.1             # a float; "#" inside strings must not confuse the parser
tag: str = "a # not a comment"
flag: bool = False
fail_if: str = ""           # raise while this file exists
plot: bool = False

# %%
import json, os, pathlib
runs = pathlib.Path(os.environ["DFKD_RUNS"])
with open(runs.parent / "executions.log", "a") as f:
    f.write(f"{stage}/{run_name}\\n")
if fail_if and pathlib.Path(fail_if).exists():
    raise RuntimeError("planned failure")

# %%
if plot:
    import matplotlib.pyplot as plt
    plt.plot([0, 1], [1, 0])
    plt.show()

# %%
out = runs / stage / run_name
out.mkdir(parents=True, exist_ok=True)
env = {k: os.environ.get(k) for k in ("DFKD_RUNS", "TQDM_DISABLE", "MPLBACKEND", "DFKD_FIGURES")}
from ipykernel.connect import get_connection_info
(out / "summary.json").write_text(json.dumps({
    "kernel": {k: get_connection_info(unpack=True)[k] for k in ("transport", "ip")},
    "params": {"seed": seed, "lr": lr, "tag": tag, "flag": flag},
    "types": {"lr": type(lr).__name__, "seed": type(seed).__name__},
    "env": env, "cwd": os.getcwd()}))
'''

OTHER_NB = '''\
# %% tags=["parameters"]
run_name: str = "dev"
only_in_other: int = 0

# %%
print(run_name, only_in_other)
'''


# no run_name: a "plain" notebook whose completion the runner records
PLAIN_NB = '''\
# %% tags=["parameters"]
note: str = ""

# %%
import os, pathlib
with open(pathlib.Path(os.environ["DFKD_RUNS"]).parent / "executions.log", "a") as f:
    f.write(f"plain{note}\\n")
'''


def _project(tmp_path: Path, manifest: str, *, base: str | None = "{}", smoke: str | None = None,
             files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "proj"
    (root / "notebooks").mkdir(parents=True)
    (root / "params").mkdir()
    (root / "batches").mkdir()
    (root / "notebooks" / "ok.py").write_text(OK_NB)
    (root / "notebooks" / "other.py").write_text(OTHER_NB)
    (root / "notebooks" / "plain.py").write_text(PLAIN_NB)
    if base is not None:
        (root / "params" / "base.yaml").write_text(base)
    if smoke is not None:
        (root / "params" / "smoke.yaml").write_text(smoke)
    for name, text in {"params/job.yaml": "", **(files or {})}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "batches" / "b.yaml").write_text(textwrap.dedent(manifest))
    return root


LAYERED = """\
jobs:
  - name: a
    notebook: notebooks/ok.py
    stage: teacher
    run: "{tag}_s{seed}"
    params: [params/job.yaml]
    set: {lr: 1, seed: 3}
    grid: {tag: [g1, g2]}
  - name: b
    notebook: notebooks/other.py
    stage: viz
    run: other
    needs: [a]
"""


def test_notebook_parameters_parses_annotated_literals(tmp_path):
    root = _project(tmp_path, LAYERED)
    params = batch.notebook_parameters(root / "notebooks" / "ok.py")
    assert params["seed"] == ("int", 0)
    assert params["lr"] == ("float", 0.1)
    assert params["tag"] == ("str", "a # not a comment")
    assert params["flag"] == ("bool", False)
    with pytest.raises(batch.BatchError, match="literal"):
        batch.parse_parameters("x: int = 1 + y\n")


def test_layering_order_grid_and_needs(tmp_path):
    root = _project(
        tmp_path, LAYERED,
        base="seed: 1\nflag: true\nonly_in_other: 3\n",          # shared: filtered per notebook
        smoke="lr: 0.5\nonly_in_other: 7\n",
        files={"params/job.yaml": "seed: 2\ntag: file\nlr: 1e-3\n"})
    jobs = batch.resolve_jobs(root / "batches" / "b.yaml", sets=["seed=5"], root=root)
    assert [j.name for j in jobs] == ["a[tag=g1]", "a[tag=g2]", "b"]  # b waits for both expansions
    a1 = jobs[0]
    # defaults < base < job file < set < grid < (smoke) < --set
    assert a1.values["flag"] is True and a1.sources["flag"] == "params/base.yaml"
    assert a1.values["tag"] == "g1" and a1.sources["tag"] == "grid"
    assert a1.values["seed"] == 5 and a1.sources["seed"] == "--set"
    assert a1.values["lr"] == 1.0 and isinstance(a1.values["lr"], float)  # int accepted as float
    assert a1.values["fail_if"] == "" and "fail_if" not in a1.params     # defaults not injected
    assert a1.run_name == "g1_s5" and a1.params["run_name"] == "g1_s5"
    assert "only_in_other" not in a1.values
    b = jobs[2]
    assert b.values["only_in_other"] == 3 and b.needs == ["a[tag=g1]", "a[tag=g2]"]
    assert b.need_runs == [("teacher", "g1_s5"), ("teacher", "g2_s5")]

    smoke = batch.resolve_jobs(root / "batches" / "b.yaml", smoke=True, root=root)
    assert smoke[0].values["lr"] == 0.5 and smoke[0].sources["lr"] == "params/smoke.yaml"
    assert smoke[0].values["seed"] == 3 and smoke[2].values["only_in_other"] == 7
    assert smoke[0].timeout == batch.SMOKE_CELL_TIMEOUT
    smoke_set = batch.resolve_jobs(root / "batches" / "b.yaml", smoke=True, sets=["lr=2"], root=root)
    assert smoke_set[0].values["lr"] == 2.0 and smoke_set[0].sources["lr"] == "--set"  # --set wins

    only = batch.resolve_jobs(root / "batches" / "b.yaml", only="a", root=root)
    assert [j.name for j in only] == ["a[tag=g1]", "a[tag=g2]"]


def test_templated_needs_pick_one_expansion(tmp_path):
    manifest = LAYERED + """\
  - name: c
    notebook: notebooks/ok.py
    stage: distill
    run: c
    set: {tag: g2, seed: 3}
    needs: ["teacher/{tag}_s{seed}", "teacher/made_elsewhere"]
"""
    root = _project(tmp_path, manifest)
    jobs = {j.name: j for j in batch.resolve_jobs(root / "batches" / "b.yaml", root=root)}
    assert jobs["c"].needs == ["a[tag=g2]"]
    assert jobs["c"].need_runs == [("teacher", "g2_s3"), ("teacher", "made_elsewhere")]


def test_set_values_parse_as_yaml_scalars():
    assert batch.parse_sets(["epochs=3", "lr=0.1", "flag=true", "name=foo", "wd=5e-4"]) == {
        "epochs": 3, "lr": 0.1, "flag": True, "name": "foo", "wd": 5e-4}
    with pytest.raises(batch.BatchError):
        batch.parse_sets(["novalue"])


@pytest.mark.parametrize("sets, match", [
    (["no_such_param=1"], "no_such_param"),
    (["seed=abc"], r"'seed' is int, got str"),
    (["flag=1"], r"'flag' is bool, got int"),
    (["seed=true"], r"'seed' is int, got bool"),
])
def test_bad_overrides_fail_before_anything_runs(tmp_path, sets, match):
    root = _project(tmp_path, LAYERED, smoke="lr: 0.5\n")
    with pytest.raises(batch.BatchError, match=match):
        batch.resolve_jobs(root / "batches" / "b.yaml", smoke=True, sets=sets, root=root)


@pytest.mark.parametrize("manifest, files, match", [
    (LAYERED, {"params/job.yaml": "sed: 2\n"}, "unknown parameter 'sed'"),
    (LAYERED.replace("grid: {tag: [g1, g2]}", "grid: {flag: [true, false]}"),
     {"params/job.yaml": "tag: t\n"}, "both write runs/teacher/t_s3"),
    (LAYERED.replace("grid: {tag: [g1, g2]}", ""), {}, "not a plain folder name"),
    (LAYERED.replace("needs: [a]", "needs: [nope]"), {"params/job.yaml": ""}, "needs 'nope'"),
    (LAYERED.replace("run: other", "run: '{nope}'"), {"params/job.yaml": ""}, "nope"),
    (LAYERED.replace("stage: viz", "stage: vis"), {"params/job.yaml": ""}, "stage 'vis'"),
    (LAYERED.replace("needs: [a]", "need: [a]"), {"params/job.yaml": ""}, "unknown key"),
])
def test_manifest_errors_name_the_problem(tmp_path, manifest, files, match):
    root = _project(tmp_path, manifest, files=files)
    with pytest.raises(batch.BatchError, match=match):
        batch.resolve_jobs(root / "batches" / "b.yaml", root=root)


def test_shared_file_typo_fails(tmp_path):
    root = _project(tmp_path, LAYERED, base="sede: 1\n", files={"params/job.yaml": ""})
    with pytest.raises(batch.BatchError, match="sede"):
        batch.resolve_jobs(root / "batches" / "b.yaml", root=root)


def test_cli_unknown_key_and_dry_run_run_nothing(tmp_path, capsys):
    root = _project(tmp_path, LAYERED, smoke="lr: 0.5\n", files={"params/job.yaml": ""})
    runs = tmp_path / "runs"
    manifest = str(root / "batches" / "b.yaml")
    rc = batch.main([manifest, "--smoke", "--set", "no_such_param=1", "--runs-dir", str(runs),
                     "--root", str(root)])
    assert rc == 2 and "no_such_param" in capsys.readouterr().err
    rc = batch.main([manifest, "--dry-run", "--set", "seed=4", "--runs-dir", str(runs), "--root", str(root)])
    out = capsys.readouterr().out
    assert rc == 0 and "a[tag=g2]" in out and "g2_s4" in out and "(new)" in out
    assert not runs.exists() and not (tmp_path / "executions.log").exists()


def test_python_dash_m_entry_point(tmp_path):
    root = _project(tmp_path, LAYERED, files={"params/job.yaml": ""})
    cmd = [sys.executable, "-m", "dfkd.batch", str(root / "batches" / "b.yaml"), "--root", str(root),
           "--set", "no_such_param=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no_such_param" in res.stderr


@pytest.mark.notebooks
def test_batch_failure_blocking_resume_and_force(tmp_path):
    flag = tmp_path / "fail_once"
    flag.write_text("x")
    manifest = f"""\
    jobs:
      - name: first
        notebook: notebooks/ok.py
        stage: teacher
        run: "first_s{{seed}}"
      - name: second
        notebook: notebooks/ok.py
        stage: distill
        run: second
        set: {{stage: distill, fail_if: "{flag}"}}
      - name: third
        notebook: notebooks/ok.py
        stage: distill
        run: third
        needs: [second]
        set: {{stage: distill, plot: true, lr: 2}}
        timeout: 120
      - name: plain
        notebook: notebooks/plain.py
        stage: viz
        run: plain
    """
    root = _project(tmp_path, manifest)
    runs, log = tmp_path / "runs", tmp_path / "executions.log"
    path = root / "batches" / "b.yaml"

    # 1st batch: second fails -> FAILED + partial notebook; third is blocked; first finishes
    status = batch.run_batch(path, runs_root=runs, root=root)
    assert status == {"first": "done", "second": "failed", "third": "blocked", "plain": "done"}
    assert json.loads((runs / "viz" / "plain" / "summary.json").read_text())["executed_by"] == "dfkd.batch"
    failed = runs / "distill" / "second"
    assert "planned failure" in (failed / "FAILED").read_text()
    assert (failed / "executed.ipynb").is_file() and not (failed / "summary.json").exists()
    assert not (runs / "distill" / "third").exists()
    first_summary = runs / "teacher" / "first_s0" / "summary.json"
    mtime = first_summary.stat().st_mtime_ns

    # 2nd batch, failure cause removed: first is not redone, second re-runs, third runs
    flag.unlink()
    assert batch.main([str(path), "--runs-dir", str(runs), "--root", str(root)]) == 0
    assert log.read_text().split() == ["teacher/first_s0", "distill/second", "plain", "distill/second",
                                       "distill/third"]  # plain's run is finished: not redone
    assert first_summary.stat().st_mtime_ns == mtime
    assert not (failed / "FAILED").exists() and (failed / "summary.json").is_file()

    # the kernel saw the injected parameters with their types, the env and the project root
    third = runs / "distill" / "third"
    summary = json.loads((third / "summary.json").read_text())
    assert summary["types"] == {"lr": "float", "seed": "int"} and summary["params"]["lr"] == 2.0
    assert summary["env"]["DFKD_RUNS"] == str(runs.resolve()) and summary["env"]["TQDM_DISABLE"] == "1"
    assert summary["cwd"] == str(root.resolve())
    if os.name != "nt":  # Unix sockets in the job's own temp folder: no TCP port race between kernels
        assert summary["kernel"]["transport"] == "ipc", summary["kernel"]
        assert Path(summary["kernel"]["ip"]).parent.name.startswith("dfkd-batch-"), summary["kernel"]
    nb = json.loads((third / "executed.ipynb").read_text())
    assert nb["metadata"]["papermill"]["input_path"] == "notebooks/ok.py"
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    assert ["parameters"] in tags and ["injected-parameters"] in tags
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # inline backend, not Agg

    # --force re-runs a finished run from scratch
    first = batch.resolve_jobs(path, only="first", root=root)[0]
    (runs / "teacher" / "first_s0" / "stale.txt").write_text("old")
    assert batch.run_job(first, runs_root=runs) == "skipped"
    assert batch.run_job(first, runs_root=runs, force=True) == "done"
    assert log.read_text().split().count("teacher/first_s0") == 2
    assert not (runs / "teacher" / "first_s0" / "stale.txt").exists()


def test_only_requires_finished_needs(tmp_path):
    root = _project(tmp_path, LAYERED, files={"params/job.yaml": ""})
    with pytest.raises(batch.BatchError, match="teacher/g1_s3"):
        batch.run_batch(root / "batches" / "b.yaml", only="b", runs_root=tmp_path / "runs", root=root)
    assert not (tmp_path / "runs").exists()


def test_only_takes_a_comma_list_and_accepts_needs_made_in_the_batch(tmp_path):
    root = _project(tmp_path, LAYERED, files={"params/job.yaml": ""})
    both = batch.resolve_jobs(root / "batches" / "b.yaml", only="b, a[tag=g1],a[tag=g2]", root=root)
    assert [j.name for j in both] == ["a[tag=g1]", "a[tag=g2]", "b"]     # needs first
    # b's needs are made by this batch: the dry run plans it instead of refusing it
    planned = batch.run_batch(root / "batches" / "b.yaml", only="a,b", runs_root=tmp_path / "runs",
                              root=root, dry_run=True, log=lambda m: None)
    assert set(planned) == {"a[tag=g1]", "a[tag=g2]", "b"}
    with pytest.raises(batch.BatchError, match="'nope' matches no job"):
        batch.resolve_jobs(root / "batches" / "b.yaml", only="a,nope", root=root)
    # a need outside the list is still refused (b needs a[tag=g2] too)
    with pytest.raises(batch.BatchError, match="teacher/g2_s3"):
        batch.run_batch(root / "batches" / "b.yaml", only="a[tag=g1],b", runs_root=tmp_path / "runs", root=root,
                        dry_run=True, log=lambda m: None)


def test_only_takes_grid_expansions_of_two_keys(tmp_path):
    """A grid of two keys names its expansions ``a[seed=0,tag=g1]``: the comma inside the brackets
    belongs to the name, the one outside separates two names."""
    two = LAYERED.replace("set: {lr: 1, seed: 3}\n    grid: {tag: [g1, g2]}",
                          "set: {lr: 1}\n    grid: {tag: [g1, g2], seed: [0, 1]}")
    root = _project(tmp_path, two, files={"params/job.yaml": ""})
    jobs = batch.resolve_jobs(root / "batches" / "b.yaml", root=root)
    names = sorted(j.name for j in jobs if j.job == "a")
    assert len(names) == 4 and all("," in n for n in names), names
    picked = batch.resolve_jobs(root / "batches" / "b.yaml", only=f"{names[0]}, {names[3]}", root=root)
    assert [j.name for j in picked] == [names[0], names[3]]
    with pytest.raises(batch.BatchError, match="matches no job"):
        batch.resolve_jobs(root / "batches" / "b.yaml", only=names[0].replace("]", ""), root=root)


def test_kernel_config_uses_unix_sockets_unless_the_path_is_too_long(tmp_path):
    short = batch.kernel_config(tmp_path)
    if os.name != "nt":
        assert short.KernelManager.transport == "ipc"
        assert short.KernelManager.ip == str(tmp_path.resolve() / "kernel")
    long_dir = tmp_path / ("d" * 120)  # a socket address holds 107 bytes: TCP, not a dead kernel
    assert "KernelManager" not in batch.kernel_config(long_dir)
