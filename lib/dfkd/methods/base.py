"""The one interface every data-free distillation method implements.

A method owns everything that trains (generator or synthetic inputs, the student, adapters,
heads, attention modules, both optimisers, their schedules and counters); the frozen teacher is
held but never checkpointed. ``generator_step`` and ``student_step`` are the two override points;
``iteration`` is Algorithm 1: ``g_steps`` generator steps, then ``s_steps`` student steps.

Fast path (CUDA; on a CPU the first two with ``amp: native`` or ``bf16``): bf16 autocast,
channels_last, no host synchronisation inside an iteration (losses stay tensors; the caller syncs
every ``log_every`` iterations), student weight gradients
off during generator steps, teacher gradients never, fused optimisers (foreach where fused is
unavailable), opt-in ``torch.compile`` of the forward passes (``cfg.compile``). Measured by
``python -m dfkd.bench``; see ``docs/decisions.md#speed``.

Data parallel (under torchrun, ``dfkd.dist``): ``self.cfg.batch_size`` is this rank's share of the
configured global batch, :meth:`sample_z` slices the global noise batch, train-mode BatchNorm uses
global statistics and gradients are averaged over ranks before every optimiser step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .. import dist
from ..generator import to_teacher_input
from ..options import ConfigError, NoOptions, resolve

if TYPE_CHECKING:   # dfkd.config imports this registry lazily; the methods never import it
    from ..config import DistillConfig

COUNTERS = ("iterations", "g_steps", "s_steps", "images_generated", "images_consumed", "teacher_forwards")
IMAGE_COUNTERS = ("images_generated", "images_consumed", "teacher_forwards")   # per rank under DDP


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo),
    where bf16 autocast speeds the loop up; elsewhere it is emulated and slower (``amp: native``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


# On a CPU, PyTorch's channels_last BatchNorm kernels vectorise over the channels; with fewer than
# 16 of them (resnet_tiny_s's first stage has 8) forward + backward are about 8 times slower than the
# same layer in NCHW (3.2 against 0.4 ms for (32, 8, 32, 32) bf16 here). Such layers compute in NCHW
# and hand channels_last on: the same arithmetic, one layout copy each way
# (docs/decisions.md, 'Few-channel BatchNorm in NCHW').
NCHW_BN_BELOW = 16


def _bn_input_nchw(module, args):
    x = args[0]
    module._dfkd_from_cl = (x.dim() == 4 and not x.is_contiguous()
                            and x.is_contiguous(memory_format=torch.channels_last))
    return (x.contiguous(),) + tuple(args[1:]) if module._dfkd_from_cl else None


def _bn_output_channels_last(module, args, out):
    # only what came in channels_last goes back to it (modules kept in NCHW stay NCHW)
    return out.contiguous(memory_format=torch.channels_last) if module._dfkd_from_cl else None


def nchw_few_channel_batchnorm(module: nn.Module, below: int | None = None) -> int:
    """Make every BatchNorm2d of ``module`` with fewer than ``below`` (default ``NCHW_BN_BELOW``;
    0 turns this off) channels compute in NCHW (forward pre-hook) and return channels_last (forward
    hook); idempotent. Returns the number of layers that carry the pair."""
    below = NCHW_BN_BELOW if below is None else below
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features < below:
            if not getattr(m, "_dfkd_nchw", False):
                m.register_forward_pre_hook(_bn_input_nchw)
                m.register_forward_hook(_bn_output_channels_last)
                m._dfkd_nchw = True
            n += 1
    return n


def has_foreign_forward_hooks(module: nn.Module) -> bool:
    """True when a forward hook other than the layout pair above watches ``module`` (the BN prior)."""
    return any(h is not _bn_output_channels_last
               for m in module.modules() for h in m._forward_hooks.values())


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def make_optimizer(cls, params, device: torch.device, impl: str = "auto", **kw) -> torch.optim.Optimizer:
    """``cls(params, **kw)`` with the multi-tensor implementation for ``device``.

    ``impl``: ``auto`` (CUDA: fused, falling back to foreach where fused is unsupported; CPU:
    PyTorch's default), ``fused``, ``foreach`` or ``plain`` (the single-tensor loop, the reference
    of ``dfkd.bench``). The implementations compute the same update up to rounding.

    Data parallel (``dfkd.dist``, more than one rank): the optimiser averages its parameters'
    gradients over the ranks just before every step (a step pre-hook); one rank: nothing added.
    """
    params = list(params)
    if impl == "auto":
        impl = "fused" if torch.device(device).type == "cuda" else "default"
    opt = None
    if impl == "fused":
        try:
            opt = cls(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            impl = "foreach"
    if opt is None:
        extra = {"foreach": {"foreach": True}, "plain": {"foreach": False}, "default": {}}[impl]
        opt = cls(params, **extra, **kw)
    dist.average_gradients_on_step(opt)
    return opt


class DistillMethod(nn.Module):
    """Base class. Subclasses set up their modules in :meth:`build` and implement the two steps.

    Args:
        teacher: frozen classifier (``dfkd.models.FeatureNet``), kept in eval mode, never saved here.
        student: the network to train (``FeatureNet``), randomly initialised.
        cfg: the run's :class:`~dfkd.config.DistillConfig`.
        num_classes: K. image_size: S of the synthetic images (B, 3, S, S).

    A method's own hyper-parameters are its ``Options`` dataclass (defined in its module, defaults
    cited there); ``self.opts`` is that dataclass filled from ``cfg.method_options``.
    """

    name = "base"
    Options = NoOptions    # the method's own hyper-parameters (dfkd.options; docs/methods.md)
    uses_generator = True  # False for input-optimisation methods (ZSKD, ADI)
    optim_impl = "auto"    # make_optimizer(impl=...); the bench's fp32 reference sets "plain"
    nchw_modules: tuple[str, ...] = ()   # submodules kept in NCHW when the networks go channels_last

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig, *,
                 num_classes: int, image_size: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        if self.world_size > 1:   # cfg.batch_size is the global batch; this rank makes its share
            cfg = dataclasses.replace(cfg, batch_size=dist.local_batch_size(cfg.batch_size))
        # data parallel: BN prior statistics averaged over ranks (None: this process's batch)
        self.stat_reduce = dist.mean_across_ranks if self.world_size > 1 else None
        self.__dict__["teacher"] = teacher  # not a registered submodule: not in state_dict
        self.student = student
        self.cfg = cfg
        if cfg.method_options and cfg.method != self.name:
            raise ConfigError(f"method_options were given for method {cfg.method!r}, but this is {self.name!r}: "
                              f"set method={self.name!r} in the config")
        self.opts = resolve(self.Options, cfg.method_options, self.name)   # the one accessor
        self.num_classes = num_classes
        self.image_size = image_size
        self.device = torch.device(device)
        self.counters = {k: 0 for k in COUNTERS}
        teacher.eval()
        set_requires_grad(teacher, False)
        self.amp_dtype = self._amp_dtype(cfg.amp, self.device)
        # channels_last on a CPU only under bf16 autocast: with AVX512-BF16 / AMX the oneDNN bf16
        # convolutions are about twice as fast in NHWC (docs/decisions.md, 'The CPU fast path')
        self.channels_last = bool(cfg.channels_last and (self.device.type == "cuda"
                                                         or self.amp_dtype == torch.bfloat16))
        self.g_opt: torch.optim.Optimizer | None = None
        self.s_opt: torch.optim.Optimizer | None = None
        self.s_sched = None
        self.g_sched = None   # cfg.g_lr_schedule == "cosine" only (default: constant lr_g)
        self.build()
        if self.world_size > 1:   # train-mode BN of student, generator, SAM, MHA: global statistics
            dist.convert_batchnorm(self)
        self.to(self.device)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
            teacher.to(memory_format=torch.channels_last)
            for name in self.nchw_modules:    # modules whose element-wise work is faster in NCHW
                if getattr(self, name, None) is not None:
                    getattr(self, name).to(memory_format=torch.contiguous_format)
            if self.device.type == "cpu":   # few-channel BN layers: NCHW kernels (see above)
                for m in (self, teacher):
                    nchw_few_channel_batchnorm(m)
        self.configure_optimizers()   # make_optimizer: gradients averaged over ranks at each step
        if self.world_size > 1:        # identical start on every rank
            dist.broadcast_module(self)
            dist.broadcast_module(teacher)
        self.__dict__["_teacher_features"] = None   # compiled hook-free teacher feature pass
        if cfg.compile:
            self.compile_models()

    # ------------------------------------------------------------------ hooks for subclasses
    def build(self) -> None:
        """Create the generator and auxiliary modules (registered as attributes)."""

    def trainable_student_modules(self) -> list[nn.Module]:
        """Modules the student optimiser updates (student + adapters, heads, ...)."""
        return [self.student]

    def generator_parameters(self) -> list[nn.Parameter]:
        gen = getattr(self, "generator", None)
        return list(gen.parameters()) if gen is not None else []

    def configure_optimizers(self) -> None:
        """SGD for the student (lr 0.01, momentum 0.9, wd 5e-4, cosine over all epochs) and Adam
        for the generator (lr 1e-3, betas (0.5, 0.99)), as Sec. 5.1 states. Each is created once
        and kept for the whole run (a peer codebase re-created Adam every round)."""
        cfg = self.cfg
        params = [p for m in self.trainable_student_modules() for p in m.parameters() if p.requires_grad]
        self.s_opt = make_optimizer(torch.optim.SGD, params, self.device, self.optim_impl, lr=cfg.lr_s,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # cosine over the epochs (stepped at each epoch's end) or, s_lr_schedule="iter", over the
        # iterations (stepped after each, reaching 0 at the end; docs/decisions.md#synthesis)
        # or, "onecycle", a warm-up over the first s_warmup of the iterations to lr_s, then the cosine
        # to ~0 (OneCycleLR, the teacher recipe's schedule), stepped after each iteration
        n_iters = max(1, cfg.epochs * cfg.iters_per_epoch)
        if cfg.s_lr_schedule == "onecycle":
            self.s_sched = torch.optim.lr_scheduler.OneCycleLR(self.s_opt, max_lr=cfg.lr_s, total_steps=n_iters,
                                                               pct_start=cfg.s_warmup)
        else:
            t_max = n_iters if cfg.s_lr_schedule == "iter" else max(1, cfg.epochs)
            self.s_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.s_opt, T_max=t_max)
        gparams = self.generator_parameters()
        if gparams:
            self.g_opt = make_optimizer(torch.optim.Adam, gparams, self.device, self.optim_impl,
                                        lr=cfg.lr_g, betas=(cfg.g_beta1, cfg.g_beta2))
            if cfg.g_lr_schedule == "cosine":   # paper silent; default constant (decisions.md)
                self.g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.g_opt, T_max=max(1, cfg.epochs))

    def generator_step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of one student step on teacher-space images x (B, 3, S, S); must hold ``loss``."""
        raise NotImplementedError

    @staticmethod
    def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One update of ``opt`` on ``loss`` (gradients of earlier steps dropped)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def train_student_on(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One student step on images x: :meth:`student_losses`, then the student optimiser."""
        with self.autocast():
            out = self.student_losses(x)
        self.optimize(self.s_opt, out["loss"])
        self.counters["images_consumed"] += int(x.shape[0])
        return {k: v.detach() for k, v in out.items()}

    # ------------------------------------------------------------------ shared machinery
    @staticmethod
    def _amp_dtype(amp: str, device: torch.device):
        if amp == "off":
            return None
        if amp == "bf16" or device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if amp == "native" and cpu_has_native_bf16() else None  # auto: off on a CPU

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sample_z(self, n: int) -> torch.Tensor:
        """z ~ N(0, I), (n, nz) (Sec. 3).

        Data parallel: the global batch of ``n * world_size`` rows is drawn from the global RNG
        (seeded alike on every rank) and this rank keeps rows ``rank*n:(rank+1)*n``, so the ranks
        together use the noise one process would draw, and their RNG states stay equal.
        """
        if self.world_size == 1:
            return torch.randn(n, self.cfg.nz, device=self.device)
        z = torch.randn(n * self.world_size, self.cfg.nz, device=self.device)
        return z[self.rank * n:(self.rank + 1) * n]

    def to_input(self, x_tanh: torch.Tensor) -> torch.Tensor:
        """Generator output in [-1, 1] -> the teacher's normalised input space."""
        x = to_teacher_input(x_tanh, self.cfg.output_map)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def generator_inputs(self, z: torch.Tensor) -> tuple:
        """Extra positional inputs of the generator for the noise batch z (default: none). The one
        override point of :meth:`generate`: a class-conditional method returns its target labels."""
        return ()

    def generate(self, n: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, S, S) teacher-space images from the generator (with grad)."""
        z = self.sample_z(n) if z is None else z
        self.counters["images_generated"] += int(z.shape[0])
        return self.to_input(self.generator(z, *self.generator_inputs(z)))

    @torch.no_grad()
    def synthesize(self, n: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, S, S) synthetic images in the teacher's input space, without grad (for display
        use ``dfkd.generator.from_teacher_input``). Generator BN is put in eval mode meanwhile."""
        gen = self.generator
        was = gen.training
        gen.eval()
        try:
            z = self.sample_z(n) if z is None else z.to(self.device)
            with self.autocast():
                return self.to_input(gen(z)).float()
        finally:
            gen.train(was)

    def teacher_forward(self, x: torch.Tensor, features: bool = False):
        self.counters["teacher_forwards"] += int(x.shape[0])
        if features:
            fn = self._teacher_features
            if fn is not None and not has_foreign_forward_hooks(self.teacher):
                return fn(x)    # compiled, only while no hook (BN prior) watches the teacher
            return self.teacher.forward_features(x)
        return self.teacher(x)

    def compile_models(self) -> None:
        """``torch.compile`` the student's and generator's forward passes and the teacher's feature
        pass (``cfg.compile``, opt-in).

        The compiled functions replace ``forward`` / ``forward_features`` as instance attributes,
        so module structure and state_dict keys are unchanged. The teacher's ``forward`` stays
        eager: the BN prior (Eq. 3) adds and removes forward hooks on it at every generator step,
        and a compiled graph does not see hooks added after it was traced. The compiled teacher
        feature pass is used only while the teacher carries no forward hook.
        """
        for m in (self.student, getattr(self, "generator", None)):
            if m is None:
                continue
            if hasattr(m, "forward_features"):
                m.forward_features = torch.compile(m.forward_features)
            m.forward = torch.compile(m.forward)
        self.__dict__["_teacher_features"] = torch.compile(self.teacher.forward_features)

    @contextlib.contextmanager
    def generator_phase(self):
        """Student frozen (no weight grads; BN in eval unless configured otherwise) while G trains."""
        s = self.student
        was = s.training
        set_requires_grad(s, False)
        if self.cfg.student_bn_eval_in_g:
            s.eval()
        try:
            yield
        finally:
            set_requires_grad(s, True)
            s.train(was)

    def iteration(self) -> dict[str, torch.Tensor]:
        """Algorithm 1: ``g_steps`` generator steps, then ``s_steps`` student steps.

        Returns the mean of each loss over its steps as 0-dim tensors (no host sync).
        """
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def add(d):
            for k, v in d.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
                counts[k] = counts.get(k, 0) + 1

        self.student.train()
        if self.g_steps_per_iteration() > 0:
            with self.generator_phase():
                for _ in range(self.g_steps_per_iteration()):
                    add({f"g_{k}": v for k, v in self.generator_step().items()})
                    self.counters["g_steps"] += 1
        for _ in range(self.s_steps_per_iteration()):
            add({f"s_{k}": v for k, v in self.student_step().items()})
            self.counters["s_steps"] += 1
        self.counters["iterations"] += 1
        return {k: sums[k] / counts[k] for k in sums}

    def synthesis_iterations(self) -> int:
        """Iterations that run generator steps: the first ``ceil(g_stop x epochs x iters_per_epoch)``.
        The rest (``g_stop`` < 1) run only their student steps, on the frozen generator's images or
        pool: a distillation tail after synthesis (decisions.md, 'A distillation tail')."""
        total = self.cfg.epochs * self.cfg.iters_per_epoch
        return total if self.cfg.g_stop >= 1.0 else math.ceil(self.cfg.g_stop * total - 1e-9)

    def g_steps_per_iteration(self) -> int:
        if self.counters["iterations"] >= self.synthesis_iterations():
            return 0
        return self.cfg.g_steps if (self.g_opt is not None or not self.uses_generator) else 0

    def s_steps_per_iteration(self) -> int:
        return self.cfg.s_steps

    def iteration_end(self) -> None:
        """Per-iteration schedule step (``s_lr_schedule`` "iter" or "onecycle"); called after each iteration."""
        if self.s_sched is not None and self.cfg.s_lr_schedule in ("iter", "onecycle"):
            self.s_sched.step()

    def epoch_end(self) -> None:
        """Per-epoch schedule step (cosine annealing of the student's learning rate)."""
        if self.s_sched is not None and self.cfg.s_lr_schedule == "epoch":
            self.s_sched.step()
        if getattr(self, "g_sched", None) is not None:
            self.g_sched.step()

    def budget(self) -> dict[str, int]:
        """Equal-budget accounting: images generated/consumed, steps, teacher forward passes.

        Image counts are global: data parallel, each rank counts its own share (``self.counters``)
        and the W equal shares are summed here."""
        return {k: v * self.world_size if k in IMAGE_COUNTERS else v for k, v in self.counters.items()}

    def lr(self) -> dict[str, float]:
        out = {"lr_s": self.s_opt.param_groups[0]["lr"]} if self.s_opt else {}
        if self.g_opt is not None:
            out["lr_g"] = self.g_opt.param_groups[0]["lr"]
        return out

    # ------------------------------------------------------------------ checkpointing
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything that trains: modules, optimisers, schedulers, counters (tensors/primitives).

        Data parallel: a collective (every rank calls it; ``distill`` does). The state is the one
        a single process on the global batch would hold: modules are identical on every rank,
        pools global, per-rank rows (a crafted batch, round targets) gathered in rank order, so
        rank 0's copy resumes every rank (:meth:`load_checkpoint_state` keeps each rank's rows)."""
        state = {"modules": {k: v.detach().clone() for k, v in self.state_dict().items()},
                 "counters": self.budget(), "method": self.name}   # global counts: any world size resumes
        if self.s_opt is not None:
            state["s_opt"] = self.s_opt.state_dict()
        if self.g_opt is not None:
            state["g_opt"] = self.g_opt.state_dict()
        if self.s_sched is not None:
            state["s_sched"] = self.s_sched.state_dict()
        if getattr(self, "g_sched", None) is not None:
            state["g_sched"] = self.g_sched.state_dict()
        state.update(self.extra_state())
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"this checkpoint was written by method {state.get('method')!r}, not "
                             f"{self.name!r}; use the run's own method or a new run_name")
        try:
            self.load_state_dict(state["modules"], strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint modules do not fit this {self.name} setup (another student "
                             f"or generator architecture?): {str(e).splitlines()[0]}") from e
        if self.s_opt is not None and "s_opt" in state:
            self.s_opt.load_state_dict(state["s_opt"])
        if self.g_opt is not None and "g_opt" in state:
            self.g_opt.load_state_dict(state["g_opt"])
        if self.s_sched is not None and "s_sched" in state:
            self.s_sched.load_state_dict(state["s_sched"])
        if getattr(self, "g_sched", None) is not None and "g_sched" in state:
            self.g_sched.load_state_dict(state["g_sched"])
        self.counters.update({k: v // self.world_size if k in IMAGE_COUNTERS else v
                              for k, v in state.get("counters", {}).items()})
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Method-specific extra state (pools, memory banks, EMA copies)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
