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
# # 20 · Generator synthesis
# The generator stage of Algorithm 1 on its own: the attention generator (Table 6) is trained for
# `steps` steps on `alpha * L_BN - L_KD` (Eq. 10) against the frozen teacher and a fixed random student.
# We watch the BN-prior and adversarial terms, the synthetic images, what the teacher predicts on them,
# and the spatial attention maps of the SAM modules (Eqs. 4-6).
#
# **Inputs**: `runs/teacher/<teacher_run>/` (notebook 10 first; "" = random teacher, smoke only).
# **Outputs**: `runs/synthesis/<run_name>/` (metrics, samples, attention maps, generator weights).

# %% tags=["parameters"]
# What a person sets here; every other field of dfkd.config.SynthConfig (sam_softmax, deconv_kernel,
# output_map, kd_T, ...) may be added as a line too (or set by a batch job) and keeps its default
# otherwise. The generator defaults are notebook 30's (params/demo/distill.yaml).
# --- what to run
run_name: str = 'synthesis_dev'           # runs/synthesis/<run_name>/
teacher_run: str = 'teacher_dev'          # runs/teacher/<teacher_run>/: notebook 10's run_name; "" = random teacher (smoke only)
method: str = 'dfkd_fgvc'                 # whose generator objective: dfkd_fgvc (Eq. 10) | any generator-based method (not zskd, adi)
method_options: dict = {}                 # that method's own options; {} = its defaults (docs/methods.md)
interactive: bool = False                 # True: a widget browser of the attention maps at the end
# --- data: as the teacher was trained
dataset: str = 'toy_fgvc'                 # toy_fgvc (embedded, no files) | cub200 | cars196 | aircraft | pets
image_size: int = 32                      # px; the paper uses 224
# --- generator stage (Eq. 10) against a fixed random student
steps: int = 50                           # generator steps
n_samples: int = 32                       # images in the saved grid
batch_size: int = 32
lr_g: float = 0.003                       # generator Adam (paper: 1e-3)
alpha: float = 3.0                        # BN prior weight (paper: 0.3; docs/decisions.md#synthesis)
# --- generator (Table 6)
nz: int = 64                              # noise size (paper: 256)
ngf: int = 16                             # width (paper: 64)
lam: float = 0.05                         # SAM residual weight (Eq. 6); 0 = no spatial attention
block_norm: str = 'bn'                    # bn (DCGAN peers; needed at small budgets) | none (Table 6)
# --- machine
seed: int = 0
device: str = 'auto'                      # auto | cpu | cuda | cuda:N

# %%
import torch
from dfkd import figures, synthesis, tracking
from dfkd.config import SynthConfig, collect
from dfkd.seed import resolve_device

cfg = collect(SynthConfig, globals())   # checks every parameter, method_options against method
if teacher_run and not (tracking.run_path("teacher", teacher_run) / "weights" / "last.safetensors").exists():
    raise FileNotFoundError(
        f"no trained teacher {teacher_run!r} in {tracking.run_path('teacher', teacher_run)}: run "
        "notebooks/10_teacher_pretraining.py first (its default run_name is 'teacher_dev'), or set "
        "teacher_run to a finished teacher run ('' = a random teacher, for smoke tests only)")
run = tracking.start_run("synthesis", run_name, cfg, device=resolve_device(device))
summary = synthesis.synthesize(cfg, run, progress=True)
print({k: summary[k] for k in ("g_bn_last", "g_kd_last", "class_coverage", "num_classes", "teacher_confidence")})

# %% [markdown]
# BN-prior (Eq. 3) and adversarial KL (Eq. 2) terms over generator steps.

# %%
fig = figures.loss_terms_figure(run, prefixes=("g_",), x="step")
fig

# %% [markdown]
# Synthetic images at fixed noise, titled with the teacher's predicted class.

# %%
from dfkd.viz.grids import attention_grid, image_grid

samples = figures.run_samples(run)
classes = figures.class_names(cfg)
fig = image_grid(samples["images"][:n_samples], labels=[classes[i][:14] for i in samples["teacher_pred"][:n_samples]], nrow=8)
fig

# %% [markdown]
# Spatial attention (channel-mean of `softmax(A_s)`) of each generator block for the first images.

# %%
att_path = run.samples_dir / "attention.pt"
maps = torch.load(att_path, weights_only=True)["maps"] if att_path.exists() else []
for i, m in enumerate(maps):
    display(attention_grid(m[:8], title=f"SAM block {i + 1}: {tuple(m.shape[1:])}"))

# %%
if interactive and maps:
    from dfkd.viz.widgets import browse_attention
    display(browse_attention(samples["images"], maps[-1]))
