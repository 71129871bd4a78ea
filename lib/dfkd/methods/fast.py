"""Fast: Fang, Mo, Wang, Song, Bei, Zhang, Song, "Up to 100x Faster Data-free Knowledge
Distillation", AAAI 2022 (code: zju-vipa/Fast-Datafree, ``FastMetaSynthesizer``).

Recipe (one synthesis round per iteration of the shared loop):
- A *meta* generator G (DCGAN ``GeneratorB``, BN in the blocks) is kept across rounds. A round
  copies it to a fast generator G', re-initialises G''s first (linear) layer (``reset_l0``,
  the authors' ``reset_l0``), draws fresh trainable noise z and random target classes y, and runs
  ``g_steps`` Adam steps on (G', z) of
      L = ``bn`` * L_BN^mmt + ``oh`` * CE(T(a(x)), y) - ``adv`` * mask * KL(T(a(x)) || S(a(x)))
  with x = G'(z), a() the random crop + flip augmentation, L_BN^mmt the momentum BN prior (the
  batch statistics blended with an EMA of earlier rounds' with rate ``bn_mmt``,
  ``dfkd.losses.BNPrior``) and mask = 1 where student and teacher agree on the class (the
  adversarial term only pushes images the student already gets right).
- Meta update (feature reuse): first-order MAML (``meta='fomaml'``, the authors' ``is_maml 1``:
  the meta gradient is the sum of G''s gradients over the round's steps) or Reptile
  (``meta='reptile'``: the meta gradient is G - G' after the round), then one Adam step of G
  (``lr_g``, betas (0.5, 0.999)); :func:`meta_gradients` is that update rule.
- The round's final images join a replay pool (the authors' memory bank, ``replay_size``); the
  ``s_steps`` student steps of the iteration draw from it with crop + flip augmentation
  (``replay_aug``), KD at temperature ``T`` with the teacher labelling every augmented view.
- ``warmup``: the first iterations synthesise only (no student steps, no adversarial term),
  as the authors' ``warmup`` epochs.

Defaults: the authors' CIFAR-10 script (fast-2: ``g_steps 2, lr_z 0.015, lr_g 5e-3, bn 10, oh 0.5,
adv 1.1, bn_mmt 0.9, T 20``, student SGD lr 0.2); ``g_steps``, ``s_steps``, ``lr_g`` and ``lr_s``
are the shared fields, so a preset sets them (``params/laptop/``). Options (``method_options``,
:class:`FastOptions`): the names in double backquotes above except the shared ``replay_*``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..losses import bn_memory_state, bn_prior, kd_loss, load_bn_memory
from ..options import option
from ..replay import Replay, augment
from .base import make_optimizer
from .common import GeneratorBaseline, rank_share

META_MODES = ("fomaml", "reptile")


@dataclass(frozen=True)
class FastOptions:
    """Fast: Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022. Defaults:
    the authors' CIFAR-10 script (zju-vipa/Fast-Datafree, fast-2): lr_z 0.015, bn 10, oh 0.5, adv 1.1,
    bn_mmt 0.9, T 20, first-order MAML, reset_l0."""
    lr_z: float = option(0.015, "Adam lr of the round's trainable noise z")
    bn: float = option(10.0, "momentum BN-statistics prior weight")
    oh: float = option(0.5, "cross-entropy weight (to the round's random targets)")
    adv: float = option(1.1, "agreement-masked adversarial KL weight")
    bn_mmt: float = option(0.9, "momentum of the BN prior's statistics memory")
    T: float = option(20.0, "KD temperature of the student steps")
    meta: str = option("fomaml", "meta update of the generator (fomaml = the authors' is_maml 1)",
                       choices=META_MODES)
    reset_l0: bool = option(True, "re-initialise the fast generator's first layer every round")
    warmup: int = option(0, "iterations of synthesis only (the authors' warm-up epochs)")


@torch.no_grad()
def meta_gradients(meta: nn.Module, fast: nn.Module, mode: str, accumulated: list | None = None) -> list:
    """The meta gradient of each parameter of ``meta`` after one round on its copy ``fast``.

    ``reptile``: ``meta - fast`` (the direction from the adapted weights back to the meta weights,
    so a descent step moves the meta weights towards the adapted ones). ``fomaml``: the sum of the
    fast generator's gradients over the round (``accumulated``, one tensor per parameter).
    """
    if mode == "reptile":
        return [pm.detach() - pf.detach() for pm, pf in zip(meta.parameters(), fast.parameters())]
    if mode == "fomaml":
        if accumulated is None:
            raise ValueError("fomaml needs the gradients accumulated over the round")
        return [g.clone() for g in accumulated]
    raise ValueError(f"meta={mode!r} (a method option of fast) is not one of {META_MODES}")


def open_round(meta: nn.Module, draw_z, lr_g: float, lr_z: float, reset_l0: bool = True) -> dict:
    """A round's state: the fast generator (a copy of ``meta`` whose first, linear layer is
    re-initialised with ``reset_l0``, the authors' ``reset_l0``), its trainable noise ``draw_z()``,
    their Adam (``lr_g`` for the weights, ``lr_z`` for z, betas (0.5, 0.999) as the authors') and
    the round's gradient sums, zero."""
    fast = copy.deepcopy(meta)
    if reset_l0:
        fast.fc.reset_parameters()
    z = draw_z().requires_grad_(True)
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": lr_z}],
                           lr=lr_g, betas=(0.5, 0.999))
    return {"fast": fast, "z": z, "opt": opt, "grads": [torch.zeros_like(p) for p in fast.parameters()]}


