"""Run folders: ``runs/<stage>/<run_name>/`` with params, env, metrics, summary, weights, state.

Layout (the contract every notebook and figure reads)::

    params.yaml          resolved parameters
    env.json             versions, device, git commit
    metrics.csv          one row per log step (columns grow as new metrics appear)
    summary.json         final scalars; the only thing figures read for numbers
    weights/<name>.safetensors + <name>.json   tensors + sidecar (arch, classes, image size, ...)
    state/last.pt        full training state for resume, written atomically
    samples/             image grids
    executed.ipynb       written by the batch runner
    FAILED               present (with the error) when a batch job failed

Every file is written to a temporary name and renamed into place, so a killed run never leaves
a half-written checkpoint behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from . import paths
from .config import to_dict


# --------------------------------------------------------------------------------------------
# atomic file writes
# --------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it visible rather than crash
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except Exception:
            pass
    return v


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.project_root(),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except Exception:
        return ""


def environment(device: str | torch.device | None = None) -> dict:
    """Versions, device and git commit, for ``env.json``."""
    import torchvision
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device) if device is not None else "",
        "git_commit": git_commit(),
        "num_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    # versions from the installed distributions' metadata: importing the packages to read
    # __version__ cost about 5 s per process (papermill's jsonschema builds grammars at import)
    from importlib import metadata
    for key, dist_name in (("pytorch_grad_cam", "grad-cam"), ("papermill", "papermill"), ("sklearn", "scikit-learn")):
        try:
            env[key] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return env


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Run:
    """A run folder. Create with :func:`start_run`; open an existing one with ``Run(path)``."""

    def __init__(self, path: str | os.PathLike, *, write: bool = True):
        self.dir = Path(path)
        self.write = write  # False on non-zero DDP ranks: every write becomes a no-op
        self._metric_fields: list[str] | None = None

    # ---- locations ----
    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def weights_dir(self) -> Path:
        return self.dir / "weights"

    @property
    def samples_dir(self) -> Path:
        return self.dir / "samples"

    @property
    def state_path(self) -> Path:
        return self.dir / "state" / "last.pt"

    # ---- params / summary ----
    def params(self) -> dict:
        p = self.dir / "params.yaml"
        return yaml.safe_load(p.read_text()) if p.exists() else {}

    def summary(self) -> dict:
        p = self.dir / "summary.json"
        return read_json(p) if p.exists() else {}

    def is_finished(self) -> bool:
        return (self.dir / "summary.json").exists()

    # ---- metrics ----
    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row to ``metrics.csv`` (tensors are converted; new columns rewrite the header)."""
        if not self.write:
            return
        row = {k: _jsonable(v) for k, v in row.items()}
        path = self.dir / "metrics.csv"
        existing = self.metrics() if path.exists() else []
        fields = list(existing[0].keys()) if existing else []
        for k in row:
            if k not in fields:
                fields.append(k)
        if existing and fields != list(existing[0].keys()):
            # rare: a new metric appeared; rewrite the file with the widened header
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=fields)
            w.writeheader()
            for r in existing + [row]:
                w.writerow(r)
            atomic_write_text(path, buf.getvalue())
            return
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow(row)

    def metrics(self) -> list[dict]:
        """Rows of ``metrics.csv`` with numbers parsed (empty cells become None)."""
        path = self.dir / "metrics.csv"
        if not path.exists():
            return []
        rows = []
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                rows.append({k: _parse(v) for k, v in r.items()})
        return rows

    def truncate_metrics(self, keep) -> None:
        """Drop rows for which ``keep(row)`` is False (used on resume to forget rows past the checkpoint)."""
        if not self.write:
            return
        rows = self.metrics()
        if not rows:
            return
        kept = [r for r in rows if keep(r)]
        if len(kept) == len(rows):
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in kept:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
        atomic_write_text(self.dir / "metrics.csv", buf.getvalue())

    # ---- weights ----
    def save_weights(self, name: str, module_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
                     meta: Mapping[str, Any]) -> Path:
        """Write ``weights/<name>.safetensors`` and its JSON sidecar ``weights/<name>.json``."""
        path = self.weights_dir / f"{name}.safetensors"
        if self.write:
            save_weights(path, module_or_state, meta)
        return path

    # ---- resume state ----
    def save_state(self, state: Mapping[str, Any]) -> None:
        """Full training state to ``state/last.pt`` (tensors and primitives only), atomically."""
        if self.write:
            atomic_torch_save(dict(state), self.state_path)

    def load_state(self, map_location="cpu") -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            return torch.load(self.state_path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot read the resume state {self.state_path}: {e}. Delete that file "
                               "to restart the run from scratch.") from e

    # ---- finish ----
    def finish(self, summary: Mapping[str, Any]) -> dict:
        """Write ``summary.json`` (marks the run finished) and remove a stale FAILED marker."""
        summary = dict(summary)
        if self.write:
            write_json(self.dir / "summary.json", summary)
            (self.dir / "FAILED").unlink(missing_ok=True)
            from . import runlock
            runlock.unhold(self.dir)  # the lock start_run took (no-op under the batch runner)
        return summary

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"


