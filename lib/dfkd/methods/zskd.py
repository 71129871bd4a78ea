"""ZSKD: Nayak, Mopuri, Shaj, Babu, Chakraborty, "Zero-Shot Knowledge Distillation in Deep
Learning", ICML 2019.

Recipe (no generator; the synthetic images are "Data Impressions", DIs):
1. Class similarity from the teacher's final layer: C[i, j] = cosine similarity of the class weight
   vectors w_i, w_j of the classifier; each row min-max normalised to [0, 1].
2. Soft-label targets: for each image pick a class k (uniformly) and draw
   y ~ Dirichlet(beta * C[k]) with beta in {1.0, 0.1} (half of every batch each, as ZSKD uses the
   two scaling factors for equal shares), both scaled by the ``beta`` option.
3. Impressions: start from random noise and optimise the *inputs* x with Adam so the teacher's
   temperature-20 softmax matches y: loss = cross-entropy(y, softmax(teacher(x) / 20)), i.e.
   -sum_k y_k log softmax(t(x) / T)_k with T = the ``T`` option.
4. Student: KD at the same temperature, KL(softmax(t/T) || softmax(s/T)) * T^2, on the impressions.

Mapping onto Algorithm 1 (``distill``): one generator step = one Adam step of the current batch of
impressions (``g_steps`` per iteration). A batch is optimised for ``craft_steps`` steps
(0 = ``g_steps``, i.e. one batch per iteration; ZSKD uses 1500) and then appended to a bounded pool
(``pool_size``, 0 = 2048 images, FIFO, stored as uint8). Student steps draw KD batches from the
pool. Choices where ZSKD is silent at FGVC scale (``docs/decisions.md#baselines``): noise init
N(0, 1) in the teacher's normalised input space, pixels clipped to the valid image range after
every step (impressions are stored as images), Adam lr ``lr`` (0.01 in ZSKD), the shared SGD
student optimiser instead of ZSKD's Adam, random horizontal flips of pool samples.

Options (``method_options``, :class:`ZSKDOptions`): ``beta``, ``T``, ``lr``, ``craft_steps``, ``pool_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..options import option
from .common import CraftingMethod, InputBatch, rank_share

BETAS = (1.0, 0.1)  # ZSKD's two Dirichlet scaling factors


@dataclass(frozen=True)
class ZSKDOptions:
    """ZSKD: Nayak et al., "Zero-Shot Knowledge Distillation in Deep Learning", ICML 2019. Defaults:
    the paper's temperature 20 and Adam lr 0.01; the crafting length and pool fit the shared loop
    (docs/decisions.md#baselines)."""
    beta: float = option(1.0, "Dirichlet concentration scale (times ZSKD's two factors 1.0 and 0.1)")
    T: float = option(20.0, "softmax temperature of the impressions and of the student's KD")
    lr: float = option(0.01, "Adam lr of the impressions")
    craft_steps: int = option(0, "Adam steps per impression batch (0 = g_steps; ZSKD: 1500)")
    pool_size: int = option(0, "impressions kept for the student steps (0 = 2048; FIFO, uint8)")


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """ZSKD's class similarity matrix: cosine similarity of the class weight vectors (K, D),
    each row min-max normalised to [0, 1]. Returns (K, K) fp32 (diagonal = 1)."""
    w = F.normalize(weight.detach().float(), dim=1)
    sim = w @ w.t()
    lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
    return (sim - lo) / (hi - lo).clamp_min(1e-12)


class ZSKD(CraftingMethod):
    """Zero-Shot KD with Data Impressions crafted from the teacher (Nayak et al. 2019)."""

    name = "zskd"
    Options = ZSKDOptions

    def build(self) -> None:
        self.register_buffer("class_sim", class_similarity(self.teacher.classifier.weight), persistent=False)
        self.setup_crafting(self.opts.craft_steps)

    def sample_targets(self, n: int) -> torch.Tensor:
        """(n, K) soft labels y ~ Dir(b * opts.beta * C[k]), k uniform, b alternating 1.0 / 0.1."""
        return rank_share(self, self._draw_targets, n)

    def _draw_targets(self, n: int) -> torch.Tensor:
        k = torch.randint(0, self.num_classes, (n,), device=self.device)
        beta = torch.tensor(BETAS, device=self.device)[torch.arange(n, device=self.device) % len(BETAS)]
        # the row minimum is 0 after min-max normalisation; Dirichlet needs positive concentrations
        conc = (self.class_sim[k] * (beta * self.opts.beta)[:, None]).clamp_min(1e-3)
        y = torch.distributions.Dirichlet(conc).sample()
        y = torch.nan_to_num(y, nan=0.0) + 1e-8        # a Gamma draw can underflow to 0 at small conc.
        return y / y.sum(1, keepdim=True)

    def new_batch(self, n: int) -> InputBatch:
        return InputBatch(self.noise(n), self.sample_targets(n), lr=self.opts.lr)

    def craft_losses(self, batch: InputBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy between the soft targets y (B, K) and the teacher's softmax at T = opts.T."""
        x = batch.x.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.x
        t = self.teacher_forward(x)
        ce = -(batch.targets * F.log_softmax(t.float() / self.opts.T, dim=1)).sum(1).mean()
        return {"loss": ce, "ce": ce}

    def student_T(self) -> float:
        return self.opts.T
