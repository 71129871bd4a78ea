"""ADI: Yin, Molchanov, Alvarez, Li, Mallya, Hoiem, Jha, Kautz, "Dreaming to Distill: Data-free
Knowledge Transfer via DeepInversion", CVPR 2020 (Adaptive DeepInversion).

Recipe (no generator; the inputs themselves are optimised):
  min_x  CE(T(x_j), y) + ``bn`` * R_BN(x_j) + ``tv`` * R_TV(x_j) + ``l2`` * ||x_j||_2
         + ``competition`` * (1 - JS(S(x_j) || T(x_j)))
- x_j: the batch after a random jitter (``torch.roll`` by up to ``jitter`` px in each axis)
  and a random horizontal flip of the whole batch, drawn anew every step (DeepInversion).
- y: target classes drawn uniformly per crafted batch.
- R_BN: the teacher's BN-statistics prior (``dfkd.losses.bn_prior``), sum over BN layers of
  ||mu - mean||_2 + ||sigma^2 - var||_2, the first BN layer's term times ``first_bn_mul``.
- R_TV: sum of the L2 norms of the four neighbour differences (horizontal, vertical, two diagonals);
  ||x_j||_2: mean over images of their L2 norm (DeepInversion's ImageNet code).
- The adaptive competition term: JS = Jensen-Shannon divergence of the student's and teacher's
  softmax at T = 3 (probabilities clamped to [0.01, 0.99], as NVlabs' code); 1 - JS is small when
  they disagree, so the inversion seeks images where the current student is wrong. It depends on the
  student (and is exactly 1 for a student equal to the teacher).
- After each Adam step the pixels are clipped to the valid image range.
The crafted batches go to a bounded pool (``pool_size``, 0 = 2048 images, FIFO, uint8) and the
student is trained by KD (KL(T||S) at ``kd_T``) on batches drawn from it.

Mapping onto Algorithm 1: one generator step = one Adam step on the current batch; a batch is
crafted for ``craft_steps`` steps (0 = ``g_steps``, one batch per iteration; DeepInversion uses
2000 at 224 px) before it joins the pool. Defaults follow DeepInversion's ImageNet (224 px) setting
(lr 0.2, Adam betas (0.5, 0.9), r_feature 0.05, first BN x10, TV 1e-4, l2 1e-5, jitter 30 px,
flips, competition 0.2); ``jitter = 0`` scales the 30 px jitter with the image size
(2 px at 32 px, as the CIFAR-10 script). See ``docs/decisions.md#baselines``.

Learning rate of the inputs (``lr_schedule``): ``cosine`` (default) is DeepInversion's
``lr_cosine_policy(lr, 100, 2000)``: a linear warm-up over the first 1/20 of a batch's steps
(at least one), then a cosine from ``lr`` towards 0 over the rest (:func:`cosine_lr`);
``constant`` keeps ``lr`` for every step. The two-resolution schedule of DeepInversion's
224 px setting (first at 112 px, then at 224 px) is not implemented (``docs/decisions.md#baselines``).

Options (``method_options``, :class:`ADIOptions`): the names in double backquotes above, without prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dist
from ..losses import bn_prior
from ..options import option
from .common import CraftingMethod, InputBatch, js_competition, rank_share

COMPETITION_T = 3.0  # NVlabs' Adaptive DeepInversion temperature
WARMUP_FRACTION = 1 / 20  # DeepInversion: lr_cosine_policy(lr, 100, 2000)


def warmup_steps(craft_steps: int) -> int:
    """Warm-up length of :func:`cosine_lr`: 1/20 of a batch's steps, at least 1."""
    return max(1, round(craft_steps * WARMUP_FRACTION))


def cosine_lr(base_lr: float, step: int, total: int, warmup: int) -> float:
    """DeepInversion's ``lr_cosine_policy``: ``base * (step + 1) / warmup`` for ``step < warmup``,
    then ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base_lr


def tv_l2(x: torch.Tensor, sum_reduce=None) -> torch.Tensor:
    """DeepInversion's total variation (L2 version): sum of the norms of the four neighbour
    differences of x (B, 3, H, W), each norm over the whole batch. 0-d fp32. ``sum_reduce``
    (data parallel: ``dist.sum_across_ranks``) sums the squared norms over ranks first, so the
    norms are the global batch's."""
    x = x.float()
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    if sum_reduce is None:
        return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))
    return sum(sum_reduce(d.pow(2).sum()).sqrt() for d in (d1, d2, d3, d4))


