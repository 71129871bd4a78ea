"""Executors of ``python -m dfkd.batch``: ``--executor local | local:N | slurm``, and ``--status``.

- ``local`` (default, in :func:`dfkd.batch.run_batch`): one job after the other, in this process.
- ``local:N`` (:func:`run_pool`): up to N jobs at once, each in its own worker process
  (``python -m dfkd.executors worker``) as soon as its ``needs`` are done. With GPUs each job gets
  its own device(s) through ``CUDA_VISIBLE_DEVICES`` (``resources.gpus``, default 1, or the
  ``torchrun`` count); without, a job gets ``cores // min(N, jobs that can run at that moment)``
  threads (``OMP_NUM_THREADS`` & co., which torch reads for its intra-op pool): a lone job (the
  teacher that the rest needs) gets every core, two at once half each. A job marked ``alone: true``
  starts once the running jobs have finished, nothing starts beside it, and it gets every core
  (or every GPU slot it asks for): a result that depends on its thread count (the CUB teacher of
  ``batches/laptop.yaml``) is then what the manifest recorded, whatever N is.
- ``slurm`` (:func:`submit_slurm`): one SLURM job per run through submitit, ``needs`` as
  ``afterok`` dependencies (``kill-on-invalid-dep``: a failed need cancels its dependents instead of
  leaving them pending forever), resources from the manifest's ``resources:`` or the command line,
  submitit's logs in ``<run>/slurm/``. The runner exits after submission; ``--status`` reports later.
  ``--slurm-cluster local|debug`` sends the same parameters to submitit's local/debug executor,
  which cannot hold a job on a dependency: the submitter then submits a job only once its needs'
  jobs have finished (and blocks it when one failed), which is what ``afterok`` does on SLURM.

Every executor runs a job through the same function, :func:`dfkd.batch.run_job`, which holds the
run folder's lock (:mod:`dfkd.runlock`) and runs the notebook (papermill) or, for a ``torchrun:``
job, ``torchrun -m dfkd.launch``. So a job is launched the same way wherever it runs.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from dfkd import batch, runlock
from dfkd.batch import (BLOCKED, DONE, FAILED, LOCKED, LOG_DIR, PLANNED, SKIPPED, BatchError,
                        ResolvedJob, blocked_by, is_finished)

RUNNING, SUBMITTED = "running", "submitted"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
DEFAULT_TIME_MIN = 24 * 60  # SLURM time limit when neither the manifest nor --time gives one
RECORD = "submitted.json"   # <run>/slurm/submitted.json: the last submission of that run


def parse_executor(spec: str) -> tuple[str, int]:
    """``local`` -> ("local", 1), ``local:N`` -> ("pool", N), ``slurm`` -> ("slurm", 0)."""
    m = re.fullmatch(r"local(?::(\d+))?|slurm", spec or "")
    if not m:
        raise BatchError(f"--executor {spec!r}: local, local:N (N >= 1) or slurm")
    if spec == "slurm":
        return "slurm", 0
    n = int(m.group(1) or 1)
    if n < 1:
        raise BatchError(f"--executor {spec!r}: N must be >= 1")
    return ("pool", n) if m.group(1) else ("local", 1)


# --------------------------------------------------------------------------------------------
# local:N
# --------------------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """Devices this machine offers: ``$CUDA_VISIBLE_DEVICES`` if set, else torch's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpus_wanted(job: ResolvedJob) -> int:
    g = job.resources.get("gpus")
    return int(g) if g is not None else (job.torchrun or 1)


def thread_env(threads: int) -> dict[str, str]:
    return {v: str(max(1, threads)) for v in THREAD_VARS}