def round_update(loss: torch.Tensor, round_: dict, world_size: int = 1) -> None:
    """One step of a round (``round_``: the fast generator ``fast``, its noise ``z``, their Adam
    ``opt`` and the round's gradient sums ``grads``): backward, the rank-mean gradients of G' (z: each
    rank's own rows), the sums, then the Adam step."""
    fast, z = round_["fast"], round_["z"]
    round_["opt"].zero_grad(set_to_none=True)
    loss.backward()
    if world_size > 1:   # G' is shared: rank-mean gradients; z: each rank's own rows
        dist.average_gradients(fast.parameters())
        dist.scale_own_rows_grad([z])
    with torch.no_grad():
        for g, p in zip(round_["grads"], fast.parameters()):
            if p.grad is not None:
                g.add_(p.grad)
    round_["opt"].step()


def meta_update(meta: nn.Module, round_: dict, mode: str, opt: torch.optim.Optimizer) -> None:
    """The end of a round: one step of the meta generator's optimiser ``opt`` on
    :func:`meta_gradients` of the round."""
    grads = meta_gradients(meta, round_["fast"], mode, round_["grads"])
    opt.zero_grad(set_to_none=True)
    for p, g in zip(meta.parameters(), grads):
        p.grad = g
    opt.step()


def per_sample_kl(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) per sample, (B,) fp32 (the authors' ``kldiv`` at T = 1)."""
    return F.kl_div(F.log_softmax(s_logits.float(), 1), F.log_softmax(t_logits.float(), 1),
                    reduction="none", log_target=True).sum(1)


class Fast(GeneratorBaseline):
    """Meta-learned generator initialisation, few steps per batch, momentum BN prior, memory bank."""

    name = "fast"
    Options = FastOptions

    def build(self) -> None:
        super().build()      # self.generator: the meta generator
        cfg = self.cfg
        # the memory bank's crops keep Fast's CIFAR padding (S/8); replay_pad is dfkd_fgvc's CPU lever
        self.replay = Replay(max(cfg.replay_size, cfg.batch_size * self.world_size), cfg.output_map, self.device,
                             aug=cfg.replay_aug, fresh=0.0)
        self.bn_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.round_step = 0
        self._round: dict[str, Any] | None = None

    def configure_optimizers(self) -> None:
        super().configure_optimizers()
        # the meta optimiser: Adam(lr_g, betas (0.5, 0.999)) as the authors'
        self.g_opt = make_optimizer(torch.optim.Adam, self.generator.parameters(), self.device, self.optim_impl,
                                    lr=self.cfg.lr_g, betas=(0.5, 0.999))

    def warming_up(self) -> bool:
        return self.counters["iterations"] < self.opts.warmup

    # ------------------------------------------------------------------ one round
    def start_round(self) -> None:
        cfg = self.cfg
        r = open_round(self.generator, lambda: rank_share(
            self, lambda m: torch.randn(m, cfg.nz, device=self.device), cfg.batch_size),
            cfg.lr_g, self.opts.lr_z, self.opts.reset_l0)
        r["y"] = rank_share(self, lambda m: torch.randint(0, self.num_classes, (m,), device=self.device),
                            cfg.batch_size)
        self._round = r

    def generator_losses(self, x: torch.Tensor, y: torch.Tensor, adversarial: bool = True):
        o = self.opts
        xa = augment(x, "crop_flip")
        with bn_prior(self.teacher, reduce=self.stat_reduce, momentum=o.bn_mmt,
                      memory=self.bn_memory) as bn:
            t = self.teacher_forward(xa)
        l_bn = bn.loss()
        oh = F.cross_entropy(t.float(), y)
        s = self.student(xa)
        per = per_sample_kl(s, t)
        mask = (s.argmax(1) == t.argmax(1)).float()
        adv_used = (per * mask).mean()
        loss = o.bn * l_bn + o.oh * oh
        if adversarial:
            loss = loss - o.adv * adv_used
        return {"loss": loss, "bn": l_bn, "oh": oh, "adv": per.mean(), "adv_masked": adv_used}, bn

    def adversarial_term(self, x: torch.Tensor) -> torch.Tensor:
        """KL(T(x) || S(x)), unmasked: the divergence whose agreement-masked part G maximises."""
        return per_sample_kl(self.student(x), self.teacher_forward(x)).mean()

    def generator_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if self.round_step == 0:
            self.start_round()
        r = self._round
        fast = r["fast"]
        fast.train()
        with self.autocast():
            x = self.to_input(fast(r["z"]))
            out, bn = self.generator_losses(x, r["y"], adversarial=not self.warming_up())
        self.counters["images_generated"] += int(x.shape[0])
        round_update(out["loss"], r, self.world_size)
        self.round_step += 1
        if self.round_step >= self.g_steps_per_iteration():
            self.end_round(x.detach(), bn)
        return {k: v.detach() for k, v in out.items()}

    def end_round(self, x: torch.Tensor, bn) -> None:
        meta_update(self.generator, self._round, self.opts.meta, self.g_opt)
        bn.update_memory()
        self.replay.add(x)
        self.round_step = 0
        self._round = None

    # ------------------------------------------------------------------ student
    def fresh_images(self, n: int) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.generate(n).float()

    def student_step(self) -> dict[str, torch.Tensor]:
        return self.train_student_on(self.replay.batch(self.cfg.batch_size, self.fresh_images))

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kd_losses(x, T=self.opts.T)

    def s_steps_per_iteration(self) -> int:
        return 0 if self.warming_up() else self.cfg.s_steps    # warm-up: synthesis only

    @torch.no_grad()
    def synthesize(self, n: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """The newest pool images (what the student learns from); the meta generator's raw output
        before the first round."""
        if len(self.replay):
            return self.replay.pool.latest(n).float()
        return super().synthesize(n, z)

    # ------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        if self._round is not None:
            raise RuntimeError("fast: checkpoint requested inside a synthesis round")
        return {"replay": self.replay.state(),
                "bn_memory": bn_memory_state(self.bn_memory)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.replay.load(state["replay"])
        load_bn_memory(self.bn_memory, state["bn_memory"], self.device)

