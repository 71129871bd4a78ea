"""DFKD-FGVC (Shao et al., ICCV 2023): attention generator + MHAD + SFCL.

Generator step (Eq. 10):  min_G  alpha * L_BN  -  L_KD
Student step   (Eq. 11):  min_S  L_KD + beta * L_MHAD + gamma * L_SFCL

with L_KD the KL divergence of Eq. 2, L_BN the BatchNorm-statistics prior of Eq. 3 on the frozen
teacher, L_MHAD the mixed high-order attention distillation of Eq. 7 and L_SFCL the semantic
feature contrastive loss of Eqs. 8-9. Every term can be switched off (Table 3) and every weight is
a config field (Tables 4-5, Fig. 7). Design choices where the paper is silent are listed in
``docs/decisions.md`` and selected by the config fields named there. Options added since
2026-12-08 are this method's own (``method_options``, :class:`DFKDFGVCOptions`); the older ones are
still shared config fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..generator import AttentionGenerator
from ..losses import (ProjectionHead, bn_memory_state, bn_prior, build_mhad, class_coverage_terms, kd_loss,
                      load_bn_memory, mhad_loss, mode_seeking_loss, sfcl_loss)
from ..options import option
from ..replay import Replay, augment
from .base import DistillMethod
from .fast import meta_update, open_round, round_update


@dataclass(frozen=True)
class DFKDFGVCOptions:
    """DFKD-FGVC: Shao et al., "Data-free Knowledge Distillation for Fine-grained Visual Categorization",
    ICCV 2023. Defaults: the paper's (Table 6: a SAM after every generator block)."""
    sam_blocks: int = option(4, "SAMs after the first N of the generator's four blocks (4: every block, "
                                "Table 6; 3 drops the largest block's, most of the SAMs' CPU cost)")


