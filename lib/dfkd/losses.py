"""Loss terms of DFKD-FGVC (Eqs. 2, 3, 7, 8, 9) as small callables.

Scope:
- :func:`kd_loss` — KL distillation of logits (Eq. 2), used by both players (Eqs. 10, 11).
- :func:`bn_prior` / :class:`BNPrior` — BatchNorm-statistics prior of the teacher (Eq. 3) as a
  context manager owning forward hooks.
- :func:`mhad_loss` + :func:`build_mhad` — mixed high-order attention distillation (Eq. 7) with
  per-stage adapters and MHA modules (:mod:`dfkd.attention`).
- :class:`ProjectionHead` + :func:`sfcl_loss` — semantic feature contrast learning (Eqs. 8, 9).
- :func:`check_finite` — loud failure on non-finite loss terms.

Numerically sensitive reductions (softmax/KL, BN statistics, contrastive logits, MSE) run in fp32
even under bf16 autocast. Choices the paper leaves open: ``docs/decisions.md#method``.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MixedHighOrderAttention

MHAD_MODES = ("frozen", "trainable", "separate")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ------------------------------------------------------------------------------------------------
# Eq. 2: KL distillation
# ------------------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0,
            direction: str = "t_s") -> torch.Tensor:
    """KL divergence between softened class distributions (Eq. 2), batch mean, times T^2.

    Args:
        student_logits, teacher_logits: (B, K), any float dtype (computed in fp32).
        T: temperature (> 0); the T^2 factor keeps gradient scale comparable across T (Hinton).
        direction: ``t_s`` = KL(softmax(t/T) || softmax(s/T)) (peers, the author's ``kdloss``);
            ``s_t`` = KL(softmax(s/T) || softmax(t/T)) (Eq. 2 as written).

    Returns a 0-d fp32 tensor >= 0. Gradients flow into *both* arguments when they require grad
    (the generator's adversarial term -L_KD needs the gradient through teacher and student).
    """
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    if direction == "t_s":
        kl = F.kl_div(s, t, reduction="batchmean", log_target=True)   # sum p_t (log p_t - log p_s)
    elif direction == "s_t":
        kl = F.kl_div(t, s, reduction="batchmean", log_target=True)   # sum p_s (log p_s - log p_t)
    else:
        raise ValueError(f"direction={direction!r} is not one of ('t_s', 's_t')")
    return kl * (T * T)


# ------------------------------------------------------------------------------------------------
# Eq. 3: BatchNorm statistics prior
# ------------------------------------------------------------------------------------------------
class _ShiftedMoments(torch.autograd.Function):
    """Per-channel (E[d], E[d^2]) of d = x - shift over every axis but ``cdim``, in fp32.

    One autograd node instead of the half-dozen element-wise ones that ``mean`` and ``(d * d).mean``
    record: the backward is one fused ``g_m / n + d * (2 g_sq / n)`` pass over the activations, cast
    back to x's dtype. On a CPU the BN prior's element-wise passes (not its reductions) are most of its
    cost, since every pass over a (B, C, H, W) activation is memory-bound (docs/decisions.md#speed).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, cdim: int):
        view = [1] * x.dim()
        view[cdim] = -1
        d = x.float() - shift.float().view(view)
        dims = [k for k in range(x.dim()) if k != cdim]
        ctx.save_for_backward(d)
        ctx.meta = (x.dtype, view, d.numel() // d.shape[cdim])
        return torch.stack([d.mean(dim=dims), (d * d).mean(dim=dims)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (d,) = ctx.saved_tensors
        dtype, view, n = ctx.meta
        gm, gsq = (g / n).unbind(0)
        gx = torch.addcmul(gm.view(view), d, (2 * gsq).view(view))
        return gx.to(dtype), None, None


def shifted_moments(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(2, C) fp32: per-channel E[x - shift] and E[(x - shift)^2] over all axes but the channel axis
    1 of x (B, C, ...), differentiable in x. A channels_last (B, C, H, W) x is reduced as its
    contiguous (B H W, C) view: the same numbers, without a strided reduction."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _ShiftedMoments.apply(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), shift, 1)
    return _ShiftedMoments.apply(x, shift, 1)


class BNPrior:
    """Context manager that hooks every BatchNorm{1,2,3}d of ``model`` (Eq. 3).

    Usage::

        with bn_prior(teacher) as bn:
            t_logits = teacher(x)
        loss_bn = bn.loss()

    Per layer l the hook records ``||mu_l - mean(x)||_2 + ||sigma2_l - var(x)||_2`` where x is the
    BN *input*, mean/var are per-channel batch statistics (biased variance) computed in fp32 (also
    under autocast), and mu_l / sigma2_l are the layer's running statistics. Each layer keeps the
    value of its most recent call (a second forward overwrites, it does not accumulate). Layers
    without running statistics are skipped. The model's train/eval mode is never touched (the
    teacher is expected in eval mode so its running statistics stay fixed). Hooks are removed on
    exit, also when the body raises; the collected terms remain readable after exit.

    Args:
        model: the network whose BN layers define the prior (the teacher).
        first_bn_multiplier: weight of the first BN layer's term (DeepInversion uses 10; 1 = Eq. 3).
        reduce: optional differentiable mean over data-parallel ranks (``dfkd.dist.mean_across_ranks``)
            applied to the stacked per-channel (mean, E[x^2]) before the variance is formed, so the
            statistics are those of the global batch; None (default) = this process's batch only.
        momentum, memory: the momentum BN prior of Fast (Fang et al., AAAI 2022): with
            ``momentum`` m > 0 and a ``memory`` dict holding earlier batches' (mean, var) per layer,
            the running statistics are compared with ``m * memory + (1 - m) * batch`` instead of the
            batch alone; :meth:`update_memory` then folds the batch in (detached). m = 0: Eq. 3.

    The batch mean and biased variance come from one pass over the activations
    (:func:`shifted_moments`: E[d] and E[d^2] of d = x - running_mean, then var = E[d^2] - E[d]^2),
    equal to the two-pass ``mean`` / ``var`` up to rounding.
    """

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 1.0, *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 momentum: float = 0.0, memory: dict | None = None):
        self.model = model
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.reduce = reduce
        self.momentum = float(momentum)
        self.memory = memory if memory is not None else {}
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers = [m for m in model.modules()
                       if isinstance(m, _BN_TYPES) and m.running_mean is not None and m.running_var is not None]
        self._terms: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, index: int):
        def hook(module, inputs, output):
            x = inputs[0]
            with torch.autocast(device_type=x.device.type, enabled=False):
                # one pass: the batch mean and E[d^2] of d = x - running_mean; shifting by the stored
                # mean (near the batch's) keeps E[d^2] - E[d]^2 free of cancellation. BN's biased var.
                shift = module.running_mean.detach().float()
                stats = shifted_moments(x, shift)
                if self.reduce is not None:                       # global batch over ranks
                    stats = self.reduce(stats)
                mean_d, sq = stats.unbind(0)
                mean = mean_d + shift
                var = (sq - mean_d * mean_d).clamp_min(0)
                self._stats[index] = (mean.detach(), var.detach())
                if self.momentum > 0 and index in self.memory:    # Fast's momentum prior
                    m_mean, m_var = self.memory[index]
                    mean = self.momentum * m_mean + (1 - self.momentum) * mean
                    var = self.momentum * m_var + (1 - self.momentum) * var
                term = (torch.linalg.vector_norm(module.running_mean.float() - mean)
                        + torch.linalg.vector_norm(module.running_var.float() - var))   # Eq. 3
            self._terms[index] = term
        return hook

    def __enter__(self) -> "BNPrior":
        self.reset()
        try:
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._hook(i)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False                                                  # never swallow exceptions

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget the collected terms (hooks stay)."""
        self._terms.clear()

    def update_memory(self) -> None:
        """Fold the last batch's statistics into ``memory`` (momentum prior; first batch: copied)."""
        m = self.momentum
        for i, (mean, var) in self._stats.items():
            if i in self.memory:
                mm, mv = self.memory[i]
                self.memory[i] = (m * mm + (1 - m) * mean, m * mv + (1 - m) * var)
            else:
                self.memory[i] = (mean, var)

    def per_layer(self) -> list[torch.Tensor]:
        """Unweighted Eq. 3 terms (0-d fp32 tensors) of the hooked layers that ran, in module order."""
        return [self._terms[i] for i in sorted(self._terms)]

    def loss(self) -> torch.Tensor:
        """Sum over layers of the Eq. 3 terms (first layer times ``first_bn_multiplier``), 0-d fp32."""
        if not self._terms:
            if not self.layers:
                raise RuntimeError(f"{type(self.model).__name__} has no BatchNorm layer with running "
                                   "statistics: the BN prior (Eq. 3) is undefined for it")
            raise RuntimeError("BNPrior.loss() called before any forward pass of the hooked model "
                               "inside the `with bn_prior(model)` block")
        total = None
        for i in sorted(self._terms):
            term = self._terms[i] * self.first_bn_multiplier if i == 0 else self._terms[i]
            total = term if total is None else total + term
        return total


def bn_memory_state(memory: dict) -> dict:
    """A momentum BN prior's ``memory`` (layer -> (mean, var)) as CPU copies, for a checkpoint."""
    return {i: (m.cpu().clone(), v.cpu().clone()) for i, (m, v) in memory.items()}


def load_bn_memory(memory: dict, saved: dict, device) -> None:
    """Replace ``memory``'s contents (in place: a method's BNPrior keeps the same dict) with a
    checkpoint's :func:`bn_memory_state`, moved to ``device``."""
    memory.clear()
    memory.update({int(i): (m.to(device), v.to(device)) for i, (m, v) in saved.items()})


def bn_prior(model: nn.Module, first_bn_multiplier: float = 1.0, *,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             momentum: float = 0.0, memory: dict | None = None) -> BNPrior:
    """``with bn_prior(teacher) as bn: teacher(x)`` then ``bn.loss()`` (Eq. 3). See :class:`BNPrior`."""
    return BNPrior(model, first_bn_multiplier, reduce=reduce, momentum=momentum, memory=memory)


# ------------------------------------------------------------------------------------------------
# Eq. 7: mixed high-order attention distillation
# ------------------------------------------------------------------------------------------------
def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_mhad(teacher_channels: Sequence[int], student_channels: Sequence[int], order: int = 3,
               mode: str = "frozen", seed: int = 0, *, sigmoid: str = "per_route"):
    """Build the per-stage modules of MHAD; the caller owns, optimises and checkpoints them.

    Returns ``(adapters, mhas, teacher_mhas)``:
    - ``adapters``: ModuleList of 1x1 convs Cs -> Ct with bias (paper-notes M4); identity-initialised
      when Cs == Ct (MHAD then starts by comparing raw features), default init otherwise. Trainable.
    - ``mhas``: ModuleList of :class:`MixedHighOrderAttention` (Ct, order). ``frozen``: requires_grad
      False (a fixed random high-order lens); ``trainable``: trainable, shared by both branches;
      ``separate``: trainable, student side only.
    - ``teacher_mhas``: for ``separate`` a frozen copy of the *same* initial ``mhas`` (teacher side);
      ``None`` otherwise.

    Initialisation is drawn from a private RNG seeded with ``seed`` (the global RNG is untouched),
    so the frozen lens is reproducible from the config alone.
    """
    if mode not in MHAD_MODES:
        raise ValueError(f"mode={mode!r} is not one of {MHAD_MODES}")
    if len(teacher_channels) != len(student_channels):
        raise ValueError(f"{len(teacher_channels)} teacher stages vs {len(student_channels)} student stages")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapters = nn.ModuleList()
        for ct, cs in zip(teacher_channels, student_channels):
            conv = nn.Conv2d(cs, ct, 1, bias=True)
            if cs == ct:
                with torch.no_grad():
                    conv.weight.copy_(torch.eye(ct).view(ct, ct, 1, 1))
                    conv.bias.zero_()
            adapters.append(conv)
        mhas = nn.ModuleList(MixedHighOrderAttention(ct, order, sigmoid=sigmoid) for ct in teacher_channels)
    teacher_mhas = None
    if mode == "frozen":
        _frozen(mhas)
    elif mode == "separate":
        teacher_mhas = _frozen(copy.deepcopy(mhas))
    return adapters, mhas, teacher_mhas


def mhad_loss(teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor],
              adapters: Sequence[nn.Module], mhas: Sequence[nn.Module], *, mode: str = "frozen",
              teacher_mhas: Sequence[nn.Module] | None = None, eps: float = 1e-6) -> torch.Tensor:
    """MHAD (Eq. 7), summed over stages.

    Per stage m: ``ft`` (B, Ct, H, W) teacher feature (detached here), ``fs`` (B, Cs, h, w) student
    feature -> ``adapters[m]`` (1x1, Cs -> Ct) -> bilinear resize to (H, W) if needed; then
    - ``frozen`` / ``separate``: element-wise-mean ``MSE(MHA_t(ft), MHA_s(fs'))`` (Eq. 7's
      1/(N C) sum MSE), with MHA_t = MHA_s = ``mhas[m]`` for ``frozen`` and MHA_t =
      ``teacher_mhas[m]`` for ``separate``;
    - ``trainable``: the shared ``mhas[m]`` on both branches and the energy-normalised error
      ``||A(ft)ft - A(fs')fs'||^2 / (||A(ft)ft||^2 + eps)`` per sample, averaged over the batch —
      shrinking the attention scales numerator and denominator alike, so it cannot reach zero by
      collapsing A (a plain MSE can; see decisions).

    Returns a 0-d fp32 tensor (the sum over stages).
    """
    if mode not in MHAD_MODES:
        raise ValueError(f"mode={mode!r} is not one of {MHAD_MODES}")
    n = len(teacher_feats)
    if not (len(student_feats) == len(adapters) == len(mhas) == n) or n == 0:
        raise ValueError(f"need one adapter and MHA per stage: {n} teacher feats, {len(student_feats)} "
                         f"student feats, {len(adapters)} adapters, {len(mhas)} MHAs")
    if mode == "separate" and (teacher_mhas is None or len(teacher_mhas) != n):
        raise ValueError("mode='separate' needs teacher_mhas (one frozen MHA per stage, from build_mhad)")
    total = None
    for m in range(n):
        ft = teacher_feats[m].detach()
        fs = adapters[m](student_feats[m])
        # NCHW for the MHA (a no-op unless the networks run channels_last): its element-wise passes
        # over (B, R, C, H, W) stacks are several times slower on NHWC strides (docs/decisions.md#speed)
        ft, fs = ft.contiguous(), fs.contiguous()
        if fs.shape[-2:] != ft.shape[-2:]:
            fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
        t_mha = teacher_mhas[m] if mode == "separate" else mhas[m]
        at = t_mha(ft).float()                                       # F~_m^t = A_m(ft) * ft
        as_ = mhas[m](fs).float()                                    # F~_m^s
        if mode == "trainable":
            num = (at - as_).pow(2).flatten(1).sum(1)
            den = at.pow(2).flatten(1).sum(1) + eps
            term = (num / den).mean()
        else:
            term = F.mse_loss(as_, at)                               # Eq. 7
        total = term if total is None else total + term
    return total


# ------------------------------------------------------------------------------------------------
# Eqs. 8-9: semantic feature contrast learning
# ------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """The MLP "C" of Sec. 4.3 mapping penultimate features to the contrast space.

    "MLP layer with two hidden linear layers" read as two hidden layers of width ``hidden``:
    Linear(in, h) - ReLU - Linear(h, h) - ReLU - Linear(h, out) (``n_linear=3``, default). The
    alternative reading, two linear layers in total (CMI/CPSC heads), is ``n_linear=2``:
    Linear(in, h) - ReLU - Linear(h, out). ``hidden`` defaults to ``in_dim``.

    Forward: (B, in_dim) -> (B, out_dim), un-normalised (:func:`sfcl_loss` normalises, Eq. 8).
    """

    def __init__(self, in_dim: int, out_dim: int = 256, hidden: int | None = None, *, n_linear: int = 3):
        super().__init__()
        if n_linear not in (2, 3):
            raise ValueError(f"n_linear must be 2 or 3, got {n_linear}")
        h = hidden or in_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, h), nn.ReLU(inplace=True)]
        if n_linear == 3:
            layers += [nn.Linear(h, h), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(h, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim, self.hidden, self.n_linear = in_dim, out_dim, h, n_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def _anchor_ce(anchors: torch.Tensor, z: torch.Tensor, self_offset: int, pos_offset: int,
               tau: float) -> torch.Tensor:
    """Mean CE of anchors[i] vs the rows of z without row self_offset+i, target row pos_offset+i."""
    n = anchors.shape[0]
    logits = anchors @ z.t() / tau                                   # (N, 2N), cosine / tau (Eq. 8)
    idx = torch.arange(n, device=z.device)
    logits = logits.masked_fill(F.one_hot(idx + self_offset, z.shape[0]).bool(), float("-inf"))
    return F.cross_entropy(logits, idx + pos_offset)


def sfcl_loss(teacher_z: torch.Tensor, student_z: torch.Tensor, tau: float = 0.07,
              symmetric: bool = False, *, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
              rank: int = 0) -> torch.Tensor:
    """SFCL (Eq. 9): NT-Xent with teacher anchors.

    Args:
        teacher_z, student_z: (N, D) projections of the same N synthetic images (any dtype).
        tau: temperature (not given by the paper; default 0.07, decision S2).
        symmetric: also use student anchors and average the two directions (decision S3).

    Both batches are L2-normalised in fp32 (Eq. 8). For anchor t_i the positive is s_i and the
    candidates are all 2N - 1 representations other than t_i (the other N - 1 teachers and N - 1
    students are the 2(N - 1) negatives); the loss is the mean over i of
    ``-log(exp(sim(t_i, s_i)/tau) / sum_{z != t_i} exp(sim(t_i, z)/tau))``. Returns 0-d fp32.

    Data-parallel: ``gather`` (``dfkd.dist.gather_rows``, differentiable) concatenates every rank's
    normalised rows in rank order; this rank's N rows are the anchors (at ``rank * N`` of the
    global batch) and the candidates are the whole global batch, so the mean over ranks of the
    returned values equals the single-process loss on the global batch.
    """
    if teacher_z.shape != student_z.shape or teacher_z.dim() != 2:
        raise ValueError(f"teacher_z and student_z must both be (N, D); got {tuple(teacher_z.shape)} "
                         f"and {tuple(student_z.shape)}")
    n = teacher_z.shape[0]
    with torch.autocast(device_type=teacher_z.device.type, enabled=False):
        t = F.normalize(teacher_z.float(), dim=1)
        s = F.normalize(student_z.float(), dim=1)
        if gather is None:
            z = torch.cat([t, s], dim=0)                              # (2N, D): teachers, then students
            own, total = 0, n
        else:                                                         # global batch of all ranks
            z = torch.cat([gather(t), gather(s)], dim=0)
            own, total = rank * n, z.shape[0] // 2
        loss = _anchor_ce(t, z, self_offset=own, pos_offset=total + own, tau=tau)     # Eq. 9
        if symmetric:
            loss = 0.5 * (loss + _anchor_ce(s, z, self_offset=total + own, pos_offset=own, tau=tau))
    return loss


# ------------------------------------------------------------------------------------------------
# Registry and guards
# ------------------------------------------------------------------------------------------------
LOSSES = {"kd": kd_loss, "sfcl": sfcl_loss, "mhad": mhad_loss}


def check_finite(losses: Mapping[str, torch.Tensor | float], where: str) -> None:
    """Raise ``FloatingPointError`` naming every non-finite term of ``losses`` (one host sync).

    ``where`` says which step produced them (e.g. ``"generator step, epoch 3 iter 12"``).
    """
    items = [(k, v) for k, v in losses.items() if v is not None]
    if not items:
        return
    flags = []
    for _, v in items:
        v = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
        flags.append(torch.isfinite(v.float()).all())
    device = flags[0].device
    ok = torch.stack([f.to(device) for f in flags]).tolist()         # the only host sync
    if all(ok):
        return
    bad = [k for (k, _), f in zip(items, ok) if not f]
    raise FloatingPointError(f"non-finite loss term(s) {bad} in {where}; try a lower learning rate "
                             "(lr_g / lr_s) or amp='off'")


def mode_seeking_loss(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al., CVPR 2019, Eq. 3): the batch's first half is paired
    with its second half, ``r = mean|x1 - x2| / mean|z1 - z2|`` and the loss is ``1 / (r + eps)``:
    minimising it pushes images of different noise apart (against a generator that maps every z
    to one image). x (B, ...) images, z (B, nz) their noise, B >= 2; a 0-d fp32 tensor."""
    h = x.shape[0] // 2
    if h < 1:
        raise ValueError(f"mode_seeking_loss needs a batch of at least 2, got {x.shape[0]}")
    x, z = x.float(), z.float()
    r = (x[:h] - x[h:2 * h]).abs().mean() / (z[:h] - z[h:2 * h]).abs().mean()
    return 1.0 / (r + eps)


def class_coverage_terms(logits: torch.Tensor, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DFQ's generator terms on teacher logits (B, K): the instance entropy (cross-entropy to the
    argmax) and the class balance ``sum_k p_k log p_k`` of the batch-mean softmax p (``reduce``:
    mean over data-parallel ranks). Both 0-d fp32; used by ``dfq`` and by ``dfkd_fgvc``'s
    ``g_oh`` / ``g_balance``."""
    logits = logits.float()
    oh = F.cross_entropy(logits, logits.argmax(1))
    p = F.softmax(logits, dim=1).mean(0)
    p = reduce(p) if reduce is not None else p
    return oh, (p * torch.log(p.clamp_min(1e-12))).sum()

