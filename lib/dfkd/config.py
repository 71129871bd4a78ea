"""One dataclass per stage; field names equal the notebook parameter names.

``collect(Cls, namespace)`` builds a config from a notebook's globals (or any mapping) by field
name and type-checks every value, in the spirit of nanoGPT's strict configurator: a parameter
with the wrong type fails loudly instead of being silently coerced. ``check_overrides`` rejects
unknown keys and wrong types of a parameter mapping before anything runs.

Each method's own hyper-parameters are not fields here: they live in an ``Options`` dataclass in
the method's module (``dfkd.methods.<name>``) and reach a run as one parameter, ``method_options``
(a mapping; ``{}`` = the method's defaults), checked against the chosen method by
:func:`check_method_options` whenever a :class:`DistillConfig` is built. ``docs/methods.md`` lists
them; the shared fields below are what every method reads (schedule, batch, optimisers, generator
architecture) plus the paper method's own losses and switches, which Tables 3-5 sweep as
parameters of their own (run templates and notebook 40 read them from params.yaml).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .options import ConfigError, coerce  # ConfigError lives there so methods need not import config


# --------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Dataset selection shared by every stage."""
    dataset: str = "toy_fgvc"          # toy_fgvc | cub200 | cars196 | aircraft | pets
    data_root: str = ""                # "" -> $DFKD_DATA -> <project>/data
    image_size: int = 32               # px; the paper uses 224, the workbench 112/64/32
    toy_num_classes: int = 10          # embedded dataset only
    toy_train_per_class: int = 60      # embedded dataset only
    toy_test_per_class: int = 30       # embedded dataset only
    cars_heldout_fraction: float = 0.2 # cars196 split="heldout"/"train_minus_heldout" only

    def __post_init__(self):   # range checks also when a config is built directly, not via collect
        validate(self)


@dataclass
class TeacherConfig(DataConfig):
    """Teacher (or supervised student) pretraining on real data (notebook 10)."""
    run_name: str = "teacher_dev"
    arch: str = "resnet_tiny_t"
    pretrained: bool = False           # torchvision/efficientnet ImageNet weights (must be local)
    epochs: int = 60                   # 60 x batch 32 one-cycle: ~92 % on toy_fgvc (params/demo/teacher.yaml)
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    adv_eps: float = 0.0               # L2 radius of adversarial training in the normalised input (0: standard; dfkd.robustness)
    adv_steps: int = 3                 # gradient steps of that attack per training step
    schedule: str = "onecycle"         # onecycle | cosine
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    amp: str = "auto"                  # auto (bf16 on CUDA) | bf16 | off (native: as auto)
    channels_last: bool = True         # CUDA only
    gpu_preload: str = "auto"          # auto | on | off: decoded images held on the device
    num_workers: int = 0               # data-loader processes (0: in the main process)
    eval_every: int = 1
    max_steps_per_epoch: int = 0       # 0 = full epoch (smoke tests use a few)
    interactive: bool = False