class PenultimateAdapter(nn.Module):
    """MLP with two hidden layers mapping student penultimate features (B, Ds, 1, 1) to the
    teacher's width (B, Dt, 1, 1); used for heterogeneous students (Sec. 5.2, Table 2)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        h = hidden or out_dim
        self.net = nn.Sequential(nn.Conv2d(in_dim, h, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(h, h, 1), nn.ReLU(inplace=True), nn.Conv2d(h, out_dim, 1))

    def forward(self, x):
        return self.net(x)


def resolve_mhad_mode(cfg, teacher, student) -> str:
    """``auto``: ``stages`` for ResNet -> ResNet (both ``family == "resnet"`` with as many stages),
    otherwise ``penultimate``: Sec. 5.2 distils WRN40-2 *and* MobileNetV2 students (Table 2) at the
    penultimate layer only, although MobileNetV2 has four stages like ResNet-34. A network without
    a ``family`` attribute counts as ResNet when its ``arch`` starts with ``resnet``."""
    if cfg.mhad_mode != "auto":
        return cfg.mhad_mode

    def family(m) -> str:
        fam = getattr(m, "family", "")
        return fam or ("resnet" if str(getattr(m, "arch", "")).startswith("resnet") else "")

    same = family(teacher) == family(student) == "resnet"
    return "stages" if same and len(teacher.stage_channels) == len(student.stage_channels) else "penultimate"


class DFKDFGVC(DistillMethod):
    """The paper's method (Algorithm 1)."""

    name = "dfkd_fgvc"
    Options = DFKDFGVCOptions
    # MHAD's route products, sigmoids and route mean are element-wise passes over (B, R, C, H, W)
    # stacks, several times slower on NHWC strides on a CPU: mhad_loss feeds them NCHW features
    nchw_modules = ("adapters", "mhas", "teacher_mhas")

    def build(self) -> None:
        cfg, t, s = self.cfg, self.teacher, self.student
        self.generator = self.build_generator()
        self._reinit_done = -1   # the iteration whose re-initialisation ran (g_reinit_every)
        self.targets: torch.Tensor | None = None   # g_conditional: the labels of the last generated batch
        # g_meta: the open round (fast generator, noise, Adam, summed gradients) and its step
        self._round: dict | None = None
        self.round_step = 0
        # bn_momentum > 0: per-layer (mean, var) memory of the generated batches (Fast's momentum prior)
        self.bn_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mhad_mode = resolve_mhad_mode(cfg, t, s)
        if cfg.use_mhad:
            if self.mhad_mode == "stages":
                if len(t.stage_channels) != len(s.stage_channels):
                    raise ValueError(f"mhad_mode='stages' needs as many stages in the student "
                                     f"({s.arch}: {len(s.stage_channels)}) as in the teacher "
                                     f"({t.arch}: {len(t.stage_channels)}); use mhad_mode='penultimate'")
                tc, sc = list(t.stage_channels), list(s.stage_channels)
                if not 0 <= cfg.mhad_from < len(tc):
                    raise ValueError(f"mhad_from={cfg.mhad_from} leaves no stage to distil: {t.arch} has "
                                     f"{len(tc)} stages; use 0..{len(tc) - 1} (0: every block, the paper)")
            else:
                if cfg.mhad_from != 0:
                    raise ValueError(f"mhad_from={cfg.mhad_from} needs mhad_mode='stages' (this run distils "
                                     f"the penultimate features only); set mhad_from=0")
                tc, sc = [t.feature_dim], [s.feature_dim]
            adapters, mhas, teacher_mhas = build_mhad(tc, sc, order=cfg.mha_order, mode=cfg.mha_mode,
                                                       seed=cfg.seed)
            if self.mhad_mode == "penultimate":
                adapters = nn.ModuleList([PenultimateAdapter(s.feature_dim, t.feature_dim)])
            self.adapters, self.mhas = adapters, mhas
            self.teacher_mhas = teacher_mhas
        # replay pool (dfkd.replay, docs/decisions.md#synthesis): off = Algorithm 1 as printed
        # replay_recent_window 0: the images of one iteration's generator steps (global batch)
        window = cfg.replay_recent_window or cfg.g_steps * cfg.batch_size * self.world_size
        self.replay = (Replay(max(cfg.replay_size, cfg.batch_size * self.world_size), cfg.output_map, self.device,
                              aug=cfg.replay_aug, pad=cfg.replay_pad, fresh=cfg.replay_fresh,
                              recent=cfg.replay_recent, window=max(1, window), balance=cfg.replay_balance)
                       if cfg.replay == "pool" else None)
        if cfg.use_sfcl:
            # one projection shared by both networks (a common space, Sec. 4.3); a linear map first
            # brings a student of another width to the teacher's
            self.student_to_teacher = (nn.Identity() if s.feature_dim == t.feature_dim
                                       else nn.Linear(s.feature_dim, t.feature_dim))
            self.projection = ProjectionHead(t.feature_dim, cfg.sfcl_dim)

    def build_generator(self) -> AttentionGenerator:
        cfg = self.cfg
        return AttentionGenerator(
            nz=cfg.nz, img_size=self.image_size, ngf=cfg.ngf, lam=cfg.lam,
            sam_reduction=cfg.sam_reduction, sam_softmax=cfg.sam_softmax,
            deconv_kernel=cfg.deconv_kernel, block_norm=cfg.block_norm, use_sam=cfg.lam > 0,
            num_classes=self.num_classes if cfg.g_conditional else 0, sam_blocks=self.opts.sam_blocks)

    def sample_targets(self, n: int) -> torch.Tensor:
        """``g_conditional``: n labels (n,) for this rank, class-balanced over the global batch: the
        concatenation of fresh permutations of the K classes, cut to ``n * world_size`` rows (so a
        batch smaller than K holds distinct classes, a larger one every class about equally often).
        Drawn from the global RNG like :meth:`sample_z`, so every rank draws the same and keeps its
        rows."""
        k, total = self.num_classes, n * self.world_size
        y = torch.cat([torch.randperm(k) for _ in range(math.ceil(total / k))])[:total].to(self.device)
        return y[self.rank * n:(self.rank + 1) * n]

    def generator_inputs(self, z: torch.Tensor) -> tuple:
        """With ``g_conditional``: class-balanced target labels for the batch z, kept in
        ``self.targets`` for the generator's CE term; otherwise none (the paper's generator)."""
        if not self.cfg.g_conditional:
            return ()
        self.targets = self.sample_targets(z.shape[0])
        return (self.targets,)

    def trainable_student_modules(self) -> list[nn.Module]:
        mods = [self.student]
        for name in ("adapters", "mhas", "student_to_teacher", "projection"):
            if hasattr(self, name):
                mods.append(getattr(self, name))
        return mods

    # ------------------------------------------------------------------ Eq. 10
    def maybe_reinit_generator(self) -> None:
        """``g_reinit_every`` N > 0: at the first generator step of every N-th iteration after the
        first, the generator gets fresh weights and its Adam forgets its moments, so the pool holds
        the images of several generators instead of one trajectory (docs/decisions.md#synthesis).
        Keyed on the iteration counter, which the checkpoint holds, so a resumed run re-initialises
        at the same iterations."""
        n, it = self.cfg.g_reinit_every, self.counters["iterations"]
        if n <= 0 or it == 0 or it % n or self._reinit_done == it:
            return
        self._reinit_done = it
        self.generator.load_state_dict(self.build_generator().state_dict())
        self.g_opt.state.clear()
        if self.world_size > 1:
            dist.broadcast_module(self.generator)

    def generator_objective(self, x: torch.Tensor, z: torch.Tensor):
        """Eq. 10 (and the CPU presets' extra terms) on the generated batch x (with grad) from
        noise z: returns (loss, the logged terms, the BN prior's handle, the teacher's logits)."""
        cfg = self.cfg
        # g_aug: the networks see a differentiable augmentation of the batch (DeepInversion's
        # jitter and flip); the pool keeps the batch as generated (docs/decisions.md#synthesis)
        xa = augment(x, cfg.g_aug)
        # bn_first_mul: DeepInversion's first-layer multiplier (docs/decisions.md, seventh session of 2026-12-06)
        with bn_prior(self.teacher, first_bn_multiplier=cfg.bn_first_mul, reduce=self.stat_reduce,
                      momentum=cfg.bn_momentum, memory=self.bn_memory) as bn:
            t_logits = self.teacher_forward(xa)
        s_logits = self.student(xa)
        l_bn = bn.loss()
        l_kd = kd_loss(s_logits, t_logits, T=cfg.kd_T, direction=cfg.kd_direction)
        loss = x.new_zeros((), dtype=torch.float32)
        if cfg.use_bn:
            loss = loss + cfg.alpha * l_bn
        if cfg.use_adv:
            loss = loss - cfg.g_adv * l_kd
        out = {}
        if cfg.g_oh > 0 or cfg.g_balance > 0:   # class-coverage terms (off in the paper preset)
            out["oh"], out["balance"] = class_coverage_terms(t_logits, self.stat_reduce)
            loss = loss + cfg.g_oh * out["oh"] + cfg.g_balance * out["balance"]
        if cfg.g_div > 0:   # MSGAN's mode-seeking term (off in the paper preset)
            out["div"] = mode_seeking_loss(x, z)
            loss = loss + cfg.g_div * out["div"]
        if cfg.g_conditional:   # per-sample targets (DeepInversion's, Fast's, NAYER's CE term)
            out["ce"] = F.cross_entropy(t_logits.float(), self.targets)
            loss = loss + cfg.g_ce * out["ce"]
        return loss, {"loss": loss, "bn": l_bn, "kd": l_kd, **out}, bn, t_logits

    def generator_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.g_meta != "off":
            return self.meta_generator_step()
        self.maybe_reinit_generator()
        self.generator.train()
        with self.autocast():
            z = self.sample_z(cfg.batch_size)
            x = self.generate(cfg.batch_size, z)
            loss, out, bn, t_logits = self.generator_objective(x, z)
        self.optimize(self.g_opt, loss)
        if cfg.bn_momentum > 0:
            bn.update_memory()
        if self.replay is not None:   # every synthesised batch joins the pool (CMI, Fast)
            # replay_balance: the pool keeps the teacher's argmax of each image, to draw by class
            balance = cfg.replay_balance > 0
            self.replay.add(x, t_logits.detach().argmax(1) if balance else None)
            # replay_extra: more samples of the just-updated generator at new noise, without a
            # teacher pass (the pool's teacher labels come at student time; docs/decisions.md#synthesis)
            # unless replay_balance needs their classes (one no-grad teacher forward per batch)
            for _ in range(cfg.replay_extra):
                with torch.no_grad(), self.autocast():
                    xe = self.generate(cfg.batch_size)
                    self.replay.add(xe, self.teacher_forward(xe).argmax(1) if balance else None)
        return out

    # ------------------------------------------------------------------ g_meta: Fast's rounds
    def start_round(self) -> None:
        """``g_meta``: a round's fast generator (a copy of the meta generator with its first, linear
        layer re-initialised, Fast's ``reset_l0``), its trainable noise z and their Adam (Fast's:
        ``lr_g`` for the weights, ``g_meta_lr_z`` for z, betas (0.5, 0.999))."""
        cfg = self.cfg
        r = open_round(self.generator, lambda: self.sample_z(cfg.batch_size), cfg.lr_g, cfg.g_meta_lr_z)
        r["inputs"] = self.generator_inputs(r["z"])   # g_conditional: the round's targets, fixed for its steps
        self._round = r

    def meta_generator_step(self) -> dict[str, torch.Tensor]:
        """One step of a ``g_meta`` round (the iteration's ``g_steps`` G steps are one round): Eq. 10
        on the fast generator's batch, an Adam step of (G', z); after the last step the meta
        generator takes one step of its own Adam on Fast's meta gradient
        (:func:`dfkd.methods.fast.meta_update`) and the round's final batch joins the pool."""
        cfg = self.cfg
        if self._round is None:
            self.maybe_reinit_generator()   # g_reinit_every re-initialises the meta generator
            self.start_round()
        r = self._round
        fast = r["fast"]
        fast.train()
        with self.autocast():
            x = self.to_input(fast(r["z"], *r["inputs"]))
            self.counters["images_generated"] += int(x.shape[0])
            loss, out, bn, t_logits = self.generator_objective(x, r["z"])
        round_update(loss, r, self.world_size)
        self.round_step += 1
        if self.round_step >= cfg.g_steps:
            meta_update(self.generator, r, cfg.g_meta, self.g_opt)
            if cfg.bn_momentum > 0:
                bn.update_memory()
            balance = cfg.replay_balance > 0
            self.replay.add(x.detach(), t_logits.detach().argmax(1) if balance else None)
            self.round_step, self._round = 0, None
        return {k: v.detach() for k, v in out.items()}

    # ------------------------------------------------------------------ Eq. 11
    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 11 terms on a batch of teacher-space images x (B, 3, S, S)."""
        cfg = self.cfg
        with torch.no_grad():
            t = self.teacher_forward(x, features=True)
        s = self.student.forward_features(x)
        out = {"kd": kd_loss(s.logits, t.logits, T=cfg.kd_T, direction=cfg.kd_direction)}
        loss = out["kd"] if cfg.use_kd else out["kd"] * 0
        if cfg.use_mhad:
            k = cfg.mhad_from   # 0: every block (the paper); k > 0 skips the first k stages (CPU lever)
            if self.mhad_mode == "stages":
                tf, sf = t.stages[k:], s.stages[k:]
            else:  # penultimate features as (B, D, 1, 1) maps
                tf, sf = [t.penultimate[:, :, None, None]], [s.penultimate[:, :, None, None]]
            # every stage's modules are built (the frozen lens of stage m is the same whatever
            # mhad_from is); the skipped ones get no gradient, so SGD leaves them untouched
            out["mhad"] = mhad_loss(tf, sf, self.adapters[k:], self.mhas[k:], mode=cfg.mha_mode,
                                    teacher_mhas=self.teacher_mhas[k:] if self.teacher_mhas is not None else None)
            loss = loss + cfg.beta * out["mhad"]
        if cfg.use_sfcl:
            zt = self.projection(t.penultimate.float())
            zs = self.projection(self.student_to_teacher(s.penultimate.float()))
            out["sfcl"] = sfcl_loss(zt, zs, tau=cfg.tau, symmetric=cfg.sfcl_symmetric,   # negatives:
                                    gather=dist.gather_rows if self.world_size > 1 else None,  # global batch
                                    rank=self.rank)
            loss = loss + cfg.gamma * out["sfcl"]
        out["loss"] = loss
        return out

    def fresh_images(self, n: int) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.generate(n)

    def student_step(self) -> dict[str, torch.Tensor]:
        """Eq. 11 on fresh generator images (Algorithm 1) or, with ``replay='pool'``, on augmented
        pool samples that the teacher labels afresh inside :meth:`student_losses`."""
        n = self.cfg.batch_size
        x = self.fresh_images(n) if self.replay is None else self.replay.batch(n, self.fresh_images)
        return self.train_student_on(x)

    @torch.no_grad()
    def synthesize(self, n: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """With ``g_meta`` the newest pool images (the rounds' final batches, what the student
        learns from; the meta generator alone draws an initialisation, not an image); otherwise the
        generator's output."""
        if self.cfg.g_meta != "off" and len(self.replay):   # g_meta needs the pool (config check)
            return self.replay.pool.latest(n).float()
        return super().synthesize(n, z)

    def extra_state(self) -> dict:
        if self._round is not None:
            raise RuntimeError("dfkd_fgvc: checkpoint requested inside a g_meta round")
        out = {"replay": self.replay.state()} if self.replay is not None else {}
        if self.cfg.bn_momentum > 0:
            out["bn_memory"] = bn_memory_state(self.bn_memory)
        return out

    def load_extra_state(self, state: dict) -> None:
        if self.cfg.bn_momentum > 0:
            load_bn_memory(self.bn_memory, state.get("bn_memory", {}), self.device)
        if self.replay is not None:
            if "replay" not in state:
                raise ValueError("this checkpoint has no replay pool (it was written with replay='off'); "
                                 "resume with replay='off' or start a new run_name")
            self.replay.load(state["replay"])