def _parse(v: str):
    if v == "" or v is None:
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def run_path(stage: str, run_name: str, runs_root=None) -> Path:
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"run_name {run_name!r} must be a plain folder name (no '/', not empty)")
    return paths.runs_dir(runs_root) / stage / run_name


def epochs_changed_message(run_dir, old, new) -> str:
    """Why a run cannot be resumed with another ``epochs``, and what to do instead."""
    return (f"run {Path(run_dir).name!r} ({run_dir}) was started with epochs={old!r} and cannot be "
            f"resumed with epochs={new!r}: its learning-rate schedules were fixed for {old!r} epochs "
            f"when it started (a restored cosine schedule would climb again past its end). Resume "
            f"with epochs={old!r}, or start a new run_name for {new!r} epochs.")


def start_run(stage: str, run_name: str, cfg=None, *, runs_root=None, device=None,
              write: bool = True) -> Run:
    """Create (or reopen, for resume) ``runs/<stage>/<run_name>`` and write params.yaml and env.json.

    Reopening a run whose ``params.yaml`` differs in a parameter that changes the result raises,
    naming the parameters, so a resumed run never mixes two configurations silently.
    """
    run = Run(run_path(stage, run_name, runs_root), write=write)
    if write:  # one run, one writer: a second writer raises naming the holder (dfkd.runlock)
        from . import runlock
        runlock.hold(run.dir)
    if cfg is not None and write:
        new = to_dict(cfg) if not isinstance(cfg, Mapping) else dict(cfg)
        old = run.params()
        if old and run.state_path.exists():
            # only the knobs that do not change the math may differ on resume; ``epochs`` is not
            # one of them: it fixes the learning-rate schedules (the student's cosine T_max, the
            # teacher's cosine/one-cycle total) when the run starts
            free = {"device", "interactive", "num_workers", "log_every", "data_root",
                    "max_eval_batches", "compile", "test_batch_size"}
            diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
            if "epochs" in diff:
                raise RuntimeError(epochs_changed_message(run.dir, old.get("epochs"), new.get("epochs")))
            if diff:
                raise RuntimeError(
                    f"run folder {run.dir} holds a resumable state made with other parameters "
                    f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}). "
                    "Choose another run_name, or delete that folder to start over.")
        run.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.dir / "params.yaml", yaml.safe_dump(new, sort_keys=True))
        write_json(run.dir / "env.json", environment(device))
    return run


def open_run(stage: str, run_name: str, runs_root=None) -> Run:
    """An existing run, or a clear error naming the folder that was expected."""
    path = run_path(stage, run_name, runs_root)
    if not path.is_dir():
        raise FileNotFoundError(f"no {stage} run named {run_name!r}: expected the folder {path}. "
                                f"Run notebooks/{'10_teacher_pretraining' if stage == 'teacher' else '30_distillation'}.py "
                                "first, or check the run name and DFKD_RUNS.")
    return Run(path)


# --------------------------------------------------------------------------------------------
# safetensors weights + JSON sidecar
# --------------------------------------------------------------------------------------------
def save_weights(path: str | os.PathLike, module_or_state, meta: Mapping[str, Any]) -> None:
    """Tensors to ``path`` (.safetensors) and ``meta`` to the sidecar ``path.with_suffix('.json')``."""
    from safetensors.torch import save as st_save
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    # safetensors refuses shared/non-contiguous storage; weights are small, so copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    atomic_write_bytes(path, st_save(tensors, metadata={"format": "pt"}))
    write_json(path.with_suffix(".json"), dict(meta))


def load_weights(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, sidecar)`` from a ``.safetensors`` file (sidecar is ``{}`` when absent)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = load_file(str(path), device=str(map_location))
    side = path.with_suffix(".json")
    return state, (read_json(side) if side.exists() else {})


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "weights",
              expected_arch: str | None = None, meta: Mapping[str, Any] | None = None) -> None:
    """``load_state_dict(strict=True)`` with an error that says which architecture the file is for."""
    if expected_arch and meta and meta.get("arch") and meta["arch"] != expected_arch:
        raise ValueError(f"{what} were saved for architecture {meta['arch']!r}, not {expected_arch!r}; "
                         f"build the model with arch={meta['arch']!r} or pick the matching weights")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        arch = (meta or {}).get("arch", "?")
        raise ValueError(f"{what} (saved for arch {arch!r}) do not fit this model "
                         f"({type(module).__name__}): {str(e).splitlines()[0]} ...") from e
