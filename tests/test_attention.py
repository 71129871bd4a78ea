"""SAM (Eqs. 4-6, Table 6 right) and MHA (Sec. 4.2, HighDivModule) against written-out references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd.attention import MixedHighOrderAttention, SpatialAttention, attention_softmax, mha_inter_channels


# ------------------------------------------------------------------------------------------------
# SAM
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["spatial", "spatial_scaled", "channel"])
@pytest.mark.parametrize("train", [True, False])
def test_sam_lam_zero_is_exact_identity(mode, train):
    torch.manual_seed(0)
    sam = SpatialAttention(16, reduction=4, lam=0.0, softmax=mode).train(train)
    x = torch.randn(3, 16, 9, 7)
    assert torch.equal(sam(x), x)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 9), (6, 3), (1, 1), (2, 5)])
def test_sam_output_shape_equals_input(hw):
    torch.manual_seed(0)
    sam = SpatialAttention(8, reduction=2, lam=0.05)
    x = torch.randn(2, 8, *hw)
    out, w = sam(x, return_attention=True)
    assert out.shape == x.shape and w.shape == x.shape
    assert out.dtype == x.dtype


def test_sam_unpool_reuses_the_pool_indices():
    """The unpooled map is the decoder value at the encoder's argmax positions and 0 elsewhere."""
    torch.manual_seed(0)
    sam = SpatialAttention(8, reduction=4, lam=0.05)   # C/r = 2 -> pooled stage has 4 channels
    cap = {}

    def grab(name, fn):
        def hook(module, inputs, output):       # returns None: observe, do not replace
            cap[name] = fn(inputs, output).detach().clone()
        return hook

    sam.enc1.register_forward_hook(grab("psi", lambda i, o: o))
    sam.pool.register_forward_hook(grab("idx", lambda i, o: o[1]))
    sam.unpool.register_forward_hook(grab("d", lambda i, o: i[0]))
    sam.unpool.register_forward_hook(grab("u", lambda i, o: o))
    x = torch.randn(2, 8, 5, 7)                         # odd sizes: ceil-mode windows at the border
    sam(x)
    psi, idx, d, u = cap["psi"], cap["idx"], cap["d"], cap["u"]
    B, C, H, W = psi.shape
    assert u.shape == psi.shape
    assert (d != 0).float().mean() > 0.3          # enough non-zero decoder values to be informative
    ph, pw = idx.shape[-2:]
    assert (ph, pw) == ((H + 1) // 2, (W + 1) // 2)
    for b in range(B):
        for c in range(C):
            covered = torch.zeros(H * W, dtype=torch.bool)
            for i in range(ph):
                for j in range(pw):
                    rows = range(2 * i, min(2 * i + 2, H))
                    cols = range(2 * j, min(2 * j + 2, W))
                    window = [(r, q) for r in rows for q in cols]
                    wmax = max(psi[b, c, r, q].item() for r, q in window)
                    flat = int(idx[b, c, i, j])
                    r0, q0 = divmod(flat, W)
                    assert (r0, q0) in window                        # index lies in its window
                    assert psi[b, c, r0, q0].item() == wmax          # ... at the window's max
                    assert u[b, c, r0, q0].item() == d[b, c, i, j].item()  # value placed there
                    covered[flat] = True
            assert torch.all(u[b, c].flatten()[~covered] == 0)       # zero off the argmax positions


def test_attention_softmax_normalisation():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 6, 7) * 3
    sp = attention_softmax(a, "spatial")
    sc = attention_softmax(a, "spatial_scaled")
    ch = attention_softmax(a, "channel")
    for b in range(2):
        for c in range(5):
            assert sp[b, c].sum().item() == pytest.approx(1.0, abs=1e-5)
            assert sc[b, c].mean().item() == pytest.approx(1.0, abs=1e-5)
        for r in range(6):
            for q in range(7):
                assert ch[b, :, r, q].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(sc, sp * 42)
    with pytest.raises(ValueError):
        attention_softmax(a, "pixel")


