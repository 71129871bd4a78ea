"""DFAD: Fang, Song, Song, Sun, Song, "Data-Free Adversarial Distillation", arXiv 1912.11006, 2019.

Recipe:
- Generator step (adversarial): max_G MAE(T(x), S(x)) = mean |t - s| over batch and classes of the
  logits, x = G(z); i.e. minimise -L1.
- Student step: min_S mean |t - s| on fresh generator images (DFAD uses the L1 of logits rather
  than a KL because it keeps a gradient for G when S already matches T's softmax).
DFAD's CIFAR/Caltech schedule is 1 generator step : 5 student steps (set ``g_steps`` / ``s_steps``).

Chosen at FGVC scale (``docs/decisions.md#baselines``): DCGAN ``GeneratorB`` at init size S/16
(DFAD itself used this plan at 128 px for Caltech101 / CamVid); tanh output mapped to the
ImageNet-normalised teacher input (DFAD trained its teachers on mean = std = 0.5 instead); the
shared optimisers (Adam lr_g for G; SGD lr_s for S).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import GeneratorBaseline


def mae(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the logits (fp32, 0-d)."""
    return F.l1_loss(s_logits.float(), t_logits.float())


class DFAD(GeneratorBaseline):
    """Adversarial distillation on the logit MAE (Fang et al. 2019)."""

    name = "dfad"

    def adversarial_term(self, x: torch.Tensor) -> torch.Tensor:
        """MAE(T(x), S(x)) (what G maximises)."""
        return mae(self.student(x), self.teacher_forward(x))

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher_forward(x)
        l1 = mae(self.student(x), t)
        return {"loss": l1, "mae": l1}
