"""dfkd.viz: every plot function renders on random tensors, figure files are reproducible,
Grad-CAM releases its hooks and restores modes, t-SNE copes with tiny inputs, widgets build."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from dfkd.viz import cams, embed, grids, style


def _images(b=6, s=16, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


class TinyNet(nn.Module):
    """Two conv blocks + linear head; ``target_layer`` as dfkd.models.FeatureNet exposes it."""

    def __init__(self, k=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.target_layer = self.features[3]
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_import_is_light():
    code = ("import sys, dfkd.viz, dfkd.viz.widgets, dfkd.viz.cams; "
            "print(any(m in sys.modules for m in ('ipywidgets', 'pytorch_grad_cam', 'cv2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_grids_render():
    x = _images()
    norm = (x - torch.tensor(grids.IMAGENET_MEAN)[:, None, None]) / torch.tensor(grids.IMAGENET_STD)[:, None, None]
    figs = [
        grids.image_grid(x, labels=[0, 1, 2, 0, 1, 2], class_names=["a", "b", "c"], nrow=4, title="t"),
        grids.image_grid(norm, denormalize=True),
        grids.compare_grid({"real": x, "ours": _images(4, 8, 1), "dafl": x[:2]}, ncol=4, title="Fig 4"),
        grids.attention_grid(torch.rand(6, 4, 4), x, nrow=3),
        grids.attention_grid(np.random.rand(3, 1, 5, 5)),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    for f in figs:
        f.canvas.draw()
    back = grids.to_numpy_images(norm, denormalize=True)
    assert np.allclose(back, x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert figs[0]._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # displays in Jupyter without pyplot


def test_imagenet_stats_match_data_module():
    data = pytest.importorskip("dfkd.data")
    assert tuple(data.IMAGENET_MEAN) == pytest.approx(grids.IMAGENET_MEAN)
    assert tuple(data.IMAGENET_STD) == pytest.approx(grids.IMAGENET_STD)


def test_tsne_tiny_and_panels():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(24, 64)).astype(np.float32), np.arange(24) % 4
    assert embed.effective_perplexity(30, 24) == pytest.approx(23 / 3)
    xy = embed.tsne_embed(torch.from_numpy(feats), seed=0, perplexity=30, max_iter=250)
    assert xy.shape == (24, 2) and np.isfinite(xy).all()
    assert np.array_equal(xy, embed.tsne_embed(feats, seed=0, perplexity=30, max_iter=250))  # deterministic
    assert isinstance(embed.scatter_embedding(xy, labels, ["w", "x", "y", "z"], title="s"), Figure)
    fig = embed.tsne_panels({"ours": (feats, labels), "dafl": (feats[:12], labels[:12])}, title="Fig 5",
                            max_iter=250)
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_save_figure_png_pdf_byte_identical(tmp_path):
    def make():
        return grids.image_grid(_images(4, 8), labels=["a", "b", "c", "d"], nrow=2, title="same")

    first = style.save_figure(make(), "fig/x", figures_root=tmp_path)
    assert [p.name for p in first] == ["x.png", "x.pdf"]
    blobs = [p.read_bytes() for p in first]
    assert b"CreationDate" not in blobs[1] and b"Matplotlib" not in blobs[1]
    second = style.save_figure(make(), "fig/x.png", figures_root=tmp_path)  # suffix is dropped
    assert second == first and [p.read_bytes() for p in second] == blobs
    with pytest.raises(ValueError):
        style.save_figure(make(), "../escape", figures_root=tmp_path)


def test_save_figure_uses_dfkd_figures_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DFKD_FIGURES", str(tmp_path / "figs"))
    (path,) = style.save_figure(grids.image_grid(_images(2, 8)), "env", formats=("png",))
    assert path == tmp_path / "figs" / "env.png" and path.is_file()


def test_gradcam_shapes_hooks_and_modes():
    torch.manual_seed(0)
    model = TinyNet().train()
    model.features[1].eval()  # a frozen BN inside a training model must stay frozen
    for p in model.head.parameters():
        p.requires_grad_(False)
    x = _images(3, 16)
    with torch.no_grad():  # grad-cam must still work (and not care)
        with cams.GradCAMContext(model) as cam:
            maps = cam(x)
            maps_t = cam(x, targets=[0, 1, 2])
            assert len(model.target_layer._forward_hooks) > 0
            assert not model.training  # BaseCAM evaluates in eval mode
    assert maps.shape == (3, 16, 16) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and maps_t.shape == maps.shape
    assert len(model.target_layer._forward_hooks) == 0
    assert model.training and not model.features[1].training
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()][-2:] == [False, False]
    assert cams.compute_cams(model, x, targets=1).shape == (3, 16, 16)
    assert len(model.target_layer._forward_hooks) == 0 and model.training


@pytest.mark.parametrize("exc", [RuntimeError, IndexError])  # BaseCAM.__exit__ swallows IndexError
def test_gradcam_releases_and_reraises_on_error(exc):
    model = TinyNet().train()
    with pytest.raises(exc):
        with cams.GradCAMContext(model, model.target_layer):
            raise exc("boom")
    assert len(model.target_layer._forward_hooks) == 0 and model.training


def test_cam_overlay_figure():
    x = _images(4, 16)
    fig = cams.cam_overlay_figure(x, np.random.rand(4, 8, 8).astype(np.float32), titles=list("abcd"), nrow=2)
    assert isinstance(fig, Figure)
    assert cams.overlay_cams(x, torch.rand(4, 16, 16)).shape == (4, 16, 16, 3)


def test_widgets_construct_and_update():
    pytest.importorskip("ipywidgets")
    from dfkd.viz import widgets

    x = _images(6, 8)
    box = widgets.browse_images(x, labels=torch.tensor([0, 0, 1, 1, 2, 2]), class_names=["a", "b", "c"])
    cls, sample = box.children[0].children
    cls.value = 2
    sample.value = 1
    assert "class 2 (c)" in box.children[2].value and box.children[1].value[:4] == b"\x89PNG"
    box = widgets.browse_images(x)
    att = widgets.browse_attention(x, torch.rand(6, 4, 4))
    att.children[0].children[1].value = 0.9
    cam = widgets.browse_cams(x, np.random.rand(6, 8, 8))
    cam.children[0].children[0].value = 5
    assert all(hasattr(b, "children") for b in (box, att, cam))