@dataclass
class DistillConfig(DataConfig):
    """Data-free distillation with any registered method (notebook 30; Algorithm 1)."""
    run_name: str = "distill_dev"
    method: str = "dfkd_fgvc"          # key of dfkd.methods.METHODS
    method_options: dict = field(default_factory=dict)  # the method's own Options ({} = defaults; docs/methods.md)
    teacher_run: str = ""              # runs/teacher/<teacher_run>; "" = random teacher (smoke only)
    teacher_arch: str = "resnet_tiny_t"  # only used when teacher_run == ""
    student_arch: str = "resnet_tiny_s"
    seed: int = 0
    device: str = "auto"
    # --- schedule (Algorithm 1, Sec. 5.1) ---
    epochs: int = 2
    iters_per_epoch: int = 5           # "epoch" is undefined in the paper; 50 in peers (decisions.md)
    g_steps: int = 20                  # t
    s_steps: int = 15                  # k
    g_stop: float = 1.0                # share of the iterations with generator steps; after it the generator and its
                                       # pool are frozen and iterations run their s_steps only (1.0: Algorithm 1 throughout)
    batch_size: int = 64
    lr_g: float = 1e-3
    g_beta1: float = 0.5
    g_beta2: float = 0.99
    g_lr_schedule: str = "constant"    # constant (paper silent) | cosine (over epochs, like the student)
    lr_s: float = 0.01
    s_lr_schedule: str = "epoch"       # epoch: cosine stepped per epoch (Sec. 5.1 read literally) | iter: per iteration, to 0
                                       # | onecycle: warm-up over s_warmup of the iterations, then cosine (per iteration)
    s_warmup: float = 0.15             # onecycle only: share of the iterations spent warming up (teacher recipe: 0.15)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # --- generator (Table 6) ---
    nz: int = 256
    ngf: int = 64                      # generator width: 8ngf->4ngf->2ngf->ngf->ngf (Table 6 at 64)
    lam: float = 0.05                  # Eq. 6
    sam_reduction: int = 4
    sam_softmax: str = "spatial"       # spatial | spatial_scaled | channel
    deconv_kernel: int = 3             # 3 (Table 6) | 4 (DCGAN)
    block_norm: str = "none"           # none (Table 6) | bn (DCGAN peers)
    output_map: str = "imagenet"       # imagenet | raw_tanh
    # --- losses (Eqs. 2, 3, 7, 9, 10, 11) ---
    alpha: float = 0.3
    beta: float = 10.0
    gamma: float = 8.0
    kd_T: float = 1.0
    kd_direction: str = "t_s"          # t_s = KL(T||S) (peers) | s_t = KL(S||T) (Eq. 2 as written)
    tau: float = 0.07
    mha_order: int = 3                 # R
    mha_mode: str = "frozen"           # frozen | trainable | separate
    mhad_mode: str = "auto"            # auto | stages | penultimate
    mhad_from: int = 0                 # stages: MHAD on stages mhad_from.. only (0: every block, the paper; 1 skips 32x32 at 32 px)
    sfcl_dim: int = 256
    sfcl_symmetric: bool = False
    use_bn: bool = True                # Table 3 switches
    use_adv: bool = True
    use_kd: bool = True
    use_mhad: bool = True
    use_sfcl: bool = True
    student_bn_eval_in_g: bool = True  # student BN in eval mode during generator steps
    # --- sample-efficient synthesis (dfkd.replay; docs/decisions.md#synthesis); off = Algorithm 1 ---
    replay: str = "off"                # off (student on fresh generator images) | pool (replay pool)
    replay_size: int = 4096            # images kept in the replay pool (FIFO)
    replay_aug: str = "crop_flip"      # none | flip | crop_flip[_mixup|_cutmix|_color] | rrc_flip: pool samples only
    replay_pad: float = 0.125          # dfkd_fgvc: crop_flip* reflect padding, a share of the side (S/8: 4 px at 32)
    replay_fresh: float = 0.0          # share of each student batch straight from the generator
    replay_extra: int = 0              # extra batches the updated generator adds to the pool per G step (no grad)
    replay_recent: float = 0.0         # share of each student batch drawn from the pool's newest images
    replay_recent_window: int = 0      # how many newest images that share draws from (0: one iteration's, g_steps x batch)
    replay_balance: float = 0.0        # dfkd_fgvc: pool draws weighted n_c^-b by the teacher's class at synthesis (0: uniform)
    g_oh: float = 0.0                  # generator: CE of teacher logits to their argmax (DFQ's L_oh)
    g_balance: float = 0.0             # generator: class balance of the batch-mean teacher softmax
    g_adv: float = 1.0                 # weight of the adversarial -L_KD in Eq. 10 (the paper: 1)
    g_div: float = 0.0                 # generator: MSGAN's mode-seeking term over the batch's two halves
    bn_momentum: float = 0.0           # Fast's momentum BN prior in Eq. 3: batch stats mixed with a memory (0: Eq. 3)
    bn_first_mul: float = 1.0          # dfkd_fgvc: the first BN layer's Eq. 3 term times this (DeepInversion: 10; 1: Eq. 3)
    g_reinit_every: int = 0            # re-initialise the generator and its Adam every N iterations (0: never)
    g_meta: str = "off"                # dfkd_fgvc: each iteration's G steps are one Fast round (fomaml | reptile; off: Eq. 10 on one generator)
    g_meta_lr_z: float = 0.015         # with g_meta: Adam lr of each round's trainable noise (Fast's lr_z)
    g_conditional: bool = False        # class-conditional generator: per-sample target labels (label embedding added to the noise)
    g_ce: float = 1.0                  # with g_conditional: weight of the teacher's CE to each sample's target
    g_aug: str = "none"                # augmentation of the generated batch inside Eq. 10 (DeepInversion's jitter + flip)
    # --- evaluation / logging / speed ---
    test_batch_size: int = 128
    max_eval_batches: int = 0          # 0 = the whole test split
    log_every: int = 1                 # iterations between metric rows (no host sync in between)
    checkpoint_every: int = 0          # iterations between resume states (0 = end of each epoch only)
    sample_every: int = 1              # epochs between sample grids
    amp: str = "auto"                  # auto (bf16 on CUDA) | native (+ CPU steps, bf16 instructions) | bf16 | off
    channels_last: bool = True         # CUDA; on a CPU only under bf16 autocast (the measured CPU fast path)
    compile: bool = False
    num_workers: int = 2
    interactive: bool = False

    def __post_init__(self):
        # the method's own options, checked against the chosen method (normalised: 1 -> 1.0 for a
        # float option, so params.yaml compares equal on resume)
        self.method_options = check_method_options(self.method, self.method_options)
        super().__post_init__()


