# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 50 · Synthetic images beside real ones (Fig. 4)
# One row of real test images, then one row of synthetic images per method (each run's
# `samples/last.pt`, written at fixed noise after its last epoch).

# %% tags=["parameters"]
run_name: str = 'grids_dev'               # runs/viz/<run_name>/ keeps the figure this notebook writes
runs_prefix: str = ''                     # distill runs whose name starts with this (see batches/*.yaml)
runs: str = ''                            # or an explicit comma-separated list of distill run names
n_images: int = 8                         # images per row in grids
data_root: str = ''                       # "" -> $DFKD_DATA -> <project>/data
interactive: bool = False

# %%
from dfkd import figures, tracking
from dfkd.config import VizConfig, collect

cfg = collect(VizConfig, globals())
run = tracking.start_run("viz", run_name, cfg)
runs = figures.select_runs("distill", runs, runs_prefix)
print([r.name for r in runs])

# %%
fig = figures.synthetic_grid_figure(runs, figures.dataset_cfg_of(runs[0], data_root), n=n_images)
fig.savefig(run.dir / "synthetic_grids.png", dpi=120)
fig

# %%
if interactive:
    from dfkd.viz.widgets import browse_images
    s = figures.run_samples(runs[0])
    display(browse_images(s["images"], s["teacher_pred"].tolist(), figures.class_names(figures.dataset_cfg_of(runs[0], data_root))))

# %%
summary = run.finish({"runs": [r.name for r in runs], "n_images": n_images})
