"""Tables and curves of the laptop protocol (``batches/laptop.yaml``) from its run folders.

    python -m dfkd.protocol                      # every part whose runs exist, into figures/
    python -m dfkd.protocol --part toy --out runs/laptop_report

Per part (``toy``: the embedded set at 32 px; ``cub``: CUB-200 classes 1-50 at 64 px, both at equal
steps; ``cub_time``: the CUB part at equal wall time with a distillation tail, ``batches/laptop_time.yaml``;
``cub_time_bf16``: the same in bf16; ``cub_time_bf16_xeon``: its main lines again on an Intel Xeon) it writes
``laptop_<part>_table.md`` (per method: last-epoch top-1 mean and std over seeds, best-epoch mean,
the share of the teacher and of the supervised student, the budget in images and steps, wall time)
and ``laptop_<part>_curves.png`` (student top-1 against wall time, one line per run). Parts whose
runs are missing are skipped with a message (the protocol is resumable across sessions).
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from . import paths, report, tracking

# issue 9 fixes a teacher of at least this top-1 per dataset for comparability; a table whose
# teacher ended under it says so (the CUB recipe's last epoch moves by about a point with the CPU's
# float kernels: 45.57 % on an Intel Xeon, 44.64 % on an AMD EPYC, both fp32 on two threads)
TEACHER_FLOOR = {"toy": 90.0, "cub": 45.0}

# the protocol fixes each run's iterations, not its time (the loop has no wall-time budget)
EQUAL_STEPS = ("\nEvery run of a part has the same steps (G/S steps); the time column is each method's "
               "mean wall time: methods are compared at equal steps, not at equal time.\n")
# batches/laptop_time.yaml sets each method's iterations so that its runs take about the same time
EQUAL_TIME = ("\nEach method's iteration count was set so that its runs take about the same wall time, each "
              "alone on every core (the time column); the steps differ: methods are compared at equal time, "
              "not at equal steps.\n")

# batches/laptop_time.yaml's runs since 2026-12-07's fourteenth session
TAIL = ("\nEvery run synthesises (G and S steps) for its first iterations only, then freezes the generator "
        "and its pool and runs student steps alone (`g_stop`, docs/decisions.md 'A distillation tail'): the G/S "
        "steps column counts both phases.\n")

# the KL-only line's name in both equal-time parts' tables and curves (its runs: ..._dfkd_fgvc_kl_s<seed>),
# and what it is, said once for both parts' notes
KL_ONLY = "dfkd_fgvc, Eq. 11 as KL only"
KL_SAM = KL_ONLY + ", with the SAM"       # the same line with the paper's SAM on (runs ..._dfkd_fgvc_klsam_s<seed>)
KL_T4 = KL_ONLY + ", KD temperature 4"   # the same line at kd_T 4 (runs ..._dfkd_fgvc_klT4_s<seed>)
G01 = "dfkd_fgvc, Eq. 11 with gamma 0.1"   # the whole Eq. 11 with a lighter SFCL (runs ..._dfkd_fgvc_g01_s<seed>)
KL_ONLY_IS = (f"`{KL_ONLY}` is the paper's method with its student loss reduced to the KL term (`use_mhad: false, "
              "use_sfcl: false`, Table 3's ablation switches)")

# batches/laptop_time.yaml's jobs cub_time_dfkd_fgvc_{kl,g01} (since 2026-12-07's fifteenth session)
VARIANTS = (f"\nThe line `dfkd_fgvc` keeps the whole Eq. 11 (beta 10, gamma 1); `{G01}` "
            f"keeps it with a lighter SFCL; {KL_ONLY_IS}. The three have the same synthesis: docs/decisions.md, "
            "'Eq. 11 in the tail'.\n")

# batches/laptop_time.yaml's jobs cub_time_bf16_* (since 2026-12-07's sixteenth session)
BF16 = ("\nEvery run computes in bf16 (`amp: native`: bf16 autocast and channels_last networks on a CPU with "
        "bf16 instructions; the fp32 runs are part cub_time), and each method's iteration count was set from its "
        f"own bf16 iteration times: docs/decisions.md, 'The CUB part in bf16'. {KL_ONLY_IS}; its SAM is off (`lam: 0`), "
        f"and `{KL_SAM}` is the same line with the paper's attention generator (`lam: 0.05`, "
        f"since the seventeenth session); `{G01}` keeps the whole Eq. 11 with a lighter SFCL and its fp32 job's synthesis "
        "share (`g_stop` 0.4). `dfq`, `cmi` and `dafl` (one seed each) synthesise for the same share "
        "of their iterations as the KL-only line (`g_stop` 0.3), `fast` for its fp32 job's (0.36).\n")

# batches/laptop_time.yaml's jobs cub_xeon_* (since 2026-12-08's eighteenth session)
XEON = ("\nThe bf16 part's jobs (the same parameters and iterations; part cub_time_bf16 ran on an AMD EPYC) on a "
        "2-core Intel Xeon with AMX-BF16, whose teacher (the same job) ends above the 45 % floor: docs/decisions.md, "
        f"'The CUB part on an Intel Xeon'. {KL_ONLY_IS}; `{KL_T4}` is the same line with the KD temperature 4 "
        "(`kd_T`, Eq. 2; the paper gives none, 1 elsewhere).\n")

PARTS = {
    # since 2026-12-06's eighth session the embedded teacher is adversarially trained (adv_eps 1.0,
    # docs/decisions.md); the standard teacher's runs stay readable as part toy_standard
    "toy": {"prefix": "laptop_toy100r_m_", "teacher": "laptop_toy_teacher_r", "supervised": "laptop_toy_student",
            "title": "embedded set, 32 px, 2 CPU cores, robust teacher"},
    "toy_standard": {"prefix": "laptop_toy100_m_", "teacher": "laptop_toy_teacher",
                     "supervised": "laptop_toy_student",
                     "title": "embedded set, 32 px, 2 CPU cores, standard teacher (before 2026-12-06, eighth)"},
    # since 2026-12-07's tenth session the CUB teacher is adversarially fine-tuned (adv_eps 1.0, one
    # step) and the generator has ngf 16 and 6 steps per iteration; the earlier runs: part cub_standard
    "cub": {"prefix": "laptop_cub16r_m_", "teacher": "laptop_cub_teacher_r", "supervised": "laptop_cub_student",
            "title": "CUB-200 classes 1-50, 64 px, 2 CPU cores, robust teacher"},
    # batches/laptop_time.yaml: the CUB part at equal wall time; since 2026-12-07's fourteenth session
    # every run ends with a distillation tail (g_stop); the thirteenth session's runs without it: cub_time_notail
    "cub_time": {"prefix": "laptop_cubtail_m_", "teacher": "laptop_cub_teacher_r", "supervised": "laptop_cub_student",
                 "title": "CUB-200 1-50, 64 px, 2 CPU cores, equal wall time, with tail",
                 "compare": "time", "note": TAIL + VARIANTS,
                 "labels": {"dfkd_fgvc_kl": KL_ONLY,
                            "dfkd_fgvc_g01": G01}},
    # since 2026-12-07's sixteenth session: the same comparison in bf16 (amp native) on a CPU with bf16
    # instructions, each method's iterations set again from its bf16 iteration times
    "cub_time_bf16": {"prefix": "laptop_cubbf16_m_", "teacher": "laptop_cub_teacher_r",
                      "supervised": "laptop_cub_student", "compare": "time", "note": TAIL + BF16,
                      "title": "CUB-200 1-50, 64 px, 2 CPU cores, equal wall time, with tail, bf16",
                      "labels": {"dfkd_fgvc_kl": KL_ONLY, "dfkd_fgvc_klsam": KL_SAM,
                                 "dfkd_fgvc_g01": G01}},
    # since 2026-12-08's eighteenth session: the bf16 part's main lines on a 2-core Intel Xeon (AMX-BF16)
    "cub_time_bf16_xeon": {"prefix": "laptop_cubx_m_", "teacher": "laptop_cub_teacher_r",
                           "supervised": "laptop_cub_student", "compare": "time", "note": TAIL + XEON,
                           "title": "CUB-200 1-50, 64 px, 2 Xeon cores, equal wall time, with tail, bf16",
                           "labels": {"dfkd_fgvc_kl": KL_ONLY, "dfkd_fgvc_klT4": KL_T4}},
    "cub_time_notail": {"prefix": "laptop_cubtime_m_", "teacher": "laptop_cub_teacher_r",
                        "supervised": "laptop_cub_student", "compare": "time",
                        "title": "CUB-200 1-50, 64 px, 2 CPU cores, equal wall time, no tail"},
    "cub_standard": {"prefix": "laptop_cub_m_", "teacher": "cpu_cub_effl0_64", "supervised": "laptop_cub_student",
                     "title": "CUB-200 classes 1-50, 64 px, 2 CPU cores, standard teacher (before 2026-12-07, tenth)"},
}


def _teacher_top1(name: str, runs_root) -> float | None:
    p = tracking.run_path("teacher", name, runs_root) / "summary.json"
    return tracking.read_json(p).get("top1_last") if p.exists() else None


def teacher_warning(part: str, top1: float | None, run: str) -> str:
    """A sentence when the part's teacher is missing or under issue 9's floor for its dataset
    (the students' shares of it are then not comparable with other tables); '' otherwise."""
    dataset = part.split("_")[0]   # toy, cub (their _standard parts too)
    floor = TEACHER_FLOOR.get(dataset)
    if floor is None:
        return ""
    if top1 is None:
        return f"teacher run `{run}` has not finished: the table has no teacher reference."
    if top1 < floor:
        return (f"teacher `{run}` ended at {top1:.2f} %, under the {floor:.0f} % that issue 9 fixes "
                f"for comparability; retrain it (`python -m dfkd.batch batches/laptop.yaml --only "
                f"{dataset}_teacher --force`, alone on every core) or read these shares against that "
                f"teacher.")
    return ""


def line_label(spec: dict, row: dict) -> str:
    """A run's line in its part's table and curves: the run name without the part's prefix and its
    ``_s<seed>``; named by the part's ``labels`` where it differs from the method (a variant of one
    method, e.g. ``dfkd_fgvc_kl``), otherwise the method."""
    key = re.sub(r"_s\d+$", "", row["run"][len(spec["prefix"]):])
    method = row["summary"].get("method") or row["params"].get("method") or key
    return method if key == method else spec.get("labels", {}).get(key, key)


def write_part(part: str, out: Path, runs_root=None) -> list[Path]:
    """Write the table and the curves of one part; [] when none of its runs has finished."""
    spec = PARTS[part]
    rows = [r for r in report.collect_runs("distill", runs_root=runs_root)
            if r["run"].startswith(spec["prefix"])]
    if not rows:
        print(f"protocol: no finished runs named {spec['prefix']}* yet; run batches/laptop.yaml")
        return []
    ref = {}
    for key in ("teacher", "supervised"):
        v = _teacher_top1(spec[key], runs_root)
        if v is not None:
            ref["teacher" if key == "teacher" else "supervised student"] = v
    ref["chance"] = rows[0]["summary"].get("chance_top1", 0.0)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"laptop_{part}_table.md"
    line = {r["run"]: line_label(spec, r) for r in rows}   # a run's line in the table and the curves
    text = f"# Laptop protocol: {spec['title']}\n\n" + report.seed_table(
        rows, reference=ref, group=lambda r: line[r["run"]]) + (
        EQUAL_TIME if spec.get("compare") == "time" else EQUAL_STEPS) + spec.get("note", "")
    warning = teacher_warning(part, ref.get("teacher"), spec["teacher"])
    if warning:
        print(f"protocol: {warning}")
        text += f"\n**Warning.** {warning}\n"
    tracking.atomic_write_text(md, text)
    from . import figures
    runs = [tracking.Run(tracking.run_path("distill", r["run"], runs_root), write=False) for r in rows]
    seeds = Counter(line.values())
    label = {run: f"{m} ({seeds[m]} seed{'s' if seeds[m] > 1 else ''})" for run, m in line.items()}
    fig = figures.curves_figure(
        runs, y="test_top1", x="time_s", title=spec["title"], group=lambda r: label[r.name],
        xlabel="distillation wall time (s)", ylabel="student top-1 on the test split (%)")
    png = out / f"laptop_{part}_curves.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")   # the legend sits outside the axes
    return [md, png]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfkd.protocol", description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS) + ["all"], default="all")
    ap.add_argument("--out", default="", help="output folder (default: figures/)")
    ap.add_argument("--runs-dir", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else paths.project_root() / "figures"
    for part in (sorted(PARTS) if a.part == "all" else [a.part]):
        for p in write_part(part, out, a.runs_dir):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
