"""Sample-efficient synthesis (issue 9): the replay pool, its augmentation, resume with a pool,
Fast's meta-update against a hand computation, and the one-pass / momentum BN statistics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfkd.replay as replay_mod
from dfkd import tracking
from dfkd.config import ConfigError, DistillConfig
from dfkd.losses import bn_prior, shifted_moments
from dfkd.methods.fast import meta_gradients
from dfkd.replay import Replay, augment, crop_pad_px, random_crop
from dfkd.train import distill

from test_methods import build, changed, params_of, tiny_cfg


def _imgs(n, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, s, s, generator=g) * 2 - 1        # raw_tanh space = [-1, 1]


# ------------------------------------------------------------------ pool
def test_pool_capacity_keeps_the_newest():
    rp = Replay(8, "raw_tanh", "cpu", aug="none")
    a, b = _imgs(6, seed=1), _imgs(6, seed=2)
    rp.add(a)
    assert len(rp) == 6
    rp.add(b)
    assert len(rp) == 8                                         # capped
    stored = rp.pool.decode(rp.pool.images)                     # what is kept: b and a's last two
    want = torch.cat([a[-2:], b])
    q = rp.pool.decode(rp.pool.encode(want))                    # the uint8 quantisation
    assert all(any(torch.allclose(s, w) for s in stored) for w in q)
    assert not any(torch.allclose(s, rp.pool.decode(rp.pool.encode(a[:1]))[0]) for s in stored)


def test_pool_sampling_is_uniform_and_quantised():
    rp = Replay(64, "raw_tanh", "cpu", aug="none")
    x = torch.linspace(-1, 1, 64)[:, None, None, None].expand(64, 3, 4, 4).contiguous()
    rp.add(x)
    torch.manual_seed(0)
    draws = rp.batch(4000, fresh_images=None)
    assert draws.shape == (4000, 3, 4, 4)
    # every draw is one of the stored images (to uint8 precision), and all 64 are drawn
    vals = draws[:, 0, 0, 0]
    assert (vals[:, None] - x[None, :, 0, 0, 0]).abs().min(1).values.max() < 1 / 127
    idx = (vals[:, None] - x[None, :, 0, 0, 0]).abs().argmin(1)
    counts = torch.bincount(idx, minlength=64).float()
    assert counts.min() > 0 and counts.std() / counts.mean() < 0.35


def test_fresh_share_and_empty_pool():
    rp = Replay(32, "raw_tanh", "cpu", aug="none", fresh=0.25)
    calls = []

    def fresh(k):
        calls.append(k)
        return torch.full((k, 3, 4, 4), 0.5)
    out = rp.batch(8, fresh)                                    # empty pool: all fresh
    assert calls == [8] and torch.equal(out, torch.full((8, 3, 4, 4), 0.5))
    rp.add(torch.full((16, 3, 4, 4), -0.5))
    out = rp.batch(8, fresh)
    assert calls[-1] == 2 and (out[:, 0, 0, 0] > 0).sum() == 2


def test_recent_share_draws_from_the_newest_window_only():
    """replay_recent r, window w: round(n * r) rows of each student batch come from the w newest
    pool images (uniformly), the rest from the whole pool; wrap-around of the ring is respected."""
    rp = Replay(48, "raw_tanh", "cpu", aug="none", recent=0.5, window=8)
    x = torch.linspace(-1, 1, 64)[:, None, None, None].expand(64, 3, 4, 4).contiguous()
    rp.add(x[:40])
    rp.add(x[40:])                          # wraps: the pool holds x[16:64], newest x[56:64]
    torch.manual_seed(0)
    draws = torch.cat([rp.batch(16, fresh_images=None) for _ in range(300)])
    idx = (draws[:, 0, 0, 0][:, None] - x[None, :, 0, 0, 0]).abs().argmin(1).view(300, 16)
    assert idx.min() >= 16                                    # never an overwritten image
    recent_rows, rest = idx[:, :8], idx[:, 8:]                 # the recent share comes first
    assert recent_rows.min() >= 56                             # only the 8 newest
    assert torch.bincount(recent_rows.flatten() - 56, minlength=8).min() > 0   # all 8 drawn
    assert (rest < 56).float().mean() > 0.7                    # the rest: the whole pool (40 of 48 older)
    with pytest.raises(ValueError, match="replay_recent"):
        Replay(8, "raw_tanh", "cpu", fresh=0.6, recent=0.5)


def test_recent_window_defaults_to_one_iteration_of_generator_batches():
    m = build("dfkd_fgvc", replay="pool", replay_size=256, replay_recent=0.5, g_steps=3)
    assert m.replay.recent == 0.5 and m.replay.window == 3 * m.cfg.batch_size
    m = build("dfkd_fgvc", replay="pool", replay_size=256, replay_recent=0.5, replay_recent_window=7)
    assert m.replay.window == 7
    assert build("dfkd_fgvc", replay="pool", replay_size=256).replay.recent == 0.0   # off by default


def _labelled_pool(sizes, balance, capacity=None):
    """A pool whose image k holds the value of its class in every pixel: class c has sizes[c] images."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = (labels.float() / 10 - 0.5)[:, None, None, None].expand(len(labels), 3, 4, 4).contiguous()
    rp = Replay(capacity or len(labels), "raw_tanh", "cpu", aug="none", balance=balance)
    rp.add(x, labels)
    return rp


def _drawn_classes(rp, n=6000):
    v = rp.batch(n, fresh_images=None)[:, 0, 0, 0]
    return ((v + 0.5) * 10).round().long()          # the class each draw's pixels encode


def test_balanced_draws_give_every_class_its_share():
    """replay_balance 1: each class the pool holds is drawn equally often, whatever its pool share;
    0: draws follow the pool shares (uniform over images, CMI and Fast); 0.5: in between."""
    sizes = [48, 12, 4]
    torch.manual_seed(0)
    for b, want in ((1.0, [1 / 3, 1 / 3, 1 / 3]), (0.0, [48 / 64, 12 / 64, 4 / 64]),
                    (0.5, [n ** .5 / sum(k ** .5 for k in sizes) for n in sizes])):   # n_c x n_c^-0.5
        got = torch.bincount(_drawn_classes(_labelled_pool(sizes, b)), minlength=3).float() / 6000
        assert torch.allclose(got, torch.tensor(want), atol=0.025), (b, got)


