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
# # 52 · GradCAM of the distilled student (Fig. 6)
# Class-activation maps (pytorch-grad-cam) of the student's last stage on its synthetic images
# (top row) and on real test images (bottom row). The hooks are released and the model's mode is
# restored after each call.

# %% tags=["parameters"]
run_name: str = 'gradcam_dev'             # runs/viz/<run_name>/ keeps the figures this notebook writes
runs_prefix: str = ''                     # distill runs whose name starts with this (see batches/*.yaml)
runs: str = ''                            # or an explicit comma-separated list of distill run names
gradcam_images: int = 4                   # synthetic and real images each (Fig. 6)
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
for r in runs:
    fig = figures.gradcam_figure(r, figures.dataset_cfg_of(r, data_root), n=gradcam_images)
    fig.savefig(run.dir / f"gradcam_{r.name}.png", dpi=120)
    display(fig)

# %%
if interactive:
    from dfkd.viz.widgets import browse_cams
    display(browse_cams(*figures.gradcam_arrays(runs[0], figures.dataset_cfg_of(runs[0], data_root), n=gradcam_images)))

# %%
summary = run.finish({"runs": [r.name for r in runs]})