@pytest.mark.parametrize("mode", ["spatial", "spatial_scaled", "channel"])
def test_sam_eq6_and_relative_contribution(mode):
    torch.manual_seed(0)
    lam = 0.3
    sam = SpatialAttention(8, reduction=2, lam=lam, softmax=mode)
    x = torch.randn(2, 8, 6, 6)
    out, w = sam(x, return_attention=True)
    # Eq. 6 written out element by element for one sample/channel, and in full
    b, c, r, q = 1, 3, 2, 4
    assert out[b, c, r, q].item() == pytest.approx(lam * w[b, c, r, q].item() * x[b, c, r, q].item()
                                                   + x[b, c, r, q].item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(out, x + lam * w * x, atol=1e-6)
    num = sum(((lam * w[i] * x[i]) ** 2).sum().item() for i in range(2)) ** 0.5
    den = sum((x[i] ** 2).sum().item() for i in range(2)) ** 0.5
    assert sam.relative_contribution.item() == pytest.approx(num / den, rel=1e-4)
    assert sam.last_attention is None
    sam.record_attention = True
    sam(x)
    assert sam.last_attention.shape == x.shape and not sam.last_attention.requires_grad


def test_sam_spatial_softmax_term_is_tiny_at_paper_resolution_scale():
    """The magnitude argument of decision G2: mean spatial weight is 1/(HW)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 56, 56)
    sp = SpatialAttention(4, reduction=1, lam=0.05, softmax="spatial").eval()
    sc = SpatialAttention(4, reduction=1, lam=0.05, softmax="spatial_scaled").eval()
    sc.load_state_dict(sp.state_dict())
    sp(x), sc(x)
    assert sp.relative_contribution.item() < 1e-3
    assert 0.02 < sc.relative_contribution.item() < 0.2


def test_sam_gradients_and_bf16_autocast():
    torch.manual_seed(0)
    sam = SpatialAttention(8, reduction=2, lam=0.05)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, w = sam(x, return_attention=True)
    assert out.dtype == x.dtype and w.dtype == torch.float32 and torch.isfinite(out).all()
    (out.float() ** 2).sum().backward()
    assert x.grad is not None and sam.expand.weight.grad is not None
    assert sam.expand.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# MHA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,expected", [(512, 128), (64, 16), (16, 4), (12, 2), (8, 2), (4, 2), (1, 2)])
def test_mha_inter_channels(C, expected):
    assert mha_inter_channels(C) == expected


@pytest.mark.parametrize("C", [4, 16, 64])
@pytest.mark.parametrize("R", [1, 2, 3])
def test_mha_parameter_count(C, R):
    m = MixedHighOrderAttention(C, order=R)
    cp = max(2, (C // 8) * 2)
    expected = R * (R + 1) // 2 * C * cp + R * cp * C
    assert sum(p.numel() for p in m.parameters()) == expected
    assert all(conv.bias is None for route in m.reducers for conv in route)
    assert [len(route) for route in m.reducers] == list(range(1, R + 1))


def _manual_mha(m: MixedHighOrderAttention, x: torch.Tensor, after_sum: bool = False) -> torch.Tensor:
    """x * mean_r sigmoid(U_r(ReLU(prod_i W_ri x))) with explicit F.conv2d calls."""
    maps = []
    for r in range(m.order):
        prod = None
        for i in range(r + 1):
            y = F.conv2d(x, m.reducers[r][i].weight)
            prod = y if prod is None else prod * y
        maps.append(F.conv2d(F.relu(prod), m.expanders[r].weight))
    if after_sum:
        a = torch.sigmoid(sum(maps))
    else:
        a = sum(torch.sigmoid(u) for u in maps) / len(maps)
    return x * a


@pytest.mark.parametrize("R", [1, 2, 3])
def test_mha_matches_written_out_formula(R):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6).relu()
    m = MixedHighOrderAttention(16, order=R)
    assert torch.allclose(m(x), _manual_mha(m, x), atol=1e-6)
    a = m.attention_map(x)
    assert a.shape == x.shape and (a > 0).all() and (a < 1).all()
    assert m.last_attention_mean.item() == pytest.approx(a.mean().item(), rel=1e-6)
    m2 = MixedHighOrderAttention(16, order=R, sigmoid="after_sum")
    assert torch.allclose(m2(x), _manual_mha(m2, x, after_sum=True), atol=1e-6)


@pytest.mark.parametrize("sigmoid", ["per_route", "after_sum"])
def test_mha_fused_convolutions_give_each_module_its_own_gradient(sigmoid):
    """The forward runs the reducers / expanders as two fused convolutions; the gradients of the
    input and of every per-module weight (what the trainable MHA modes optimise) must be those of
    the written-out per-module formula."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 5, 5, requires_grad=True)
    m = MixedHighOrderAttention(16, order=3, sigmoid=sigmoid)
    params = [x] + list(m.parameters())
    g_fused = torch.autograd.grad(m(x).square().sum(), params)
    g_ref = torch.autograd.grad(_manual_mha(m, x, after_sum=sigmoid == "after_sum").square().sum(), params)
    for a, b in zip(g_fused, g_ref):
        assert a.abs().max() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("R", [1, 2, 3])
def test_every_mha_route_contributes(R):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 4) * 2
    m = MixedHighOrderAttention(16, order=R)
    ref = m(x).detach()
    for r in range(R):
        saved = m.expanders[r].weight.detach().clone()
        with torch.no_grad():
            m.expanders[r].weight.zero_()
        assert not torch.allclose(m(x), ref, atol=1e-6), f"route {r + 1} does not contribute"
        with torch.no_grad():
            m.expanders[r].weight.copy_(saved)


def test_mha_small_channels_and_bf16():
    torch.manual_seed(0)
    m = MixedHighOrderAttention(3, order=3)       # C < 8: C' = 2
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    with pytest.raises(ValueError):
        MixedHighOrderAttention(8, order=0)
    with pytest.raises(ValueError):
        MixedHighOrderAttention(8, sigmoid="before")
