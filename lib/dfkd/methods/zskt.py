"""ZSKT: Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching",
NeurIPS 2019.

Recipe:
- Generator step (adversarial): max_G KL(T(x) || S(x)), x = G(z), i.e. minimise -KL at T = 1
  (``kd_T`` / ``kd_direction`` of the run; ZSKT: T = 1, KL(T||S)).
- Student step: min_S KL(T(x) || S(x)) + ``at`` * sum_l AT_l on fresh generator images, with
  attention transfer (Zagoruyko & Komodakis 2017): per stage, a_l = L2-normalised flattened map of
  the channel mean of squared activations; AT_l = mean over batch and positions of
  (a_l^T - a_l^S)^2 (ZSKT's ``(at(x) - at(y)).pow(2).mean()``), beta = 250 in ZSKT.
- Stage pairs: the i-th teacher stage with the i-th student stage when both have as many stages
  (ResNet -> ResNet; a student map of another spatial size is resized bilinearly; channel counts
  need not match); otherwise stages of equal spatial size (:func:`common.stage_pairs`).

What we chose where ZSKT is silent at FGVC scale (``docs/decisions.md#baselines``): the DCGAN
``GeneratorB`` plan (init size S/16) instead of ZSKT's 32-px generator; ``g_steps``/``s_steps``
map ZSKT's n_G = 1 / n_S = 10 (set them so); the shared optimisers (Adam for G, SGD for S)
instead of ZSKT's Adam for both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import kd_loss
from ..options import option
from .common import GeneratorBaseline, at_loss, stage_pairs


@dataclass(frozen=True)
class ZSKTOptions:
    """ZSKT: Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching",
    NeurIPS 2019. Default: the paper's attention-transfer weight beta = 250."""
    at: float = option(250.0, "attention-transfer weight of the student step")


class ZSKT(GeneratorBaseline):
    """Adversarial belief matching + attention transfer (Micaelli & Storkey 2019)."""

    name = "zskt"
    Options = ZSKTOptions

    def adversarial_term(self, x: torch.Tensor) -> torch.Tensor:
        """KL(T(x) || S(x)) (what G maximises); gradients reach x through both networks."""
        return kd_loss(self.student(x), self.teacher_forward(x), T=self.cfg.kd_T, direction=self.cfg.kd_direction)

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher_forward(x, features=True)
        s = self.student.forward_features(x)
        kd = kd_loss(s.logits, t.logits, T=self.cfg.kd_T, direction=self.cfg.kd_direction)
        pairs = stage_pairs(len(t.stages), len(s.stages), [f.shape[-2:] for f in t.stages],
                            [f.shape[-2:] for f in s.stages])
        at = sum((at_loss(t.stages[i], s.stages[j]) for i, j in pairs), kd.new_zeros(()))
        return {"loss": kd + self.opts.at * at, "kd": kd, "at": at}
