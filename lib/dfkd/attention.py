"""Attention modules of DFKD-FGVC.

Scope:
- :class:`SpatialAttention` (SAM): the encoder-decoder spatial-wise attention plugged after every
  generator block (Sec. 4.1, Eqs. 4-6, Table 6 right).
- :class:`MixedHighOrderAttention` (MHA): the mixed high-order attention applied to intermediate
  teacher/student features for MHAD (Sec. 4.2, Fig. 3), re-implemented after
  ``HighDivModule`` of Chen, Deng, Hu, "Mixed High-Order Attention Network for Person
  Re-Identification" (ICCV 2019).

The losses that use MHA live in :mod:`dfkd.losses`; the generator that uses SAM lives in
:mod:`dfkd.generator`. Choices the paper leaves open are recorded in ``docs/decisions.md#method``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SAM_SOFTMAX = ("spatial", "spatial_scaled", "channel")
MHA_SIGMOID = ("per_route", "after_sum")


def attention_softmax(a: torch.Tensor, mode: str = "spatial") -> torch.Tensor:
    """Normalise raw attention logits ``a`` (B, C, H, W) into weights, in fp32.

    - ``spatial``: softmax over the H*W positions of each (sample, channel); each map sums to 1,
      so the mean weight is 1/(H*W).
    - ``spatial_scaled``: ``spatial`` times H*W; each map has mean 1 (values in (0, H*W)).
    - ``channel``: softmax over C at every position; sums to 1 over channels (mean 1/C).

    Returns a float32 tensor of the same shape (softmax in bf16 would quantise 1/(H*W) weights).
    """
    a = a.float()
    if mode == "channel":
        return a.softmax(dim=1)
    if mode in ("spatial", "spatial_scaled"):
        b, c, h, w = a.shape
        s = a.reshape(b, c, h * w).softmax(dim=-1).reshape(b, c, h, w)
        return s * float(h * w) if mode == "spatial_scaled" else s
    raise ValueError(f"softmax={mode!r} is not one of {SAM_SOFTMAX}")


def _conv_bn_relu(conv: nn.Module, c: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True))


class SpatialAttention(nn.Module):
    """Spatial-wise attention module, SAM (Eqs. 4-6, Table 6 right).

    Encoder: 1x1 conv C -> C/r (A_d); 3x3 conv C/r -> 2C/r, BN, ReLU, 2x2 max-pool (indices kept);
    3x3 conv 2C/r -> 4C/r, BN, ReLU (Gamma). Decoder: 3x3 deconv (stride 1) 4C/r -> 2C/r, BN,
    ReLU, 2x2 max-unpool with *the same* pool indices; 3x3 deconv 2C/r -> C/r, BN, ReLU; 1x1 conv
    C/r -> C giving A_s. Output ``F~ = lam * softmax(A_s) * F + F`` (Eq. 6).

    Args:
        channels: C, channels of the feature map F.
        reduction: r (not given by the paper; default 4, see decisions). C/r is clamped to >= 1.
        lam: lambda of Eq. 6 (paper default 5e-2). ``lam=0`` gives exactly the identity.
        softmax: ``spatial`` | ``spatial_scaled`` | ``channel`` (see :func:`attention_softmax`).

    Forward: ``x`` (B, C, H, W), any H, W >= 1 (odd sizes handled: ceil-mode pooling and an
    explicit unpool ``output_size``) -> same shape and dtype. ``forward(x, return_attention=True)``
    returns ``(out, weights)`` with the softmax weights (B, C, H, W) in fp32, still attached to the
    graph. After each forward, ``last_relative_contribution`` holds the detached 0-d tensor
    ``||lam * softmax(A_s) * F|| / ||F||`` (no host sync); with ``record_attention = True`` the
    detached weights are also kept in ``last_attention`` (off by default: at 224^2 x 64 channels
    they are ~13 MB per image).
    """

    def __init__(self, channels: int, reduction: int = 4, lam: float = 0.05, softmax: str = "spatial"):
        super().__init__()
        if softmax not in SAM_SOFTMAX:
            raise ValueError(f"softmax={softmax!r} is not one of {SAM_SOFTMAX}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        c = channels
        cr = max(1, c // reduction)
        self.channels, self.reduction, self.lam, self.softmax_mode = c, reduction, float(lam), softmax
        # Eq. 4 (encoder)
        self.reduce = nn.Conv2d(c, cr, 1)                                            # A_d
        self.enc1 = _conv_bn_relu(nn.Conv2d(cr, 2 * cr, 3, padding=1), 2 * cr)       # Psi
        # ceil_mode keeps the last row/column of odd maps in the pooling (and makes 1x1 maps legal)
        self.pool = nn.MaxPool2d(2, return_indices=True, ceil_mode=True)
        self.enc2 = _conv_bn_relu(nn.Conv2d(2 * cr, 4 * cr, 3, padding=1), 4 * cr)   # Gamma
        # Eq. 5 (decoder); "DC 3x3" keeps the size (stride 1, padding 1), MaxUnpool doubles it
        self.dec1 = _conv_bn_relu(nn.ConvTranspose2d(4 * cr, 2 * cr, 3, stride=1, padding=1), 2 * cr)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec2 = _conv_bn_relu(nn.ConvTranspose2d(2 * cr, cr, 3, stride=1, padding=1), cr)
        self.expand = nn.Conv2d(cr, c, 1)                                            # A_s
        self.record_attention = False
        self.last_attention: torch.Tensor | None = None
        self.last_relative_contribution: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw attention A_s (B, C, H, W) before the softmax (Eqs. 4-5)."""
        h, w = x.shape[-2:]
        psi = self.enc1(self.reduce(x))
        pooled, idx = self.pool(psi)
        gamma = self.enc2(pooled)
        d = self.dec1(gamma)
        # Eq. 5: MUP reuses the encoder's pool indices ("the indexes of Maxpool are also used in
        # the MaxUnpool", Sec. 5.5); output_size restores odd H, W exactly.
        u = self.unpool(d, idx, output_size=(h, w))
        return self.expand(self.dec2(u))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        weights = attention_softmax(self.logits(x), self.softmax_mode)   # fp32, (B, C, H, W)
        xf = x.float()
        # Eq. 6: F~ = lam * (softmax(A_s) * F) + F, fused; lam = 0 leaves F bit-exact (F + 0)
        out = torch.addcmul(xf, weights, xf, value=self.lam).to(x.dtype)
        with torch.no_grad():
            self.last_relative_contribution = (abs(self.lam) * (weights * xf).norm()
                                               / xf.norm().clamp_min(1e-12))
            self.last_attention = weights.detach() if self.record_attention else None
        return (out, weights) if return_attention else out

    @property
    def relative_contribution(self) -> torch.Tensor | None:
        """``||lam * softmax(A_s) * F|| / ||F||`` of the last forward (detached 0-d tensor)."""
        return self.last_relative_contribution

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, lam={self.lam}, softmax={self.softmax_mode!r}"


