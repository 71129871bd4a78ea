"""Papermill batch runner: ``python -m dfkd.batch MANIFEST [--smoke] [--only JOB[,JOB]] [--runs-dir DIR]
[--set key=value ...] [--dry-run] [--force] [--executor local|local:N|slurm] [--status]``.

Scope: read a manifest (``batches/*.yaml``), layer parameters, validate every key and type against
each notebook's ``parameters`` cell *before* anything runs, then execute the notebooks in
dependency order into ``runs/<stage>/<run>/executed.ipynb``. Finished runs (``summary.json``) are
skipped; interrupted ones are re-executed and the notebook resumes from ``state/last.pt`` itself.

Manifest (``docs/decisions.md#batch`` has the full schema)::

    jobs:
      - name: teacher                      # job id (grid expansions become teacher[seed=0] ...)
        notebook: notebooks/10_teacher_pretraining.py
        stage: teacher                     # teacher | synthesis | distill | viz | figures
        run: "{arch}_{dataset}_s{seed}"    # run_name template, filled from the resolved params
        params: [params/teacher/r34_cub.yaml]   # later files win
        set: {epochs: 30}                  # optional inline overrides
        grid: {seed: [0, 1, 2]}            # optional cartesian product
        needs: [other_job, "teacher/{teacher_run}"]  # job names, or stage/run folders
        timeout: 3600                      # optional, seconds per cell
        resources: {gpus: 1, cpus: 8, time: "4:00:00", mem: 32G, partition: gpu}  # optional
        torchrun: 4                        # optional: run with torchrun -m dfkd.launch, 4 processes
        alone: true                        # optional: under --executor local:N nothing runs beside it

Layering (later wins): notebook defaults < params/base.yaml < job files < ``set`` < grid values
< params/smoke.yaml (``--smoke``) < ``--set``. ``run_name`` is always injected from ``run``
(a notebook that declares no ``run_name`` is "plain": the runner writes its summary.json).
base.yaml, smoke.yaml and ``--set`` are shared by all jobs: their keys apply where a notebook
declares them, and a key that no notebook declares is a typo and fails. Job keys (``params``
files, ``set``, ``grid``) must be declared by the job's own notebook. A notebook "declares" the
names of its parameters cell and every field of the config dataclass it builds with
``collect(<Config>, globals())`` (a short cell holds what a person sets; the other fields keep
their config defaults unless a job sets them, and papermill injects them).

``method_options`` (a mapping: the chosen method's own hyper-parameters, ``docs/methods.md``) is
merged key by key across the layers (a later layer's key wins), and the result is checked against
the job's ``method`` before anything runs: an unknown or mistyped key fails, naming the key, the
method and the method's known keys. ``--set 'method_options={tau: 0.2}'`` takes a YAML mapping.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from dfkd import config, paths

STAGES = ("teacher", "synthesis", "distill", "viz", "figures")
DONE, SKIPPED, FAILED, BLOCKED, PLANNED = "done", "skipped", "failed", "blocked", "planned"
SMOKE_CELL_TIMEOUT = 300  # s per cell when --smoke and the job gives none: CI must never hang
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}
_log = partial(print, flush=True)  # progress lines interleave correctly with kernel stderr
_JOB_KEYS = {"name", "notebook", "stage", "run", "params", "set", "grid", "needs", "timeout",
             "resources", "torchrun", "alone"}
RESOURCE_KEYS = ("partition", "gpus", "cpus", "time", "mem", "account")  # see dfkd.executors
LOCKED = "locked"  # skipped because another process holds the run's lock (--if-locked skip)


class BatchError(ValueError):
    """The manifest, a parameter file or an override is invalid (raised before anything runs)."""


# --------------------------------------------------------------------------------------------
# YAML: PyYAML (YAML 1.1) reads `1e-3` as a string; parameter files are full of such floats
# --------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(path_or_text: str | Path, *, text: bool = False) -> Any:
    """YAML with YAML-1.2 floats (``1e-3`` is a float, as in Python)."""
    src = path_or_text if text else Path(path_or_text).read_text()
    return yaml.load(src, Loader=_Loader)


# --------------------------------------------------------------------------------------------
# notebook parameters
# --------------------------------------------------------------------------------------------
def _parameters_source(notebook_path: Path) -> str:
    import jupytext
    nb = jupytext.read(notebook_path)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell.source
    raise BatchError(f"{notebook_path} has no cell tagged 'parameters' "
                     "(py:percent: `# %% tags=[\"parameters\"]`)")


def parse_parameters(source: str, where: str = "parameters cell") -> dict[str, tuple[str, Any]]:
    """``{name: (type_name, default)}`` from ``name: type = literal  # help`` lines.

    Parsed with ``ast`` rather than papermill's line regex, which cuts string values at a ``#``
    and returns defaults as source text. Unannotated ``name = literal`` takes the literal's type.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise BatchError(f"{where}: syntax error: {e}") from e
    out: dict[str, tuple[str, Any]] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a bare string used as a comment
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            name, value = node.target.id, node.value
            ann = node.annotation
            type_name = ann.value if isinstance(ann, ast.Constant) else ast.unparse(ann)
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)):
            name, value, type_name = node.targets[0].id, node.value, None
        else:
            raise BatchError(f"{where}, line {node.lineno}: only `name: type = literal` lines are "
                             f"allowed in a parameters cell, got {ast.unparse(node)[:60]!r}")
        try:
            default = ast.literal_eval(value)
        except ValueError as e:
            raise BatchError(f"{where}, line {node.lineno}: {name} must be a literal, got "
                             f"{ast.unparse(value)[:60]!r}") from e
        type_name = type_name or type(default).__name__
        if type_name not in _TYPES:
            raise BatchError(f"{where}: parameter {name!r} has type {type_name!r}; allowed: "
                             f"{', '.join(_TYPES)}")
        out[name] = (type_name, coerce(name, default, type_name, where))
    return out


