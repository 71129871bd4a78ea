"""Losses (Eqs. 2, 3, 7, 8, 9) against independent, written-out computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.generator import AttentionGenerator, to_teacher_input
from dfkd.losses import (LOSSES, BNPrior, ProjectionHead, bn_prior, build_mhad, check_finite, kd_loss,
                         mhad_loss, sfcl_loss)


# ------------------------------------------------------------------------------------------------
# Eq. 2: KD
# ------------------------------------------------------------------------------------------------
def _manual_kl(p_logits, q_logits, T):
    """sum_k p log(p/q) averaged over the batch, times T^2, with p, q softmaxes of logits / T."""
    total = 0.0
    for b in range(p_logits.shape[0]):
        pe = [math.exp(v / T) for v in p_logits[b].tolist()]
        qe = [math.exp(v / T) for v in q_logits[b].tolist()]
        p = [v / sum(pe) for v in pe]
        q = [v / sum(qe) for v in qe]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / p_logits.shape[0] * T * T


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_matches_hand_written_kl_and_directions(T):
    torch.manual_seed(0)
    s, t = torch.randn(5, 7) * 2, torch.randn(5, 7) * 2
    assert kd_loss(s, t, T).item() == pytest.approx(_manual_kl(t, s, T), rel=1e-5)           # KL(T||S)
    assert kd_loss(s, t, T, direction="s_t").item() == pytest.approx(_manual_kl(s, t, T), rel=1e-5)
    assert abs(kd_loss(s, t, T).item() - kd_loss(s, t, T, direction="s_t").item()) > 1e-4
    assert kd_loss(s, s.clone(), T).item() == pytest.approx(0.0, abs=1e-6)
    for _ in range(5):
        assert kd_loss(torch.randn(4, 3), torch.randn(4, 3), T).item() >= 0
    with pytest.raises(ValueError):
        kd_loss(s, t, direction="sym")


def test_kd_loss_gradients_reach_both_arguments_and_fp32():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    loss = kd_loss(s.bfloat16(), t.bfloat16(), 2.0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def _tiny_net(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


def _adversarial_grad(G, teacher, student, z):
    """One generator step of Eq. 10's adversarial part: minimise -L_KD(S(x), T(x))."""
    G.zero_grad()
    x = to_teacher_input(G(z))
    loss = -kd_loss(student(x), teacher(x))
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in G.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def test_generator_gets_nonzero_adversarial_gradient_from_the_student():
    """Regression for the peer bug that passed the teacher as the student (zero adversarial term)."""
    torch.manual_seed(0)
    G = AttentionGenerator(nz=16, img_size=32, ngf=8, block_norm="bn")
    teacher, student = _tiny_net(1, 16).eval(), _tiny_net(2, 8).eval()
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)                          # frozen players (Algorithm 1, line 7)
    z = torch.randn(8, 16)
    buggy_loss, buggy_gnorm = _adversarial_grad(G, teacher, teacher, z)   # student := teacher
    loss, gnorm = _adversarial_grad(G, teacher, student, z)
    assert abs(buggy_loss) < 1e-7 and buggy_gnorm < 1e-6                 # the bug silences G
    assert -loss > 1e-4, "adversarial term is ~0: is the student really the student?"
    assert gnorm > 1e-4 and gnorm > 1000 * max(buggy_gnorm, 1e-12)
    grads = [p.grad for p in G.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# ------------------------------------------------------------------------------------------------
# Eq. 3: BN prior
# ------------------------------------------------------------------------------------------------
def _stats_by_loop(x):
    """Per-channel mean and biased variance over (N, H, W), one channel at a time."""
    means, vars_ = [], []
    for c in range(x.shape[1]):
        v = x[:, c].double().flatten()
        m = v.sum() / v.numel()
        means.append(m)
        vars_.append(((v - m) ** 2).sum() / v.numel())
    return torch.stack(means).float(), torch.stack(vars_).float()


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()


def test_bn_prior_zero_at_matching_statistics_and_positive_otherwise():
    net, x = _bn_net(), torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        h1 = net[0](x)
        net[1].running_mean.copy_(_stats_by_loop(h1)[0]); net[1].running_var.copy_(_stats_by_loop(h1)[1])
        h2 = net[3](net[2](net[1](h1)))                  # eval BN1 now uses the exact batch stats
        net[4].running_mean.copy_(_stats_by_loop(h2)[0]); net[4].running_var.copy_(_stats_by_loop(h2)[1])
    with bn_prior(net) as bn:
        net(x)
    assert bn.loss().item() == pytest.approx(0.0, abs=1e-5)
    delta = torch.tensor([0.3, -0.4, 0.0, 1.2, 0.0, 0.0])
    net[4].running_var += delta                          # last BN: its input is unchanged
    with bn_prior(net) as bn:
        net(x)
    assert bn.loss().item() == pytest.approx(delta.norm().item(), rel=1e-4)
    assert bn.per_layer()[0].item() == pytest.approx(0.0, abs=1e-5)


def test_bn_prior_equals_written_out_sum_and_multiplier():
    net, x = _bn_net(), torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        for bn_layer in (net[1], net[4]):
            bn_layer.running_mean.uniform_(-1, 1); bn_layer.running_var.uniform_(0.5, 2)
        h1 = net[0](x)
        h2 = net[3](net[2](net[1](h1)))
    terms = []
    for h, layer in ((h1, net[1]), (h2, net[4])):
        m, v = _stats_by_loop(h)
        terms.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(layer.running_mean.tolist(), m.tolist())))
                     + math.sqrt(sum((a - b) ** 2 for a, b in zip(layer.running_var.tolist(), v.tolist()))))
    with bn_prior(net, first_bn_multiplier=10.0) as bn:
        net(x)
    assert [t.item() for t in bn.per_layer()] == pytest.approx(terms, rel=1e-4)
    assert bn.loss().item() == pytest.approx(10 * terms[0] + terms[1], rel=1e-4)
    bn.reset()
    with pytest.raises(RuntimeError, match="before any forward"):
        bn.loss()


