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
# # 10 · Teacher pretraining
# Trains `arch` on the real train split of `dataset` and evaluates on its test split every epoch
# (SGD, cosine or one-cycle schedule, label smoothing; bf16 and channels_last on CUDA, decoded images
# held on the GPU). Re-running with the same `run_name` resumes a killed run.
#
# **Outputs**: `runs/teacher/<run_name>/` with `weights/last.safetensors` (+ JSON sidecar), used by
# notebooks 20 and 30 as `teacher_run`.

# %% tags=["parameters"]
dataset: str = 'toy_fgvc'                 # toy_fgvc | cub200 | cars196 | aircraft | pets
data_root: str = ''                       # "" -> $DFKD_DATA -> <project>/data
image_size: int = 32                      # px; the paper uses 224, the workbench 112/64/32
toy_num_classes: int = 10                 # embedded dataset only
toy_train_per_class: int = 60             # embedded dataset only
toy_test_per_class: int = 100             # embedded dataset only: 1,000 test images, as notebook 30
cars_heldout_fraction: float = 0.2        # cars196 split="heldout"/"train_minus_heldout" only
run_name: str = 'teacher_dev'             # runs/teacher/<run_name>/; notebooks 20 and 30 read it as teacher_run
arch: str = 'resnet_tiny_t'
pretrained: bool = False                  # torchvision/efficientnet ImageNet weights (must be local)
epochs: int = 60                          # 60 x batch 32 one-cycle: ~97 % on toy_fgvc, ~4 min on 2 cores
batch_size: int = 32
lr: float = 0.05
momentum: float = 0.9
weight_decay: float = 0.0005
label_smoothing: float = 0.1
schedule: str = 'onecycle'                # onecycle | cosine
warmup_epochs: int = 0
adv_eps: float = 0.0                      # >0: adversarial training, L2 radius in the normalised input (robust teacher)
adv_steps: int = 3                        # gradient steps of that attack per training step (adv_eps > 0 only)
seed: int = 0
device: str = 'auto'                      # auto | cpu | cuda | cuda:N
amp: str = 'auto'                         # auto (bf16 on CUDA) | bf16 | off
channels_last: bool = True                # CUDA only
gpu_preload: str = 'auto'                 # auto | on | off: decoded images held on the device
num_workers: int = 0                      # data-loader processes (0: in the kernel, fastest for toy_fgvc)
eval_every: int = 1
max_steps_per_epoch: int = 0              # 0 = full epoch (smoke tests use a few)
interactive: bool = False

# %%
from dfkd import figures, tracking, train
from dfkd.config import TeacherConfig, collect
from dfkd.seed import resolve_device

cfg = collect(TeacherConfig, globals())
run = tracking.start_run("teacher", run_name, cfg, device=resolve_device(device))
print("run folder:", run.dir)

# %%
summary = train.train_teacher(cfg, run, progress=True)
print({k: summary[k] for k in ("arch", "dataset", "image_size", "epochs", "top1_last", "top1_best")})

# %% [markdown]
# Test accuracy per epoch (we report the **last** epoch; the best epoch is selected on the test set).

# %%
fig = figures.curves_figure([run], y="test_top1", title="teacher: test top-1 (%)")
fig

# %%
fig = figures.curves_figure([run], y="train_loss", title="teacher: train loss")
fig

# %% [markdown]
# Predictions of the trained teacher on a few test images (true / predicted class).

# %%
from dfkd.viz.grids import image_grid
import torch

model, meta = train.load_teacher(run_name)
imgs01, labels, classes = figures.real_images(cfg, 16)
with torch.no_grad():
    pred = model(figures.normalize(imgs01)).argmax(1).tolist()
fig = image_grid(imgs01, labels=[f"{classes[t][:12]} / {classes[p][:12]}" for t, p in zip(labels, pred)], nrow=8)
fig

# %%
if interactive:
    from dfkd.viz.widgets import browse_images
    display(browse_images(imgs01, pred, classes))
