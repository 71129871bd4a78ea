"""DFQ: Choi, Choi, El-Khamy, Lee, "Data-Free Network Quantization With Adversarial Knowledge
Distillation", CVPR Workshops 2020 — used here as the plain adversarial-KD-with-BN-statistics loop
(the paper's Algorithm 1 without SAM, MHAD and SFCL).

Recipe:
- Generator step: min_G  ``bn`` * L_BN - ``adv`` * KL(T||S) + ``oh`` * L_oh
  + ``balance`` * L_balance, x = G(z), where
    L_BN      = DeepInversion BN-statistics prior of the teacher (``dfkd.losses.bn_prior``, Eq. 3 of
                DFKD-FGVC; DFQ itself matches the BN Gaussians with a KL, see decisions),
    KL(T||S)  = the adversarial term (``kd_T``, ``kd_direction`` of the run),
    L_oh      = cross-entropy of the teacher logits against their argmax (instance entropy, pushes
                each image to one confident class),
    L_balance = sum_k p_k log p_k of the batch-mean teacher softmax p (minus the batch entropy:
                classes balanced within a batch).
  DFQ's paper has the instance- and batch-entropy terms; we follow them with the weights of the
  zju-vipa/CMI re-implementation that the DFKD peers (and most likely Table 1) ran for ResNet-34
  -> ResNet-18 (bn 1, oh 1, adv 1, balance 20). ``oh = balance = 0`` gives the bare
  "BN prior - KL" loop.
- Student step: min_S KL(T(x) || S(x)) on fresh generator images.

Chosen at FGVC scale: DCGAN ``GeneratorB`` (init S/16), the shared optimisers and schedule;
DFQ's 1 G : 5 S (CIFAR) / 1 : 10 (CIFAR-100 R34->R18) steps map onto ``g_steps`` / ``s_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import class_coverage_terms, kd_loss
from ..options import option
from .common import GeneratorBaseline, batch_mean


@dataclass(frozen=True)
class DFQOptions:
    """DFQ: Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation",
    CVPR Workshops 2020. Defaults: the zju-vipa/CMI re-implementation's ResNet-34 -> ResNet-18
    weights (bn 1, adv 1, oh 1, balance 20); oh = balance = 0 is the bare "BN prior - KL" loop."""
    bn: float = option(1.0, "BN-statistics prior weight (Eq. 3)")
    adv: float = option(1.0, "adversarial KL(T||S) weight")
    oh: float = option(1.0, "one-hot (instance entropy) weight")
    balance: float = option(20.0, "class-balance (batch entropy) weight")


class DFQ(GeneratorBaseline):
    """Adversarial KD with the teacher's BN statistics as image prior (Choi et al. 2020)."""

    name = "dfq"
    Options = DFQOptions

    def adversarial_term(self, x: torch.Tensor) -> torch.Tensor:
        """KL(T(x) || S(x)) (what G maximises)."""
        return kd_loss(self.student(x), self.teacher_forward(x), T=self.cfg.kd_T, direction=self.cfg.kd_direction)

    def generator_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        t, l_bn, adv = self.bn_and_adversarial(x)
        oh, balance = class_coverage_terms(t, lambda p: batch_mean(self, p))
        loss = o.bn * l_bn - o.adv * adv + o.oh * oh + o.balance * balance
        return {"loss": loss, "bn": l_bn, "adv": adv, "oh": oh, "balance": balance}

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kd_losses(x)
