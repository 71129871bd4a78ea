"""Sample-efficient synthesis: a replay pool of synthesised images that the student draws from
with augmentation, every augmented sample re-labelled by the teacher.

Algorithm 1 as printed trains the student only on the images the generator makes at that moment:
each image is seen once, by one student step, and the student follows the generator's drift. The
sample-efficient DFKD literature keeps what was synthesised and replays it: CMI (Fang et al., IJCAI
2021) and Fast (Fang et al., AAAI 2022) store every synthesised batch in a memory bank and train the
student on random draws from it under standard data augmentation (random crop, flip), the teacher
labelling every augmented view afresh. This module is that mechanism, for any method that wants
it (the paper's own method uses it when ``replay='pool'``; docs/decisions.md#synthesis):

- :class:`Replay`: the pool (a uint8 FIFO :class:`~dfkd.methods.common.ImagePool`), the policy of
  what goes in (``add``) and what a student step gets (``batch``), and its checkpoint state.
- :func:`augment`: the student-side augmentation of pool samples (``none`` | ``flip`` |
  ``crop_flip`` and its variants); never applied to the images the generator's losses see.

Options (fields of :class:`~dfkd.config.DistillConfig`):
``replay`` (``off`` = Algorithm 1 as printed | ``pool``), ``replay_size`` (images kept),
``replay_aug`` (augmentation of pool samples), ``replay_pad`` (the crops' padding), ``replay_fresh``
(share of each student batch that comes straight from the generator instead of the pool),
``replay_recent`` / ``replay_recent_window`` (share of each student batch drawn from the pool's
newest images only), ``replay_balance`` (pool draws weighted towards the classes the teacher sees
least often in the pool).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .dist import rank_rows
from .generator import from_teacher_input, to_teacher_input

REPLAY_MODES = ("off", "pool")
AUGMENTATIONS = ("none", "flip", "crop_flip", "crop_flip_mixup", "crop_flip_cutmix", "crop_flip_color", "rrc_flip")
# crop_flip: the reflect padding of the random crop as a share of the image side (S/8: 4 px at 32 px,
# the CIFAR recipe that CMI and Fast apply to their memory banks); replay_pad selects another
CROP_PAD = 0.125
# rrc_flip: the area range of the teachers' training crop (docs/decisions.md#data, D1)
RRC_SCALE = (0.35, 1.0)
# crop_flip_color: the jitter strength s (brightness, contrast, saturation from U(1 - s, 1 + s));
# luma weights of ITU-R BT.601 (the greyscale of torchvision's rgb_to_grayscale)
COLOR_STRENGTH = 0.4
LUMA = torch.tensor([0.299, 0.587, 0.114])


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 (per sample; data parallel: this rank's
    rows of the global batch's draw, ``dfkd.dist.rank_rows``)."""
    flip = rank_rows(lambda m: torch.rand(m, device=x.device), x.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop of size (S, S) from x reflect-padded by ``pad`` px on each side (the
    CIFAR-style ``RandomCrop(S, padding)`` that CMI and Fast apply to their memory banks). Data
    parallel: the offsets are this rank's rows of the global batch's draw."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = rank_rows(lambda m: torch.randint(0, 2 * pad + 1, (m,), device=x.device), b)
    dx = rank_rows(lambda m: torch.randint(0, 2 * pad + 1, (m,), device=x.device), b)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])            # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])            # (B, W)
    idx_r = rows[:, None, :, None].expand(b, x.shape[1], h, xp.shape[-1])
    out = xp.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, idx_c)


def random_resized_crop(x: torch.Tensor, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Differentiable per-sample RandomResizedCrop + horizontal flip back to (S, S) (CMI's local
    view; kornia's ``RandomResizedCrop(scale=[0.25, 1])`` in the original), via ``roi_align``.
    Data parallel: the crop parameters are this rank's rows of the global batch's draw."""
    from torchvision.ops import roi_align
    b, _, h, w = x.shape
    dev = x.device
    lo, hi = float(torch.log(torch.tensor(ratio[0]))), float(torch.log(torch.tensor(ratio[1])))
    area = rank_rows(lambda m: torch.empty(m, device=dev).uniform_(*scale), b)
    logr = rank_rows(lambda m: torch.empty(m, device=dev).uniform_(lo, hi), b)
    r = torch.exp(logr)
    cw = (torch.sqrt(area * r) * w).clamp(2.0, w)
    ch = (torch.sqrt(area / r) * h).clamp(2.0, h)
    x0 = rank_rows(lambda m: torch.rand(m, device=dev), b) * (w - cw)
    y0 = rank_rows(lambda m: torch.rand(m, device=dev), b) * (h - ch)
    boxes = torch.stack([torch.arange(b, device=dev, dtype=x0.dtype), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return random_flip(out.to(x.dtype))


def mixup(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Each image blended with a random partner of the batch, weight ~ Beta(alpha, alpha) per
    sample. No labels are mixed: the teacher labels the blend (data-free mixing, e.g. MixMix)."""
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0],)).to(x.device, x.dtype)
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]


