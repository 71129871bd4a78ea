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
# epoch (last and best epoch reported). Every switch of the ablations is a field of `DistillConfig`
# (add it to the cell below, or set it in a batch job); each method's own hyper-parameters go in
# `method_options` (`docs/methods.md` lists them) and are checked against `method` before anything runs.
# Re-running with the same `run_name` resumes a killed run from `state/last.pt`.
#
# **Inputs**: `runs/teacher/<teacher_run>/`. **Outputs**: `runs/distill/<run_name>/`.

# %% tags=["parameters"]
# What a person sets here; every other field of dfkd.config.DistillConfig (use_bn, mha_order, kd_T,
# replay_size, ...) may be added as a line too (or set by a batch job) and keeps its default otherwise.
# The defaults (params/demo/distill.yaml) distil from notebook 10's teacher in about 5 minutes on one
# CPU core: 70.3 % student top-1 from a 93.8 % teacher (seed 0, chance 10 %; make demo, 2026-12-06).
# --- what to run
run_name: str = 'distill_dev'             # runs/distill/<run_name>/ (the same name resumes a killed run)
teacher_run: str = 'teacher_dev'          # runs/teacher/<teacher_run>/: notebook 10's run_name; "" = random teacher (smoke only)
method: str = 'dfkd_fgvc'                 # dfkd_fgvc (the paper) | zskd | zskt | dafl | dfad | adi | dfq | mad | cmi | fast
method_options: dict = {}                 # the method's own options, e.g. {'tau': 0.2} for cmi; {} = its defaults (docs/methods.md)
interactive: bool = False                 # True: a widget browser of the synthetic images at the end
# --- data: as the teacher was trained
dataset: str = 'toy_fgvc'                 # toy_fgvc (embedded, no files) | cub200 | cars196 | aircraft | pets
image_size: int = 32                      # px; the paper uses 224
toy_test_per_class: int = 100             # embedded set only: 1,000 test images, as notebook 10
student_arch: str = 'resnet_tiny_s'       # a key of dfkd.models.MODELS
# --- schedule (Algorithm 1): epochs x iters_per_epoch iterations of g_steps G + s_steps S steps
epochs: int = 9                           # x iters_per_epoch: the iterations the student's cosine runs over
iters_per_epoch: int = 10                 # the student is evaluated on the real test split after each epoch
g_steps: int = 10                         # t: generator steps per iteration
s_steps: int = 25                         # k: student steps per iteration
batch_size: int = 32
lr_g: float = 0.003                       # generator Adam (paper: 1e-3)
lr_s: float = 0.05                        # student SGD (paper: 0.01)
s_lr_schedule: str = 'iter'               # student cosine stepped per iteration (to 0) | 'epoch' (once per epoch)
# --- generator (Table 6)
nz: int = 64                              # noise size (paper: 256)
ngf: int = 16                             # width (paper: 64)
lam: float = 0.0                          # SAM weight (Eq. 6; paper 0.05): off here, 38 % of a G step for a 0.4 % change
block_norm: str = 'bn'                    # bn (DCGAN peers; needed at this budget) | none (Table 6)
# --- the paper's losses (Eqs. 10-11) and sample-efficient synthesis (docs/decisions.md#synthesis)
alpha: float = 3.0                        # BN prior weight (paper: 0.3)
beta: float = 10.0                        # MHAD weight (Eq. 11)
gamma: float = 1.0                        # SFCL weight (Eq. 11; paper: 8, which swamps KD at this budget)
mhad_from: int = 1                        # MHAD on stages 1-3 (0: every block, the paper; 20 % off a student step)
replay: str = 'pool'                      # pool: student steps on a replay pool | off: Algorithm 1 as printed
replay_size: int = 60000                  # images kept in the pool (90 x 10 x 2 x 32 = 57,600: keep all)
replay_pad: float = 0.25                  # pool crops shift by up to 0.25 x the side (8 px; CIFAR's 4 px: 0.125)
replay_extra: int = 1                     # extra no-grad generator batches per G step into the pool (paper: 0)
g_oh: float = 1.0                         # generator: confident teacher predictions (DFQ's L_oh; paper: 0)
g_balance: float = 5.0                    # generator: balanced classes per batch (DFQ; paper: 0)
# --- machine
seed: int = 0
device: str = 'auto'                      # auto | cpu | cuda | cuda:N
amp: str = 'native'                       # native: bf16 where the GPU or CPU has it (1.45x here) | auto | bf16 | off
num_workers: int = 0                      # data-loader processes (0: in the kernel, fastest for toy_fgvc)

# %%
from dfkd import figures, tracking, train
from dfkd.config import DistillConfig, collect
from dfkd.seed import resolve_device

cfg = collect(DistillConfig, globals())   # checks every parameter, method_options against method
if teacher_run and not (tracking.run_path("teacher", teacher_run) / "weights" / "last.safetensors").exists():
    raise FileNotFoundError(
        f"no trained teacher {teacher_run!r} in {tracking.run_path('teacher', teacher_run)}: run "
        "notebooks/10_teacher_pretraining.py first (its default run_name is 'teacher_dev'), or set "
        "teacher_run to a finished teacher run ('' = a random teacher, for smoke tests only)")
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
