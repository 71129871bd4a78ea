"""Generators (Table 6 left, DCGAN GeneratorB) and the generator-to-teacher input mapping."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dfkd.attention import SpatialAttention
from dfkd.generator import (GENERATORS, IMAGENET_MEAN, IMAGENET_STD, AttentionGenerator, DCGANGenerator,
                            from_teacher_input, to_teacher_input)


@pytest.mark.parametrize("size", [32, 64, 112])
@pytest.mark.parametrize("kernel", [3, 4])
def test_attention_generator_shape_and_range(size, kernel):
    torch.manual_seed(0)
    g = AttentionGenerator(nz=16, img_size=size, ngf=8, deconv_kernel=kernel)
    x = g(torch.randn(3, 16))
    assert x.shape == (3, 3, size, size)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert g.init_size == size // 16


def test_attention_generator_224_shape_small_ngf():
    torch.manual_seed(0)
    g = AttentionGenerator(nz=8, img_size=224, ngf=2)
    with torch.no_grad():
        x, maps = g(torch.randn(2, 8), return_attention=True)
    assert x.shape == (2, 3, 224, 224)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 28, 28), (2, 4, 56, 56), (2, 2, 112, 112), (2, 2, 224, 224)]


def test_attention_generator_channel_plan_and_table6_layers():
    g = AttentionGenerator(nz=16, img_size=32, ngf=64)
    assert g.fc.out_features == 512 * 2 * 2 and g.bn0.num_features == 512
    deconvs = [b[0] for b in g.blocks]
    assert [(d.in_channels, d.out_channels) for d in deconvs] == [(512, 256), (256, 128), (128, 64), (64, 64)]
    assert all(d.kernel_size == (3, 3) and d.stride == (2, 2) and d.output_padding == (1, 1) for d in deconvs)
    assert all(isinstance(b[1], nn.LeakyReLU) and b[1].negative_slope == 0.2 for b in g.blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for b in g.blocks for m in b)      # Table 6: no BN
    assert len(g.sams) == 4 and all(isinstance(s, SpatialAttention) for s in g.sams)
    assert [s.channels for s in g.sams] == [256, 128, 64, 64]
    assert isinstance(g.head[0], nn.Conv2d) and g.head[0].kernel_size == (3, 3) and isinstance(g.head[1], nn.Tanh)


def test_spectral_norm_on_every_deconv():
    torch.manual_seed(0)
    g = AttentionGenerator(nz=16, img_size=32, ngf=8).train()
    for _ in range(30):                    # power iteration converges during training forwards
        g(torch.randn(4, 16))
    for block in g.blocks:
        deconv = block[0]
        assert parametrize.is_parametrized(deconv, "weight")
        sn = deconv.parametrizations.weight[0]
        assert "SpectralNorm" in type(sn).__name__ and sn.dim == 1
        w = deconv.weight.detach()                                   # (Cin, Cout, k, k), normalised
        mat = w.transpose(0, 1).reshape(w.shape[1], -1)              # output channels first (dim=1)
        assert torch.linalg.matrix_norm(mat, ord=2).item() == pytest.approx(1.0, rel=0.05)


def test_block_norm_use_sam_and_options():
    g = AttentionGenerator(nz=16, img_size=32, ngf=8, block_norm="bn", use_sam=False, deconv_kernel=4)
    assert len(g.sams) == 0
    assert all(isinstance(b[1], nn.BatchNorm2d) for b in g.blocks)
    assert all(b[0].kernel_size == (4, 4) for b in g.blocks)
    assert g(torch.randn(2, 16)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="deconv_kernel"):
        AttentionGenerator(nz=16, img_size=32, ngf=8, deconv_kernel=5)
    with pytest.raises(ValueError, match="block_norm"):
        AttentionGenerator(nz=16, img_size=32, ngf=8, block_norm="in")


def test_sam_blocks_drops_the_last_blocks_sams_exactly():
    """sam_blocks=3: the first three blocks keep their SAMs, the largest block has none; the output is
    the four-SAM generator's with the fourth SAM's Eq. 6 term at lam 0 (the same weights)."""
    torch.manual_seed(0)
    g4 = AttentionGenerator(nz=16, img_size=32, ngf=8).eval()
    g3 = AttentionGenerator(nz=16, img_size=32, ngf=8, sam_blocks=3).eval()
    assert [s.channels for s in g3.sams] == [s.channels for s in g4.sams][:3]
    missing, unexpected = g3.load_state_dict(g4.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("sams.3.") for k in unexpected)
    z = torch.randn(4, 16)
    with torch.no_grad():
        x3, maps3 = g3(z, return_attention=True)
        with_sam = g4(z)
        g4.sams[3].lam = 0.0
        without = g4(z)
    assert len(maps3) == 3
    assert torch.equal(x3, without) and not torch.allclose(x3, with_sam)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="sam_blocks"):
            AttentionGenerator(nz=16, img_size=32, ngf=8, sam_blocks=bad)


@pytest.mark.parametrize("cls", [AttentionGenerator, DCGANGenerator])
@pytest.mark.parametrize("size", [40, 8, 100])
def test_img_size_must_be_multiple_of_16(cls, size):
    with pytest.raises(ValueError, match="multiple of 16"):
        cls(nz=16, img_size=size, ngf=4)


def test_generator_gets_gradients_and_runs_under_bf16():
    torch.manual_seed(0)
    g = AttentionGenerator(nz=16, img_size=32, ngf=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = g(torch.randn(4, 16))
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x.float()).all()
    x.float().pow(2).mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad.abs().sum() > 0 for p in g.blocks.parameters())
    rc = g.relative_contributions()
    assert len(rc) == 4 and all(r is not None and 0 <= r.item() < 1 for r in rc)


@pytest.mark.parametrize("size", [32, 64])
def test_dcgan_generator(size):
    torch.manual_seed(0)
    g = DCGANGenerator(nz=16, img_size=size, ngf=8)
    x = g(torch.randn(3, 16))
    assert x.shape == (3, 3, size, size) and x.min() >= -1 and x.max() <= 1
    deconvs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 4 and all(d.kernel_size == (4, 4) for d in deconvs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 5
    s = DCGANGenerator(nz=16, img_size=32, ngf=8, out="sigmoid")
    y = s(torch.randn(2, 16))
    assert s.output_range == (0.0, 1.0) and y.min() >= 0 and y.max() <= 1


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    g = AttentionGenerator(nz=16, img_size=32, ngf=32)
    w = g.head[0].weight
    assert abs(w.std().item() - 0.02) < 0.005 and g.head[0].bias.abs().max() == 0
    orig = g.blocks[0][0].parametrizations.weight.original
    assert abs(orig.std().item() - 0.02) < 0.002


def test_to_teacher_input_matches_per_channel_formula():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    y = to_teacher_input(x)
    for c in range(3):
        expected = ((x[:, c] + 1) / 2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(y[:, c], expected, atol=1e-6)
    assert torch.equal(to_teacher_input(x, "raw_tanh"), x)
    assert torch.allclose(from_teacher_input(y), (x + 1) / 2, atol=1e-6)
    assert torch.allclose(from_teacher_input(x, "raw_tanh"), (x + 1) / 2)
    custom = to_teacher_input(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(custom, x, atol=1e-6)
    with pytest.raises(ValueError):
        to_teacher_input(x, "bn_affine_false")


def test_registry():
    assert GENERATORS == {"attention": AttentionGenerator, "dcgan": DCGANGenerator}
