"""Comparison tables from run folders (Table 1/2-style rows with their equal-budget columns).

Scope: read finished runs (``runs/<stage>/<run>/summary.json`` + ``params.yaml``), flatten them into
rows, and render one markdown table (and a CSV) in which every row states its budget: images
generated and consumed, generator/student steps, teacher forward passes, wall-clock. Nothing here
trains or evaluates.

    rows = collect_runs("distill", names=["cub_dfq_s0", "cub_cmi_s0"])
    print(comparison_table(rows))
    write_table(rows, "figures/table1_cub")      # -> table1_cub.md + table1_cub.csv
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import paths
from .tracking import Run, atomic_write_text

__all__ = ["COLUMNS", "DEFAULT_COLUMNS", "collect_runs", "comparison_table", "seed_table", "table_rows", "write_table"]


def _summary(key: str) -> Callable[[dict], Any]:
    return lambda row: row["summary"].get(key)


def _budget(key: str) -> Callable[[dict], Any]:
    return lambda row: (row["summary"].get("budget") or {}).get(key)


def _gs_steps(row: dict) -> str | None:
    b = row["summary"].get("budget") or {}
    if "g_steps" not in b and "s_steps" not in b:
        return None
    return f"{b.get('g_steps', 0)}/{b.get('s_steps', 0)}"


# name -> (header, getter(row) -> value, format spec for numbers)
COLUMNS: dict[str, tuple[str, Callable[[dict], Any], str]] = {
    "run": ("run", lambda row: row["run"], ""),
    "method": ("method", lambda row: row["summary"].get("method") or row["params"].get("method"), ""),
    "dataset": ("dataset", _summary("dataset"), ""),
    "teacher_arch": ("teacher", _summary("teacher_arch"), ""),
    "student_arch": ("student", _summary("student_arch"), ""),
    "seed": ("seed", lambda row: row["params"].get("seed"), ""),
    "student_top1_last": ("student top-1 last (%)", _summary("student_top1_last"), ".2f"),
    "student_top1_best": ("student top-1 best (%)", _summary("student_top1_best"), ".2f"),
    "teacher_top1": ("teacher top-1 (%)", _summary("teacher_top1"), ".2f"),
    "images_generated": ("images generated", _budget("images_generated"), "d"),
    "images_consumed": ("images consumed", _budget("images_consumed"), "d"),
    "gs_steps": ("G/S steps", _gs_steps, ""),
    "g_steps": ("G steps", _budget("g_steps"), "d"),
    "s_steps": ("S steps", _budget("s_steps"), "d"),
    "iterations": ("iterations", _budget("iterations"), "d"),
    "teacher_forwards": ("teacher forwards", _budget("teacher_forwards"), "d"),
    "time_s": ("time (s)", _summary("time_s"), ".1f"),
    "ms_per_iteration": ("ms/iteration", _summary("ms_per_iteration"), ".1f"),
    "device": ("device", _summary("device"), ""),
}

DEFAULT_COLUMNS = ("method", "student_top1_last", "student_top1_best", "teacher_top1", "images_generated",
                   "images_consumed", "gs_steps", "teacher_forwards", "time_s", "ms_per_iteration")


def collect_runs(stage: str = "distill", runs_root=None, names: Iterable[str] | str | None = None) -> list[dict]:
    """Finished runs of ``stage`` as rows ``{"run", "dir", "params", "summary", "budget"}``.

    Args:
        stage: the runs sub-folder (``distill`` for the comparison tables).
        runs_root: root of the run folders (default ``$DFKD_RUNS`` or ``<project>/runs``).
        names: run names to take, in this order (a list or a comma-separated string); ``None``
            takes every finished run, sorted by name. A named run that does not exist or has not
            finished raises ``FileNotFoundError`` naming it (a table silently missing a row is worse).
    """
    root = paths.runs_dir(runs_root) / stage
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names is None:
        dirs = sorted(p for p in root.iterdir() if (p / "summary.json").is_file()) if root.is_dir() else []
    else:
        dirs = []
        for n in names:
            p = root / n
            if not (p / "summary.json").is_file():
                state = "has not finished (no summary.json)" if p.is_dir() else "does not exist"
                raise FileNotFoundError(f"{stage} run {n!r} {state}: expected {p / 'summary.json'}")
            dirs.append(p)
    rows = []
    for d in dirs:
        run = Run(d, write=False)
        summary = run.summary()
        rows.append({"run": d.name, "dir": str(d), "params": run.params(), "summary": summary,
                     "budget": dict(summary.get("budget") or {})})
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if spec == "d" and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if spec and isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _resolve(columns: Sequence[str]) -> list[tuple[str, Callable[[dict], Any], str]]:
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise KeyError(f"unknown column(s) {unknown}; known: {sorted(COLUMNS)}")
    return [COLUMNS[c] for c in columns]


def table_rows(rows: Sequence[dict], columns: Sequence[str] = DEFAULT_COLUMNS) -> list[dict[str, Any]]:
    """Raw (unformatted) values ``{column name: value}`` per row, e.g. for a DataFrame or CSV."""
    cols = _resolve(columns)
    return [{name: getter(row) for name, (_, getter, _) in zip(columns, cols)} for row in rows]


def comparison_table(rows: Sequence[dict], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """A markdown table, one line per row of :func:`collect_runs`, in the given order.

    Columns are names of :data:`COLUMNS` (default :data:`DEFAULT_COLUMNS`: method, student top-1
    last / best, teacher top-1, images generated, images consumed, G/S steps, teacher forwards,
    time s, ms/iteration). Counts get thousands separators, accuracies two decimals.
    """
    cols = _resolve(columns)
    header = "| " + " | ".join(h for h, _, _ in cols) + " |"
    align = "|" + "|".join("---:" if spec else ":---" for _, _, spec in cols) + "|"
    lines = [header, align]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(getter(row), spec) for _, getter, spec in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], path, columns: Sequence[str] = DEFAULT_COLUMNS) -> tuple[Path, Path]:
    """Write ``<path>.md`` (the markdown table) and ``<path>.csv`` (raw values, column names as
    header) atomically; a ``.md``/``.csv`` suffix on ``path`` is replaced. Returns both paths."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".md", ".csv") else path
    md, csv_path = base.with_name(base.name + ".md"), base.with_name(base.name + ".csv")
    atomic_write_text(md, comparison_table(rows, columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns))
    w.writeheader()
    for r in table_rows(rows, columns):
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    atomic_write_text(csv_path, buf.getvalue())
    return md, csv_path


