"""DAFL: Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian, "Data-Free Learning of Student Networks",
ICCV 2019.

Recipe:
- Generator step (the teacher as a fixed discriminator; NO adversarial term — the student plays no
  part in DAFL's generator objective, so there is no teacher/student divergence to test):
    L_G = ``oh`` * L_oh + ``a`` * L_a + ``ie`` * L_ie, with
    L_oh = cross-entropy of the teacher logits against their own argmax (one-hot loss),
    L_a  = -mean |f_T(x)| (activation loss; f_T = teacher penultimate features),
    L_ie = sum_k p_k log10 p_k, p = batch-mean teacher softmax (= -information entropy; the
           official code uses log10, kept here). Weights 1 / 0.1 / 5 as DAFL's CIFAR setting.
- Student step: KD, KL(T(x) || S(x)) at T = ``kd_T`` (DAFL's ``kdloss``, T = 1), on fresh generator
  images (DAFL trains on the same batch right after the generator update; our loop keeps the
  ``g_steps`` / ``s_steps`` split of Algorithm 1 and draws a fresh batch per student step).

Chosen at FGVC scale (``docs/decisions.md#baselines``): DCGAN ``GeneratorB`` (init S/16) instead
of DAFL's 32-px ``GeneratorA`` (whose last layer is a non-affine BN; here tanh + ImageNet mapping
like every baseline); the shared optimisers (Adam for G, SGD for S).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..options import option
from .common import GeneratorBaseline, batch_mean


@dataclass(frozen=True)
class DAFLOptions:
    """DAFL: Chen et al., "Data-Free Learning of Student Networks", ICCV 2019. Defaults: the
    paper's CIFAR weights (one-hot 1, activation 0.1, information entropy 5)."""
    oh: float = option(1.0, "one-hot loss weight (CE of the teacher logits to their argmax)")
    a: float = option(0.1, "activation loss weight (-mean |teacher penultimate features|)")
    ie: float = option(5.0, "information-entropy loss weight (class balance of the batch)")


class DAFL(GeneratorBaseline):
    """Teacher-as-discriminator generator (one-hot, activation, information entropy) + KD."""

    name = "dafl"
    Options = DAFLOptions

    def generator_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        t = self.teacher_forward(x, features=True)
        logits = t.logits.float()
        oh = F.cross_entropy(logits, logits.argmax(1))
        act = -t.penultimate.float().abs().mean()
        p = batch_mean(self, F.softmax(logits, dim=1).mean(0))
        ie = (p * torch.log10(p.clamp_min(1e-12))).sum()
        loss = o.oh * oh + o.a * act + o.ie * ie
        return {"loss": loss, "oh": oh, "act": act, "ie": ie}

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kd_losses(x)