@dataclass
class SynthConfig(DistillConfig):
    """Generator synthesis alone (notebook 20): the generator stage of Algorithm 1, watched."""
    run_name: str = "synthesis_dev"
    steps: int = 50                    # generator steps (Eq. 10) against a fixed random student
    n_samples: int = 32                # images in the saved grid


@dataclass
class VizConfig:
    """Report notebooks (40, 50, 51, 52, 90): which runs to read and how much to draw.

    The dataset, resolution and data root of the real images come from the runs' own params.yaml.
    """
    run_name: str = "viz_dev"          # runs/viz/<run_name>/ keeps the tables this notebook writes
    runs_prefix: str = ""              # distill runs whose name starts with this (see batches/*.yaml)
    runs: str = ""                     # or an explicit comma-separated list of distill run names
    teacher_prefix: str = ""           # teacher runs whose name starts with this
    n_images: int = 8                  # images per row in grids
    tsne_n: int = 500                  # points per t-SNE panel
    tsne_classes: int = 10             # classes shown in t-SNE (Fig. 5 uses 10)
    tsne_perplexity: float = 30.0      # clamped below n/3 for tiny inputs
    gradcam_images: int = 4            # synthetic and real images each (Fig. 6)
    figures_root: str = ""             # "" -> figures/; a relative path lies under runs/ (demo, smoke)
    data_root: str = ""                # overrides the runs' data_root when the data moved
    seed: int = 0
    device: str = "cpu"
    interactive: bool = False

    def __post_init__(self):
        validate(self)


STAGE_CONFIGS = {"teacher": TeacherConfig, "synthesis": SynthConfig, "distill": DistillConfig, "viz": VizConfig}


# --------------------------------------------------------------------------------------------
# Strict collection
# --------------------------------------------------------------------------------------------
def _check_type(name: str, value: Any, expected: type) -> Any:
    if expected is dict:   # method_options: its keys and values are checked against the method
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"parameter {name!r} must be a mapping (e.g. {{}}), got {type(value).__name__} "
                          f"({value!r}); fix its value in the parameters cell, YAML file or --set")
    try:
        return coerce(value, expected)   # bool is not an int here, an int is a float
    except TypeError:
        raise ConfigError(f"parameter {name!r} must be {expected.__name__}, got {type(value).__name__} "
                          f"({value!r}); fix its value in the parameters cell, YAML file or --set") from None


