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
# # 00 · Overview: data-free distillation for fine-grained categorisation
#
# This workbench implements **DFKD-FGVC** (Shao et al., ICCV 2023) and the baselines it compares with.
# A frozen teacher trained on real images is distilled into a student **without any real image**:
#
# 1. **Teacher pretraining** (`10_teacher_pretraining`): a classifier on CUB-200 / Cars-196 / Aircraft /
#    Pets, or on the embedded procedural set `toy_fgvc` that needs no files.
# 2. **Generator synthesis** (`20_generator_synthesis`): a DCGAN-like generator with spatial attention
#    (SAM, Eqs. 4-6) learns to produce images that match the teacher's BatchNorm statistics (Eq. 3) while
#    maximising teacher/student disagreement (Eq. 10).
# 3. **Distillation** (`30_distillation`): the student learns from the teacher on those images with KL
#    (Eq. 2), mixed high-order attention distillation (MHAD, Eq. 7) and semantic feature contrastive
#    learning (SFCL, Eq. 9), alternating with the generator (Algorithm 1). Any baseline of Table 1
#    (`zskd`, `zskt`, `dafl`, `dfad`, `adi`, `dfq`, `mad`, `cmi`) runs through the same notebook.
# 4. **Reports** (`40_ablations`, `50_synthetic_grids`, `51_tsne`, `52_gradcam`, `90_figures`) read the
#    run folders only.
#
# Every notebook starts with a `parameters` cell and runs headless under papermill:
# `python -m dfkd.batch batches/demo.yaml` runs the whole chain on the embedded dataset.
# Runs land in `runs/<stage>/<run_name>/` (params, metrics, summary, weights, resume state, samples).

# %% tags=["parameters"]
dataset: str = 'toy_fgvc'                 # which dataset to preview
image_size: int = 64                      # px
n_images: int = 16                        # images in the preview grid
data_root: str = ''                       # "" -> $DFKD_DATA -> <project>/data
interactive: bool = False                 # widgets after the static figure

# %%
import dfkd
from dfkd import data, figures, paths
from dfkd.config import DataConfig
from dfkd.viz.grids import image_grid

print("project:", paths.project_root())
print("data root:", paths.data_root(data_root or None))
print("runs:", paths.runs_dir())
print("datasets:", sorted(data.DATASETS))
print("methods:", sorted(dfkd.methods.METHODS))
print("models:", sorted(dfkd.models.MODELS))

# %% [markdown]
# A preview of the chosen dataset's test images (static figure first).

# %%
cfg = DataConfig(dataset=dataset, image_size=image_size, data_root=data_root)
cfg.num_workers, cfg.seed, cfg.batch_size = 0, 0, 64
imgs, labels, classes = figures.real_images(cfg, n_images)
fig = image_grid(imgs, labels=[classes[i] for i in labels], nrow=8, title=f"{dataset} test images")
fig

# %% [markdown]
# Finished runs found under `runs/`:

# %%
for stage in ("teacher", "synthesis", "distill"):
    print(stage, [r.name for r in figures.finished_runs(stage)])

# %%
if interactive:
    from dfkd.viz.widgets import browse_images
    display(browse_images(imgs, labels, classes))