@dataclass(frozen=True)
class ADIOptions:
    """ADI: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR
    2020 (Adaptive DeepInversion). Defaults: NVlabs' ImageNet (224 px) setting: lr 0.2, r_feature
    0.05, first BN x10, TV 1e-4, l2 1e-5, jitter 30 px (scaled to the image size), competition 0.2,
    lr_cosine_policy; crafting length and pool fit the shared loop (docs/decisions.md#baselines)."""
    bn: float = option(0.05, "BN-statistics prior weight (DeepInversion's r_feature, 224 px)")
    tv: float = option(1e-4, "total-variation (L2) prior weight (224 px)")
    l2: float = option(1e-5, "image L2-norm prior weight (224 px)")
    first_bn_mul: float = option(10.0, "multiplier of the first BN layer's prior term")
    competition: float = option(0.2, "adaptive competition weight (1 - JS(S || T); 0 = plain DeepInversion)")
    lr: float = option(0.2, "Adam lr of the inputs (224 px)")
    jitter: int = option(0, "max jitter in px (0 = 30 px scaled to image_size; 2 at 32 px)")
    craft_steps: int = option(0, "Adam steps per crafted batch (0 = g_steps; DeepInversion: 2000)")
    lr_schedule: str = option("cosine", "lr over a batch's steps: DeepInversion's warm-up + cosine, or constant",
                              choices=("cosine", "constant"))
    pool_size: int = option(0, "crafted images kept for the student steps (0 = 2048; FIFO, uint8)")


def jitter_size(opts: ADIOptions, image_size: int) -> int:
    """The ``jitter`` option when set, else 30 px scaled to the image size (30 at 224, 2 at 32)."""
    if opts.jitter > 0:
        return opts.jitter
    return 2 if image_size <= 32 else max(2, round(30 * image_size / 224))


class ADI(CraftingMethod):
    """Adaptive DeepInversion: BN-prior input optimisation with a teacher/student competition term."""

    name = "adi"
    Options = ADIOptions

    def build(self) -> None:
        self.setup_crafting(self.opts.craft_steps)
        self.jitter = jitter_size(self.opts, self.image_size)

    def craft_lr(self, step: int) -> float | None:
        if self.opts.lr_schedule != "cosine":
            return None
        return cosine_lr(self.opts.lr, step, self.craft_steps, warmup_steps(self.craft_steps))

    def new_batch(self, n: int) -> InputBatch:
        y = rank_share(self, lambda m: torch.randint(0, self.num_classes, (m,), device=self.device), n)
        return InputBatch(self.noise(n), y, lr=self.opts.lr, betas=(0.5, 0.9))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random jitter (roll) and horizontal flip of the whole batch (CPU RNG: no device sync)."""
        lim = self.jitter
        dx, dy = torch.randint(-lim, lim + 1, (2,)).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        if torch.rand(()).item() < 0.5:
            x = x.flip(3)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def competition_term(self, x: torch.Tensor, t_logits: torch.Tensor | None = None) -> torch.Tensor:
        """1 - JS(S(x) || T(x)) at T = 3: the adaptive term, minimised by the inputs."""
        t = self.teacher_forward(x) if t_logits is None else t_logits
        return js_competition(self.student(x), t, T=COMPETITION_T, reduce=self.stat_reduce)

    adversarial_term = competition_term

    def craft_losses(self, batch: InputBatch) -> dict[str, torch.Tensor]:
        o = self.opts
        xj = self.augment(batch.x)
        with bn_prior(self.teacher, first_bn_multiplier=o.first_bn_mul, reduce=self.stat_reduce) as bn:
            t = self.teacher_forward(xj)
        tv = tv_l2(xj, dist.sum_across_ranks if self.world_size > 1 else None)   # global batch's norms
        out = {"ce": F.cross_entropy(t.float(), batch.targets), "bn": bn.loss(), "tv": tv,
               "l2": torch.linalg.vector_norm(xj.float().flatten(1), dim=1).mean()}
        loss = out["ce"] + o.bn * out["bn"] + o.tv * out["tv"] + o.l2 * out["l2"]
        if o.competition > 0:
            out["competition"] = self.competition_term(xj, t)
            loss = loss + o.competition * out["competition"]
        out["loss"] = loss
        return out
