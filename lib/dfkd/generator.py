"""Generator networks and the mapping from generator output to teacher input.

Scope:
- :class:`AttentionGenerator`: the DFKD-FGVC generator (Sec. 4.1, Table 6 left): FC, reshape, BN,
  four blocks of [3x3 deconv x2-upsampling, spectral norm, LeakyReLU(0.2), SAM], 3x3 conv, tanh.
- :class:`DCGANGenerator`: the DCGAN ``GeneratorB`` channel plan used by generative DFKD peers
  (BN inside blocks, no SAM, no SN) for the baselines.
- :func:`to_teacher_input` / :func:`from_teacher_input`: generator range [-1, 1] <-> the teacher's
  ImageNet-normalised input space (and back to [0, 1] for display).

Both generators: ``forward(z (B, nz)) -> (B, 3, S, S)`` in [-1, 1], with z ~ N(0, I) (Sec. 3).
The channel plan is 8ngf -> 4ngf -> 2ngf -> ngf -> ngf (512 -> 256 -> 128 -> 64 -> 64 at ngf=64)
from an initial map of size S/16, so S must be a multiple of 16 (32 -> init 2, 224 -> init 14).
Initialisation follows DCGAN: conv/deconv weights N(0, 0.02), biases 0, BN weights N(1, 0.02).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from .attention import SpatialAttention

# Standard ImageNet statistics (also in dfkd.data; duplicated so this module has no data deps).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_MAPS = ("imagenet", "raw_tanh")


def _check_size(img_size: int) -> int:
    if img_size < 16 or img_size % 16 != 0:
        raise ValueError(f"img_size must be a positive multiple of 16 (four x2 upsamplings from "
                         f"img_size/16), got {img_size}")
    return img_size // 16


def dcgan_init(module: nn.Module) -> None:
    """DCGAN init (Radford et al. 2016): conv weights N(0, 0.02), BN weights N(1, 0.02), biases 0.

    Apply *before* spectral norm is registered (it then normalises whatever scale this gives).
    Linear layers keep PyTorch's default init (the DCGAN recipe does not touch them either).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _deconv(cin: int, cout: int, kernel: int, bias: bool = True) -> nn.ConvTranspose2d:
    """Exact x2 upsampling transposed conv: k=3 (Table 6) needs output_padding=1, k=4 (DCGAN) not."""
    if kernel == 3:
        return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=bias)
    if kernel == 4:
        return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias)
    raise ValueError(f"deconv_kernel must be 3 (Table 6) or 4 (DCGAN), got {kernel}")


class AttentionGenerator(nn.Module):
    """Generator with spatial-wise attention (Table 6 left; Eqs. 4-6 inside every block).

    Args:
        nz: latent size (paper: not given; default 256 as DFAD/CPSC/Fast).
        img_size: output side S, a multiple of 16 (paper: 224).
        ngf: base width; blocks are 8ngf -> 4ngf -> 2ngf -> ngf -> ngf.
        lam: lambda of Eq. 6 (0 disables the attention term exactly, Table 4 row lambda=0).
        sam_reduction: r of the SAM (Table 6: "r is scale scalar", value not given).
        sam_softmax: ``spatial`` | ``spatial_scaled`` | ``channel`` (decision G2).
        deconv_kernel: 3 (Table 6) or 4 (DCGAN ``GeneratorB``).
        block_norm: ``none`` (Table 6: SN + LReLU only) or ``bn`` (BatchNorm after each deconv).
        use_sam: False drops the SAMs entirely (plain SN-DCGAN; ``sams`` is then empty).
        sam_blocks: the SAM follows the first ``sam_blocks`` of the four blocks (4: every block, Table 6;
            3 drops the last, largest one, whose SAM costs most on a CPU: not in the paper, dfkd_fgvc's
            ``sam_blocks`` option, docs/decisions.md).
        num_classes: K > 0 makes the generator class-conditional (not in the paper; the
            ``g_conditional`` option, docs/decisions.md#synthesis): a learned label embedding
            ``embed`` (K, nz) is added to the noise before the FC layer, so the label moves the mean of
            the FC output (a product with the noise, ACGAN's form, carries the label only in the
            noise's variance, which the linear FC cannot read; docs/decisions.md), and
            ``forward(z, y)`` takes the labels y (B,) (default ``arange(B) % K``, one image per class
            in turn, for sample grids).

    Forward: z (B, nz) float -> image (B, 3, S, S) in [-1, 1]. ``forward(z, return_attention=True)``
    returns ``(image, [w_1, ..., w_4])`` with each block's SAM softmax weights (B, C_b, H_b, W_b)
    in fp32 (one per SAM). ``sams`` is the ModuleList of the SAMs (four unless ``sam_blocks``);
    ``relative_contributions()`` lists the detached ``||lam*softmax(A)*F|| / ||F||`` of the last
    forward per SAM (for logging).
    """

    def __init__(self, nz: int = 256, img_size: int = 224, ngf: int = 64, *, lam: float = 0.05,
                 sam_reduction: int = 4, sam_softmax: str = "spatial", deconv_kernel: int = 3,
                 block_norm: str = "none", use_sam: bool = True, num_classes: int = 0, sam_blocks: int = 4):
        super().__init__()
        if block_norm not in ("none", "bn"):
            raise ValueError(f"block_norm={block_norm!r} is not one of ('none', 'bn')")
        if not 1 <= sam_blocks <= 4:
            raise ValueError(f"sam_blocks={sam_blocks} is not 1..4 (the generator has four blocks; 4 = a SAM "
                             f"after every block, the paper; lam=0 drops every SAM)")
        self.nz, self.img_size, self.ngf = nz, img_size, ngf
        self.init_size = s0 = _check_size(img_size)
        widths = [8 * ngf, 4 * ngf, 2 * ngf, ngf, ngf]
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, nz) if num_classes > 0 else None
        self.fc = nn.Linear(nz, widths[0] * s0 * s0)                      # FC
        self.bn0 = nn.BatchNorm2d(widths[0])                              # Reshape, BN
        blocks = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers = [_deconv(cin, cout, deconv_kernel)]                  # Deconv x2
            if block_norm == "bn":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))                # LReLU
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.sams = nn.ModuleList(
            SpatialAttention(c, reduction=sam_reduction, lam=lam, softmax=sam_softmax)
            for c in widths[1:1 + sam_blocks]
        ) if use_sam else nn.ModuleList()
        self.head = nn.Sequential(nn.Conv2d(ngf, 3, 3, padding=1), nn.Tanh())   # 3x3 Conv, Tanh
        dcgan_init(self)
        # SN on every deconv (Sec. 5.5). Registered after init; ConvTranspose2d keeps its output
        # channels in dim 1 of the weight, so the spectral norm is taken along dim=1.
        for block in self.blocks:
            spectral_norm(block[0], name="weight", dim=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, return_attention: bool = False):
        if self.embed is not None:
            if y is None:
                y = torch.arange(z.shape[0], device=z.device) % self.num_classes
            z = z + self.embed(y).to(z.dtype)
        elif y is not None:
            raise ValueError("labels y were given to an unconditional generator (num_classes=0)")
        x = self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.bn0(x)
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.sams):
                if return_attention:
                    x, w = self.sams[i](x, return_attention=True)      # Eq. 6
                    maps.append(w)
                else:
                    x = self.sams[i](x)                                # Eq. 6
        img = self.head(x)
        return (img, maps) if return_attention else img

    def relative_contributions(self) -> list[torch.Tensor | None]:
        """Per block ``||lam*softmax(A_s)*F|| / ||F||`` of the last forward (detached, no sync)."""
        return [sam.relative_contribution for sam in self.sams]


