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
# # 30 · Data-free distillation
# Distils `student_arch` from the frozen teacher with any registered `method` (Algorithm 1 for
# `dfkd_fgvc`: `g_steps` generator steps on Eq. 10, then `s_steps` student steps on Eq. 11, per
# iteration). The student never sees a real image; it is evaluated on the real test split after every
# epoch (last and best epoch reported). Every switch of the ablations is a parameter below.
# Re-running with the same `run_name` resumes a killed run from `state/last.pt`.
#
# **Inputs**: `runs/teacher/<teacher_run>/`. **Outputs**: `runs/distill/<run_name>/`.

# %% tags=["parameters"]
dataset: str = 'toy_fgvc'                 # toy_fgvc | cub200 | cars196 | aircraft | pets
data_root: str = ''                       # "" -> $DFKD_DATA -> <project>/data
image_size: int = 32                      # px; the paper uses 224, the workbench 112/64/32
toy_num_classes: int = 10                 # embedded dataset only
toy_train_per_class: int = 60             # embedded dataset only
toy_test_per_class: int = 30              # embedded dataset only
cars_heldout_fraction: float = 0.2        # cars196 split="heldout"/"train_minus_heldout" only
run_name: str = 'distill_dev'             # runs/viz/<run_name>/ keeps the tables this notebook writes
method: str = 'dfkd_fgvc'                 # key of dfkd.methods.METHODS
teacher_run: str = ''                     # runs/teacher/<teacher_run>; "" = random teacher (smoke only)
teacher_arch: str = 'resnet_tiny_t'       # only used when teacher_run == ""
student_arch: str = 'resnet_tiny_s'
seed: int = 0
device: str = 'auto'                      # auto | cpu | cuda | cuda:N
epochs: int = 2
iters_per_epoch: int = 5                  # "epoch" is undefined in the paper; 50 in peers (decisions.md)
g_steps: int = 20                         # t
s_steps: int = 15                         # k
batch_size: int = 64
lr_g: float = 0.001
g_beta1: float = 0.5
g_beta2: float = 0.99
lr_s: float = 0.01
momentum: float = 0.9
weight_decay: float = 0.0005
nz: int = 256
ngf: int = 64                             # generator width: 8ngf->4ngf->2ngf->ngf->ngf (Table 6 at 64)
lam: float = 0.05                         # Eq. 6
sam_reduction: int = 4
sam_softmax: str = 'spatial'              # spatial | spatial_scaled | channel
deconv_kernel: int = 3                    # 3 (Table 6) | 4 (DCGAN)
block_norm: str = 'none'                  # none (Table 6) | bn (DCGAN peers)
output_map: str = 'imagenet'              # imagenet | raw_tanh
alpha: float = 0.3
beta: float = 10.0
gamma: float = 8.0
kd_T: float = 1.0
kd_direction: str = 't_s'                 # t_s = KL(T||S) (peers) | s_t = KL(S||T) (Eq. 2 as written)
tau: float = 0.07
mha_order: int = 3                        # R
mha_mode: str = 'frozen'                  # frozen | trainable | separate
mhad_mode: str = 'auto'                   # auto | stages | penultimate
sfcl_dim: int = 256
sfcl_symmetric: bool = False
use_bn: bool = True                       # Table 3 switches
use_adv: bool = True
use_kd: bool = True
use_mhad: bool = True
use_sfcl: bool = True
student_bn_eval_in_g: bool = True         # student BN in eval mode during generator steps
adi_tv: float = 2.5e-05                   # ADI total-variation prior weight
adi_l2: float = 3e-08                     # ADI image L2 prior weight
adi_first_bn_mul: float = 10.0            # ADI multiplier of the first BN layer's term
adi_competition: float = 0.2              # ADI adaptive competition weight
dafl_oh: float = 1.0                      # DAFL one-hot loss weight
dafl_a: float = 0.1                       # DAFL activation loss weight
dafl_ie: float = 5.0                      # DAFL information-entropy loss weight
zskt_at: float = 250.0                    # ZSKT attention-transfer weight
zskd_beta: float = 1.0                    # ZSKD Dirichlet concentration scale
mad_momentum: float = 0.9                 # MAD EMA generator momentum
cmi_contrast: float = 0.5                 # CMI contrastive weight
cmi_bank_size: int = 4096                 # CMI memory bank (images)
pool_size: int = 0                        # replay pool of synthetic images (0 = online, as the paper)
test_batch_size: int = 128
max_eval_batches: int = 0                 # 0 = the whole test split
log_every: int = 1                        # iterations between metric rows (no host sync in between)
checkpoint_every: int = 0                 # iterations between resume states (0 = end of each epoch only)
sample_every: int = 1                     # epochs between sample grids
amp: str = 'auto'                         # auto (bf16 on CUDA) | bf16 | off
channels_last: bool = True                # CUDA only
compile: bool = False
num_workers: int = 2
interactive: bool = False

# %%
from dfkd import figures, tracking, train
from dfkd.config import DistillConfig, collect
from dfkd.seed import resolve_device

cfg = collect(DistillConfig, globals())
run = tracking.start_run("distill", run_name, cfg, device=resolve_device(device))
summary = train.distill(cfg, run, progress=True)
print({k: summary[k] for k in ("method", "teacher_top1", "student_top1_last", "student_top1_best", "ms_per_iteration")})
print("budget:", summary["budget"])

# %% [markdown]
# Student accuracy on the real test split per epoch, and every loss term over iterations.

# %%
fig = figures.curves_figure([run], y="test_top1", title="student: test top-1 (%)")

# %%
fig = figures.loss_terms_figure(run)

# %% [markdown]
# The generator's images at fixed noise after the last epoch, titled with the teacher's prediction.

# %%
from dfkd.viz.grids import image_grid

samples = figures.run_samples(run, 16)
classes = figures.class_names(cfg)
fig = image_grid(samples["images"], labels=[classes[i][:14] for i in samples["teacher_pred"]], nrow=8)

# %%
print(figures.markdown_table(figures.comparison_rows([run])))

# %%
if interactive:
    from dfkd.viz.widgets import browse_images
    display(browse_images(samples["images"], samples["teacher_pred"].tolist(), classes))
