"""MAD: Do, Le, Nguyen, Harikumar, Tran, Venkatesh, "Momentum Adversarial Distillation: Handling
Large Distribution Shifts in Data-Free Knowledge Distillation", NeurIPS 2022.

MAD HAS NO PUBLIC CODE: this is our implementation from the paper's description; every detail the
text does not pin down is our choice and is listed in ``docs/decisions.md#baselines``.

Recipe:
- An exponential-moving-average copy G' of the generator G ("momentum generator"): after every
  generator update, theta' <- m * theta' + (1 - m) * theta with m = ``momentum``; G's BN
  buffers are copied into G' (they are not averaged). G' is a registered submodule
  (``generator_ema``), so it is in ``state_dict`` and in every checkpoint.
- Generator step (adversarial, as the DFQ-style loop MAD builds on):
  min_G ``bn`` * L_BN - KL(T(x) || S(x)), x = G(z), L_BN the teacher's BN prior.
- Student step: min_S KL(T||S) on a batch drawn from BOTH generators: a fraction
  ``ema_fraction`` (default 1/2) of the batch from G', the rest from G. The images of G' change
  slowly, so the student keeps seeing the older synthetic distribution while G moves on (MAD's
  remedy for the distribution shift of the adversarial game, i.e. forgetting).
Both generators run in train mode (BN batch statistics) when producing student batches.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..losses import kd_loss
from ..options import option
from .base import set_requires_grad
from .common import GeneratorBaseline


@dataclass(frozen=True)
class MADOptions:
    """MAD: Do et al., "Momentum Adversarial Distillation", NeurIPS 2022 (no public code). Defaults:
    our reading of the paper (EMA momentum 0.9, half of each student batch from the EMA generator;
    docs/decisions.md#baselines)."""
    momentum: float = option(0.9, "EMA momentum of the momentum generator G' (not the student's SGD)")
    bn: float = option(1.0, "BN-statistics prior weight of the generator step")
    ema_fraction: float = option(0.5, "share of each student batch drawn from G' (0 = the plain adversarial loop)")


class MAD(GeneratorBaseline):
    """Momentum adversarial distillation: adversarial G plus an EMA generator feeding the student."""

    name = "mad"
    Options = MADOptions

    def build(self) -> None:
        super().build()
        self.generator_ema = copy.deepcopy(self.generator)
        set_requires_grad(self.generator_ema, False)

    def adversarial_term(self, x: torch.Tensor) -> torch.Tensor:
        """KL(T(x) || S(x)) (what G maximises)."""
        return kd_loss(self.student(x), self.teacher_forward(x), T=self.cfg.kd_T, direction=self.cfg.kd_direction)

    @torch.no_grad()
    def update_ema(self) -> None:
        m = self.opts.momentum
        for pe, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            pe.lerp_(p, 1.0 - m)
        for be, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            be.copy_(b)

    def generator_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, l_bn, adv = self.bn_and_adversarial(x)
        return {"loss": self.opts.bn * l_bn - adv, "bn": l_bn, "adv": adv}

    def generator_step(self) -> dict[str, torch.Tensor]:
        out = super().generator_step()
        self.update_ema()
        return out

    def student_step(self) -> dict[str, torch.Tensor]:
        b = self.cfg.batch_size
        frac = self.opts.ema_fraction
        n_ema = min(b - 1, max(1, round(b * frac))) if frac > 0 else 0
        with torch.no_grad(), self.autocast():
            parts = [self.generate(b - n_ema)]
            if n_ema:
                z = self.sample_z(n_ema)
                self.counters["images_generated"] += n_ema
                parts.append(self.to_input(self.generator_ema(z)))
            x = torch.cat(parts)
        return self.train_student_on(x)

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kd_losses(x)