def test_pool_labels_follow_their_images_through_overwrites_and_checkpoints():
    rp = _labelled_pool([6], 1.0, capacity=8)                     # 6 of class 0, then 6 of class 1:
    one = _labelled_pool([0, 6], 1.0)                             # the ring overwrites 4 of class 0
    rp.add(one.pool.decode(one.pool.images), one.pool.labels)
    assert rp.pool.labels.tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    stored = ((rp.pool.decode(rp.pool.images)[:, 0, 0, 0] + 0.5) * 10).round().long()
    assert torch.equal(stored, rp.pool.labels)                    # each label sits with its image
    fresh = Replay(8, "raw_tanh", "cpu", aug="none", balance=1.0)
    fresh.load(rp.state())
    assert torch.equal(fresh.pool.labels, rp.pool.labels) and torch.equal(fresh.pool.images, rp.pool.images)
    torch.manual_seed(0)
    counts = torch.bincount(_drawn_classes(fresh), minlength=2).float()
    assert (counts / counts.sum() - 0.5).abs().max() < 0.03       # 2 of class 0 against 6 of class 1
    with pytest.raises(ValueError, match="labels"):
        fresh.add(_imgs(2, s=4))                                   # a labelled pool needs labels
    with pytest.raises(ValueError, match="replay_balance"):
        Replay(8, "raw_tanh", "cpu", balance=-1.0)
    unlabelled = Replay(8, "raw_tanh", "cpu", aug="none")
    unlabelled.add(_imgs(4, s=4))
    with pytest.raises(ValueError, match="labels"):
        unlabelled.pool.sample(2, balance=1.0)


