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
run_name: str = 'distill_dev'             # runs/distill/<run_name>/: metrics, weights, samples
method: str = 'dfkd_fgvc'                 # key of dfkd.methods.METHODS
teacher_run: str = 'teacher_dev'          # runs/teacher/<teacher_run> (notebook 10's run_name); "" = random teacher (smoke only)
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
g_lr_schedule: str = 'constant'           # constant (paper silent) | cosine (over epochs, like the student)
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
replay: str = 'off'                       # off (Algorithm 1) | pool: student on a replay pool (dfkd.replay)
replay_size: int = 4096                   # images kept in the replay pool
replay_aug: str = 'crop_flip'             # none | flip | crop_flip: augmentation of pool samples only
replay_fresh: float = 0.0                 # share of each student batch straight from the generator
g_oh: float = 0.0                         # generator: CE of teacher logits to their argmax (off = paper)
g_balance: float = 0.0                    # generator: class balance of the batch (off = paper)
zskd_beta: float = 1.0                    # ZSKD Dirichlet concentration scale (times beta in {1.0, 0.1})
zskd_T: float = 20.0                      # ZSKD softmax temperature (impressions and student KD)
zskd_lr: float = 0.01                     # ZSKD Adam lr of the impressions
zskd_craft_steps: int = 0                 # ZSKD Adam steps per impression batch (0 = g_steps; ZSKD: 1500)
zskt_at: float = 250.0                    # ZSKT attention-transfer weight
dafl_oh: float = 1.0                      # DAFL one-hot loss weight
dafl_a: float = 0.1                       # DAFL activation loss weight
dafl_ie: float = 5.0                      # DAFL information-entropy loss weight
adi_bn: float = 0.05                      # ADI BN-statistics prior weight (DeepInversion r_feature, 224 px)
adi_tv: float = 0.0001                    # ADI total-variation (L2) prior weight (224 px)
adi_l2: float = 1e-05                     # ADI image L2 prior weight (224 px)
adi_first_bn_mul: float = 10.0            # ADI multiplier of the first BN layer's term
adi_competition: float = 0.2              # ADI adaptive competition weight
adi_lr: float = 0.2                       # ADI Adam lr of the inputs (224 px)
adi_jitter: int = 0                       # ADI max jitter in px (0 = 30 px scaled to image_size; 2 at 32)
adi_craft_steps: int = 0                  # ADI Adam steps per batch (0 = g_steps; DeepInversion: 2000)
adi_lr_schedule: str = 'cosine'          # ADI lr over a batch's steps: cosine with warm-up (DeepInversion) | constant
dfq_bn: float = 1.0                       # DFQ BN prior weight
dfq_adv: float = 1.0                      # DFQ adversarial (KL) weight
dfq_oh: float = 1.0                       # DFQ one-hot (instance entropy) weight
dfq_balance: float = 20.0                 # DFQ class-balance (batch entropy) weight
mad_momentum: float = 0.9                 # MAD EMA generator momentum
mad_bn: float = 1.0                       # MAD BN prior weight
mad_ema_fraction: float = 0.5             # MAD share of each student batch from the EMA generator
cmi_bn: float = 1.0                       # CMI BN prior weight
cmi_oh: float = 0.5                       # CMI cross-entropy (to sampled targets) weight
cmi_adv: float = 0.5                      # CMI adversarial (KL) weight
cmi_adv_mask: bool = False                # CMI: adversarial KL only where S agrees with T (CMI's code)
cmi_contrast: float = 0.8                 # CMI contrastive weight
cmi_tau: float = 0.1                      # CMI contrastive temperature
cmi_dim: int = 256                        # CMI projection head output size
cmi_bank_size: int = 4096                 # CMI memory bank (rows of past image features)
cmi_reset_generator: bool = False         # CMI: re-initialise G at every round start (CMI's code)
fast_lr_z: float = 0.015                  # Fast: Adam lr of the round's noise z
fast_bn: float = 10.0                     # Fast: momentum BN prior weight
fast_oh: float = 0.5                      # Fast: cross-entropy (to random targets) weight
fast_adv: float = 1.1                     # Fast: masked adversarial KL weight
fast_bn_mmt: float = 0.9                  # Fast: momentum of the BN statistics memory
fast_T: float = 20.0                      # Fast: KD temperature of the student steps
fast_meta: str = 'fomaml'                 # Fast: meta update fomaml | reptile
fast_reset_l0: bool = True                # Fast: re-initialise the generator's first layer every round
fast_warmup: int = 0                      # Fast: iterations of synthesis only
pool_size: int = 0                        # pool of synthetic images (zskd/adi/cmi; 0 = 2048); others online
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

if teacher_run and not (tracking.run_path("teacher", teacher_run) / "weights" / "last.safetensors").exists():
    raise FileNotFoundError(
        f"no trained teacher {teacher_run!r} in {tracking.run_path('teacher', teacher_run)}: run "
        "notebooks/10_teacher_pretraining.py first (its default run_name is 'teacher_dev'), or set "
        "teacher_run to a finished teacher run ('' = a random teacher, for smoke tests only)")
cfg = collect(DistillConfig, globals())
run = tracking.start_run("distill", run_name, cfg, device=resolve_device(device))
summary = train.distill(cfg, run, progress=True)
print({k: summary[k] for k in ("method", "teacher_top1", "student_top1_last", "student_top1_best", "ms_per_iteration")})
print("budget:", summary["budget"])

# %% [markdown]
# Student accuracy on the real test split per epoch, and every loss term over iterations.

# %%
fig = figures.curves_figure([run], y="test_top1", title="student: test top-1 (%)")
fig

# %%
fig = figures.loss_terms_figure(run)
fig

# %% [markdown]
# The generator's images at fixed noise after the last epoch, titled with the teacher's prediction.

# %%
from dfkd.viz.grids import image_grid

samples = figures.run_samples(run, 16)
classes = figures.class_names(cfg)
fig = image_grid(samples["images"], labels=[classes[i][:14] for i in samples["teacher_pred"]], nrow=8)
fig

# %%
figures.markdown_table(figures.comparison_rows([run]))  # shown as a table

# %%
if interactive:
    from dfkd.viz.widgets import browse_images
    display(browse_images(samples["images"], samples["teacher_pred"].tolist(), classes))