def test_bn_prior_hooks_released_mode_kept_and_gradient():
    net = _bn_net()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with pytest.raises(RuntimeError, match="before any forward"):
        with bn_prior(net) as bn:
            assert all(len(m._forward_hooks) == 1 for m in bns)
            bn.loss()
    assert all(len(m._forward_hooks) == 0 for m in bns)
    with pytest.raises(ZeroDivisionError):
        with bn_prior(net):
            net(torch.randn(2, 3, 4, 4))
            1 / 0
    assert all(len(m._forward_hooks) == 0 for m in bns)
    for mode in (False, True):
        net.train(mode)
        with bn_prior(net) as bn:
            net(torch.randn(2, 3, 4, 4))
        assert net.training is mode and all(m.training is mode for m in net.modules())
    net.eval()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with bn_prior(net) as bn:
        net(x)
    bn.loss().backward()
    assert x.grad.abs().sum() > 0
    assert isinstance(bn, BNPrior)


def test_bn_prior_fp32_under_bf16_autocast_and_other_bn_dims():
    net = _bn_net()
    x = torch.randn(8, 3, 6, 6)
    with bn_prior(net) as bn:
        net(x)
    ref = bn.loss().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with bn_prior(net) as bn:
            net(x)
        loss = bn.loss()
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in bn.per_layer())
    assert loss.item() == pytest.approx(ref, rel=0.05)
    mixed = nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm3d(2)}).eval()
    with bn_prior(mixed) as bn:
        mixed["a"](torch.randn(4, 3)); mixed["b"](torch.randn(2, 2, 3, 3, 3))
    assert len(bn.per_layer()) == 2


# ------------------------------------------------------------------------------------------------
# Eq. 7: MHAD
# ------------------------------------------------------------------------------------------------
def test_build_mhad_modes_and_seed():
    state = torch.get_rng_state()
    ad, mh, tm = build_mhad([8, 16], [4, 16], order=3, mode="frozen", seed=3)
    assert torch.equal(torch.get_rng_state(), state)                 # global RNG untouched
    assert [a.in_channels for a in ad] == [4, 16] and [a.out_channels for a in ad] == [8, 16]
    assert all(a.bias is not None for a in ad)
    assert torch.equal(ad[1].weight.view(16, 16), torch.eye(16))      # equal widths: identity init
    assert tm is None and not any(p.requires_grad for p in mh.parameters())
    assert all(p.requires_grad for p in ad.parameters())
    ad2, mh2, _ = build_mhad([8, 16], [4, 16], order=3, mode="frozen", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(mh.state_dict().values(), mh2.state_dict().values()))
    _, mh3, tm3 = build_mhad([8], [4], order=2, mode="separate", seed=0)
    assert all(p.requires_grad for p in mh3.parameters()) and not any(p.requires_grad for p in tm3.parameters())
    assert all(torch.equal(a, b) for a, b in zip(mh3.state_dict().values(), tm3.state_dict().values()))
    _, mh4, tm4 = build_mhad([8], [4], order=1, mode="trainable", seed=0)
    assert tm4 is None and all(p.requires_grad for p in mh4.parameters())


