"""Report figures and tables built from run folders alone (notebooks 40, 50, 51, 52, 90).

Every function reads ``runs/<stage>/<run>/`` (summary.json, metrics.csv, weights, samples) and
returns a :class:`~dfkd.viz.style.PaperFigure` (a matplotlib Figure that Jupyter shows as an
image) or a list of table rows (:func:`markdown_table` turns them into a :class:`MarkdownTable`,
which Jupyter shows as a table); nothing depends on another notebook's in-memory state. ``dfkd.viz`` draws; this module decides what to draw for each paper artefact:

=============  ==========================================  ===================
paper          what                                        function
=============  ==========================================  ===================
Table 1/2      methods side by side, with their budgets    ``comparison_rows``
Table 3/4/5    loss terms, lambda, MHA order R             ``ablation_rows``
Fig. 7         beta and gamma sweeps                       ``sweep_figure``
Fig. 4         real images beside synthetic ones           ``synthetic_grid_figure``
Fig. 5         t-SNE of student features, 10 classes       ``tsne_figure``
Fig. 6         GradCAM of the student                      ``gradcam_figure``
=============  ==========================================  ===================
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import tracking
from .paths import runs_dir


# --------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------
def finished_runs(stage: str, names: Iterable[str] | None = None, *, runs_root=None,
                  prefix: str = "") -> list[tracking.Run]:
    """Finished runs of ``stage`` (all, those named, or those whose name starts with ``prefix``)."""
    base = runs_dir(runs_root) / stage
    if names:
        runs = [tracking.Run(base / n) for n in names]
        missing = [r.name for r in runs if not r.is_finished()]
        if missing:
            raise FileNotFoundError(f"no finished {stage} runs named {missing} under {base}; run them first "
                                    "(python -m dfkd.batch ...) or fix the names")
        return runs
    if not base.is_dir():
        return []
    return [tracking.Run(p) for p in sorted(base.iterdir())
            if p.is_dir() and p.name.startswith(prefix) and (p / "summary.json").exists()]


def dataset_cfg_of(run: tracking.Run, data_root: str = ""):
    """The :class:`~dfkd.config.DataConfig` a run was made with (its params.yaml), for real images."""
    import dataclasses
    from .config import DataConfig
    p = run.params()
    cfg = DataConfig(**{f.name: p[f.name] for f in dataclasses.fields(DataConfig) if f.name in p})
    if data_root:
        cfg.data_root = data_root
    cfg.num_workers, cfg.seed, cfg.batch_size, cfg.test_batch_size = 0, 0, 64, 64
    return cfg


def select_runs(stage: str, names: str = "", prefix: str = "", runs_root=None) -> list[tracking.Run]:
    """Runs named in ``names`` (comma-separated) if given, else those starting with ``prefix``."""
    return finished_runs(stage, split_names(names) or None, prefix=prefix, runs_root=runs_root)


def split_names(names: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (notebook parameters are flat literals)."""
    return [n.strip() for n in names.split(",") if n.strip()]


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def comparison_rows(runs: Sequence[tracking.Run]) -> list[dict]:
    """One row per distillation run: accuracy (last and best epoch) and its budget (Tables 1-2)."""
    rows = []
    for r in runs:
        s, p = r.summary(), r.params()
        b = s.get("budget", {})
        rows.append({"run": r.name, "method": s.get("method"), "dataset": s.get("dataset"),
                     "image_size": s.get("image_size"), "teacher": s.get("teacher_arch"),
                     "student": s.get("student_arch"), "teacher_top1": s.get("teacher_top1"),
                     "top1_last": s.get("student_top1_last"), "top1_best": s.get("student_top1_best"),
                     "images_generated": b.get("images_generated"), "images_consumed": b.get("images_consumed"),
                     "g_steps": b.get("g_steps"), "s_steps": b.get("s_steps"),
                     "teacher_forwards": b.get("teacher_forwards"), "time_s": s.get("time_s"),
                     "ms_per_iter": s.get("ms_per_iteration"), "seed": p.get("seed")})
    return rows