def run_pool(jobs: list[ResolvedJob], n_workers: int, *, runs_root: Path, force: bool = False,
             figures_root=None, log=batch._log, if_locked: str = "wait",
             gpus: list[str] | None = None, cores: int | None = None):
    """Run up to ``n_workers`` jobs at once, each as soon as its needs are done.

    Returns ``(status, seconds)`` like the ``local`` loop. ``gpus``/``cores`` default to this
    machine's (:func:`visible_gpus`, :func:`cpu_count`).
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    cores = cores or cpu_count()
    threads = max(1, cores // n_workers)
    if gpus:
        too_big = [j.name for j in jobs if gpus_wanted(j) > len(gpus)]
        if too_big:
            raise BatchError(f"job(s) {too_big} want more GPUs than the {len(gpus)} visible here")
        log(f"local:{n_workers}: {len(gpus)} GPU(s) {','.join(gpus)}: one device set per job")
    else:
        log(f"local:{n_workers}: no GPU; {cores} cores shared by the jobs running at once "
            f"(at least {threads} thread(s) each)")
    status: dict[str, str] = {}
    seconds: dict[str, float] = {}
    pending = list(jobs)
    names = {j.name for j in jobs}
    free = list(gpus)
    running: dict[str, tuple[subprocess.Popen, ResolvedJob, list[str], float, Path]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="dfkd-pool-"))
    kw = dict(runs_root=str(runs_root), force=force, if_locked=if_locked,
              figures_root=str(figures_root) if figures_root is not None else None)
    try:
        while pending or running:
            for job in list(pending):
                why = blocked_by(job, jobs, status, runs_root)
                if why:
                    log(f"  {job.name}: blocked (needs {', '.join(why)} which failed or are missing)")
                    status[job.name] = BLOCKED
                    pending.remove(job)
                    continue
                if not _needs_done(job, status, names):
                    continue  # a need is still pending or running
                if len(running) >= n_workers or any(r[1].alone for r in running.values()):
                    break
                if job.alone and running:
                    break  # let the running jobs drain; nothing else starts before it
                want = gpus_wanted(job) if gpus else 0
                if want > len(free):
                    continue
                devices, free = free[:want], free[want:]
                # CPU: the cores are shared by the jobs that can run now (a lone job, e.g. the
                # teacher everything else needs, gets them all; two at once get half each)
                # (an `alone` job never runs beside another: it does not count)
                runnable = len(running) + sum(_needs_done(j, status, names) and not j.alone
                                              for j in pending)
                share = threads if gpus else max(1, cores // (1 if job.alone else min(n_workers, runnable)))
                env = {**thread_env(share), "CUDA_VISIBLE_DEVICES": ",".join(devices)}
                spec = tmp / f"job{jobs.index(job)}.pkl"
                spec.write_bytes(pickle.dumps({"job": job, "kw": kw}))
                where = f"GPU {','.join(devices)}" if devices else f"{share} thread(s)"
                log(f"[start] {job.name} ({where})")
                proc = _start_worker(spec, env)
                running[job.name] = (proc, job, devices, time.perf_counter(), spec)
                pending.remove(job)
            time.sleep(0.1)
            for name, (proc, job, devices, t0, spec) in list(running.items()):
                if proc.poll() is None:
                    continue
                result = spec.with_suffix(".status")
                status[name] = result.read_text().strip() if result.is_file() else FAILED
                if not result.is_file():
                    log(f"  {name}: worker exited with status {proc.returncode} -> failed")
                seconds[name] = time.perf_counter() - t0
                free = [g for g in gpus if g in free or g in devices]  # device order kept
                del running[name]
                log(f"[end]   {name}: {status[name]} ({seconds[name]:.1f} s)")
    finally:
        for proc, *_ in running.values():  # interrupted: stop the workers (their locks go with them)
            proc.terminate()
        for proc, *_ in running.values():
            with _suppress():
                proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    return status, seconds


def _needs_done(job: ResolvedJob, status: Mapping[str, str], in_batch: set[str]) -> bool:
    """Every need of ``job`` that this batch runs is done or skipped: it may start. Needs outside
    the batch (``--only``) are finished runs (:func:`batch.blocked_by` checked them)."""
    return all(status.get(n) in (DONE, SKIPPED) for n in job.needs if n in in_batch)


class _Forked:
    """A forked worker with Popen's poll/returncode/terminate/wait (fork: no re-import of
    papermill & co. per job, seconds on a busy machine)."""

    def __init__(self, spec: Path, env: Mapping[str, str]):
        import multiprocessing
        self._p = multiprocessing.get_context("fork").Process(
            target=_forked_worker, args=(str(spec), dict(env)), daemon=False)
        self._p.start()

    def poll(self):
        return self._p.exitcode

    @property
    def returncode(self):
        return self._p.exitcode

    def terminate(self):
        self._p.terminate()

    def wait(self, timeout=None):
        self._p.join(timeout)


def _forked_worker(spec: str, env: Mapping[str, str]) -> None:
    os.environ.update(env)  # the kernel inherits it
    _worker(spec)


def _start_worker(spec: Path, env: Mapping[str, str]):
    import multiprocessing
    if "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux"):
        return _Forked(spec, env)
    return subprocess.Popen([sys.executable, "-m", "dfkd.executors", "worker", str(spec)],
                            env={**os.environ, **env})


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _worker(spec_path: str) -> int:
    spec = pickle.loads(Path(spec_path).read_bytes())
    status = batch.run_job(spec["job"], **spec["kw"])
    Path(spec_path).with_suffix(".status").write_text(status + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# slurm (submitit)
# --------------------------------------------------------------------------------------------
def time_minutes(value: Any) -> int:
    """``90`` / ``"90"`` -> 90, ``"4:00:00"`` -> 240, ``"1-12:00:00"`` -> 2160, ``"30:00"`` -> 30."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not m:
        raise BatchError(f"time {value!r}: minutes, or [D-]HH:MM:SS")
    d, a, b, c = (int(x) if x else None for x in m.groups())
    if b is None:
        h, mnt, sec = 0, a, 0          # minutes
    elif c is None:
        h, mnt, sec = 0, a, b          # MM:SS
    else:
        h, mnt, sec = a, b, c
    return max(1, (d or 0) * 1440 + h * 60 + mnt + (1 if sec else 0))