def field_types(cls) -> dict[str, type]:
    """``{field name: python type}`` of a config dataclass (annotations are strings here)."""
    types = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}
    return {f.name: types[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


def field_defaults(cls) -> dict[str, Any]:
    """``{field name: default}`` of a config dataclass (``default_factory`` fields called)."""
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in fields(cls)}


# --------------------------------------------------------------------------------------------
# method options (each method's Options dataclass, dfkd.methods.<name>; docs/methods.md)
# --------------------------------------------------------------------------------------------
def method_options_class(method: str):
    """The ``Options`` dataclass of ``METHODS[method]``; an unknown method lists the registered ones."""
    from .methods import METHODS   # here, not at the top: the registry imports torch (no cycle)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not a registered method; registered: {sorted(METHODS)}")
    return METHODS[method].Options


def check_method_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` checked against ``method``'s ``Options``: raises :class:`ConfigError` naming an
    unknown or mistyped key, the method and its known keys. Returns the normalised mapping (int
    values of float options as floats); ``{}`` (the method's defaults) is always valid."""
    from . import options as opts
    if options is None or (isinstance(options, Mapping) and not options):
        return {}
    if not isinstance(options, Mapping):
        return opts.normalize(opts.NoOptions, options, method)   # raises: not a mapping
    cls = method_options_class(method)

    def hint(key: str) -> str | None:
        from .methods import METHODS
        others = [m for m, c in METHODS.items() if m != method and key in opts.option_fields(c.Options)]
        if others:
            return f"an option of {', '.join(others)}, not of {method}"
        if key in field_types(DistillConfig):
            return f"{key!r} is a parameter of its own: set it outside method_options"
        return None
    return opts.normalize(cls, options, method, hint=hint)


def moved_parameter(name: str) -> str | None:
    """For a pre-``method_options`` parameter name (``cmi_tau``, ``pool_size``, ...), the message that
    says where it went; None for any other name."""
    from .methods import METHODS
    from .options import option_fields
    owners = [(m, k) for m, cls in METHODS.items() for k in option_fields(cls.Options)
              if name == f"{m}_{k}" or (name == k == "pool_size")]
    if not owners:
        return None
    how = " or ".join(f"method={m!r} with method_options={{{k!r}: ...}}" for m, k in owners)
    return (f"parameter {name!r} is now a method option: set {how} "
            "(each method's options: docs/methods.md)")


def collect(cls, namespace: Mapping[str, Any], **overrides):
    """Build ``cls`` from the names in ``namespace`` (e.g. a notebook's ``globals()``).

    Only the dataclass's field names are read; a field absent from ``namespace`` keeps its
    default. Every value is type-checked. ``overrides`` win over ``namespace`` and are also
    checked, and an override that names no field raises.
    """
    types = field_types(cls)
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        moved = [m for m in map(moved_parameter, unknown) if m] if "method_options" in types else []
        raise ConfigError("; ".join(moved) if moved else
                          f"unknown parameter(s) {unknown} for {cls.__name__}; known: {sorted(types)}")
    if "method_options" in types:   # an old-style name left in a notebook would be ignored silently
        moved = [m for n in namespace if n not in types and (m := moved_parameter(n))]
        if moved:
            raise ConfigError("; ".join(moved))
    values = {}
    for name, typ in types.items():
        if name in overrides:
            values[name] = _check_type(name, overrides[name], typ)
        elif name in namespace:
            values[name] = _check_type(name, namespace[name], typ)
    cfg = cls(**values)
    validate(cfg)
    return cfg


def check_overrides(cls, params: Mapping[str, Any]) -> None:
    """Raise if ``params`` has a key that is not a field of ``cls`` or a value of the wrong type."""
    types = field_types(cls)
    for k, v in params.items():
        if k not in types:
            moved = moved_parameter(k) if "method_options" in types else None
            raise ConfigError(moved or f"unknown parameter {k!r} for {cls.__name__}")
        _check_type(k, v, types[k])
    if "method_options" in types and "method_options" in params:
        check_method_options(params.get("method", field_defaults(cls)["method"]), params["method_options"])


# the accepted values of the string fields, checked by validate(); the modules that implement them
# keep their own tuples (config imports no torch code), and tests/test_replay.py checks that
# the two agree where both exist
CHOICES: dict[str, tuple[str, ...]] = {
    "sam_softmax": ("spatial", "spatial_scaled", "channel"),
    "block_norm": ("none", "bn"),
    "output_map": ("imagenet", "raw_tanh"),
    "kd_direction": ("t_s", "s_t"),
    "mha_mode": ("frozen", "trainable", "separate"),
    "mhad_mode": ("auto", "stages", "penultimate"),
    "g_lr_schedule": ("constant", "cosine"),
    "s_lr_schedule": ("epoch", "iter", "onecycle"),
    "amp": ("auto", "native", "bf16", "off"),
    "schedule": ("cosine", "onecycle"),
    "gpu_preload": ("auto", "on", "off"),
    "replay": ("off", "pool"),
    "g_meta": ("off", "fomaml", "reptile"),
    "replay_aug": ("none", "flip", "crop_flip", "crop_flip_mixup", "crop_flip_cutmix", "crop_flip_color", "rrc_flip"),
    "g_aug": ("none", "flip", "crop_flip", "rrc_flip"),
}


# fields that must be >= 0, with what they mean (the error message says it)
NON_NEGATIVE = {
    "mhad_from": "the first stage MHAD distils; 0 = every block, the paper",
    "replay_balance": "0: uniform pool draws; 1: every class the teacher sees in the pool drawn equally often",
    "replay_recent_window": "images; 0 = one iteration's generator batches",
    "replay_extra": "extra pool batches per generator step",
    "bn_first_mul": "weight of the teacher's first BN layer in the BN prior; 1 = Eq. 3, DeepInversion uses 10",
    "g_ce": "weight of the per-sample target cross-entropy with g_conditional",
    "g_reinit_every": "iterations between generator re-initialisations; 0 = never",
    "adv_eps": "L2 radius of the teacher's adversarial training in the normalised input; 0 = standard training",
}


def validate(cfg) -> None:
    """Type and range checks that catch typos early (names the field and the accepted values).
    A config built directly (``DistillConfig(use_adv="false")``, not through :func:`collect`) gets
    the same type check; an int given for a float field is stored as a float."""
    for name, typ in field_types(type(cfg)).items():
        object.__setattr__(cfg, name, _check_type(name, getattr(cfg, name), typ))
    for name, allowed in CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not one of {allowed}")
    for name in ("image_size", "batch_size", "epochs"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if hasattr(cfg, "batch_size") and cfg.batch_size < 2:
        raise ConfigError("batch_size must be >= 2: BatchNorm in train mode needs two samples")
    if hasattr(cfg, "mha_order") and cfg.mha_order not in (1, 2, 3, 4, 5, 6):
        raise ConfigError(f"mha_order must be in 1..6, got {cfg.mha_order}")
    if hasattr(cfg, "g_stop") and not 0.0 < cfg.g_stop <= 1.0:
        raise ConfigError(f"g_stop must lie in (0, 1] (the share of the iterations with generator steps; 1 = "
                          f"Algorithm 1 throughout), got {cfg.g_stop}")
    if hasattr(cfg, "replay_fresh") and not 0.0 <= cfg.replay_fresh <= 1.0:
        raise ConfigError(f"replay_fresh must lie in [0, 1] (a share of the student batch), got {cfg.replay_fresh}")
    if hasattr(cfg, "replay_pad") and not 0.0 < cfg.replay_pad < 1.0:
        raise ConfigError(f"replay_pad must lie in (0, 1) (the pool crops' reflect padding as a share of the "
                          f"image side; 0.125 = S/8), got {cfg.replay_pad}")
    if hasattr(cfg, "replay_recent") and not 0.0 <= cfg.replay_recent <= 1.0 - cfg.replay_fresh:
        raise ConfigError(f"replay_recent must lie in [0, 1 - replay_fresh] (a share of the student batch; "
                          f"replay_fresh is {cfg.replay_fresh}), got {cfg.replay_recent}")
    for name, meaning in NON_NEGATIVE.items():
        if hasattr(cfg, name) and getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0 ({meaning}), got {getattr(cfg, name)}")
    if hasattr(cfg, "s_warmup") and not 0.0 < cfg.s_warmup < 1.0:
        raise ConfigError(f"s_warmup must lie in (0, 1) (the share of the iterations that warms the "
                          f"student's lr up under s_lr_schedule='onecycle'), got {cfg.s_warmup}")
    if hasattr(cfg, "bn_momentum") and not 0.0 <= cfg.bn_momentum < 1.0:
        raise ConfigError(f"bn_momentum must lie in [0, 1) (the memory's share in the BN prior; 0 = Eq. 3), "
                          f"got {cfg.bn_momentum}")
    if hasattr(cfg, "adv_steps") and cfg.adv_steps < 1:
        raise ConfigError(f"adv_steps must be >= 1 (gradient steps of the teacher's adversarial training), got {cfg.adv_steps}")
    if hasattr(cfg, "replay_size") and cfg.replay_size < 1:
        raise ConfigError(f"replay_size must be >= 1 image, got {cfg.replay_size}")
    if getattr(cfg, "g_meta", "off") != "off" and (cfg.replay != "pool" or cfg.replay_extra > 0):
        raise ConfigError(f"g_meta={cfg.g_meta!r} puts each round's final batch into the replay pool that the "
                          f"student learns from: it needs replay='pool' (got {cfg.replay!r}) and replay_extra=0 "
                          f"(got {cfg.replay_extra}); set those or g_meta='off'")
    for name in ("lr", "lr_g", "lr_s", "tau", "kd_T", "g_meta_lr_z"):
        if hasattr(cfg, name) and not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ConfigError(f"{name} must be a positive finite number, got {getattr(cfg, name)}")


def to_dict(cfg) -> dict[str, Any]:
    """Plain ``{name: value}`` of a config (what ``params.yaml`` holds)."""
    return dataclasses.asdict(cfg)