def ablation_rows(runs: Sequence[tracking.Run], keys: Sequence[str]) -> list[dict]:
    """Rows ``{key: value ..., top1_last, top1_best}`` for an ablation over ``keys`` (Tables 3-5)."""
    out = []
    for r in runs:
        p, s = r.params(), r.summary()
        out.append({**{k: p.get(k) for k in keys}, "run": r.name, "top1_last": s.get("student_top1_last"),
                    "top1_best": s.get("student_top1_best")})
    return sorted(out, key=lambda row: tuple(str(row[k]) for k in keys))


class MarkdownTable(str):
    """A GitHub markdown table: a ``str`` (print it, write it to a file) that Jupyter renders as a
    table when it is a cell's value or passed to ``display``."""

    def _repr_markdown_(self) -> str:
        return str(self)


def show_files(paths: Iterable) -> int:
    """Display what a report wrote, in Jupyter: each markdown table as a table and each PNG as an
    image under its file name (the PDF and CSV twins are skipped). Returns how many were shown."""
    from IPython.display import Image, display
    shown = 0
    for p in map(Path, paths):
        if p.suffix == ".png":
            display(MarkdownTable(f"`{p.name}`"))
            display(Image(filename=str(p)))
        elif p.suffix == ".md":
            display(MarkdownTable(p.read_text()))
        else:
            continue
        shown += 1
    return shown


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                   floatfmt: str = ".2f") -> MarkdownTable:
    """A GitHub markdown table of ``rows`` (floats formatted with ``floatfmt``)."""
    if not rows:
        return MarkdownTable("(no finished runs)")
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else str(v)
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return MarkdownTable("\n".join(lines))


def write_table(rows: Sequence[dict], path, columns: Sequence[str] | None = None) -> None:
    """``path.md`` (markdown) and ``path.csv`` for a table, written atomically."""
    import csv
    import io
    path = Path(path)
    tracking.atomic_write_text(path.with_suffix(".md"), markdown_table(rows, columns) + "\n")
    buf = io.StringIO()
    if rows:
        cols = list(columns or rows[0].keys())
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tracking.atomic_write_text(path.with_suffix(".csv"), buf.getvalue())


def _figure(size):
    """A :class:`~dfkd.viz.style.PaperFigure` outside pyplot: it has an image repr, so notebooks show
    it once as a PNG (as a cell's value, in JupyterLab and in executed.ipynb); scripts leak nothing."""
    from .viz.style import new_figure
    return new_figure(size)


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------
def curves_figure(runs: Sequence[tracking.Run], y: str = "test_top1", x: str = "epoch", title: str = "",
                  group=None, xlabel: str = "", ylabel: str = ""):
    """``y`` against ``x`` from each run's metrics.csv, one line per run. ``group`` (run -> label):
    runs of one label (a method's seeds) share a colour and one legend entry, the legend outside
    the axes; without it every run is its own entry."""
    fig = _figure((6.4, 3.6) if group else (5.0, 3.4))
    ax = fig.subplots()
    styles: dict[str, tuple[str, str]] = {}   # label -> (colour, line style): 10 colours, then dashed
    for r in runs:
        rows = [m for m in r.metrics() if m.get(y) is not None and m.get(x) is not None]
        if not rows:
            continue
        label = group(r) if group else r.name
        first = label not in styles
        if first:
            i = len(styles)
            styles[label] = (f"C{i % 10}", "-" if i < 10 else "--")
        colour, ls = styles[label]
        ax.plot([m[x] for m in rows], [m[y] for m in rows], marker="o", ms=3, color=colour, ls=ls,
                label=label if first else None)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title or y)
    if styles:
        if group:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_terms_figure(run: tracking.Run, prefixes: Sequence[str] = ("g_", "s_"), x: str = "iter"):
    """Every logged loss term of one run over iterations (generator and student panels). The budget
    counters that share the prefixes (``g_steps``, ``s_steps``: cumulative step counts in the epoch
    rows) are not loss terms and are left out."""
    from .methods.base import COUNTERS   # here, not at import: dfkd.figures stays light
    rows = run.metrics()
    fig = _figure((4.6 * len(prefixes), 3.2))
    axes = fig.subplots(1, len(prefixes), squeeze=False)
    for ax, pre in zip(axes[0], prefixes):
        keys = sorted({k for r in rows for k in r if k.startswith(pre) and k not in COUNTERS
                       and isinstance(r.get(k), (int, float))})
        for k in keys:
            pts = [(r[x], r[k]) for r in rows if r.get(k) is not None and r.get(x) is not None]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_xlabel(x)
        ax.set_title({"g_": "generator (Eq. 10)", "s_": "student (Eq. 11)"}.get(pre, pre))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_figure(runs: Sequence[tracking.Run], key: str, baseline: float | None = None):
    """Student top-1 (last epoch) against one hyper-parameter (Fig. 7)."""
    pts = sorted((r.params().get(key), r.summary().get("student_top1_last")) for r in runs)
    fig = _figure((4.2, 3.2))
    ax = fig.subplots()
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label="baseline")
        ax.legend(fontsize=7)
    ax.set_xlabel(key)
    ax.set_ylabel("student top-1 (last epoch, %)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def real_images(dataset_cfg, n: int, *, seed: int = 0) -> tuple[torch.Tensor, list[int], list[str]]:
    """``n`` real test images of the run's dataset in [0, 1] (n, 3, S, S), with labels and class names."""
    from .data import IMAGENET_MEAN, IMAGENET_STD
    from .train import eval_loader
    ds, _ = eval_loader(dataset_cfg)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    x = torch.stack(xs)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1), list(ys), list(ds.classes)