def mem_gb(value: Any) -> float:
    """``32`` -> 32, ``"32G"``/``"32GB"`` -> 32, ``"512M"`` -> 0.5, ``"1T"`` -> 1024."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([MGT]?)B?", str(value).strip(), re.I)
    if not m:
        raise BatchError(f"mem {value!r}: a number of GB, or e.g. 32G / 512M")
    return float(m.group(1)) * {"M": 1 / 1024, "G": 1, "T": 1024, "": 1}[m.group(2).upper()]


def slurm_parameters(job: ResolvedJob, dependency_ids: list[str] = ()) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keywords for one job (generic names, plus
    ``slurm_*`` ones that only the SLURM executor reads)."""
    res = job.resources
    gpus = int(res.get("gpus", job.torchrun or 0) or 0)
    p: dict[str, Any] = {
        "name": f"dfkd_{job.stage}_{job.run_name}",
        "timeout_min": time_minutes(res.get("time", DEFAULT_TIME_MIN)),
        "nodes": 1, "tasks_per_node": 1,  # torchrun (if any) starts the ranks itself
        "gpus_per_node": gpus,
        "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"},
    }
    if res.get("cpus"):
        p["cpus_per_task"] = int(res["cpus"])
    if res.get("mem") is not None:
        p["mem_gb"] = mem_gb(res["mem"])
    if res.get("partition"):
        p["slurm_partition"] = str(res["partition"])
    if res.get("account"):
        p["slurm_account"] = str(res["account"])
    if dependency_ids:
        p["slurm_dependency"] = "afterok:" + ":".join(str(i) for i in dependency_ids)
    return p


def make_executor(folder: Path, cluster: str = "slurm"):
    import submitit
    try:
        return submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as e:  # e.g. 'Could not detect "srun"' off a cluster
        raise BatchError(f"--executor slurm: {e} (run it on a SLURM login node; "
                         "--slurm-cluster local runs the same path on this machine)") from e


def run_submitted(job: ResolvedJob, **kw) -> str:
    """What a submitted job executes (pickled by submitit): the needs must be finished (SLURM's
    ``afterok`` guarantees it), then :func:`dfkd.batch.run_job`. Raises when the run did not
    finish, so that SLURM records the job as failed and cancels its dependents."""
    runs_root = Path(kw["runs_root"])
    missing = [f"{s}/{r}" for s, r in job.need_runs if not is_finished(runs_root / s / r)]
    if missing:
        raise RuntimeError(f"{job.name}: blocked: needed run(s) not finished: {', '.join(missing)}")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        os.environ.update(thread_env(int(cpus)))
    status = batch.run_job(job, **kw)
    if status in (FAILED, LOCKED):
        raise RuntimeError(f"{job.name}: {status}; see {job.run_dir(runs_root)}")
    return status


def _outcome(handle) -> str:
    try:
        return handle.result()
    except Exception:
        return FAILED