def notebook_parameters(notebook_path: str | Path) -> dict[str, tuple[str, Any]]:
    """``{name: (type_name, default)}`` declared by the notebook's ``parameters`` cell."""
    path = Path(notebook_path)
    if not path.is_file():
        raise BatchError(f"notebook {path} does not exist")
    return parse_parameters(_parameters_source(path), where=str(path))


_COLLECT = re.compile(r"\bcollect\(\s*([A-Za-z_]\w*Config)\s*,")


def notebook_config(notebook_path: str | Path):
    """The :mod:`dfkd.config` dataclass a notebook builds with ``collect(<Config>, ...)``, or None."""
    m = _COLLECT.search(Path(notebook_path).read_text())
    cls = getattr(config, m.group(1), None) if m else None
    return cls if dataclasses.is_dataclass(cls) else None


def job_parameters(notebook_path: str | Path) -> dict[str, tuple[str, Any]]:
    """``{name: (type_name, default)}`` a job may set for a notebook: every field of the config it
    collects (at the config's default) and, on top, its ``parameters`` cell (at the cell's default)."""
    cell = notebook_parameters(notebook_path)
    cls = notebook_config(notebook_path)
    if cls is None:
        return cell
    defaults = config.field_defaults(cls)
    fields = {f.name: (f.type if isinstance(f.type, str) else f.type.__name__, defaults[f.name])
              for f in dataclasses.fields(cls)}
    return {**fields, **cell}


def _moved_hint(key: str) -> str:
    """`` (it moved: ...)`` for a pre-method_options parameter name, else ''."""
    moved = config.moved_parameter(key)
    return f"; {moved}" if moved else ""