def run_samples(run: tracking.Run, n: int | None = None) -> dict:
    """``samples/last.pt`` of a run: ``images`` (n, 3, S, S) in [0, 1], ``teacher_pred``."""
    path = run.samples_dir / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run saved no synthetic samples")
    s = torch.load(path, map_location="cpu", weights_only=True)
    imgs = s["images"].float() / 255.0
    return {"images": imgs[:n] if n else imgs, "teacher_pred": s["teacher_pred"][:n] if n else s["teacher_pred"]}


def run_labels(runs: Sequence[tracking.Run]) -> list[str]:
    """Panel labels: each run's method, or its run name where two runs share a method."""
    methods = [r.summary().get("method", r.name) for r in runs]
    return [m if methods.count(m) == 1 else r.name for m, r in zip(methods, runs)]


def synthetic_grid_figure(runs: Sequence[tracking.Run], dataset_cfg, n: int = 8):
    """Fig. 4: a row of real test images, then one row of synthetic images per run."""
    from .viz.grids import compare_grid
    real, _, _ = real_images(dataset_cfg, n)
    rows = {"real": real}
    for label, r in zip(run_labels(runs), runs):
        rows[label] = run_samples(r, n)["images"]
    return compare_grid(rows)


def load_student(run: tracking.Run, device="cpu"):
    """The distilled student of a run (FeatureNet in eval mode) and its sidecar."""
    from .train import build_model
    state, meta = tracking.load_weights(run.weights_dir / "student.safetensors")
    model = build_model(meta["arch"], meta["num_classes"], meta["image_size"], build_kwargs=meta.get("build_kwargs"))
    tracking.load_into(model, state, what=f"student of {run.dir}", expected_arch=meta["arch"], meta=meta)
    return model.to(device).eval(), meta


@torch.no_grad()
def student_features(run: tracking.Run, dataset_cfg, *, classes: int = 10, n: int = 500, device="cpu"):
    """Penultimate features (N, D) of a run's student on real test images of the first ``classes`` classes."""
    from .train import eval_loader
    model, _ = load_student(run, device)
    ds, loader = eval_loader(dataset_cfg)
    feats, labels = [], []
    for x, y in loader:
        keep = y < classes
        if keep.any():
            feats.append(model.forward_features(x[keep].to(device)).penultimate.float().cpu())
            labels.append(y[keep])
        if sum(len(t) for t in labels) >= n:
            break
    return torch.cat(feats)[:n], torch.cat(labels)[:n], list(ds.classes)[:classes]


def tsne_figure(runs: Sequence[tracking.Run], dataset_cfg, *, classes: int = 10, n: int = 500,
                perplexity: float = 30.0, seed: int = 0):
    """Fig. 5: t-SNE of each run's student features on real images of ``classes`` classes."""
    from .viz.embed import tsne_panels
    panels = {}
    names = None
    for label, r in zip(run_labels(runs), runs):
        f, y, names = student_features(r, dataset_cfg, classes=classes, n=n)
        panels[label] = (f.numpy(), y.numpy())
    return tsne_panels(panels, class_names=names, perplexity=perplexity, seed=seed)