def submit_slurm(jobs: list[ResolvedJob], *, runs_root: Path, force: bool = False,
                 figures_root=None, log=batch._log, if_locked: str = "wait", wait: bool = False,
                 cluster: str = "slurm") -> dict[str, str]:
    """Submit one job per run; ``needs`` become ``afterok`` dependencies. Returns the statuses
    (``submitted`` for the jobs left to the scheduler, final ones with ``wait``)."""
    if cluster != "slurm":
        wait = True  # local/debug jobs live as children of this process
    status: dict[str, str] = {}
    handles: dict[str, Any] = {}
    kw = dict(runs_root=str(runs_root), force=force, if_locked=if_locked,
              figures_root=str(figures_root) if figures_root is not None else None)
    pending = list(jobs)
    while pending:
        progressed = False
        for job in list(pending):
            deps = [n for n in job.needs if n in handles]
            if cluster != "slurm" and not all(handles[n].done() for n in deps):
                continue  # emulated afterok: a local job cannot be held by the scheduler
            pending.remove(job)
            progressed = True
            for n in deps:
                if cluster != "slurm" and status.get(n) == SUBMITTED:
                    status[n] = _outcome(handles[n])
            why = blocked_by(job, jobs, status, runs_root)
            run_dir = job.run_dir(runs_root)
            if why:
                log(f"  {job.name}: blocked (needs {', '.join(why)} which failed or are missing)")
                status[job.name] = BLOCKED
                continue
            if is_finished(run_dir) and not force:
                log(f"  {job.name}: finished run {run_dir} exists -> skipped")
                status[job.name] = SKIPPED
                continue
            dep_ids = [handles[n].job_id for n in deps]
            params = slurm_parameters(job, dep_ids if cluster == "slurm" else [])
            ex = make_executor(run_dir / LOG_DIR, cluster)
            ex.update_parameters(**params)
            handle = ex.submit(run_submitted, job, **kw)
            handles[job.name] = handle
            status[job.name] = SUBMITTED
            if cluster == "debug":  # the debug executor runs the job in this process, on result()
                status[job.name] = _outcome(handle)
            record = {"job_id": str(handle.job_id), "cluster": cluster, "submitted": time.time(),
                      "submitted_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "dependency": params.get("slurm_dependency", ""), "job": job.name}
            batch._write_text(run_dir / LOG_DIR / RECORD, json.dumps(record, indent=2) + "\n")
            dep = f" after {', '.join(deps)}" if deps else ""
            log(f"  {job.name}: submitted as {cluster} job {handle.job_id}{dep}; logs in "
                f"{run_dir / LOG_DIR}")
        if not progressed:
            time.sleep(0.2)
    if not wait:
        log(f"\n{list(status.values()).count(SUBMITTED)} job(s) submitted; follow them with "
            "`python -m dfkd.batch MANIFEST --status` (same options)")
        return status
    for name, handle in handles.items():
        if status[name] == SUBMITTED:
            status[name] = _outcome(handle)
    log(batch._summary_table(jobs, status, {}, runs_root))
    return status


# --------------------------------------------------------------------------------------------
# --status
# --------------------------------------------------------------------------------------------
def _scheduler_state(record: Mapping[str, Any], folder: Path) -> str:
    if record.get("cluster") != "slurm" or not shutil.which("sacct"):
        return ""
    try:
        import submitit
        return str(submitit.SlurmJob(folder=str(folder), job_id=str(record["job_id"])).state)
    except Exception:
        return ""


def batch_status(jobs: list[ResolvedJob], runs_root: Path) -> list[tuple[ResolvedJob, str, str]]:
    """``[(job, planned|running|done|failed|blocked, note)]`` from the run folders, their locks
    and the last submission record: the same whichever executor ran (or runs) the jobs."""
    out, state = [], {}
    for job in jobs:
        d = job.run_dir(runs_root)
        record: dict = {}
        with _suppress():
            record = json.loads((d / LOG_DIR / RECORD).read_text())
        holder = runlock.probe(d)
        failed = d / "FAILED"
        resubmitted = record and failed.exists() and record.get("submitted", 0) > failed.stat().st_mtime
        sched = _scheduler_state(record, d / LOG_DIR) if record and not is_finished(d) else ""
        note = ""
        if is_finished(d):
            s = DONE
        elif holder is not None:
            s, note = RUNNING, runlock.describe_holder(holder)
        elif failed.exists() and not resubmitted:
            s = FAILED
            note = (failed.read_text().strip().splitlines() or [""])[0][:80]
        elif any(state.get(n) in (FAILED, BLOCKED) for n in job.needs) or blocked_by(
                job, jobs, {}, runs_root):
            s = BLOCKED
        elif sched.startswith(("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED")):
            s, note = FAILED, f"{record['cluster']} job {record['job_id']}: {sched}"
        else:
            s = PLANNED
            if record:
                note = f"submitted as {record['cluster']} job {record['job_id']}" + (
                    f" ({sched})" if sched else "") + f" at {record.get('submitted_at', '?')}"
        state[job.name] = s
        out.append((job, s, note))
    return out


def status_table(rows, runs_root: Path) -> str:
    w = max([len(j.name) for j, _, _ in rows] + [3])
    lines = [f"{'job':<{w}}  {'status':<8} run  (note)"]
    for j, s, note in rows:
        lines.append(f"{j.name:<{w}}  {s:<8} {j.run_dir(runs_root)}" + (f"  ({note})" if note else ""))
    counts = {s: [r[1] for r in rows].count(s) for s in (PLANNED, RUNNING, DONE, FAILED, BLOCKED)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def print_status(manifest_path, *, smoke: bool = False, sets=None, only=None, runs_root=None,
                 root=None, log=batch._log) -> list[tuple[ResolvedJob, str, str]]:
    jobs = batch.resolve_jobs(manifest_path, smoke=smoke, sets=sets, only=only, root=root)
    runs_root = Path(runs_root).resolve() if runs_root else batch.default_runs_root(smoke).resolve()
    rows = batch_status(jobs, runs_root)
    log(f"{len(jobs)} job(s) from {manifest_path}; runs root {runs_root}\n")
    log(status_table(rows, runs_root))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit("usage: python -m dfkd.executors worker JOB.pkl (started by dfkd.batch --executor local:N)")
