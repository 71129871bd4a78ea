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


# ------------------------------------------------------------------------------------------------
# maps and embeddings that mean something (issue 11)
# ------------------------------------------------------------------------------------------------
class PatchNet(nn.Module):
    """Class k's logit is the mean over the image of a 3x3 box filter of colour channel k (k = 0
    red, 1 green), through a stride-2 conv (the target layer, 12x16 for 24x32 inputs), ReLU and
    global average pooling: a red patch is the evidence for class 0, a green one for class 1, and
    nothing else moves either logit (constructed weights, no training)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for k in range(2):
                self.conv.weight[k, k] = 1.0 / 9
        self.target_layer = self.conv
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


H, W = 24, 32          # not square: a map with swapped axes cannot look right
RED = (slice(2, 8), slice(20, 28))      # rows, columns of the planted patches (asymmetric places)
GREEN = (slice(14, 22), slice(3, 11))


def _patch_images() -> torch.Tensor:
    """Two images on a faint noise background (< 0.1 in every channel): image 0 holds a red patch
    only, image 1 a red and a green patch."""
    x = 0.1 * torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    x[:, 0, RED[0], RED[1]] = 1.0
    x[1, 1, GREEN[0], GREEN[1]] = 1.0
    return x


def _inside(m: np.ndarray, box) -> np.ndarray:
    mask = np.zeros(m.shape, bool)
    mask[box] = True
    return mask


def _peak_on(m: np.ndarray, box) -> None:
    """The map's maximum lies in ``box``, the box is hot and the rest (beyond a 2 px margin, the
    reach of the 3x3 stride-2 receptive field and the upsampling) is cold."""
    inside = _inside(m, box)
    near = _inside(m, (slice(max(box[0].start - 2, 0), box[0].stop + 2),
                       slice(max(box[1].start - 2, 0), box[1].stop + 2)))
    row, col = np.unravel_index(np.argmax(m), m.shape)
    assert inside[row, col], f"peak at ({row}, {col}), outside the patch rows {box[0]} cols {box[1]}"
    assert m[inside].mean() > 0.6, m[inside].mean()
    assert m[~near].max() < 0.2, m[~near].max()


def test_gradcam_peaks_on_the_planted_patch_and_follows_targets():
    model = PatchNet().eval()
    x = _patch_images()
    assert model(x).argmax(1).tolist() == [0, 1]                # the green patch is the larger one
    with cams.GradCAMContext(model) as cam:
        predicted = cam(x)                                      # targets=None: each image's own class
        red = cam(x, targets=0)
        green = cam(x, targets=[1, 1])
        per_image = cam(x, targets=[0, 1])
    assert red.shape == (2, H, W)
    for i in range(2):
        _peak_on(red[i], RED)                                   # class 0 looks at the red patch
    _peak_on(green[1], GREEN)                                   # class 1 at the green one
    np.testing.assert_allclose(predicted[0], red[0], atol=1e-6)
    np.testing.assert_allclose(predicted[1], green[1], atol=1e-6)
    np.testing.assert_allclose(per_image[0], red[0], atol=1e-6)
    np.testing.assert_allclose(per_image[1], green[1], atol=1e-6)
    # another target moves the map from one patch to the other
    assert red[1][_inside(red[1], GREEN)].mean() < 0.2 and green[1][_inside(green[1], RED)].mean() < 0.2


def _knn_accuracy(points: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (majority vote)."""
    d = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    votes = np.stack([np.bincount(labels[row], minlength=labels.max() + 1) for row in nearest])
    return float((votes.argmax(1) == labels).mean())


def test_tsne_keeps_separated_clusters_apart_and_rows_aligned_with_labels():
    """4 Gaussian clusters in 64-D whose centres differ only in dimensions 8.. (the first two
    coordinates carry noise alone), rows in an arbitrary order: in 2-D a point's nearest
    neighbours are still of its own class, with the labels in the caller's row order."""
    rng = np.random.default_rng(0)
    k, per, dim = 4, 15, 64
    centres = np.zeros((k, dim))
    centres[:, 8:] = rng.normal(size=(k, dim - 8)) * 1.5        # pairwise >= 12 sigma apart
    labels = np.repeat(np.arange(k), per)
    feats = centres[labels] + rng.normal(size=(k * per, dim))
    order = rng.permutation(len(labels))                        # not grouped by class
    feats, labels = feats[order].astype(np.float32), labels[order]
    assert _knn_accuracy(feats, labels) == 1.0                  # separable in 64-D
    assert _knn_accuracy(feats[:, :2], labels) < 0.6            # not in the first two coordinates
    xy = embed.tsne_embed(torch.from_numpy(feats), seed=0, perplexity=10, max_iter=500)
    assert xy.shape == (len(labels), 2)
    assert _knn_accuracy(xy, labels) >= 0.95