def gradcam_figure(run: tracking.Run, dataset_cfg, *, n: int = 4):
    """Fig. 6: GradCAM of a run's student on its synthetic images (top) and real images (bottom)."""
    import numpy as np
    from .data import IMAGENET_MEAN, IMAGENET_STD
    from .viz.cams import cam_overlay_figure, compute_cams
    model, _ = load_student(run)
    syn = run_samples(run, n)["images"]
    real, _, _ = real_images(dataset_cfg, n)
    imgs01 = torch.cat([syn, real])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cams = compute_cams(model, (imgs01 - mean) / std, model.target_layer)
    titles = [f"synthetic {i}" for i in range(len(syn))] + [f"real {i}" for i in range(len(real))]
    return cam_overlay_figure(imgs01.numpy() if isinstance(imgs01, np.ndarray) else imgs01, cams, titles=titles)


# --------------------------------------------------------------------------------------------
# small helpers the notebooks use
# --------------------------------------------------------------------------------------------
def normalize(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> ImageNet-normalised model input."""
    from .data import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


def class_names(dataset_cfg) -> list[str]:
    """Class names of a config's dataset (its evaluation split)."""
    from .train import eval_loader
    return list(eval_loader(dataset_cfg)[0].classes)


ABLATIONS = {  # table name -> (run-name infix, parameters that vary)
    "table3_loss_terms": ("loss_", ("use_mhad", "use_sfcl")),
    "table4_lambda": ("lam_", ("lam",)),
    "table5_order": ("order_", ("mha_order",)),
    "fig7_beta": ("beta_", ("beta",)),
    "fig7_gamma": ("gamma_", ("gamma",)),
}


def ablation_tables(runs_prefix: str = "", runs_root=None) -> dict[str, tuple[tuple[str, ...], list[dict]]]:
    """``{table: (keys, rows)}`` for every ablation group that has finished runs."""
    out = {}
    for name, (infix, keys) in ABLATIONS.items():
        runs = finished_runs("distill", prefix=f"{runs_prefix}{infix}", runs_root=runs_root)
        if runs:
            out[name] = (keys, ablation_rows(runs, keys))
    return out


def gradcam_arrays(run: tracking.Run, dataset_cfg, *, n: int = 4):
    """``(images01, cams)`` for the widgets browser (same images as :func:`gradcam_figure`)."""
    from .viz.cams import compute_cams
    model, _ = load_student(run)
    imgs01 = torch.cat([run_samples(run, n)["images"], real_images(dataset_cfg, n)[0]])
    return imgs01, compute_cams(model, normalize(imgs01), model.target_layer)


def write_report(cfg) -> list:
    """Every figure and table of the report from run folders (notebook 90); returns the paths."""
    from .paths import figures_dir
    from .viz.style import save_figure
    root = figures_dir(cfg.figures_root or None)
    root.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        written.extend(save_figure(fig, name, figures_root=root))

    teachers = finished_runs("teacher", prefix=cfg.teacher_prefix)
    if teachers:
        save(curves_figure(teachers, title="teachers: test top-1 (%)"), "teacher_curves")
    methods = finished_runs("distill", prefix=f"{cfg.runs_prefix}method_")
    if methods:
        rows = comparison_rows(methods)
        write_table(rows, root / "table1_methods")
        written += [root / "table1_methods.md", root / "table1_methods.csv"]
        save(curves_figure(methods, title="students: test top-1 (%)"), "distill_curves")
        dcfg = dataset_cfg_of(methods[0], cfg.data_root)
        save(synthetic_grid_figure(methods, dcfg, n=cfg.n_images), "fig4_synthetic_grids")
        save(tsne_figure(methods, dcfg, classes=cfg.tsne_classes, n=cfg.tsne_n,
                         perplexity=cfg.tsne_perplexity, seed=cfg.seed), "fig5_tsne")
        ours = [r for r in methods if r.summary().get("method") == "dfkd_fgvc"] or methods
        save(gradcam_figure(ours[0], dcfg, n=cfg.gradcam_images), "fig6_gradcam")
    for name, (keys, rows) in ablation_tables(cfg.runs_prefix).items():
        write_table(rows, root / name)
        written += [root / f"{name}.md", root / f"{name}.csv"]
        if name.startswith("fig7"):
            runs = finished_runs("distill", prefix=f"{cfg.runs_prefix}{ABLATIONS[name][0]}")
            save(sweep_figure(runs, keys[0]), name)
    return written