def _feats(seed=0):
    g = torch.Generator().manual_seed(seed)
    ft = [torch.randn(3, 8, 6, 6, generator=g).relu(), torch.randn(3, 16, 3, 3, generator=g).relu()]
    fs = [torch.randn(3, 4, 6, 6, generator=g).relu(), torch.randn(3, 8, 5, 5, generator=g).relu()]
    return ft, fs


def test_mhad_frozen_and_separate_equal_written_out_mse():
    ft, fs = _feats()
    ad, mh, _ = build_mhad([8, 16], [4, 8], order=3, mode="frozen", seed=0)
    expected = 0.0
    for m in range(2):
        s = F.conv2d(fs[m], ad[m].weight, ad[m].bias)
        if s.shape[-2:] != ft[m].shape[-2:]:
            s = F.interpolate(s, size=ft[m].shape[-2:], mode="bilinear", align_corners=False)
        a, b = mh[m](ft[m]).flatten(), mh[m](s).flatten()
        expected += sum((u - v) ** 2 for u, v in zip(a.tolist(), b.tolist())) / a.numel()
    assert mhad_loss(ft, fs, ad, mh).item() == pytest.approx(expected, rel=1e-5)
    ad2, mh2, tm2 = build_mhad([8, 16], [4, 8], order=3, mode="separate", seed=0)
    assert mhad_loss(ft, fs, ad2, mh2, mode="separate", teacher_mhas=tm2).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="teacher_mhas"):
        mhad_loss(ft, fs, ad2, mh2, mode="separate")


def test_mhad_trainable_is_energy_normalised():
    ft, fs = _feats(1)
    ad, mh, _ = build_mhad([8, 16], [4, 8], order=2, mode="trainable", seed=0)
    expected = 0.0
    for m in range(2):
        s = F.interpolate(ad[m](fs[m]), size=ft[m].shape[-2:], mode="bilinear", align_corners=False)
        a, b = mh[m](ft[m]), mh[m](s)
        per_sample = [((a[i] - b[i]) ** 2).sum().item() / ((a[i] ** 2).sum().item() + 1e-6) for i in range(3)]
        expected += sum(per_sample) / 3
    assert mhad_loss(ft, fs, ad, mh, mode="trainable").item() == pytest.approx(expected, rel=1e-5)