def cutmix(x: torch.Tensor) -> torch.Tensor:
    """Each image gets a random box (side sqrt(1 - lam) of the image, lam ~ U(0, 1)) pasted from
    a random partner of the batch (Yun et al. 2019); the teacher labels the result."""
    b, _, h, w = x.shape
    perm = torch.randperm(b, device=x.device)
    side = torch.sqrt(1 - torch.rand(b, device=x.device))
    bh, bw = (side * h).long(), (side * w).long()
    cy = torch.randint(0, h, (b,), device=x.device)
    cx = torch.randint(0, w, (b,), device=x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    y0, x0 = (cy - bh // 2)[:, None, None], (cx - bw // 2)[:, None, None]
    box = (ys >= y0) & (ys < y0 + bh[:, None, None]) & (xs >= x0) & (xs < x0 + bw[:, None, None])
    return torch.where(box[:, None], x[perm], x)


def color_jitter(x: torch.Tensor, output_map: str = "imagenet", strength: float = COLOR_STRENGTH) -> torch.Tensor:
    """Per-sample photometric jitter of teacher-space images x (B, 3, S, S), in pixel space:
    brightness, contrast (around the image's mean) and saturation (around each pixel's luma) each
    scaled by a factor drawn from U(1 - s, 1 + s), then a per-channel gain from U(1 - s/2, 1 + s/2)
    that tints the image; clamped to [0, 1] and mapped back to teacher space. torchvision's
    ``ColorJitter(s, s, s)`` draws one factor per batch and rotates hue; this draws every factor
    per sample and tints instead of rotating (the teacher labels the result). Data parallel: the
    factors are this rank's rows of the global batch's draw."""
    b, dev = x.shape[0], x.device

    def factor(*shape, s=strength):   # (B, *shape) from U(1 - s, 1 + s)
        return 1.0 + s * (2.0 * rank_rows(lambda m: torch.rand(m, *shape, device=dev), b) - 1.0)

    p = from_teacher_input(x.float(), output_map) * factor(1, 1, 1)              # brightness
    mean = p.mean(dim=(1, 2, 3), keepdim=True)
    p = (p - mean) * factor(1, 1, 1) + mean                                      # contrast
    luma = (p * LUMA.to(dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    p = (p - luma) * factor(1, 1, 1) + luma                                      # saturation
    p = p * factor(3, 1, 1, s=strength / 2)                                      # per-channel tint
    return to_teacher_input(p.clamp(0.0, 1.0) * 2.0 - 1.0, output_map).to(x.dtype)


def crop_pad_px(size: int, pad: float = CROP_PAD) -> int:
    """The crop's reflect padding in pixels for images of side ``size``: ``floor(pad * size)``
    (S // 8 at the default), at least 1 and at most ``size - 1`` (reflect padding needs fewer
    pixels than the side)."""
    return min(size - 1, max(1, int(pad * size)))


def augment(x: torch.Tensor, mode: str, output_map: str = "imagenet", pad: float = CROP_PAD) -> torch.Tensor:
    """Student-side augmentation of pool samples x (B, 3, S, S), teacher space.

    ``none``: x unchanged; ``flip``: random horizontal flip; ``crop_flip``: random crop with
    ``pad`` x S px reflect padding (:func:`crop_pad_px`; default S/8: 4 px at 32 px, as the CIFAR
    recipes), then flip; ``crop_flip_mixup`` /
    ``crop_flip_cutmix``: then :func:`mixup` / :func:`cutmix` within the batch (data parallel:
    within this rank's rows, so equal to one process in distribution only; see decisions.md#speed);
    ``crop_flip_color``: then :func:`color_jitter` in the pixel space of ``output_map`` (the run's);
    ``rrc_flip``: :func:`random_resized_crop` over ``RRC_SCALE`` of the area (the crop the teachers
    were trained with), then flip.
    """
    if mode == "none":
        return x
    if mode == "flip":
        return random_flip(x)
    if mode == "rrc_flip":
        return random_resized_crop(x, scale=RRC_SCALE)
    if mode.startswith("crop_flip"):
        x = random_flip(random_crop(x, crop_pad_px(x.shape[-1], pad)))
        if mode == "crop_flip_mixup":
            return mixup(x)
        if mode == "crop_flip_cutmix":
            return cutmix(x)
        if mode == "crop_flip_color":
            return color_jitter(x, output_map)
        if mode == "crop_flip":
            return x
    raise ValueError(f"replay_aug={mode!r} is not one of {AUGMENTATIONS}")


class Replay:
    """The replay pool of one run and its sampling policy.

    Args:
        capacity: images kept (``replay_size``); the oldest are overwritten.
        output_map: the run's ``output_map`` (teacher space <-> pixels).
        device: where the pool lives.
        aug: augmentation of pool samples (``replay_aug``).
        fresh: share in [0, 1] of each student batch taken from the generator's current output
            rather than the pool (``replay_fresh``).
        recent: share in [0, 1 - fresh] of each student batch drawn uniformly from the ``window``
            newest pool images instead of the whole pool (``replay_recent``). Uniform draws from a
            keep-all pool see an image added late in a run less than once (decisions.md#synthesis).
        window: the number of newest images ``recent`` draws from (``replay_recent_window``).
        pad: the ``crop_flip*`` crops' reflect padding as a share of the image side (``replay_pad``).
        balance: b >= 0 of the whole-pool draws (``replay_balance``): image i is drawn with probability
            proportional to n_c^-b, n_c the number of pooled images whose label (the teacher's argmax
            when it was made) is its class; 0 = uniform (CMI, Fast), 1 = every class equally often.
            With b > 0 every :meth:`add` must pass labels.
    """

    def __init__(self, capacity: int, output_map: str, device, *, aug: str = "crop_flip", fresh: float = 0.0,
                 recent: float = 0.0, window: int = 1, pad: float = CROP_PAD, balance: float = 0.0):
        from .methods.common import ImagePool   # the uint8 FIFO the pool-based baselines use
        if aug not in AUGMENTATIONS:
            raise ValueError(f"replay_aug={aug!r} is not one of {AUGMENTATIONS}")
        if not 0.0 <= fresh <= 1.0:
            raise ValueError(f"replay_fresh must lie in [0, 1], got {fresh}")
        if not 0.0 <= recent <= 1.0 - fresh:
            raise ValueError(f"replay_recent must lie in [0, 1 - replay_fresh], got {recent} (fresh {fresh})")
        if window < 1:
            raise ValueError(f"the recent window must hold >= 1 image, got {window}")
        if not 0.0 < pad < 1.0:
            raise ValueError(f"replay_pad must lie in (0, 1) (a share of the image side), got {pad}")
        if balance < 0:
            raise ValueError(f"replay_balance must be >= 0 (0: uniform draws, 1: class-balanced), got {balance}")
        self.pool = ImagePool(capacity, output_map, device)
        self.aug, self.fresh = aug, float(fresh)
        self.recent, self.window, self.pad = float(recent), int(window), float(pad)
        self.balance = float(balance)

    def __len__(self) -> int:
        return len(self.pool)

    def add(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Store a synthesised batch x (B, 3, S, S), teacher space (detached, quantised to uint8), and
        its class labels (B,) where ``balance`` > 0 draws by class."""
        if self.balance > 0 and labels is None:
            raise ValueError("replay_balance > 0 draws by class: add() needs the batch's labels")
        self.pool.add(x.detach(), labels if self.balance > 0 else None)

    def batch(self, n: int, fresh_images) -> torch.Tensor:
        """n student images: ``round(n * fresh)`` from ``fresh_images(k)`` (the generator now),
        ``round(n * recent)`` drawn uniformly from the ``window`` newest pool images, the rest drawn
        from the whole pool (uniformly, or weighted by class with ``balance``), all augmented. An empty pool gives fresh images only."""
        k = n if len(self.pool) == 0 else int(round(n * self.fresh))
        r = 0 if len(self.pool) == 0 else min(n - k, int(round(n * self.recent)))
        parts = []
        if k > 0:
            parts.append(fresh_images(k))
        dtype = parts[0].dtype if parts else torch.float32
        if r > 0:
            parts.append(self.pool.sample_recent(r, self.window).to(dtype))
        if n - k - r > 0:
            parts.append(self.pool.sample(n - k - r, balance=self.balance).to(dtype))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return augment(x, self.aug, self.pool.output_map, pad=self.pad)

    def state(self) -> dict[str, Any]:
        return self.pool.state()

    def load(self, state: dict[str, Any]) -> None:
        self.pool.load(state)
