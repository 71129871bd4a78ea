"""dfkd.batch executors (local, local:N, slurm through submitit's local executor), the per-run
lock (dfkd.runlock) and --status. Tiny stand-in notebooks in tmp_path (as in test_batch.py); the
one that calls dfkd.tracking.start_run checks that a kernel works inside its runner's lock.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dfkd import batch, executors, runlock

pytestmark = pytest.mark.notebooks

NB = '''\
# %% tags=["parameters"]
run_name: str = "dev"
stage: str = "teacher"
seed: int = 0
sleep: float = 0.0
needs_runs: str = ""          # comma-separated stage/run folders that must be finished
use_tracking: bool = False    # open the run with dfkd.tracking.start_run (takes the lock by hand)
fail: bool = False

# %%
import json, os, pathlib, random, time
runs = pathlib.Path(os.environ["DFKD_RUNS"])
with open(runs.parent / "executions.log", "a") as f:
    f.write(f"{stage}/{run_name}\\n")
t_start = time.time()
time.sleep(sleep)
for need in filter(None, needs_runs.split(",")):
    assert (runs / need / "summary.json").is_file(), f"need {need} is not finished"
if fail:
    raise RuntimeError("planned failure")
rng = random.Random(seed)
summary = {"result": sum(rng.random() for _ in range(1000)), "seed": seed,
           "omp": os.environ.get("OMP_NUM_THREADS"), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "lock": os.environ.get("DFKD_RUN_LOCK"), "span": [t_start, time.time()]}
if use_tracking:
    import torch
    from dfkd import tracking
    run = tracking.start_run(stage, run_name, {"seed": seed})
    summary["torch_threads"] = torch.get_num_threads()
    run.finish(summary)
else:
    out = runs / stage / run_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary))
'''


def _project(tmp_path: Path, manifest: str) -> Path:
    root = tmp_path / "proj"
    for d in ("notebooks", "params", "batches"):
        (root / d).mkdir(parents=True)
    (root / "notebooks" / "nb.py").write_text(NB)
    (root / "params" / "base.yaml").write_text("{}\n")
    (root / "batches" / "b.yaml").write_text(textwrap.dedent(manifest))
    return root


def _job(name, run, stage="teacher", needs=(), **set_):
    set_ = {"stage": stage, **set_}
    text = (f"  - name: {name}\n    notebook: notebooks/nb.py\n    stage: {stage}\n    run: {run}\n"
            f"    set: {json.dumps(set_)}\n")
    return text + (f"    needs: {json.dumps(list(needs))}\n" if needs else "")


def _executions(tmp_path: Path) -> list[str]:
    log = tmp_path / "executions.log"
    return log.read_text().split() if log.exists() else []


def _summaries(runs: Path) -> dict[str, dict]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in sorted(runs.glob("*/*/summary.json"))}


def test_local2_gives_the_same_results_as_local_in_less_time(tmp_path):
    manifest = "jobs:\n" + _job("a", "a", seed=1, sleep=3) + _job("b", "b", seed=2, sleep=3) + _job(
        "c", "c", stage="distill", needs=["a", "b"], seed=3, needs_runs="teacher/a,teacher/b")
    root = _project(tmp_path, manifest)
    path = root / "batches" / "b.yaml"
    seq = batch.run_batch(path, runs_root=tmp_path / "seq", root=root, executor="local")
    # c opens its run with start_run (imports torch: slow here) in the local:2 batch only
    path2 = root / "batches" / "b2.yaml"
    path2.write_text(path.read_text().replace('"seed": 3', '"seed": 3, "use_tracking": true'))
    assert "use_tracking" in path2.read_text()
    par = batch.run_batch(path2, runs_root=tmp_path / "par", root=root, executor="local:2")
    assert seq == par == {"a": "done", "b": "done", "c": "done"}
    s, p = _summaries(tmp_path / "seq"), _summaries(tmp_path / "par")
    assert sorted(s) == sorted(p) == ["distill/c", "teacher/a", "teacher/b"]
    for k in s:
        assert s[k]["result"] == p[k]["result"]
    # every kernel ran inside its runner's lock; c opened its run with start_run inside that lock
    assert p["distill/c"]["lock"] == str(runlock.lock_path(tmp_path / "par" / "distill" / "c"))
    if not executors.visible_gpus():  # a CPU machine: a and b, side by side, share the cores;
        # c, alone once they are done, gets all of them
        share = str(max(1, executors.cpu_count() // 2))
        assert p["teacher/a"]["omp"] == p["teacher/b"]["omp"] == share
        assert p["distill/c"]["torch_threads"] == executors.cpu_count()
        assert p["teacher/a"]["cuda"] == ""
    # the independent a and b (3 s of work each) ran side by side: the time from the start of the
    # first to the end of the last is shorter (measured inside the kernels: this shared machine's
    # load on kernel start-up does not enter)
    def ab_wall(d):
        return max(d[k]["span"][1] for k in ("teacher/a", "teacher/b")) - min(
            d[k]["span"][0] for k in ("teacher/a", "teacher/b"))
    assert ab_wall(p) < 0.75 * ab_wall(s), (ab_wall(p), ab_wall(s))
    assert min(p[k]["span"][0] for k in ("teacher/a", "teacher/b")) < min(
        p[k]["span"][1] for k in ("teacher/a", "teacher/b"))  # they overlapped
    assert p["distill/c"]["span"][0] > max(p[k]["span"][1] for k in ("teacher/a", "teacher/b"))


def test_local_n_gives_each_job_its_own_gpus(tmp_path):
    # two (pretend) devices: a and b run side by side on one each; c wants both
    manifest = "jobs:\n" + _job("a", "a") + _job("b", "b") + _job("c", "c", needs=["a"]) + (
        "    resources: {gpus: 2}\n")
    root = _project(tmp_path, manifest)
    jobs = batch.resolve_jobs(root / "batches" / "b.yaml", root=root)
    status, _ = executors.run_pool(jobs, 2, runs_root=tmp_path / "runs", gpus=["0", "1"], cores=8)
    assert status == {"a": "done", "b": "done", "c": "done"}
    s = _summaries(tmp_path / "runs")
    assert {s["teacher/a"]["cuda"], s["teacher/b"]["cuda"]} == {"0", "1"}
    assert s["teacher/c"]["cuda"] == "0,1" and s["teacher/a"]["omp"] == "4"
    with pytest.raises(batch.BatchError, match="more GPUs"):
        executors.run_pool(jobs, 2, runs_root=tmp_path / "runs", gpus=["0"])


def test_local_n_runs_an_alone_job_with_nothing_beside_it_on_every_core(tmp_path):
    # b starts; a (alone) waits for b to finish, c (after a in the manifest) waits for a
    manifest = "jobs:\n" + _job("b", "b", sleep=1) + _job("a", "a", sleep=1) + "    alone: true\n" + _job(
        "c", "c", sleep=1)
    root = _project(tmp_path, manifest)
    jobs = batch.resolve_jobs(root / "batches" / "b.yaml", root=root)
    assert [j.alone for j in jobs] == [False, True, False]
    status, _ = executors.run_pool(jobs, 2, runs_root=tmp_path / "runs", gpus=[], cores=4)
    assert status == {"a": "done", "b": "done", "c": "done"}
    s = {k.split("/")[1]: v for k, v in _summaries(tmp_path / "runs").items()}
    assert s["a"]["omp"] == "4" and s["b"]["omp"] == "2"   # b started beside a runnable c
    assert s["a"]["span"][0] > s["b"]["span"][1] and s["c"]["span"][0] > s["a"]["span"][1]
    # b and an alone a only: a will not run beside b, so b has every core too
    two = root / "batches" / "two.yaml"
    two.write_text(manifest.split("  - name: c")[0])
    status, _ = executors.run_pool(batch.resolve_jobs(two, root=root), 2,
                                   runs_root=tmp_path / "runs2", gpus=[], cores=4)
    assert status == {"a": "done", "b": "done"}
    s = {k.split("/")[1]: v for k, v in _summaries(tmp_path / "runs2").items()}
    assert s["a"]["omp"] == s["b"]["omp"] == "4"
    bad = root / "batches" / "bad.yaml"
    bad.write_text(manifest.replace("alone: true", "alone: yes please"))
    with pytest.raises(batch.BatchError, match="`alone` is true or false"):
        batch.load_manifest(bad)


@pytest.mark.timeout(120)
def test_local_n_runs_an_only_selection_whose_needs_finished_in_an_earlier_batch(tmp_path):
    # `--only b --executor local:2` once a (which b needs) finished in an earlier batch: b starts
    # (a need outside the batch is a finished run, not a pending job; this hung before)
    manifest = "jobs:\n" + _job("a", "a") + _job("b", "b", needs=["a"])
    root = _project(tmp_path, manifest)
    path, runs = root / "batches" / "b.yaml", tmp_path / "runs"
    assert batch.run_batch(path, only="a", runs_root=runs, root=root, log=lambda m: None) == {"a": "done"}
    assert batch.run_batch(path, only="b", runs_root=runs, root=root, executor="local:2",
                           log=lambda m: None) == {"b": "done"}
    assert sorted(_summaries(runs)) == ["teacher/a", "teacher/b"]


def test_two_batch_processes_on_one_runs_folder_run_each_run_once(tmp_path):
    jobs = [_job(f"j{i}", f"j{i}", seed=i, sleep=0.5) for i in range(4)]
    manifest = "jobs:\n" + "".join(jobs) + _job("last", "last", stage="distill", needs=["j0", "j3"],
                                                needs_runs="teacher/j0,teacher/j3")
    root = _project(tmp_path, manifest)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "dfkd.batch", str(root / "batches" / "b.yaml"), "--runs-dir",
           str(runs), "--root", str(root)]
    procs = [subprocess.Popen(cmd + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in ([], ["--executor", "local:2"])]
    outs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs_run = _executions(tmp_path)
    assert sorted(runs_run) == sorted(["teacher/j0", "teacher/j1", "teacher/j2", "teacher/j3",
                                       "distill/last"]), outs
    summaries = _summaries(runs)  # every summary.json parses
    assert len(summaries) == 5 and all("result" in s for s in summaries.values())
    assert "locked" in "".join(outs) or "finished" in "".join(outs)  # the loser waited or skipped


def test_killed_lock_holder_does_not_block_the_next_batch(tmp_path, capsys):
    root = _project(tmp_path, "jobs:\n" + _job("slow", "slow", sleep=120))
    runs, path = tmp_path / "runs", root / "batches" / "b.yaml"
    run_dir = runs / "teacher" / "slow"
    proc = subprocess.Popen([sys.executable, "-m", "dfkd.batch", str(path), "--runs-dir", str(runs),
                             "--root", str(root)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not (_executions(tmp_path) and runlock.read_holder(run_dir)):
            assert time.time() < deadline and proc.poll() is None, "the batch never started its job"
            time.sleep(0.2)
        holder = runlock.read_holder(run_dir)
        assert holder["pid"] == proc.pid and holder["host"]
        # while it runs: a second batch skips with the holder named; start_run refuses; --status
        status = batch.run_batch(path, runs_root=runs, root=root, if_locked="skip")
        assert status == {"slow": batch.LOCKED}
        out = capsys.readouterr().out
        assert f"pid {proc.pid}" in out and holder["host"] in out and holder["started_at"] in out
        from dfkd import tracking
        with pytest.raises(RuntimeError, match=f"pid {proc.pid}"):
            tracking.start_run("teacher", "slow", {"seed": 0}, runs_root=runs)
        (row,) = executors.print_status(path, runs_root=runs, root=root)
        assert row[1] == executors.RUNNING and f"pid {proc.pid}" in row[2]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel, no cleanup at all
        proc.wait(timeout=30)
    assert runlock.read_holder(run_dir)["pid"] == proc.pid  # the stale sidecar is still there
    assert runlock.probe(run_dir) is None                   # but its lock went with the process
    status = batch.run_batch(path, runs_root=runs, root=root, sets=["sleep=0"])
    assert status == {"slow": "done"} and _executions(tmp_path) == ["teacher/slow"] * 2
    assert not runlock.read_holder(run_dir)  # released cleanly this time
    (row,) = executors.print_status(path, runs_root=runs, root=root)
    assert row[1] == batch.DONE


def test_slurm_executor_through_submitit_local_executor(tmp_path, capsys):
    manifest = "jobs:\n" + _job("a", "a", seed=1) + _job(
        "b", "b", stage="distill", needs=["a"], needs_runs="teacher/a", seed=2) + _job(
        "bad", "bad", fail=True) + _job("after_bad", "after_bad", stage="distill", needs=["bad"])
    root = _project(tmp_path, manifest)
    runs, path = tmp_path / "runs", root / "batches" / "b.yaml"
    rows = executors.print_status(path, runs_root=runs, root=root)
    assert [r[1] for r in rows] == ["planned"] * 4
    rc = batch.main([str(path), "--runs-dir", str(runs), "--root", str(root), "--executor", "slurm",
                     "--slurm-cluster", "local", "--time", "10", "--wait"])
    out = capsys.readouterr().out
    assert rc == 1, out  # bad failed, after_bad blocked
    assert "submitted as local job" in out
    for name in ("a", "b", "bad"):
        rec = json.loads((runs / ("distill" if name == "b" else "teacher") / name / "slurm" /
                          "submitted.json").read_text())
        assert rec["cluster"] == "local" and rec["job_id"]
    assert list((runs / "teacher" / "a" / "slurm").glob("*_log.out"))  # submitit logs in the run folder
    ex = _executions(tmp_path)
    assert ex.index("teacher/a") < ex.index("distill/b") and "distill/after_bad" not in ex
    state = {r[0].name: r[1] for r in executors.print_status(path, runs_root=runs, root=root)}
    assert state == {"a": "done", "b": "done", "bad": "failed", "after_bad": "blocked"}
    assert not list((runs / ".locks").glob("*/*.json"))  # every holder released, --status took none
    assert json.loads((runs / "distill" / "b" / "summary.json").read_text())["seed"] == 2


def test_generated_slurm_parameters_for_gpus_and_a_dependency(tmp_path, monkeypatch):
    manifest = ("resources: {partition: gpu, time: '4:00:00', mem: 32G}\njobs:\n" + _job("a", "a")
                + _job("b", "b", stage="distill", needs=["a"])
                + "    resources: {gpus: 2, cpus: 16, account: lab}\n")
    root = _project(tmp_path, manifest)
    a, b = batch.resolve_jobs(root / "batches" / "b.yaml", root=root)
    assert a.resources == {"partition": "gpu", "time": "4:00:00", "mem": "32G"}
    p = executors.slurm_parameters(b, ["1001", "1002"])
    assert p == {"name": "dfkd_distill_b", "timeout_min": 240, "nodes": 1, "tasks_per_node": 1,
                 "gpus_per_node": 2, "cpus_per_task": 16, "mem_gb": 32.0, "slurm_partition": "gpu",
                 "slurm_account": "lab", "slurm_dependency": "afterok:1001:1002",
                 "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"}}
    # what submitit turns them into: the sbatch script (only sbatch itself is not run)
    import submitit
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    ex = submitit.AutoExecutor(folder=str(tmp_path / "slurm"), cluster="slurm")
    ex.update_parameters(**p)
    text = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--dependency=afterok:1001:1002", "--gpus-per-node=2", "--partition=gpu",
                 "--time=240", "--cpus-per-task=16", "--mem=32GB", "--account=lab",
                 "--kill-on-invalid-dep=yes", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in text, (line, text)
    assert executors.time_minutes("1-00:30:00") == 1470 and executors.mem_gb("512M") == 0.5
    assert executors.parse_executor("local:3") == ("pool", 3)
    with pytest.raises(batch.BatchError):
        executors.parse_executor("local:0")
    with pytest.raises(batch.BatchError, match="resources"):
        (root / "batches" / "b.yaml").write_text("jobs:\n" + _job("a", "a") + "    resources: {gpu: 1}\n")
        batch.resolve_jobs(root / "batches" / "b.yaml", root=root)


def test_torchrun_jobs_are_launched_with_dfkd_launch(tmp_path):
    root = _project(tmp_path, "jobs:\n" + _job("a", "a") + "    torchrun: 4\n")
    (job,) = batch.resolve_jobs(root / "batches" / "b.yaml", root=root)
    cmd = batch.torchrun_command(job, tmp_path / "p.yaml", tmp_path / "runs")
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert cmd[6:8] == ["dfkd.launch", "teacher"]
    assert executors.gpus_wanted(job) == 4 and executors.slurm_parameters(job)["gpus_per_node"] == 4