def coerce(name: str, value: Any, type_name: str, where: str) -> Any:
    """``value`` checked against ``type_name``; an int is accepted (and converted) for a float."""
    t = _TYPES[type_name]
    ok = (isinstance(value, t) and not (t is int and isinstance(value, bool))) or (
        t is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise BatchError(f"{where}: parameter {name!r} is {type_name}, got "
                         f"{type(value).__name__} ({value!r})")
    return float(value) if t is float else value


def parse_sets(sets: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["epochs=3", "lr=0.1"]`` -> ``{"epochs": 3, "lr": 0.1}`` (values are YAML scalars)."""
    if not sets:
        return {}
    if isinstance(sets, Mapping):
        return dict(sets)
    out = {}
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise BatchError(f"--set {item!r}: expected key=value")
        out[key.strip()] = load_yaml(raw, text=True) if raw.strip() else ""
    return out


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One manifest entry, before layering and grid expansion."""
    name: str
    notebook: str
    stage: str
    run: str
    params: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    timeout: int | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # top-level `resources:` < job's
    torchrun: int | None = None
    alone: bool = False


@dataclass
class ResolvedJob:
    """A runnable job: one grid combination with validated parameters."""
    name: str                       # job name, plus [k=v,...] for grid expansions
    job: str                        # the manifest job it came from
    notebook: Path                  # absolute path of the py:percent source
    stage: str
    run_name: str
    params: dict[str, Any]          # what papermill injects (every non-default value + run_name)
    values: dict[str, Any]          # all parameter values the notebook will see
    sources: dict[str, str]         # parameter -> layer that set it (for --dry-run)
    needs: list[str] = field(default_factory=list)        # resolved job names
    need_runs: list[tuple[str, str]] = field(default_factory=list)  # (stage, run) of all needs
    timeout: int | None = None
    smoke: bool = False
    root: Path = field(default_factory=paths.project_root)
    naming: dict[str, Any] = field(default_factory=dict)  # values for run/needs templates (pre-smoke)
    resources: dict[str, Any] = field(default_factory=dict)  # partition/gpus/cpus/time/mem/account
    torchrun: int | None = None     # processes per node under torchrun (-m dfkd.launch); None: papermill
    alone: bool = False             # local:N: starts when nothing runs, nothing starts beside it

    def run_dir(self, runs_root: str | Path | None = None) -> Path:
        return paths.runs_dir(runs_root) / self.stage / self.run_name


def load_manifest(path: str | Path) -> list[Job]:
    """Parse and shape-check a manifest (no notebook is read here)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise BatchError(f"{path}: a manifest is a mapping with a `jobs:` list")
    extra = set(data) - {"jobs", "description", "resources"}
    if extra:
        raise BatchError(f"{path}: unknown top-level key(s) {sorted(extra)}")
    top_resources = _check_resources(data.get("resources"), f"{path}: top-level resources")
    jobs, seen = [], set()
    for i, raw in enumerate(data["jobs"]):
        where = f"{path}: job {i + 1}"
        if not isinstance(raw, dict):
            raise BatchError(f"{where}: each job is a mapping")
        unknown = set(raw) - _JOB_KEYS
        if unknown:
            raise BatchError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_JOB_KEYS)}")
        for key in ("name", "notebook", "stage"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise BatchError(f"{where}: `{key}` (a string) is required")
        name = raw["name"]
        if name in seen or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise BatchError(f"{where}: job name {name!r} is duplicated or not [A-Za-z0-9_.-]+")
        seen.add(name)
        if raw["stage"] not in STAGES:
            raise BatchError(f"{where} ({name}): stage {raw['stage']!r} is not one of {STAGES}")
        params = raw.get("params") or []
        params = [params] if isinstance(params, str) else params
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise BatchError(f"{where} ({name}): `grid` maps names to non-empty lists")
        if not isinstance(raw.get("set") or {}, dict):
            raise BatchError(f"{where} ({name}): `set` must be a mapping")
        needs = raw.get("needs") or []
        timeout = raw.get("timeout")
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
            raise BatchError(f"{where} ({name}): `timeout` is a positive number of seconds per cell")
        resources = {**top_resources, **_check_resources(raw.get("resources"), f"{where} ({name})")}
        torchrun = raw.get("torchrun")
        if torchrun is not None and (not isinstance(torchrun, int) or isinstance(torchrun, bool)
                                     or torchrun < 1 or raw["stage"] not in ("teacher", "distill")):
            raise BatchError(f"{where} ({name}): `torchrun` is a number of processes (>= 1), for "
                             "teacher or distill jobs only (they run `torchrun -m dfkd.launch`)")
        alone = raw.get("alone", False)
        if not isinstance(alone, bool):
            raise BatchError(f"{where} ({name}): `alone` is true or false (true: under --executor "
                             "local:N the job runs with nothing beside it, on every core)")
        jobs.append(Job(name=name, notebook=raw["notebook"], stage=raw["stage"],
                        run=str(raw.get("run") or name), params=list(params),
                        set=dict(raw.get("set") or {}), grid=grid,
                        needs=[needs] if isinstance(needs, str) else list(needs), timeout=timeout,
                        resources=resources, torchrun=torchrun, alone=alone))
    return jobs


def _check_resources(res, where: str) -> dict[str, Any]:
    if res is None:
        return {}
    if not isinstance(res, dict) or set(res) - set(RESOURCE_KEYS):
        raise BatchError(f"{where}: `resources` is a mapping with keys among {list(RESOURCE_KEYS)}")
    for k in ("gpus", "cpus"):
        if k in res and (not isinstance(res[k], int) or isinstance(res[k], bool) or res[k] < 0):
            raise BatchError(f"{where}: resources.{k} is a non-negative integer, got {res[k]!r}")
    return dict(res)


def _read_params_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BatchError(f"parameter file {path} does not exist")
    data = load_yaml(path)
    if data is None:
        return {}
    def flat(v) -> bool:   # a dict parameter (method_options) maps names to scalars
        return not isinstance(v, dict) or not any(isinstance(x, (dict, list)) for x in v.values())
    if not isinstance(data, dict) or not all(flat(v) for v in data.values()):
        raise BatchError(f"{path}: parameter files are flat `key: value` mappings (a dict parameter "
                         "such as method_options maps option names to scalars)")
    return data


def _declared_anywhere(root: Path, notebooks: Iterable[Path]) -> set[str]:
    """Parameter names declared by the given notebooks and every ``notebooks/*.py``."""
    names: set[str] = set()
    for nb in {*notebooks, *sorted((root / "notebooks").glob("*.py"))}:
        with contextlib.suppress(BatchError):  # e.g. an overview notebook without parameters
            names |= set(job_parameters(nb))
    return names


def resolve_jobs(manifest_path: str | Path, *, smoke: bool = False, sets=None, only: str | None = None,
                 root: str | Path | None = None) -> list[ResolvedJob]:
    """Expand, layer and validate every job; return the selected ones in dependency order.

    Raises :class:`BatchError` (naming the key, file and notebook) on any unknown key, type
    mismatch, bad template, duplicate run folder, unknown dependency or cycle.
    """
    root = Path(root).resolve() if root else paths.project_root()
    jobs = load_manifest(manifest_path)
    cli = parse_sets(sets)
    if "run_name" in cli:
        raise BatchError("run_name comes from each job's `run` template; do not --set it")
    base_path, smoke_path = root / "params" / "base.yaml", root / "params" / "smoke.yaml"
    base = _read_params_file(base_path) if base_path.is_file() else {}
    if smoke and not smoke_path.is_file():
        raise BatchError(f"--smoke needs {smoke_path}")
    smoke_params = _read_params_file(smoke_path) if smoke else {}
    nb_paths = {j.name: (root / j.notebook).resolve() for j in jobs}
    declared = {n: job_parameters(p) for n, p in nb_paths.items()}
    shared = [(base_path, base), (smoke_path, smoke_params)]
    if any(d for _, d in shared):
        known = _declared_anywhere(root, nb_paths.values())
        for p, d in shared:
            typos = sorted(set(d) - known)
            if typos:
                raise BatchError(f"{p}: key(s) {typos} are declared by no notebook (typo?)"
                                 + "".join(_moved_hint(t) for t in typos))

    resolved: list[ResolvedJob] = []
    for job in jobs:
        decl, nb = declared[job.name], nb_paths[job.name]
        fixed = [("params/base.yaml", base, False)]
        fixed += [(f, _read_params_file(root / f), True) for f in job.params]
        fixed += [("set", job.set, True)]
        combos = [dict(zip(job.grid, c)) for c in itertools.product(*job.grid.values())] or [{}]
        for combo in combos:
            # --set is the last word (e.g. `--smoke --set device=cuda` for a GPU smoke check);
            # it applies where declared, and a key no selected notebook declares fails below
            layers = fixed + [("grid", combo, True), ("params/smoke.yaml", smoke_params, False),
                              ("--set", cli, False)]
            values = {k: d for k, (_, d) in decl.items()}
            sources = dict.fromkeys(decl, "default")
            naming = None  # the values before --smoke: smoke runs keep the manifest's run names
            for label, layer, strict in layers:
                if label == "params/smoke.yaml":
                    naming = dict(values)
                for k, v in layer.items():
                    where = f"job {job.name!r} ({label}, notebook {job.notebook})"
                    if k not in decl:
                        if strict:
                            raise BatchError(f"{where}: unknown parameter {k!r}{_moved_hint(k)}; "
                                             f"the notebook declares {sorted(decl)}")
                        continue
                    if k == "run_name" and strict:
                        raise BatchError(f"{where}: run_name comes from the job's `run` template")
                    v, src = coerce(k, v, decl[k][0], where), label
                    if isinstance(v, dict) and isinstance(values.get(k), dict):
                        v = {**values[k], **v}   # method_options: merged key by key, later wins
                        src = label if sources[k] == "default" else f"{sources[k]} + {label}"
                    values[k] = v
                    sources[k] = src
                    if label == "--set":
                        naming[k] = values[k]
            if values.get("method_options"):   # the method's own options, before anything runs
                try:
                    values["method_options"] = config.check_method_options(
                        values.get("method", config.DistillConfig.method), values["method_options"])
                except config.ConfigError as e:
                    raise BatchError(f"job {job.name!r} (method_options from {sources['method_options']}, "
                                     f"notebook {job.notebook}): {e}") from None
            # string values of `set` may name other parameters, e.g. teacher_run: "r34_{dataset}"
            for k, v in job.set.items():
                if isinstance(values.get(k), str) and "{" in values[k] and sources.get(k) == "set":
                    try:
                        values[k] = values[k].format_map(naming)
                    except (KeyError, IndexError, ValueError) as e:
                        raise BatchError(f"job {job.name!r}: set {k}={v!r} names a parameter the "
                                         f"notebook does not declare: {e}") from e
            try:
                run_name = job.run.format_map(naming)
            except (KeyError, IndexError, ValueError) as e:
                raise BatchError(f"job {job.name!r}: run template {job.run!r} names a parameter "
                                 f"the notebook does not declare: {e}") from e
            if not re.fullmatch(r"[\w\-+=,][\w.\-+=,]*", run_name):  # safe in shells and URLs
                raise BatchError(f"job {job.name!r}: run name {run_name!r} is not a plain folder "
                                 "name (letters, digits, . _ - + = ,)")
            if "run_name" in decl:  # else a plain notebook: the runner records its completion
                values["run_name"], sources["run_name"] = run_name, "run"
            suffix = ",".join(f"{k}={v}" for k, v in combo.items())
            resolved.append(ResolvedJob(
                name=f"{job.name}[{suffix}]" if suffix else job.name, job=job.name, notebook=nb,
                stage=job.stage, run_name=run_name,
                params={k: v for k, v in values.items() if sources[k] != "default"},
                values=values, sources=sources, smoke=smoke, root=root, naming=naming,
                timeout=job.timeout or (SMOKE_CELL_TIMEOUT if smoke else None),
                resources=dict(job.resources), torchrun=job.torchrun, alone=job.alone))

    by_run: dict[tuple[str, str], str] = {}
    for r in resolved:
        key = (r.stage, r.run_name)
        if key in by_run:
            raise BatchError(f"jobs {by_run[key]!r} and {r.name!r} both write runs/{key[0]}/{key[1]}; "
                             "make the `run` template include the grid keys")
        by_run[key] = r.name
    _link_needs(jobs, resolved, by_run)
    ordered = _topological(resolved)
    if only:
        # a grid expansion's name has commas inside its brackets (job[method=fast,seed=0]): split outside them
        names = [n.strip() for n in re.split(r",(?![^\[]*\])", only) if n.strip()]
        if unmatched := [n for n in names if not any(n in (r.name, r.job) for r in resolved)]:
            raise BatchError(f"--only {', '.join(unmatched)!r} matches no job; jobs: {[r.name for r in resolved]}")
        ordered = [r for r in ordered if r.name in names or r.job in names]
    selected = {k for r in ordered for k in declared[r.job]}
    unknown = sorted(set(cli) - selected)
    if unknown:
        raise BatchError(f"--set: unknown parameter(s) {unknown}: declared by none of the notebooks "
                         f"of the selected jobs ({sorted({str(r.notebook.name) for r in ordered})})"
                         + "".join(_moved_hint(k) for k in unknown))
    return ordered


def _link_needs(jobs: list[Job], resolved: list[ResolvedJob], by_run) -> None:
    expansions: dict[str, list[ResolvedJob]] = {}
    for r in resolved:
        expansions.setdefault(r.job, []).append(r)
    needs_of = {j.name: j.needs for j in jobs}
    for r in resolved:
        for need in needs_of[r.job]:
            try:
                need = need.format_map(r.naming or r.values) if "{" in need else need
            except (KeyError, IndexError, ValueError) as e:
                raise BatchError(f"job {r.name!r}: `needs` entry {need!r} names an undeclared "
                                 f"parameter: {e}") from e
            if need in expansions:
                deps = [(d.stage, d.run_name) for d in expansions[need]]
            elif "/" in need and need.split("/", 1)[0] in STAGES:
                deps = [tuple(need.split("/", 1))]  # a run folder, maybe from another batch
            else:
                raise BatchError(f"job {r.name!r} needs {need!r}: no such job, and not a "
                                 f"<stage>/<run> folder")
            for dep in deps:
                if dep == (r.stage, r.run_name):
                    raise BatchError(f"job {r.name!r} needs itself")
                r.need_runs.append(dep)
                if dep in by_run:
                    r.needs.append(by_run[dep])
        r.need_runs, r.needs = list(dict.fromkeys(r.need_runs)), list(dict.fromkeys(r.needs))


def _topological(resolved: list[ResolvedJob]) -> list[ResolvedJob]:
    """Dependency order, otherwise manifest order (stable Kahn)."""
    pending, done, out = list(resolved), set(), []
    while pending:
        ready = [r for r in pending if all(n in done for n in r.needs)]
        if not ready:
            raise BatchError(f"dependency cycle among {[r.name for r in pending]}")
        out.append(ready[0])
        done.add(ready[0].name)
        pending.remove(ready[0])
    return out


# --------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------
def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "summary.json").is_file()


def default_runs_root(smoke: bool = False) -> Path:
    """``runs_dir()``; smoke runs go to ``runs_dir()/_smoke`` so they never shadow real runs."""
    return paths.runs_dir() / "_smoke" if smoke else paths.runs_dir()


@contextlib.contextmanager
def _environ(values: Mapping[str, str]):
    # the kernel inherits this process's environment; restore it so in-process callers (tests) see no change
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_papermill():
    """Drop papermill's re-inspection warnings: its line regex misreads valid parameter lines
    (e.g. a quote inside a comment) and then calls their names unknown; we validated with ast."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Unable to parse line", "Passed unknown parameter"))

    loggers = [logging.getLogger(n) for n in ("papermill", "papermill.translators")]
    for lg in loggers:
        lg.addFilter(keep)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(keep)


def _error_text(e: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError
    if isinstance(e, PapermillExecutionError):
        tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(e.traceback or []))
        return (f"{e.ename}: {e.evalue}\n\nin cell {e.cell_index} (In [{e.exec_count}]):\n"
                f"{e.source}\n\n{tb}\n")
    return f"{type(e).__name__}: {e}\n"


def run_job(job: ResolvedJob, *, runs_root: str | Path | None = None, force: bool = False,
            figures_root: str | Path | None = None, log=_log, if_locked: str = "wait",
            env: Mapping[str, str] | None = None) -> str:
    """Execute one job unless its run is finished; return DONE, SKIPPED, FAILED or LOCKED.

    Every executor runs a job through this function. It holds the run folder's exclusive lock
    (:mod:`dfkd.runlock`) while it executes; a run locked by another process is waited for
    (``if_locked="wait"``, then skipped if that process finished it) or skipped (``"skip"`` ->
    LOCKED), with a message naming the holder. ``env`` is added to the kernel's environment
    (``CUDA_VISIBLE_DEVICES``, thread counts). ``force`` deletes the run folder first (a fresh
    run, not a resume; the executor's ``slurm/`` logs are kept). A failure keeps the partial
    ``executed.ipynb`` and writes ``FAILED`` with the error text.
    """
    from dfkd import runlock

    runs_root = Path(runs_root).resolve() if runs_root else default_runs_root(job.smoke).resolve()
    run_dir = job.run_dir(runs_root)
    if is_finished(run_dir) and not force:
        log(f"  {job.name}: finished run {run_dir} exists -> skipped")
        return SKIPPED
    lock = runlock.RunLock(run_dir, what=f"dfkd.batch job {job.name}")
    try:
        lock.acquire(wait=if_locked != "skip", log=log)
    except runlock.RunLocked as e:
        log(f"  {job.name}: {e} -> skipped (--if-locked skip)")
        return LOCKED
    try:
        if is_finished(run_dir) and (not force or lock.waited):  # two --force: one re-run
            log(f"  {job.name}: finished by another process meanwhile ({run_dir}) -> skipped")
            return SKIPPED
        return _run_locked(job, run_dir, runs_root, force=force, figures_root=figures_root, log=log,
                           env={**(env or {}), **lock.env})
    finally:
        lock.release()


LOG_DIR = "slurm"  # submitit's logs inside a run folder (kept by --force)


def _run_locked(job: ResolvedJob, run_dir: Path, runs_root: Path, *, force: bool, figures_root,
                log, env: Mapping[str, str]) -> str:
    import jupytext
    import nbformat
    import papermill

    if force and run_dir.exists():  # --force means from scratch: a kept state/last.pt would resume
        for child in run_dir.iterdir():
            if child.name != LOG_DIR:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    resumed = run_dir.exists() and any(c.name != LOG_DIR for c in run_dir.iterdir())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").unlink(missing_ok=True)
    if figures_root is None and job.smoke:
        figures_root = runs_root / "_figures"  # smoke runs never overwrite committed figures
    env = {"TQDM_DISABLE": "1", "DFKD_RUNS": str(runs_root),
           # not Agg: the inline backend is headless too and keeps figures in executed.ipynb
           "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences debugpy's frozen-modules warning
           **env}
    if figures_root is not None:
        env["DFKD_FIGURES"] = str(Path(figures_root).resolve())
    output = run_dir / "executed.ipynb"
    error = None
    if job.torchrun:
        log(f"  {job.name}: {'resuming' if resumed else 'running'} torchrun x{job.torchrun} "
            f"-m dfkd.launch {job.stage} -> {run_dir}")
        error = _run_torchrun(job, run_dir, runs_root, env)
    else:
        log(f"  {job.name}: {'resuming' if resumed else 'running'} {job.notebook.name} -> {run_dir}")
        with tempfile.TemporaryDirectory(prefix="dfkd-batch-") as tmp:
            src = Path(tmp) / f"{job.notebook.stem}.ipynb"
            nbformat.write(jupytext.read(job.notebook), src)  # keeps the `parameters` tag
            try:
                with _environ(env), _quiet_papermill():
                    papermill.execute_notebook(
                        str(src), str(output), parameters=job.params, kernel_name="python3",
                        language="python", cwd=str(job.root), log_output=False, progress_bar=False,
                        execution_timeout=job.timeout, config=kernel_config(Path(tmp)))
            except Exception as e:  # KeyboardInterrupt propagates: the run stays "interrupted"
                error = _error_text(e)
            _record_source(output, job)
    if error is None and "run_name" not in job.values:
        # a notebook without run_name cannot know its folder: record completion for it
        _write_text(run_dir / "summary.json", json.dumps(
            {"executed_by": "dfkd.batch", "notebook": job.notebook.name}, indent=2) + "\n")
    if error is None and not is_finished(run_dir):
        error = (f"the notebook ran to the end but wrote no {run_dir / 'summary.json'}: it must call "
                 f"dfkd.tracking.start_run({job.stage!r}, run_name, cfg) and run.finish(summary), "
                 "with the runs root taken from $DFKD_RUNS (the default)\n")
    if error is not None:
        _write_text(run_dir / "FAILED", error)
        log(f"  {job.name}: FAILED ({error.splitlines()[0]}); see {run_dir / 'FAILED'} and {output}")
        return FAILED
    return DONE


def kernel_config(socket_dir: Path):
    """The kernel's transport: Unix sockets in ``socket_dir`` (POSIX), TCP elsewhere.

    Over TCP, jupyter_client picks five free ports, closes them and hands them to the kernel; a
    kernel started in that gap by another process (two jobs of ``--executor local:2``, a Jupyter
    server, pytest-xdist's workers) can take one, and the first kernel dies with "Kernel died
    before replying to kernel_info" (CI of 2026-12-07, the smoke batch's ``zskt`` job). Sockets in
    a folder of the job's own cannot collide. TCP where that cannot work: on Windows (no IPC
    transport in zmq) and where the folder's path is too long for a Unix socket's address (107
    bytes on Linux; the kernel would die binding ``<folder>/kernel-<n>``).
    """
    import zmq
    from traitlets.config import Config
    prefix = str(Path(socket_dir).resolve() / "kernel")
    if os.name == "nt" or len(os.fsencode(prefix)) + 4 > getattr(zmq, "IPC_PATH_MAX_LEN", 103):
        return Config()
    return Config({"KernelManager": {"transport": "ipc", "ip": prefix}})


def torchrun_command(job: ResolvedJob, params_file: Path, runs_root: Path) -> list[str]:
    """The command of a ``torchrun:`` job: one node, ``job.torchrun`` processes, ``dfkd.launch``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={job.torchrun}", "-m", "dfkd.launch", job.stage,
            "--params", str(params_file), "--runs-dir", str(runs_root), "--no-progress"]


def _run_torchrun(job: ResolvedJob, run_dir: Path, runs_root: Path, env: Mapping[str, str]) -> str | None:
    import subprocess
    params_file = run_dir / "torchrun_params.yaml"
    _write_text(params_file, yaml.safe_dump(dict(job.values), sort_keys=True))
    cmd = torchrun_command(job, params_file, runs_root)
    with open(run_dir / "torchrun.log", "w") as out:
        rc = subprocess.run(cmd, cwd=str(job.root), env={**os.environ, **env}, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    if rc == 0:
        return None
    tail = "".join((run_dir / "torchrun.log").read_text().splitlines(True)[-40:])
    return f"torchrun exited with status {rc}: {' '.join(cmd)}\n\n{tail}"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a half-written summary.json would mark a run finished


def _record_source(output: Path, job: ResolvedJob) -> None:
    # papermill records the temporary .ipynb as input; point it at the committed source instead
    if not output.is_file():
        return
    with contextlib.suppress(Exception):
        nb = json.loads(output.read_text())
        nb.setdefault("metadata", {}).setdefault("papermill", {})["input_path"] = str(
            job.notebook.relative_to(job.root) if job.notebook.is_relative_to(job.root) else job.notebook)
        output.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _describe(job: ResolvedJob, runs_root: Path) -> str:
    d = job.run_dir(runs_root)
    state = ("finished -> skip" if is_finished(d) else "failed -> re-run" if (d / "FAILED").exists()
             else "interrupted -> resume" if d.exists() else "new")
    rel = job.notebook.relative_to(job.root) if job.notebook.is_relative_to(job.root) else job.notebook
    lines = [f"{job.name}", f"    notebook: {rel}", f"    run:      {d}  ({state})"]
    if job.need_runs:
        lines.append(f"    needs:    {', '.join(f'{s}/{r}' for s, r in job.need_runs)}")
    if job.timeout:
        lines.append(f"    timeout:  {job.timeout} s per cell")
    if job.resources:
        lines.append(f"    resources: {', '.join(f'{k}={v}' for k, v in job.resources.items())}")
    if job.torchrun:
        lines.append(f"    torchrun: {job.torchrun} processes (-m dfkd.launch {job.stage})")
    if job.alone:
        lines.append("    alone:    nothing runs beside it under --executor local:N")
    width = max((len(k) for k in job.params), default=0)
    lines += [f"      {k:<{width}} = {v!r:<24} # {job.sources[k]}" for k, v in job.params.items()]
    return "\n".join(lines)


def run_batch(manifest_path: str | Path, *, smoke: bool = False, sets=None, only: str | None = None,
              runs_root: str | Path | None = None, dry_run: bool = False, force: bool = False,
              root: str | Path | None = None, figures_root: str | Path | None = None,
              log=_log, executor: str = "local", if_locked: str = "wait",
              resources: Mapping[str, Any] | None = None, wait: bool | None = None,
              slurm_cluster: str = "slurm") -> dict[str, str]:
    """Validate everything, then run the jobs on ``executor``; return ``{job name: status}``.

    ``executor``: ``local`` (one after the other, in this process), ``local:N`` (up to N at once,
    each in its own process with its own GPU(s) or share of the cores) or ``slurm`` (one
    submitit/SLURM job per run, ``needs`` as ``afterok`` dependencies; returns after submission
    unless ``wait``). ``resources`` (partition, gpus, cpus, time, mem, account) win over the
    manifest's. See :mod:`dfkd.executors`.
    """
    from dfkd import executors

    kind, n_workers = executors.parse_executor(executor)
    if if_locked not in ("wait", "skip"):
        raise BatchError(f"--if-locked {if_locked!r}: wait or skip")
    jobs = resolve_jobs(manifest_path, smoke=smoke, sets=sets, only=only, root=root)
    cli_res = _check_resources(dict(resources or {}), "--resources")
    for j in jobs:
        j.resources.update(cli_res)
    runs_root = Path(runs_root).resolve() if runs_root else default_runs_root(smoke).resolve()
    log(f"{len(jobs)} job(s) from {manifest_path}; runs root {runs_root}; executor {executor}")
    if only:  # needed runs that this batch does not make must already be finished
        missing = sorted({need for j in jobs for need in blocked_by(j, jobs, {}, runs_root)})
        if missing:
            raise BatchError(f"--only {only}: needed run(s) not finished under {runs_root}: "
                             f"{', '.join(missing)}; run those jobs first")
    if dry_run:
        for job in jobs:
            log(_describe(job, runs_root))
        return dict.fromkeys((j.name for j in jobs), PLANNED)
    kw = dict(runs_root=runs_root, force=force, figures_root=figures_root, log=log,
              if_locked=if_locked)
    if kind == "slurm":
        return executors.submit_slurm(jobs, wait=bool(wait), cluster=slurm_cluster, **kw)
    if kind == "pool":
        status, seconds = executors.run_pool(jobs, n_workers, **kw)
        log(_summary_table(jobs, status, seconds, runs_root))
        return status
    status: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for i, job in enumerate(jobs, 1):
        log(f"[{i}/{len(jobs)}] {job.name}")
        why = blocked_by(job, jobs, status, runs_root)
        if why:
            log(f"  {job.name}: blocked (needs {', '.join(why)} which failed or are missing)")
            status[job.name] = BLOCKED
            continue
        t0 = time.perf_counter()
        status[job.name] = run_job(job, **kw)
        seconds[job.name] = time.perf_counter() - t0
    log(_summary_table(jobs, status, seconds, runs_root))
    return status


def blocked_by(job: ResolvedJob, jobs: list[ResolvedJob], status: Mapping[str, str],
               runs_root: Path) -> list[str]:
    """Needs of ``job`` that failed, were blocked or skipped as locked in this batch, or that are
    not part of the batch and not finished (empty: ``job`` may run once its needs are done)."""
    bad = [n for n in job.needs if status.get(n) in (FAILED, BLOCKED, LOCKED)]
    in_batch = {(j.stage, j.run_name) for j in jobs}
    absent = [f"{s}/{r}" for s, r in job.need_runs
              if (s, r) not in in_batch and not is_finished(runs_root / s / r)]
    return bad + absent


def _summary_table(jobs, status, seconds, runs_root) -> str:
    w = max([len(j.name) for j in jobs] + [3])
    rows = [f"\n{'job':<{w}}  {'status':<8} {'seconds':>8}  run"]
    for j in jobs:
        t = f"{seconds[j.name]:.1f}" if j.name in seconds else "-"
        rows.append(f"{j.name:<{w}}  {status[j.name]:<8} {t:>8}  {j.run_dir(runs_root)}")
    counts = {s: list(status.values()).count(s) for s in (DONE, SKIPPED, FAILED, BLOCKED, LOCKED)}
    counts = {s: n for s, n in counts.items() if n or s != LOCKED}
    rows.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; 0 = all done or skipped, 1 = a job failed or was blocked, 2 = invalid input."""
    ap = argparse.ArgumentParser(prog="python -m dfkd.batch", description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", help="batches/*.yaml")
    ap.add_argument("--smoke", action="store_true", help="put params/smoke.yaml on top of the manifest")
    ap.add_argument("--only", metavar="JOB[,JOB...]", help="run these jobs (names or grid expansions, "
                    "comma-separated) only; what they need must be among them or finished")
    ap.add_argument("--runs-dir", metavar="DIR", help="runs root (default $DFKD_RUNS or runs/; "
                    "with --smoke runs/_smoke)")
    ap.add_argument("--figures-dir", metavar="DIR", help="sets DFKD_FIGURES for the notebooks")
    ap.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override a parameter of every job that declares it (YAML scalar; wins "
                    "over everything, params/smoke.yaml included)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the jobs; run nothing")
    ap.add_argument("--force", action="store_true", help="delete and re-run finished runs")
    ap.add_argument("--root", metavar="DIR", help="project root (default: this checkout)")
    ex = ap.add_argument_group("executors (README: SLURM and several GPUs)")
    ex.add_argument("--executor", default="local", metavar="local|local:N|slurm",
                    help="local: one job after the other (default); local:N: up to N at once, each "
                    "with its own GPU (CUDA_VISIBLE_DEVICES) or share of the cores; slurm: one "
                    "SLURM job per run through submitit, needs -> afterok dependencies")
    ex.add_argument("--if-locked", choices=("wait", "skip"), default="wait",
                    help="a run folder locked by another process: wait for it (default) or skip it")
    ex.add_argument("--status", action="store_true", help="show planned/running/done/failed/"
                    "blocked per job and its run folder (any executor); run nothing")
    ex.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and print the "
                    "final table (default: exit after submission; see --status)")
    ex.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default="slurm",
                    help="submitit cluster behind --executor slurm: local/debug run the same "
                    "submission path on this machine (tests; no sbatch)")
    for k, h in (("partition", "SLURM partition"), ("gpus", "GPUs per job"),
                 ("cpus", "CPUs per job"), ("time", "time limit (minutes or [D-]HH:MM:SS)"),
                 ("mem", "memory per job (e.g. 32G)"), ("account", "SLURM account")):
        ex.add_argument(f"--{k}", type=int if k in ("gpus", "cpus") else str, default=None,
                        help=f"{h}; wins over the manifest's `resources:`")
    args = ap.parse_args(argv)
    res = {k: getattr(args, k) for k in RESOURCE_KEYS if getattr(args, k) is not None}
    try:
        if args.status:
            from dfkd import executors
            executors.print_status(args.manifest, smoke=args.smoke, sets=args.sets, only=args.only,
                                   runs_root=args.runs_dir, root=args.root)
            return 0
        status = run_batch(args.manifest, smoke=args.smoke, sets=args.sets, only=args.only,
                           runs_root=args.runs_dir, dry_run=args.dry_run, force=args.force,
                           root=args.root, figures_root=args.figures_dir, executor=args.executor,
                           if_locked=args.if_locked, resources=res, wait=args.wait,
                           slurm_cluster=args.slurm_cluster)
    except (BatchError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(s in (FAILED, BLOCKED) for s in status.values()) else 0


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: jobs pickled for submitit and the errors
    # raised by dfkd.executors must be dfkd.batch's classes
    from dfkd import batch as _batch
    sys.exit(_batch.main())
