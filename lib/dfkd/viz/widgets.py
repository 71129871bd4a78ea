"""ipywidgets browsers for notebooks run interactively (``interactive=True``).

Each function returns a widget (display it, or let it be the cell's last expression); the static
figures in ``grids``/``cams`` are the fallback that batches and papers use. ipywidgets is imported
inside the functions, so importing this module (or ``dfkd.viz``) does not need it. Images are
shown as PNG bytes in ``widgets.Image`` (no matplotlib round trip, instant slider updates), each at a
fixed ``DISPLAY_PX`` box so a 32 px sample is not stretched to the cell width.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from dfkd.viz.grids import IMAGENET_MEAN, IMAGENET_STD, normalize_maps, to_numpy, to_numpy_images


DISPLAY_PX = 256  # on-screen size of every image widget (CSS px): never stretched to the cell width


def _image_widget(px: int = DISPLAY_PX):
    """A ``widgets.Image`` shown at a fixed ``px`` x ``px`` box (aspect kept, pixels not smoothed)."""
    import ipywidgets as w
    return w.Image(format="png", width=px, height=px, layout=w.Layout(
        width=f"{px}px", height=f"{px}px", object_fit="contain", flex="0 0 auto"))


def _column(children):
    """A VBox whose children keep their own width (controls, images and caption stay together)."""
    import ipywidgets as w
    return w.VBox(children, layout=w.Layout(align_items="flex-start", width="auto"))


def _png(rgb: np.ndarray, min_size: int = 192) -> bytes:
    """(H, W, 3) float in [0, 1] or uint8 -> PNG bytes, upscaled (nearest) to ``min_size`` px."""
    from PIL import Image
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(rgb)
    scale = max(1, -(-min_size // max(img.size)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png")
    return buf.getvalue()


def _blend(img: np.ndarray, heat: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    import matplotlib
    from PIL import Image
    h, w = img.shape[:2]
    if heat.shape != (h, w):  # stretch a low-resolution map over the image
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((w, h), Image.BILINEAR))
    rgb = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return (1 - alpha) * img + alpha * rgb


def browse_images(images: Any, labels: Any = None, class_names: Sequence[str] | None = None, *,
                  denormalize: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD):
    """Browse (B, 3, H, W) images: a class selector (when ``labels`` are given) and a sample slider."""
    import ipywidgets as w

    imgs = to_numpy_images(images, denormalize=denormalize, mean=mean, std=std)
    labs = None if labels is None else to_numpy(labels).astype(int).reshape(-1)
    by_class = ({int(c): np.flatnonzero(labs == c) for c in np.unique(labs)} if labs is not None
                else {-1: np.arange(len(imgs))})
    name = (lambda c: class_names[c] if class_names is not None else str(c))
    cls = w.Dropdown(options=[(f"{c}: {name(c)}", c) for c in by_class] if labs is not None else [("all", -1)],
                     description="class")
    sample = w.IntSlider(min=0, max=len(by_class[cls.value]) - 1, description="sample")
    view, caption = _image_widget(), w.Label()

    def update(*_):
        idx = by_class[cls.value]
        sample.max = len(idx) - 1
        i = int(idx[min(sample.value, len(idx) - 1)])
        view.value = _png(imgs[i])
        lab = f"class {labs[i]} ({name(labs[i])}) · " if labs is not None else ""
        caption.value = f"{lab}sample {sample.value + 1}/{len(idx)} · index {i}"

    cls.observe(update, names="value")
    sample.observe(update, names="value")
    update()
    return _column([w.HBox([cls, sample]), view, caption])


def browse_attention(images: Any, maps: Any, *, cmap: str = "jet", denormalize: bool = False,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Browse images (B, 3, H, W) beside their attention maps (B, h, w) blended with ``alpha``."""
    import ipywidgets as w

    imgs = to_numpy_images(images, denormalize=denormalize, mean=mean, std=std)
    heat = normalize_maps(maps)
    if len(heat) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(heat)} maps")
    index = w.IntSlider(min=0, max=len(imgs) - 1, description="image")
    alpha = w.FloatSlider(min=0.0, max=1.0, step=0.05, value=0.5, description="alpha")
    left, right = _image_widget(), _image_widget()

    def update(*_):
        left.value = _png(imgs[index.value])
        right.value = _png(_blend(imgs[index.value], heat[index.value], alpha.value, cmap))

    index.observe(update, names="value")
    alpha.observe(update, names="value")
    update()
    return _column([w.HBox([index, alpha]), w.HBox([left, right])])


def browse_cams(images: Any, cams: Any, *, image_weight: float = 0.5):
    """Browse Grad-CAM overlays: images (B, 3, H, W) in [0, 1] and maps (B, H, W) in [0, 1]."""
    import ipywidgets as w

    from dfkd.viz.cams import overlay_cams

    imgs = to_numpy_images(images)
    maps = to_numpy(cams)
    if len(maps) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(maps)} maps")
    index = w.IntSlider(min=0, max=len(imgs) - 1, description="image")
    weight = w.FloatSlider(min=0.0, max=1.0, step=0.05, value=image_weight, description="image weight")
    left, right = _image_widget(), _image_widget()

    def update(*_):
        i = index.value
        left.value = _png(imgs[i])
        right.value = _png(overlay_cams(imgs[i:i + 1].transpose(0, 3, 1, 2), maps[i:i + 1],
                                        image_weight=weight.value)[0])

    index.observe(update, names="value")
    weight.observe(update, names="value")
    update()
    return _column([w.HBox([index, weight]), w.HBox([left, right])])
