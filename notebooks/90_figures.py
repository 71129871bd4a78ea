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
# # 90 · Figures and tables for the report
# Regenerates every figure and table under `figures/` (or `figures_root`) from run folders alone:
# teacher curves, Table 1 (methods with their budgets), Tables 3-5 and Fig. 7 (ablations), Fig. 4
# (synthetic grids), Fig. 5 (t-SNE) and Fig. 6 (GradCAM). PNG and PDF, fixed size, no timestamps, so
# regenerating gives the same files. `figures/README.md` says which runs each one comes from.

# %% tags=["parameters"]
run_name: str = 'figures_dev'             # runs/figures/<run_name>/ records this report run
runs_prefix: str = ''                     # distill runs whose name starts with this (see batches/*.yaml)
teacher_prefix: str = ''                  # teacher runs whose name starts with this
n_images: int = 8                         # images per row in grids
tsne_n: int = 500                         # points per t-SNE panel
tsne_classes: int = 10                    # classes shown in t-SNE (Fig. 5 uses 10)
tsne_perplexity: float = 30.0             # clamped below n/3 for tiny inputs
gradcam_images: int = 4                   # synthetic and real images each (Fig. 6)
figures_root: str = ''                    # "" -> figures/; a relative path lies under runs/ (demo, smoke)
data_root: str = ''                       # "" -> $DFKD_DATA -> <project>/data
seed: int = 0

# %%
from dfkd import figures, tracking
from dfkd.config import VizConfig, collect

cfg = collect(VizConfig, globals())
run = tracking.start_run("figures", run_name, cfg)
written = figures.write_report(cfg)
for p in written:
    print(p)

# %% [markdown]
# What was written: the tables as tables, the figures as images (PDF and CSV twins lie beside them).

# %%
figures.show_files(written);

# %%
summary = run.finish({"files": [str(p) for p in written], "n_files": len(written)})
