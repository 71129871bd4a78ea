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
# # 51 · t-SNE of student features (Fig. 5)
# Penultimate features of each method's student on real test images of `tsne_classes` classes,
# embedded with t-SNE (scikit-learn), one panel per method.

# %% tags=["parameters"]
run_name: str = 'tsne_dev'                # runs/viz/<run_name>/ keeps the figure this notebook writes
runs_prefix: str = ''                     # distill runs whose name starts with this (see batches/*.yaml)
runs: str = ''                            # or an explicit comma-separated list of distill run names
tsne_n: int = 500                         # points per t-SNE panel
tsne_classes: int = 10                    # classes shown in t-SNE (Fig. 5 uses 10)
tsne_perplexity: float = 30.0             # clamped below n/3 for tiny inputs
data_root: str = ''                       # "" -> $DFKD_DATA -> <project>/data
seed: int = 0
interactive: bool = False

# %%
from dfkd import figures, tracking
from dfkd.config import VizConfig, collect

cfg = collect(VizConfig, globals())
run = tracking.start_run("viz", run_name, cfg)
runs = figures.select_runs("distill", runs, runs_prefix)
print([r.name for r in runs])

# %%
fig = figures.tsne_figure(runs, figures.dataset_cfg_of(runs[0], data_root), classes=tsne_classes, n=tsne_n,
                          perplexity=tsne_perplexity, seed=seed)
fig.savefig(run.dir / "tsne.png", dpi=120)
fig

# %%
summary = run.finish({"runs": [r.name for r in runs], "tsne_n": tsne_n})