def mha_inter_channels(channels: int) -> int:
    """C' = (C // 8) * 2 as in ``HighDivModule``; at least 2 so that C < 8 still works."""
    return max(2, (channels // 8) * 2)


class MixedHighOrderAttention(nn.Module):
    """Mixed high-order attention, MHA (Sec. 4.2, Fig. 3; Chen et al. 2019 ``HighDivModule``).

    For every order r = 1..R: r bias-free 1x1 reducers ``W[r][i]: C -> C'`` whose outputs are
    multiplied element-wise, a ReLU *after* the product, a bias-free 1x1 expander ``U[r]: C' -> C``
    and a sigmoid; the R maps are averaged into A and the output is ``x * A`` (no residual, no BN,
    PyTorch default init). Parameters: R(R+1)/2 * C*C' + R * C'*C.

    Args:
        channels: C.
        order: R (the paper uses 3).
        sigmoid: ``per_route`` (the MHN code: ``A = mean_r sigmoid(U_r Q_r)``) or ``after_sum``
            (one sigmoid on the aggregated map: ``A = sigmoid(sum_r U_r Q_r)``; decision M2).

    Forward: x (B, C, H, W) -> x * A, same shape. ``attention_map(x)`` returns A (B, C, H, W) in
    (0, 1). ``last_attention_mean`` holds the detached mean of A of the last forward (collapse
    monitor, no host sync).
    """

    def __init__(self, channels: int, order: int = 3, sigmoid: str = "per_route"):
        super().__init__()
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if sigmoid not in MHA_SIGMOID:
            raise ValueError(f"sigmoid={sigmoid!r} is not one of {MHA_SIGMOID}")
        self.channels, self.order, self.sigmoid_mode = channels, order, sigmoid
        self.inter_channels = ci = mha_inter_channels(channels)
        # reducers[r-1][i]: the i-th factor of route r (own weights per route, no sharing)
        self.reducers = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(channels, ci, 1, bias=False) for _ in range(r)) for r in range(1, order + 1))
        self.expanders = nn.ModuleList(nn.Conv2d(ci, channels, 1, bias=False) for _ in range(order))
        self.last_attention_mean: torch.Tensor | None = None

    def route_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-route pre-sigmoid maps ``U_r(ReLU(prod_i W_ri x))``, each (B, C, H, W)."""
        return list(self._stacked_logits(x).unbind(1))

    def _stacked_logits(self, x: torch.Tensor) -> torch.Tensor:
        """All routes at once, (B, R, C, H, W): the R(R+1)/2 reducers as one 1x1 convolution of
        their concatenated weights and the R expanders as one grouped 1x1 convolution (groups=R).
        The same linear maps as one convolution per reducer/expander (the per-module weights stay
        the parameters), in 2 convolution calls instead of R(R+3)/2: on a CPU the small calls cost
        more than their arithmetic (tests/test_attention.py checks it against the per-module form)."""
        ci, c, order = self.inter_channels, self.channels, self.order
        w = torch.cat([red.weight for reducers in self.reducers for red in reducers])
        q = F.conv2d(x, w.to(x.dtype)).split(ci, dim=1)     # R(R+1)/2 maps W_ri x, (B, C', H, W) each
        prods, k = [], 0
        for r in range(1, order + 1):
            prod = q[k]
            for i in range(1, r):
                prod = prod * q[k + i]            # r-th order term: product of r linear maps
            prods.append(F.relu(prod))            # ReLU after the product (HighDivModule)
            k += r
        u = torch.cat([e.weight for e in self.expanders])   # (R C, C', 1, 1)
        logits = F.conv2d(torch.cat(prods, 1), u.to(x.dtype), groups=order)
        return logits.unflatten(1, (order, c))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) in (0, 1)."""
        logits = self._stacked_logits(x)
        if self.sigmoid_mode == "per_route":
            a = torch.sigmoid(logits).mean(1)
        else:
            a = torch.sigmoid(logits.sum(1))
        with torch.no_grad():
            self.last_attention_mean = a.detach().float().mean()
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)          # F~_m = A_m * F_m

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inter={self.inter_channels}, order={self.order}, sigmoid={self.sigmoid_mode!r}"