class DCGANGenerator(nn.Module):
    """DCGAN ``GeneratorB`` plan used by DFKD peers (DFAD/CPSC/Fast) for the baselines.

    FC nz -> 8ngf*(S/16)^2, reshape, BN; 4x [ConvT 4x4 s2 p1 (no bias), BN, LeakyReLU(0.2)];
    3x3 conv ngf -> 3; ``tanh`` (output in [-1, 1], DFAD/CPSC) or ``sigmoid`` (output in [0, 1],
    Fast/CMI; ``output_range`` says which; map sigmoid outputs with ``2*x - 1`` before
    :func:`to_teacher_input`). Works for S = 32 (initial map 2x2) up to 224.

    Forward: z (B, nz) -> (B, 3, S, S).
    """

    def __init__(self, nz: int = 256, img_size: int = 32, ngf: int = 64, out: str = "tanh"):
        super().__init__()
        if out not in ("tanh", "sigmoid"):
            raise ValueError(f"out={out!r} is not one of ('tanh', 'sigmoid')")
        self.nz, self.img_size, self.ngf = nz, img_size, ngf
        self.init_size = s0 = _check_size(img_size)
        self.output_range = (-1.0, 1.0) if out == "tanh" else (0.0, 1.0)
        widths = [8 * ngf, 4 * ngf, 2 * ngf, ngf, ngf]
        self.fc = nn.Linear(nz, widths[0] * s0 * s0)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [_deconv(cin, cout, 4, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(ngf, 3, 3, padding=1), nn.Tanh() if out == "tanh" else nn.Sigmoid()]
        self.main = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size))


def _stats(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return m, s


def to_teacher_input(x: torch.Tensor, output_map: str = "imagenet", mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> torch.Tensor:
    """Map generator output x (B, 3, H, W) in [-1, 1] to the teacher's input space (decision G6).

    ``imagenet``: ``((x + 1) / 2 - mean) / std`` (teachers are trained on ImageNet-normalised
    images); ``raw_tanh``: identity (feed the tanh output as is). Differentiable.
    """
    if output_map == "raw_tanh":
        return x
    if output_map == "imagenet":
        m, s = _stats(x, mean, std)
        return ((x + 1.0) * 0.5 - m) / s
    raise ValueError(f"output_map={output_map!r} is not one of {OUTPUT_MAPS}")


def from_teacher_input(x: torch.Tensor, output_map: str = "imagenet", mean=IMAGENET_MEAN,
                       std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of :func:`to_teacher_input` for display: returns images in [0, 1] (clamped)."""
    if output_map == "raw_tanh":
        return ((x + 1.0) * 0.5).clamp(0.0, 1.0)
    if output_map == "imagenet":
        m, s = _stats(x, mean, std)
        return (x * s + m).clamp(0.0, 1.0)
    raise ValueError(f"output_map={output_map!r} is not one of {OUTPUT_MAPS}")


GENERATORS = {"attention": AttentionGenerator, "dcgan": DCGANGenerator}
