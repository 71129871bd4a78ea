"""Adversarial training of a teacher (dfkd.robustness, TeacherConfig.adv_eps / adv_steps)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd import tracking
from dfkd.config import ConfigError, TeacherConfig
from dfkd.robustness import l2_pgd
from dfkd.train import train_teacher


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_l2_pgd_stays_in_the_ball_and_raises_the_loss():
    """Every sample moves by at most eps in L2, the cross-entropy to the model's own clean
    predictions goes up (a descent step would lower it), and no parameter gradient is left."""
    net = _net().eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        target = net(x).argmax(1)
        clean = F.cross_entropy(net(x), target, reduction="none")
    for eps in (0.5, 2.0):
        xa = l2_pgd(net, x, eps, steps=3)
        norms = (xa - x).flatten(1).norm(dim=1)
        assert (norms <= eps * (1 + 1e-5)).all() and (norms > 0.5 * eps).all()
        with torch.no_grad():
            attacked = F.cross_entropy(net(xa), target, reduction="none")
        assert (attacked > clean).all(), (attacked - clean)
        assert not xa.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert l2_pgd(net, x, 0.0, steps=3) is x


def test_l2_pgd_more_steps_find_a_stronger_attack():
    net = _net().eval()
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        target = net(x).argmax(1)
    loss = {}
    for steps in (1, 10):
        torch.manual_seed(1)
        with torch.no_grad():
            loss[steps] = F.cross_entropy(net(l2_pgd(net, x, 1.0, steps)), target).item()
    assert loss[10] > loss[1]


def test_teacher_trains_on_the_attacked_batch(runs_root):
    """adv_eps > 0 changes what the teacher learns from (same seed, same batches), 0 is standard
    training, and bad values are refused before anything runs."""
    common = dict(arch="resnet_tiny_s", epochs=1, batch_size=16, lr=0.05, max_steps_per_epoch=2,
                  dataset="toy_fgvc", image_size=32, toy_num_classes=10, toy_train_per_class=60,
                  toy_test_per_class=5, device="cpu", num_workers=0)
    weights = {}
    for name, eps in (("std", 0.0), ("adv", 1.0)):
        cfg = TeacherConfig(run_name=name, adv_eps=eps, **common)
        train_teacher(cfg, tracking.start_run("teacher", name, cfg), progress=False)
        weights[name], _ = tracking.load_weights(runs_root / f"teacher/{name}/weights/last.safetensors")
    assert any(not torch.equal(weights["std"][k], weights["adv"][k]) for k in weights["std"])
    with pytest.raises(ConfigError, match="adv_eps"):
        TeacherConfig(adv_eps=-1.0)
    with pytest.raises(ConfigError, match="adv_steps"):
        TeacherConfig(adv_steps=0)