def seed_table(rows: Sequence[dict], *, reference: dict[str, float] | None = None,
               group: Callable[[dict], str] | None = None) -> str:
    """One markdown line per method over its seeds: last-epoch top-1 mean and std, best-epoch
    mean, the seeds, the teacher, each method's share of every ``reference`` accuracy (e.g.
    ``{"teacher": 93.8, "supervised student": 92.0, "chance": 10.0}``) and the mean budget.

    ``group`` (a row to its line's label; default its method) keeps two variants of one method on
    lines of their own. The std is the sample std over seeds (0 with one seed). Lines keep the
    order in which they first appear in ``rows``."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        m = group(row) if group else row["summary"].get("method") or row["params"].get("method")
        groups.setdefault(m, []).append(row)
    reference = dict(reference or {})
    ref_cols = [k for k in reference if k != "chance"]
    header = (["method", "seeds", "top-1 last mean (%)", "std", "top-1 best mean (%)"]
              + [f"last / {k}" for k in ref_cols]
              + ["images generated", "images consumed", "G/S steps", "time (s)"])
    lines = ["| " + " | ".join(header) + " |", "|:---|:---|" + "---:|" * (len(header) - 2)]
    for m, rs in groups.items():
        last = [r["summary"]["student_top1_last"] for r in rs]
        best = [r["summary"]["student_top1_best"] for r in rs]
        mean = sum(last) / len(last)
        std = math.sqrt(sum((v - mean) ** 2 for v in last) / (len(last) - 1)) if len(last) > 1 else 0.0
        seeds = ",".join(str(r["params"].get("seed")) for r in rs)
        b = [r["summary"].get("budget") or {} for r in rs]
        avg = lambda k: sum(x.get(k, 0) for x in b) / len(b)   # noqa: E731
        t = sum(r["summary"].get("time_s", 0.0) for r in rs) / len(rs)
        cells = [m, seeds, f"{mean:.2f}", f"{std:.2f}", f"{sum(best) / len(best):.2f}"]
        cells += [f"{mean / reference[k]:.2f}" for k in ref_cols]
        cells += [f"{avg('images_generated'):,.0f}", f"{avg('images_consumed'):,.0f}",
                  f"{avg('g_steps'):.0f}/{avg('s_steps'):.0f}", f"{t:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if reference:
        lines.append("")
        lines.append("References: " + ", ".join(f"{k} {v:.2f} %" for k, v in reference.items()) + ".")
    return "\n".join(lines) + "\n"
