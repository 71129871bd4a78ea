"""CMI: Fang, Song, Wang, Shen, Wang, Song, "Contrastive Model Inversion for Data-Free Knowledge
Distillation", IJCAI 2021.

Recipe:
- Generator step: min_{G, head}  ``bn`` * L_BN + ``oh`` * CE(T(x), y) - ``adv`` * KL(T||S)
  + ``contrast`` * L_cr, with x = G(z), y target classes drawn once per round, L_BN the teacher's
  BN prior (``dfkd.losses.bn_prior``), KL(T||S) the adversarial term (``kd_T``), and
  L_cr the instance-discrimination (contrastive) loss:
    global view = x, local view = a random resized crop (scale 0.25-1) + flip of x;
    f = teacher penultimate features of each view; h = projection head (Linear-ReLU-Linear,
    ``dim`` outputs, L2-normalised) applied to [f_local; bank_local] and [f_global; bank_global];
    logits = h_local @ stopgrad(h_global)^T / ``tau``; CE with the matching index as positive,
    averaged separately over the current batch and the bank entries (CMI's split, so the bank
    does not dilute the generator's gradient).
  The memory bank holds the (local, global) teacher features of past synthesized batches, a ring
  buffer of ``bank_size`` rows registered as module buffers (``cmi_bank``, ``cmi_bank_ptr``,
  ``cmi_bank_count``), so it is in ``state_dict`` and checkpointed. The head is trained together with
  G by the generator's Adam.
- After the ``g_steps`` of a round, the round's last batch joins the data pool (``pool_size``,
  0 = 2048 images, FIFO, uint8) and its features join the bank.
- Student step: KD, KL(T||S) at ``kd_T``, on batches drawn from the pool (random flips).

Differences from the original (all in ``docs/decisions.md#baselines``): features are the teacher's
penultimate features (CMI concatenates per-instance channel means of all BN inputs, or of the four
ResNet stages for ResNet-34); the adversarial KL is unmasked by default (CMI multiplies it by
1[argmax S == argmax T]; ``adv_mask = True`` restores it — with a random student at 200 classes
the mask is almost always 0, i.e. the adversarial term silently vanishes); the generator is
not re-initialised each round and z is not optimised (``reset_generator = True`` re-initialises
G and its Adam state at each round start, as CMI); the last batch of a round is pooled, not the
lowest-loss one; DCGAN ``GeneratorB`` (init S/16) instead of CMI's 32-px generator; the whole bank
serves as negatives (CMI samples 4096 of 40960).

Options (``method_options``, :class:`CMIOptions`): the names in double backquotes above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..generator import dcgan_init
from ..losses import bn_prior, kd_loss
from ..options import option
from .common import GeneratorBaseline, ImagePool, PooledMixin, pool_capacity, random_resized_crop, rank_share


@dataclass(frozen=True)
class CMIOptions:
    """CMI: Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI
    2021. Defaults: the authors' adv-CMI CIFAR script (bn 1, oh 0.5, adv 0.5, contrast 0.8, tau 0.1,
    head 256, bank 4096), adversarial mask and per-round generator reset off (docs/decisions.md#baselines)."""
    bn: float = option(1.0, "BN-statistics prior weight")
    oh: float = option(0.5, "cross-entropy weight (to the round's sampled targets)")
    adv: float = option(0.5, "adversarial KL(T||S) weight")
    adv_mask: bool = option(False, "adversarial KL only where S agrees with T (CMI's code)")
    contrast: float = option(0.8, "contrastive (instance discrimination) weight")
    tau: float = option(0.1, "contrastive temperature")
    dim: int = option(256, "projection head output size")
    bank_size: int = option(4096, "memory bank rows (teacher features of past batches)")
    reset_generator: bool = option(False, "re-initialise G and its Adam state at every round start (CMI's code)")
    pool_size: int = option(0, "synthetic images kept for the student steps (0 = 2048; FIFO, uint8)")


class MLPHead(nn.Module):
    """CMI's projection head: Linear(D, D) - ReLU - Linear(D, out), L2-normalised output."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x.float()), dim=1)


def per_sample_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float, direction: str) -> torch.Tensor:
    """(B,) KL per image at temperature T, times T^2 (its batch mean equals ``kd_loss``)."""
    s = F.log_softmax(s_logits.float() / T, dim=1)
    t = F.log_softmax(t_logits.float() / T, dim=1)
    a, b = (t, s) if direction == "t_s" else (s, t)
    return (a.exp() * (a - b)).sum(1) * (T * T)


def contrastive_loss(h_local: torch.Tensor, h_global: torch.Tensor, n_current: int, tau: float, *,
                     rank: int = 0) -> torch.Tensor:
    """CMI's instance discrimination: row i of ``h_local`` (N, d) must pick row i of the detached
    ``h_global`` (N, d); the first ``n_current`` rows are the current batch, the rest the bank.
    The CE is averaged over each part separately and summed. 0-d fp32.

    Data parallel: ``h_global`` holds the current batch of every rank (rank order, ``n_current``
    rows each) before the bank rows, so it has more rows than ``h_local``; the positive of this
    ``rank``'s current row i is row ``rank * n_current + i``, that of bank row j the bank's row j."""
    logits = h_local @ h_global.detach().t() / tau
    n_bank = len(h_local) - n_current
    n_all = len(h_global) - n_bank                   # current rows of every rank
    dev = logits.device
    target = torch.cat([rank * n_current + torch.arange(n_current, device=dev),
                        n_all + torch.arange(n_bank, device=dev)])
    ce = F.cross_entropy(logits, target, reduction="none")
    if len(logits) > n_current:
        return ce[:n_current].mean() + ce[n_current:].mean()
    return ce.mean()


class CMI(PooledMixin, GeneratorBaseline):
    """Contrastive model inversion: BN prior + CE + adversarial + instance contrast, with a pool."""

    name = "cmi"
    Options = CMIOptions

    def build(self) -> None:
        super().build()
        cfg, d = self.cfg, self.teacher.feature_dim
        self.head = MLPHead(d, self.opts.dim)
        self.register_buffer("cmi_bank", torch.zeros(self.opts.bank_size, 2 * d))      # [local | global]
        self.register_buffer("cmi_bank_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("cmi_bank_count", torch.zeros((), dtype=torch.long))
        self.pool = ImagePool(pool_capacity(self), cfg.output_map, self.device)
        self.round_step = 0
        self.round_targets: torch.Tensor | None = None
        self.bank_n = 0  # host copy of cmi_bank_count (no device sync per step)

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.head.parameters())

    def adversarial_term(self, x: torch.Tensor) -> torch.Tensor:
        """KL(T(x) || S(x)), unmasked (what G maximises)."""
        return kd_loss(self.student(x), self.teacher_forward(x), T=self.cfg.kd_T, direction=self.cfg.kd_direction)

    # ------------------------------------------------------------------ memory bank
    def bank_entries(self) -> torch.Tensor:
        """The filled rows of the bank, (n, 2D), n <= bank_size (count mirrored on the host)."""
        return self.cmi_bank[:min(self.bank_n, self.cmi_bank.shape[0])]

    @torch.no_grad()
    def bank_add(self, feats: torch.Tensor) -> None:
        size = self.cmi_bank.shape[0]
        feats = feats[-size:].float()
        idx = (self.cmi_bank_ptr + torch.arange(len(feats), device=feats.device)) % size
        self.cmi_bank.index_copy_(0, idx, feats)
        self.cmi_bank_ptr.copy_((self.cmi_bank_ptr + len(feats)) % size)
        self.cmi_bank_count.add_(len(feats))
        self.bank_n += len(feats)

    # ------------------------------------------------------------------ generator
    def start_round(self) -> None:
        cfg = self.cfg
        if self.opts.reset_generator:
            dcgan_init(self.generator)
            for p in self.generator.parameters():
                self.g_opt.state.pop(p, None)
        self.round_targets = rank_share(
            self, lambda m: torch.randint(0, self.num_classes, (m,), device=self.device), cfg.batch_size)

    def generator_step(self) -> dict[str, torch.Tensor]:
        cfg, o = self.cfg, self.opts
        if self.round_step == 0:
            self.start_round()
        y = self.round_targets
        with self.autocast():
            x = self.generate(cfg.batch_size)
            with bn_prior(self.teacher, reduce=self.stat_reduce) as bn:
                t = self.teacher_forward(x, features=True)
            l_bn = bn.loss()
            oh = F.cross_entropy(t.logits.float(), y)
            s_logits = self.student(x)
            per = per_sample_kl(s_logits, t.logits, cfg.kd_T, cfg.kd_direction)
            kl = per.mean()                                  # == kd_loss(s, t): the adversarial term
            if o.adv_mask:                             # CMI: only where S agrees with T
                adv_used = (per * (s_logits.argmax(1) == t.logits.argmax(1)).float()).mean()
            else:
                adv_used = kl
            local = self.teacher_forward(random_resized_crop(x), features=True).penultimate.float()
            glob = t.penultimate.float()
            bank = self.bank_entries()
            d = glob.shape[1]
            h = self.head(torch.cat([local, bank[:, :d], glob, bank[:, d:]]))
            h_local, h_global = h.chunk(2)
            if self.world_size > 1:   # candidates: the global batch (every rank's rows), then the bank
                h_global = torch.cat([dist.all_gather_rows(h_global[:len(x)]), h_global[len(x):]])
            cr = contrastive_loss(h_local, h_global, len(x), o.tau, rank=self.rank)
            loss = o.bn * l_bn + o.oh * oh - o.adv * adv_used + o.contrast * cr
        self.optimize(self.g_opt, loss)
        self.round_step += 1
        if self.round_step >= self.g_steps_per_iteration():
            self.pool.add(x.detach())                  # data parallel: both gather the global batch,
            self.bank_add(dist.all_gather_rows(torch.cat([local, glob], 1).detach()))   # as one process
            self.round_step = 0
        return {"loss": loss.detach(), "bn": l_bn.detach(), "oh": oh.detach(), "adv": kl.detach(),
                "contrast": cr.detach()}

    # ------------------------------------------------------------------ student
    def fallback_batch(self, n: int) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.generate(n).float()

    def student_step(self) -> dict[str, torch.Tensor]:
        return self.train_student_on(self.pool_batch())

    def student_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kd_losses(x)

    # ------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        """Pool (global), round position and the round's targets (data parallel: gathered, the
        global batch's; a collective, so every rank calls it)."""
        rt = self.round_targets
        return {"pool": self.pool.state(), "round_step": self.round_step,
                "round_targets": dist.all_gather_rows(rt).cpu().clone() if rt is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool.load(state["pool"])
        self.bank_n = int(self.cmi_bank_count)  # buffers were restored by load_state_dict
        self.round_step = int(state.get("round_step", 0))
        rt = state.get("round_targets")
        self.round_targets = dist.own_rows(rt).to(self.device) if rt is not None else None