def test_mhad_gradients_and_bf16():
    ft, fs = _feats()
    ft = [f.requires_grad_() for f in ft]
    fs = [f.requires_grad_() for f in fs]
    ad, mh, _ = build_mhad([8, 16], [4, 8], order=3, mode="frozen", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mhad_loss(ft, fs, ad, mh)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    assert all(f.grad is None for f in ft)                   # teacher features are targets only
    assert all(p.grad is None for p in mh.parameters())     # the frozen lens gets no gradient


def _optimise(mode: str, naive: bool = False, steps: int = 100):
    """Adam on adapter + (trainable) MHA for `steps` steps on fixed random features."""
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(8, 16, 8, 8, generator=g).relu()
    fs = torch.randn(8, 8, 8, 8, generator=g).relu()
    ad, mh, tm = build_mhad([16], [8], order=3, mode=mode, seed=0)
    params = [p for p in list(ad.parameters()) + list(mh.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    before = {k: v.clone() for k, v in mh.state_dict().items()}
    first = None
    for _ in range(steps):
        if naive:       # plain MSE through a shared trainable MHA: the collapse-prone objective
            loss = F.mse_loss(mh[0](ad[0](fs)), mh[0](ft))
        else:
            loss = mhad_loss([ft], [fs], ad, mh, mode=mode, teacher_mhas=tm)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (F.mse_loss(mh[0](ad[0](fs)), mh[0](ft)) if naive
                 else mhad_loss([ft], [fs], ad, mh, mode=mode, teacher_mhas=tm)).item()
        a_mean = mh[0].attention_map(ft).mean().item()
    return first, final, a_mean, before, mh


def test_mhad_frozen_cannot_collapse():
    first, final, a_mean, before, mh = _optimise("frozen")
    assert all(torch.equal(before[k], v) for k, v in mh.state_dict().items())   # lens unchanged
    assert a_mean > 0.3 and final > 0.1 * first


def test_mhad_trainable_does_not_collapse():
    first, final, a_mean, before, mh = _optimise("trainable")
    assert any(not torch.equal(before[k], v) for k, v in mh.state_dict().items())  # it did train
    assert a_mean > 0.25 and final > 0.1 * first and final > 0.1


def test_naive_trainable_mse_does_collapse():
    """Shows the two tests above can fail: the un-normalised shared objective shrinks A to ~0."""
    first, final, a_mean, _, _ = _optimise("trainable", naive=True)
    assert a_mean < 0.1 and final < 0.02 * first


# ------------------------------------------------------------------------------------------------
# Eqs. 8-9: SFCL
# ------------------------------------------------------------------------------------------------
def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _manual_sfcl(t, s, tau, anchors="teacher"):
    t, s = t.double().tolist(), s.double().tolist()
    n = len(t)
    if anchors == "student":
        t, s = s, t                      # same construction with the roles swapped
    total = 0.0
    for i in range(n):
        candidates = [t[k] for k in range(n) if k != i] + [s[k] for k in range(n)]   # 2N - 1
        assert len(candidates) == 2 * n - 1
        pos = math.exp(_cos(t[i], s[i]) / tau)
        denom = sum(math.exp(_cos(t[i], z) / tau) for z in candidates)
        total += -math.log(pos / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_sfcl_equals_written_out_cross_entropy(tau):
    torch.manual_seed(0)
    t, s = torch.randn(5, 4), torch.randn(5, 4)
    assert sfcl_loss(t, s, tau).item() == pytest.approx(_manual_sfcl(t, s, tau), rel=1e-5)
    sym = 0.5 * (_manual_sfcl(t, s, tau) + _manual_sfcl(t, s, tau, anchors="student"))
    assert sfcl_loss(t, s, tau, symmetric=True).item() == pytest.approx(sym, rel=1e-5)
    # scale invariance (Eq. 8 normalises) and a lower loss when students match teachers
    assert sfcl_loss(3 * t, 0.5 * s, tau).item() == pytest.approx(sfcl_loss(t, s, tau).item(), rel=1e-5)
    assert sfcl_loss(t, t + 0.01 * s, tau).item() < sfcl_loss(t, s, tau).item()


def test_sfcl_fp32_under_autocast_and_gradients():
    torch.manual_seed(0)
    t = torch.randn(6, 8, requires_grad=True)
    s = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sfcl_loss(t.bfloat16(), s.bfloat16(), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_manual_sfcl(t.detach().bfloat16().float(), s.detach().bfloat16().float(), 0.1), rel=1e-4)
    loss.backward()
    assert t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        sfcl_loss(torch.randn(4, 3), torch.randn(5, 3))


def test_projection_head_readings():
    head = ProjectionHead(32, 16)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(32, 32), (32, 32), (32, 16)]
    assert head(torch.randn(4, 32)).shape == (4, 16)
    alt = ProjectionHead(32, 16, hidden=64, n_linear=2)
    assert [(l.in_features, l.out_features) for l in alt.modules() if isinstance(l, nn.Linear)] == [(32, 64), (64, 16)]


# ------------------------------------------------------------------------------------------------
# Guards and registry
# ------------------------------------------------------------------------------------------------
def test_check_finite():
    check_finite({"kd": torch.tensor(1.0), "bn": 2.0, "none": None}, "unit test")
    with pytest.raises(FloatingPointError, match=r"\['kd', 'sfcl'\].*student step.*learning rate"):
        check_finite({"kd": torch.tensor(float("nan")), "bn": torch.tensor(1.0),
                      "sfcl": float("inf")}, "student step")


def test_registry():
    assert LOSSES == {"kd": kd_loss, "sfcl": sfcl_loss, "mhad": mhad_loss}