def test_dfkd_fgvc_labels_every_pool_image_with_the_teachers_class():
    """replay_balance > 0: every image the generator steps add (the optimised batch and the
    replay_extra ones) carries the teacher's argmax; off, the pool keeps no labels."""
    m = build("dfkd_fgvc", replay="pool", replay_size=64, replay_balance=1.0, replay_extra=1, g_steps=2)
    fw = m.counters["teacher_forwards"]
    with m.generator_phase():
        for _ in range(2):
            m.generator_step()
    assert len(m.replay) == 32 and m.replay.balance == 1.0
    assert m.counters["teacher_forwards"] - fw == 4 * m.cfg.batch_size    # 2 steps + 2 extra batches
    imgs = m.replay.pool.decode(m.replay.pool.images[:32])
    with torch.no_grad():
        want = m.teacher(imgs).argmax(1)
    # the labels were taken before the uint8 quantisation of the stored images
    assert (m.replay.pool.labels[:32] == want).float().mean() >= 0.9
    assert build("dfkd_fgvc", replay="pool", replay_size=64).replay.pool.labels is None


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.manual_seed(0)
    y = random_crop(x, 0)
    assert torch.equal(y, x)
    y = random_crop(x, 2)
    assert y.shape == x.shape
    # the centre of an 8 px image shifted by at most 2 px is still inside the original
    for b in range(2):
        assert any(torch.equal(y[b, :, 3:5, 3:5], x[b, :, 3 + dy:5 + dy, 3 + dx:5 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    with pytest.raises(ValueError, match="replay_aug"):
        augment(x, "mixup")


def _crop_offsets(y: torch.Tensor, x: torch.Tensor) -> set:
    """The (dy, dx) shift of every crop y[b] of x[b], read off the centre pixel's value (x holds
    distinct values, so the centre of a crop shifted by at most S/2 - 1 px is found once)."""
    s = x.shape[-1]
    out = set()
    for b in range(y.shape[0]):
        v = y[b, 0, s // 2, s // 2]
        (r, c), = (x[b, 0] == v).nonzero().tolist()
        out.add((r - s // 2, c - s // 2))
    return out


@pytest.mark.parametrize("pad,px", [(0.125, 4), (0.25, 8)])
def test_replay_pad_sets_the_crop_range_of_pool_samples(pad, px):
    """replay_pad: the crop_flip crops of pool samples shift by up to floor(pad x S) px each way
    (S/8 by default, 4 px at 32 px), and every shift in that range occurs."""
    s, n = 32, 3000
    x = torch.arange(s * s, dtype=torch.float32).view(1, 1, s, s).expand(n, 3, s, s) / (s * s) - 0.5
    torch.manual_seed(0)
    assert crop_pad_px(s, pad) == px and crop_pad_px(s) == s // 8 and crop_pad_px(12) == 1
    offs = _crop_offsets(random_crop(x, crop_pad_px(s, pad)), x)
    want = {(dy, dx) for dy in range(-px, px + 1) for dx in range(-px, px + 1)}
    assert offs == want
    assert Replay(8, "raw_tanh", "cpu").pad == 0.125
    assert build("dfkd_fgvc", replay="pool", replay_size=64, replay_pad=pad).replay.pad == pad
    # fast keeps its paper's CIFAR crop (S/8) whatever the shared file says
    assert build("fast", replay="pool", replay_size=64, replay_pad=0.25).replay.pad == 0.125
    with pytest.raises(ValueError, match="replay_pad"):
        Replay(8, "raw_tanh", "cpu", pad=1.0)


def test_replay_batches_use_the_pool_pad(monkeypatch):
    """Replay.batch hands its pad to the crop: a pool with pad 0.25 crops 32 px samples with 8 px."""
    seen = []
    orig = replay_mod.random_crop
    monkeypatch.setattr(replay_mod, "random_crop", lambda x, p: seen.append(p) or orig(x, p))
    for pad, px in ((0.125, 4), (0.25, 8)):
        rp = Replay(64, "raw_tanh", "cpu", aug="crop_flip", pad=pad)
        rp.add(_imgs(8, s=32))
        rp.batch(4, fresh_images=None)
        assert seen[-1] == px


def test_config_rejects_bad_replay_values():
    from dfkd.config import validate
    for bad, key in ((dict(replay="bank"), "replay"), (dict(replay_fresh=1.5), "replay_fresh"),
                     (dict(replay_aug="mixup"), "replay_aug"),
                     (dict(method="fast", method_options={"meta": "maml"}), "'meta'.*'fast'"),
                     (dict(replay_size=0), "replay_size"), (dict(replay_extra=-1), "replay_extra"),
                     (dict(replay_recent=0.8, replay_fresh=0.3), "replay_recent"),
                     (dict(replay_recent_window=-1), "replay_recent_window"),
                     (dict(replay_pad=0.0), "replay_pad"), (dict(replay_pad=1.0), "replay_pad"),
                     (dict(replay_balance=-0.5), "replay_balance"),
                     (dict(g_stop=0.0), "g_stop"), (dict(g_stop=1.5), "g_stop")):
        with pytest.raises(ConfigError, match=key):
            validate(DistillConfig(**bad))


def test_config_accepts_exactly_what_the_implementing_modules_accept():
    """config keeps its own tuples of accepted values (it imports no torch code); each must equal the
    tuple of the module that implements the field, so a new mode is never accepted but unknown."""
    from dfkd.attention import SAM_SOFTMAX
    from dfkd.config import CHOICES
    from dfkd.generator import OUTPUT_MAPS
    from dfkd.losses import MHAD_MODES
    assert CHOICES["replay_aug"] == replay_mod.AUGMENTATIONS
    assert CHOICES["replay"] == replay_mod.REPLAY_MODES
    assert CHOICES["sam_softmax"] == SAM_SOFTMAX
    assert CHOICES["output_map"] == OUTPUT_MAPS
    assert CHOICES["mha_mode"] == MHAD_MODES
    assert set(CHOICES["g_aug"]) <= set(replay_mod.AUGMENTATIONS)


# ------------------------------------------------------------------ dfkd_fgvc with a pool
@pytest.mark.parametrize("method", ["dfkd_fgvc", "fast"])
def test_augmentation_only_on_pool_samples(method, monkeypatch):
    m = build(method, replay="pool", replay_size=64, replay_aug="crop_flip", g_steps=2, s_steps=2)
    calls = {"n": 0}
    real = replay_mod.augment

    def counting(x, mode, *args, **kw):
        calls["n"] += 1
        return real(x, mode, *args, **kw)
    monkeypatch.setattr(replay_mod, "augment", counting)
    with m.generator_phase():
        for _ in range(m.g_steps_per_iteration()):
            m.generator_step()
    assert calls["n"] == 0, "the generator's losses must see un-augmented pool images"
    assert len(m.replay) == (16 if method == "dfkd_fgvc" else 8)   # every G step vs one round
    # the pool holds exactly what the generator made (before any augmentation)
    seen = []
    monkeypatch.setattr(m, "train_student_on", lambda x: seen.append(x) or {})
    m.student_step()
    assert calls["n"] == 1 and len(seen) == 1 and seen[0].shape[0] == m.cfg.batch_size


def test_pool_resume_matches_uninterrupted(runs_root):
    common = dict(dataset="toy_fgvc", image_size=32, toy_num_classes=4, toy_train_per_class=4,
                  toy_test_per_class=4, device="cpu", num_workers=0, epochs=2, iters_per_epoch=2,
                  g_steps=1, s_steps=1, batch_size=8, nz=16, ngf=8, sfcl_dim=16, replay="pool",
                  replay_size=24, amp="off", channels_last=False)

    class Killed(RuntimeError):
        pass

    def kill(step, row):
        if step == 1:
            raise Killed()
    cfg_a = DistillConfig(run_name="a", **common)
    distill(cfg_a, tracking.start_run("distill", "a", cfg_a), progress=False)
    cfg_b = DistillConfig(run_name="b", **common)
    with pytest.raises(Killed):
        distill(cfg_b, tracking.start_run("distill", "b", cfg_b), progress=False, callbacks=[kill])
    state = tracking.Run(runs_root / "distill/b").load_state()
    assert state["method"]["replay"]["size"] == 16              # 2 iterations x 1 G step x 8
    distill(cfg_b, tracking.start_run("distill", "b", cfg_b), progress=False)
    wa, _ = tracking.load_weights(runs_root / "distill/a/weights/student.safetensors")
    wb, _ = tracking.load_weights(runs_root / "distill/b/weights/student.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_refuses_a_checkpoint_without_pool():
    a = build("dfkd_fgvc")
    b = build("dfkd_fgvc", replay="pool", replay_size=16)
    with pytest.raises(ValueError, match="replay"):
        b.load_checkpoint_state(a.checkpoint_state())


# ------------------------------------------------------------------ Fast's meta update
def test_meta_gradients_by_hand():
    meta = nn.Linear(2, 1)
    with torch.no_grad():
        meta.weight.copy_(torch.tensor([[1.0, -2.0]]))
        meta.bias.fill_(0.5)
    fast = copy.deepcopy(meta)
    with torch.no_grad():
        fast.weight.copy_(torch.tensor([[0.5, -1.0]]))
        fast.bias.fill_(1.0)
    rep = meta_gradients(meta, fast, "reptile")
    assert torch.equal(rep[0], torch.tensor([[0.5, -1.0]])) and torch.equal(rep[1], torch.tensor([-0.5]))
    acc = [torch.ones(1, 2), torch.full((1,), 3.0)]
    fo = meta_gradients(meta, fast, "fomaml", acc)
    assert torch.equal(fo[0], acc[0]) and torch.equal(fo[1], acc[1])
    with pytest.raises(ValueError, match="meta='maml2'"):
        meta_gradients(meta, fast, "maml2")


@pytest.mark.parametrize("mode", ["reptile", "fomaml"])
def test_fast_round_meta_update_by_hand(mode, monkeypatch):
    """One synthesis round of ``g_steps`` inner steps, then one Adam step of the meta generator
    on the meta gradient; Adam's first step is lr * g / (|g| + eps) per element (bias-corrected)."""
    m = build("fast", method_options={"meta": mode, "reset_l0": False}, g_steps=2, replay="pool",
              replay_size=32, lr_g=1e-3)
    before = [p.detach().clone() for p in m.generator.parameters()]
    captured = {}
    real_end = m.end_round

    def spy(x, bn):
        captured["fast"] = [p.detach().clone() for p in m._round["fast"].parameters()]
        captured["grads"] = [g.clone() for g in m._round["grads"]]
        real_end(x, bn)
    monkeypatch.setattr(m, "end_round", spy)
    with m.generator_phase():
        m.generator_step()
        assert m.round_step == 1 and all(torch.equal(a, b) for a, b in zip(before, m.generator.parameters()))
        m.generator_step()
    assert m.round_step == 0 and len(m.replay) == 8
    for p0, pf, gacc, p1 in zip(before, captured["fast"], captured["grads"], m.generator.parameters()):
        g = (p0 - pf) if mode == "reptile" else gacc
        want = p0 - 1e-3 * g / (g.abs() + 1e-8)
        assert torch.allclose(p1.detach(), want, atol=1e-6), mode
    # the fast copy moved away from the meta weights (the inner steps did something)
    assert any(not torch.equal(a, b) for a, b in zip(before, captured["fast"]))


def test_fast_warmup_skips_student_steps():
    m = build("fast", method_options={"warmup": 1}, replay="pool", replay_size=32)
    s0 = [p.detach().clone() for p in m.student.parameters()]
    m.iteration()
    assert all(torch.equal(a, b) for a, b in zip(s0, m.student.parameters())) and m.counters["s_steps"] == 0
    m.iteration()
    assert m.counters["s_steps"] == m.cfg.s_steps


@pytest.mark.parametrize("method,extra", [("dfkd_fgvc", {}), ("dfkd_fgvc", {"g_meta": "fomaml"}), ("fast", {})])
def test_g_stop_freezes_the_generator_and_pool_and_keeps_the_student_training(method, extra):
    """g_stop 0.5 of 2 x 2 iterations: two iterations of Algorithm 1, then two of student steps only
    on the frozen pool (the distillation tail): no generator step, generator and pool unchanged."""
    m = build(method, replay="pool", replay_size=256, epochs=2, iters_per_epoch=2, g_stop=0.5, **extra)
    assert m.synthesis_iterations() == 2
    for _ in range(2):
        m.iteration()
    g_steps, gen = m.counters["g_steps"], params_of(m.generator)
    assert g_steps == 2 * m.cfg.g_steps and len(m.replay) > 0
    pool = m.replay.pool.images[:len(m.replay)].clone(), len(m.replay)
    for _ in range(2):
        s0 = params_of(m.student)
        m.iteration()
        assert changed(s0, m.student)                                   # the student still learns
    assert m.counters["g_steps"] == g_steps and m.counters["s_steps"] == 4 * m.cfg.s_steps
    assert not changed(gen, m.generator)
    assert len(m.replay) == pool[1] and torch.equal(m.replay.pool.images[:pool[1]], pool[0])


@pytest.mark.parametrize("g_stop,total,synth", [(1.0, 12, 12), (0.25, 12, 3), (0.3, 10, 3), (0.34, 10, 4), (0.01, 10, 1)])
def test_g_stop_counts_whole_iterations(g_stop, total, synth):
    m = build("dfkd_fgvc", epochs=total // 2, iters_per_epoch=2, g_stop=g_stop)
    assert m.synthesis_iterations() == synth


# ------------------------------------------------------------------ BN statistics
def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4))
    for mod in net:
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return net.eval()


def test_one_pass_bn_statistics_equal_two_pass():
    net = _bn_net()
    x = torch.randn(6, 3, 9, 9) * 3 + 1
    with bn_prior(net) as bn:
        net(x)
    got = bn.per_layer()
    # two passes by hand: mean, then the mean squared deviation
    h = x
    want = []
    for mod in net:
        if isinstance(mod, nn.BatchNorm2d):
            mean = h.mean((0, 2, 3))
            var = ((h - mean[None, :, None, None]) ** 2).mean((0, 2, 3))
            want.append((mod.running_mean - mean).norm() + (mod.running_var - var).norm())
        h = mod(h)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_shifted_moments_value_and_gradient_against_autograd(layout):
    """The fused moments (one autograd node, CL inputs reduced as their (N H W, C) view) give the
    same E[x - s], E[(x - s)^2] and the same input gradient as the plain formula under autograd."""
    torch.manual_seed(1)
    x = torch.randn(5, 4, 6, 7) * 2 + 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    shift = torch.randn(4)
    got = shifted_moments(x, shift)
    d = x - shift[None, :, None, None]
    want = torch.stack([d.mean((0, 2, 3)), (d * d).mean((0, 2, 3))])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn(2, 4)
    g_got, = torch.autograd.grad((got * w).sum(), x)
    g_want, = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_bn_prior_on_channels_last_equals_nchw_with_gradients():
    """The BN prior reads a channels_last activation through its NHWC view: the same terms and the
    same gradient into the input as the NCHW activation, and a bf16 input gives fp32 terms."""
    net = _bn_net()
    x = torch.randn(6, 3, 9, 9) * 3 + 1
    out = []
    for mf in (torch.contiguous_format, torch.channels_last):
        net_l = copy.deepcopy(net).to(memory_format=mf)
        xi = x.clone().contiguous(memory_format=mf).requires_grad_(True)
        with bn_prior(net_l) as bn:
            net_l(xi)
        loss = bn.loss()
        g, = torch.autograd.grad(loss, xi)
        out.append((bn.per_layer(), g))
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16), bn_prior(copy.deepcopy(net)) as bn:
        bn.model(x)
    assert all(t.dtype == torch.float32 for t in bn.per_layer())


def test_momentum_bn_prior_by_hand():
    net = _bn_net()
    bn_layer = net[1]
    x1, x2 = torch.randn(4, 3, 9, 9), torch.randn(4, 3, 9, 9) + 2
    memory = {}
    with bn_prior(net, momentum=0.9, memory=memory) as bn:
        net(x1)
    first = bn.per_layer()[0]
    bn.update_memory()
    f1 = net[0](x1)
    m1, v1 = f1.mean((0, 2, 3)), f1.var((0, 2, 3), unbiased=False)
    assert torch.allclose(first, (bn_layer.running_mean - m1).norm() + (bn_layer.running_var - v1).norm(), atol=1e-5)
    assert torch.allclose(memory[0][0], m1, atol=1e-6)          # first batch: copied
    with bn_prior(net, momentum=0.9, memory=memory) as bn:
        net(x2)
    f2 = net[0](x2)
    m2, v2 = f2.mean((0, 2, 3)), f2.var((0, 2, 3), unbiased=False)
    bm, bv = 0.9 * m1 + 0.1 * m2, 0.9 * v1 + 0.1 * v2
    want = (bn_layer.running_mean - bm).norm() + (bn_layer.running_var - bv).norm()
    assert torch.allclose(bn.per_layer()[0], want, atol=1e-5)
    bn.update_memory()
    assert torch.allclose(memory[0][0], bm, atol=1e-6)


def test_replay_extra_adds_samples_of_the_updated_generator():
    """replay_extra=k: after each generator step k more batches of the *updated* generator join the
    pool, at new noise and without a teacher pass; off (0) by default."""
    m = build("dfkd_fgvc", replay="pool", replay_size=256, replay_extra=2, g_steps=3)
    b = m.cfg.batch_size
    weights = []          # the generator's weights at each generate() call
    real_generate = m.generate

    def recording(n, z=None):
        weights.append(torch.cat([p.detach().flatten().clone() for p in m.generator.parameters()]))
        return real_generate(n, z)
    m.generate = recording
    forwards = m.counters["teacher_forwards"]
    with m.generator_phase():
        m.generator_step()
    final = torch.cat([p.detach().flatten() for p in m.generator.parameters()])
    assert len(m.replay) == 3 * b and len(weights) == 3
    assert not torch.equal(weights[0], final)                          # the loss batch: before the update
    assert torch.equal(weights[1], final) and torch.equal(weights[2], final)   # extras: after it
    assert m.counters["teacher_forwards"] - forwards == b              # the extras skip the teacher
    pool = m.replay.pool.images[:3 * b]
    assert not torch.equal(pool[b:2 * b], pool[2 * b:])                # new noise each batch
    off = build("dfkd_fgvc", replay="pool", replay_size=256, g_steps=3)
    with off.generator_phase():
        off.generator_step()
    assert len(off.replay) == b and tiny_cfg().replay_extra == 0


def _generator_steps_without_and_with(**options):
    """One generator step of the default dfkd_fgvc and one with ``options``, from the same seed."""
    outs = []
    for kw in ({}, options):
        m = build("dfkd_fgvc", **kw)
        torch.manual_seed(5)
        with m.generator_phase():
            outs.append(m.generator_step())
    return outs


def test_class_coverage_terms_enter_the_generator_loss():
    """g_oh / g_balance (off by default) add DFQ's instance-entropy and balance terms to Eq. 10."""
    o0, o1 = _generator_steps_without_and_with(g_oh=1.0, g_balance=2.0)
    assert "oh" not in o0 and "oh" in o1
    assert torch.allclose(o1["loss"], o0["loss"] + o1["oh"] + 2.0 * o1["balance"], atol=1e-5)
    assert tiny_cfg().g_oh == 0.0 and tiny_cfg().g_balance == 0.0


def test_mode_seeking_loss_against_a_hand_computation():
    """MSGAN's term: 1 / (mean|x1 - x2| / mean|z1 - z2| + eps) over the batch's two halves."""
    from dfkd.losses import mode_seeking_loss
    x = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 2.0], [1.0, 5.0]])   # pairs (0, 2), (1, 3)
    z = torch.tensor([[1.0], [0.0], [0.0], [2.0]])
    # |x1 - x2|: (3, 0, 0, 4) -> mean 7/4; |z1 - z2|: (1, 2) -> mean 3/2; r = 7/6
    assert torch.allclose(mode_seeking_loss(x, z, eps=0.0), torch.tensor(6 / 7))
    # odd B: rows (0, 1) paired, the last unpaired: |x0 - x1| = (1, 1), |z0 - z1| = 1, r = 1
    assert torch.allclose(mode_seeking_loss(x[:3], z[:3], eps=0.0), torch.tensor(1.0))
    # minimising it spreads images of different noise apart
    xx = x.clone().requires_grad_(True)
    mode_seeking_loss(xx, z).backward()
    assert (xx.grad[:2] * (x[:2] - x[2:]) <= 0).all() and (xx.grad[:2] * (x[:2] - x[2:]) < 0).any()
    with pytest.raises(ValueError, match="at least 2"):
        mode_seeking_loss(x[:1], z[:1])


def test_mode_seeking_weight_enters_the_generator_loss():
    """g_div (off by default) adds g_div x the mode-seeking term to Eq. 10 on the generated batch."""
    o0, o1 = _generator_steps_without_and_with(g_div=3.0)
    assert "div" not in o0 and o1["div"] > 0
    assert torch.allclose(o1["loss"], o0["loss"] + 3.0 * o1["div"], atol=1e-5)
    assert tiny_cfg().g_div == 0.0


def test_adversarial_weight_scales_the_kl_in_eq10():
    """g_adv (1 = Eq. 10 as printed) multiplies the adversarial -L_KD of the generator's loss."""
    losses = {}
    for w in (1.0, 3.0):
        m = build("dfkd_fgvc", g_adv=w)
        torch.manual_seed(5)
        with m.generator_phase():
            losses[w] = m.generator_step()
    for w, o in losses.items():
        assert torch.allclose(o["loss"], m.cfg.alpha * o["bn"] - w * o["kd"], atol=1e-5)
    assert float(losses[1.0]["kd"].detach()) > 0 and tiny_cfg().g_adv == 1.0


def test_generator_reinit_every_n_iterations():
    """g_reinit_every=N: the first generator step of iterations N, 2N, ... starts from fresh weights
    (those a new generator gets from the same RNG state) with an empty Adam state; other
    iterations and the second step of the same iteration keep training the same generator."""
    m = build("dfkd_fgvc", g_reinit_every=2, g_steps=2)

    def weights():
        return torch.cat([p.detach().flatten().clone() for p in m.generator.parameters()])
    m.iteration()                                        # iteration 0: no re-initialisation
    m.iteration()                                        # iteration 1: none either
    trained = weights()
    assert len(m.g_opt.state) > 0
    assert m.counters["iterations"] == 2
    torch.manual_seed(11)
    m.maybe_reinit_generator()                           # iteration 2: fresh weights, Adam forgets
    torch.manual_seed(11)
    want = torch.cat([p.detach().flatten() for p in m.build_generator().parameters()])
    assert torch.equal(weights(), want) and not torch.equal(trained, want)
    assert len(m.g_opt.state) == 0
    with m.generator_phase():
        m.generator_step()                               # trains on; no second reset in iteration 2
    after = weights()
    assert not torch.equal(after, want)
    m.maybe_reinit_generator()
    assert torch.equal(weights(), after)
    m.counters["iterations"] = 3
    m.maybe_reinit_generator()                           # 3 is not a multiple of 2
    assert torch.equal(weights(), after)
    off = build("dfkd_fgvc", g_steps=2)
    off.counters["iterations"] = 2
    before = torch.cat([p.detach().flatten().clone() for p in off.generator.parameters()])
    off.maybe_reinit_generator()
    assert torch.equal(before, torch.cat([p.detach().flatten() for p in off.generator.parameters()]))
    with pytest.raises(ConfigError, match="g_reinit_every"):
        DistillConfig(g_reinit_every=-1)


def test_momentum_bn_prior_in_dfkd_fgvc():
    """bn_momentum m > 0 (Fast's momentum prior, off by default): the first generator step is Eq. 3
    (empty memory), from the second on the BN term compares the running statistics with the
    memory-mixed statistics, and the memory survives a checkpoint."""
    runs = {}
    for m_ in (0.0, 0.5):
        m = build("dfkd_fgvc", bn_momentum=m_)
        torch.manual_seed(5)
        with m.generator_phase():
            runs[m_] = [m.generator_step()["bn"].detach() for _ in range(2)], m
    (plain, m0), (mom, m5) = runs[0.0], runs[0.5]
    assert torch.allclose(plain[0], mom[0]) and not torch.allclose(plain[1], mom[1])
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in m5.teacher.modules())
    assert len(m5.bn_memory) == n_bn and m0.bn_memory == {} and "bn_memory" not in m0.extra_state()
    state = m5.extra_state()
    twin = build("dfkd_fgvc", bn_momentum=0.5)
    twin.load_extra_state(state)
    assert all(torch.equal(twin.bn_memory[i][0], m5.bn_memory[i][0]) for i in m5.bn_memory)
    with pytest.raises(ConfigError, match="bn_momentum"):
        DistillConfig(bn_momentum=1.0)


def test_rrc_flip_crops_between_the_teacher_crop_areas():
    """replay_aug='rrc_flip': a random resized crop of 35-100 % of the area (the teachers' training
    crop), resized back to S and flipped at random: a constant image stays constant, a horizontal
    ramp keeps a span between the narrowest crop's width and the whole image's."""
    s = 32
    torch.manual_seed(0)
    const = torch.full((16, 3, s, s), 0.3)
    assert torch.allclose(augment(const, "rrc_flip"), const, atol=1e-5)
    ramp = torch.linspace(-1, 1, s)[None, None, None, :].expand(64, 3, s, s).contiguous()
    out = augment(ramp, "rrc_flip")
    assert out.shape == ramp.shape
    span = (out[:, 0, s // 2, -1] - out[:, 0, s // 2, 0]).abs()        # flip-invariant
    full = float(ramp[0, 0, 0, -1] - ramp[0, 0, 0, 0])
    narrowest = (replay_mod.RRC_SCALE[0] * 3 / 4) ** 0.5                   # smallest crop width / S
    assert span.max() <= full + 1e-4 and span.min() >= narrowest * full * 0.9
    assert span.std() > 0.05                                            # crops differ per sample
    flipped = out[:, 0, s // 2, -1] < out[:, 0, s // 2, 0]
    assert 0 < int(flipped.sum()) < 64                                  # and so do the flips


@pytest.mark.parametrize("output_map", ["imagenet", "raw_tanh"])
def test_color_jitter_by_hand(output_map):
    """replay_aug='crop_flip_color': in pixel space, brightness, contrast around the image's mean,
    saturation around each pixel's luma (BT.601) and a per-channel tint, every factor drawn per
    sample, then clamped to [0, 1]; strength 0 is the identity."""
    from dfkd.generator import from_teacher_input, to_teacher_input
    torch.manual_seed(1)
    p = torch.rand(4, 3, 6, 6) * 0.6 + 0.2                       # pixels well inside [0, 1]
    x = to_teacher_input(p * 2 - 1, output_map)
    assert torch.allclose(replay_mod.color_jitter(x, output_map, strength=0.0), x, atol=1e-5)
    s = 0.4
    torch.manual_seed(7)
    y = replay_mod.color_jitter(x, output_map, strength=s)
    torch.manual_seed(7)                                          # the same draws, by hand
    fb, fc, fs = (1 + s * (2 * torch.rand(4, 1, 1, 1) - 1) for _ in range(3))
    ft = 1 + s / 2 * (2 * torch.rand(4, 3, 1, 1) - 1)
    q = p * fb
    m = q.mean(dim=(1, 2, 3), keepdim=True)
    q = (q - m) * fc + m
    luma = 0.299 * q[:, :1] + 0.587 * q[:, 1:2] + 0.114 * q[:, 2:]
    q = ((q - luma) * fs + luma) * ft
    assert torch.allclose(from_teacher_input(y, output_map), q.clamp(0, 1), atol=1e-5)
    assert fb.std() > 0 and not torch.allclose(y, x, atol=1e-3)   # factors differ per sample


def test_crop_flip_color_reaches_student_batches_in_the_runs_output_space():
    """The pool hands its output_map to the augmentation: a pool of a raw_tanh run jitters in
    raw_tanh space (a mid-grey pool image stays inside [-1, 1] and changes colour)."""
    pool = Replay(32, "raw_tanh", "cpu", aug="crop_flip_color")
    pool.add(torch.zeros(8, 3, 8, 8))
    torch.manual_seed(0)
    out = pool.batch(8, lambda k: None)
    assert out.shape == (8, 3, 8, 8) and out.abs().max() <= 1.0 + 1e-6
    assert out.std(dim=(0, 2, 3)).max() > 0.01


# ------------------------------------------------------------------ class-conditional generator
def test_conditional_generator_uses_its_labels():
    """num_classes > 0: the label embedding is added to the noise, so one z gives another image for
    another label; y defaults to arange(B) % K; an unconditional generator refuses labels."""
    from dfkd.generator import AttentionGenerator
    torch.manual_seed(0)
    g = AttentionGenerator(nz=16, img_size=32, ngf=4, block_norm="bn", num_classes=3).eval()
    z = torch.randn(4, 16)
    a, b = g(z, torch.tensor([0, 0, 0, 0])), g(z, torch.tensor([1, 1, 1, 1]))
    assert not torch.allclose(a, b)
    assert torch.allclose(g(z), g(z, torch.tensor([0, 1, 2, 0])))
    shift = g.embed.weight[1] - g.embed.weight[0]     # label 1 = label 0 with the noise moved
    assert torch.allclose(b, g(z + shift.detach(), torch.tensor([0, 0, 0, 0])), atol=1e-5)
    plain = AttentionGenerator(nz=16, img_size=32, ngf=4, num_classes=0)
    assert plain.embed is None
    with pytest.raises(ValueError, match="unconditional"):
        plain(z, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("n", [4, 6, 14])
def test_conditional_targets_are_class_balanced(n):
    """Targets come as fresh permutations of the K (= 6) classes: a batch of at most K holds
    distinct classes, a larger one every class within one count of the others."""
    m = build("dfkd_fgvc", g_conditional=True, batch_size=n)
    for _ in range(3):
        y = m.sample_targets(n)
        counts = torch.bincount(y, minlength=m.num_classes)
        assert y.shape == (n,) and counts.max() - counts.min() <= 1
        if n <= m.num_classes:
            assert y.unique().numel() == n


def test_conditional_ce_enters_the_generator_loss():
    """g_conditional: Eq. 10 gains g_ce x CE(teacher(G(z, y)), y) with y the batch's drawn targets;
    the term is recomputed here from the teacher's logits on the same images."""
    seen = {}
    m = build("dfkd_fgvc", g_conditional=True, g_ce=2.0)
    hook = m.teacher.register_forward_hook(lambda mod, i, o: seen.setdefault("t", o.detach().clone()))
    torch.manual_seed(5)
    with m.generator_phase():
        o = m.generator_step()
    hook.remove()
    ce = F.cross_entropy(seen["t"].float(), m.targets)
    assert torch.allclose(o["ce"], ce, atol=1e-5)
    assert torch.allclose(o["loss"], m.cfg.alpha * o["bn"] - o["kd"] + 2.0 * ce, atol=1e-5)
    assert tiny_cfg().g_conditional is False and "ce" not in build("dfkd_fgvc").generator_step()


def test_conditional_generator_learns_its_targets():
    """Generator steps on the CE term alone lower the teacher's cross-entropy to the drawn targets
    on a fixed noise batch (the term pulls towards, not away from, the labels)."""
    m = build("dfkd_fgvc", g_conditional=True, g_ce=1.0, use_bn=False, use_adv=False, lr_g=0.01,
              batch_size=12)
    torch.manual_seed(1)
    z = m.sample_z(12)
    y = torch.arange(12) % m.num_classes

    def target_ce():
        with torch.no_grad():
            return F.cross_entropy(m.teacher(m.to_input(m.generator(z, y))), y).item()
    before = target_ce()
    with m.generator_phase():
        for _ in range(5):
            m.generator_step()
    assert target_ce() < before


def test_conditional_config_rejects_negative_ce_weight():
    with pytest.raises(ConfigError, match="g_ce"):
        tiny_cfg(g_conditional=True, g_ce=-1.0)


def test_generator_augmentation_reaches_the_networks_not_the_pool(monkeypatch):
    """g_aug: the teacher (and student) of Eq. 10 see augment(x, g_aug) of the generated batch x,
    while the replay pool stores x itself; the default is 'none' (Algorithm 1 as printed)."""
    import dfkd.methods.dfkd_fgvc as mod
    modes = []

    def marked(x, mode):
        modes.append(mode)
        return x.flip(-1)
    monkeypatch.setattr(mod, "augment", marked)
    m = build("dfkd_fgvc", g_aug="flip", replay="pool", replay_size=64)
    made, seen = [], []
    generate = m.generate
    m.generate = lambda n, z=None: made.append(generate(n, z)) or made[-1]
    hook = m.teacher.register_forward_pre_hook(lambda mod_, inp: seen.append(inp[0].detach().clone()))
    with m.generator_phase():
        m.generator_step()
    hook.remove()
    x = made[0].detach()
    assert modes == ["flip"] and torch.equal(seen[0], x.flip(-1))
    pool = m.replay.pool
    assert torch.equal(pool.images[:x.shape[0]], pool.encode(x))
    assert tiny_cfg().g_aug == "none"
    with pytest.raises(ConfigError, match="g_aug"):
        tiny_cfg(g_aug="mixup")


def test_balanced_resume_from_a_checkpoint_without_labels_names_the_fix():
    a = build("dfkd_fgvc", replay="pool", replay_size=64, g_steps=1)
    with a.generator_phase():
        a.generator_step()
    b = build("dfkd_fgvc", replay="pool", replay_size=64, g_steps=1, replay_balance=1.0)
    b.load_checkpoint_state(a.checkpoint_state())
    with pytest.raises(ValueError, match="replay_balance=0"):
        with b.generator_phase():
            b.generator_step()


def test_first_bn_multiplier_in_dfkd_fgvc(monkeypatch):
    """bn_first_mul w (DeepInversion's first-layer multiplier, 1 by default): the generator step's BN
    term is w x the teacher's first BN layer's Eq. 3 term plus the other layers' terms, and that
    term is what the generator's loss carries (alpha x L_BN)."""
    import dfkd.methods.dfkd_fgvc as fgvc
    priors = []

    def spy(*a, **k):
        priors.append(bn_prior(*a, **k))
        return priors[-1]

    monkeypatch.setattr(fgvc, "bn_prior", spy)
    got = {}
    for w in (1.0, 10.0):
        m = build("dfkd_fgvc", bn_first_mul=w)
        torch.manual_seed(5)
        with m.generator_phase():
            got[w] = m.generator_step()["bn"].detach()
        terms = [t.detach() for t in priors[-1].per_layer()]
        assert len(terms) == sum(isinstance(x, nn.BatchNorm2d) for x in m.teacher.modules()) > 1
        assert got[w].item() == pytest.approx(w * terms[0].item() + sum(t.item() for t in terms[1:]), rel=1e-5)
    assert got[10.0].item() > got[1.0].item()
    with pytest.raises(ConfigError, match="bn_first_mul"):
        DistillConfig(bn_first_mul=-1.0)


def test_dfkd_fgvc_meta_rounds():
    """g_meta='fomaml': an iteration's g_steps G steps are one Fast round on a copy of the generator
    whose first layer is re-initialised and whose noise is trained; the meta generator stays put
    during the round and then takes one Adam step on the sum of the round's gradients (its first
    moment is (1 - beta1) x that sum); only the round's final batch joins the pool; no checkpoint
    inside a round; the student's terms (Eq. 11) are untouched."""
    m = build("dfkd_fgvc", g_meta="fomaml", g_steps=3, replay="pool", lam=0.05)
    meta0 = [p.detach().clone() for p in m.generator.parameters()]
    seen = []
    with m.generator_phase():
        m.generator_step()
        r = m._round
        assert r is not None and m.round_step == 1
        assert not torch.equal(r["fast"].fc.weight, m.generator.fc.weight)   # reset_l0
        assert all(torch.equal(a, b) for a, b in zip(meta0, m.generator.parameters()))
        assert len(m.replay) == 0
        with pytest.raises(RuntimeError, match="inside a g_meta round"):
            m.extra_state()
        z0 = r["z"].detach().clone()
        grads_before = [g.clone() for g in r["grads"]]
        orig = r["opt"].step

        def spy():   # every step's gradient of the fast generator
            seen.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                         for p in r["fast"].parameters()])
            orig()
        r["opt"].step = spy
        m.generator_step()
        m.generator_step()
    assert m._round is None and m.round_step == 0
    assert not torch.equal(z0, r["z"].detach())          # the noise is trained
    total = [a + b + c for a, b, c in zip(grads_before, *seen)]
    beta1 = m.g_opt.param_groups[0]["betas"][0]
    for p, g in zip(m.generator.parameters(), total):
        assert torch.allclose(m.g_opt.state[p]["exp_avg"], (1 - beta1) * g, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(meta0, m.generator.parameters()))
    assert len(m.replay) == m.cfg.batch_size            # the final batch only
    assert m.counters["images_generated"] == 3 * m.cfg.batch_size
    assert "replay" in m.extra_state()
    assert torch.equal(m.synthesize(4), m.replay.pool.latest(4).float())


def test_g_meta_config():
    """g_meta needs the pool (the student learns from the rounds' batches) and no replay_extra."""
    with pytest.raises(ConfigError, match="replay='pool'"):
        DistillConfig(g_meta="fomaml")
    with pytest.raises(ConfigError, match="replay_extra"):
        DistillConfig(g_meta="fomaml", replay="pool", replay_extra=1)
    with pytest.raises(ConfigError, match="g_meta"):
        DistillConfig(g_meta="maml2", replay="pool")
    assert DistillConfig().g_meta == "off"
    DistillConfig(g_meta="reptile", replay="pool")


def test_dfkd_fgvc_meta_checkpoint_round_trip():
    """A g_meta checkpoint (taken between iterations) restores the pool of the rounds' batches, the
    meta generator and its Adam moments, and the next iteration of the copy matches the original's."""
    kw = dict(g_meta="fomaml", replay="pool")
    m = build("dfkd_fgvc", **kw)
    for _ in range(2):
        m.iteration()
    state = copy.deepcopy(m.checkpoint_state())
    twin = build("dfkd_fgvc", **kw)            # the same frozen teacher, untrained generator and student
    twin.load_checkpoint_state(state)
    assert len(twin.replay) == len(m.replay) == 2 * m.cfg.batch_size
    assert all(torch.equal(a, b) for a, b in zip(twin.generator.parameters(), m.generator.parameters()))
    for p, q in zip(m.generator.parameters(), twin.generator.parameters()):
        assert torch.equal(m.g_opt.state[p]["exp_avg"], twin.g_opt.state[q]["exp_avg"])
    torch.manual_seed(9)
    m.iteration()
    torch.manual_seed(9)
    twin.iteration()
    assert all(torch.allclose(a, b) for a, b in zip(twin.generator.parameters(), m.generator.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(twin.student.parameters(), m.student.parameters()))
