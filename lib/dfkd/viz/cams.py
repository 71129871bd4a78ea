"""Grad-CAM maps through pytorch-grad-cam, owned by a context manager.

``GradCAMContext`` registers the library's hooks on entry and, on exit, always removes them and
restores every module's ``training`` flag (``BaseCAM.__init__`` forces ``model.eval()``). It
never swallows exceptions; note that ``BaseCAM.__exit__`` itself swallows ``IndexError``, which
is why the library's own ``with`` support is not used. While maps are computed the parameters'
``requires_grad`` is switched off and the input gets the gradient instead, so a frozen teacher
works, the model's ``.grad`` buffers are left as they were, and ``torch.no_grad()`` around the
call does not matter.

A model is any ``nn.Module`` returning logits (B, K); ``dfkd.models.FeatureNet`` exposes
``.target_layer`` (its last conv stage), the default layer here.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dfkd.viz.grids import to_numpy, to_numpy_images
from dfkd.viz.style import new_figure, style_context


class GradCAMContext:
    """``with GradCAMContext(model) as cam: maps = cam(images)`` -> (B, H, W) in [0, 1].

    Args:
        model: ``nn.Module`` mapping normalised images (B, 3, H, W) to logits (B, K).
        target_layer: module whose output is explained; default ``model.target_layer``.
        reshape_transform: passed to pytorch-grad-cam (for non-CNN layers).
    """

    def __init__(self, model, target_layer=None, *, reshape_transform=None):
        self.model = model
        self.target_layer = target_layer if target_layer is not None else getattr(model, "target_layer", None)
        if self.target_layer is None:
            raise ValueError("pass target_layer= (the model has no .target_layer attribute)")
        self.reshape_transform = reshape_transform
        self._cam = None
        self._modes: list = []

    def __enter__(self) -> "GradCAMContext":
        from pytorch_grad_cam import GradCAM
        self._modes = [(m, m.training) for m in self.model.modules()]
        try:
            self._cam = GradCAM(model=self.model, target_layers=[self.target_layer],
                                reshape_transform=self.reshape_transform)
            # GradCAM.__init__ does not take it; BaseCAM.forward reads the attribute
            self._cam.compute_input_gradient = True
        except BaseException:
            self._restore_modes()
            raise
        return self

    def __call__(self, images, targets: int | Sequence | None = None) -> np.ndarray:
        """Maps for ``images`` (B, 3, H, W), normalised as the model expects.

        Args:
            targets: None (each image's predicted class), one class index for all images, a
                sequence of B class indices, or pytorch-grad-cam target objects.
        Returns:
            float32 array (B, H, W) in [0, 1], at the input resolution.
        """
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self._cam is None:
            raise RuntimeError("GradCAMContext must be used inside a `with` block")
        if targets is not None:
            if isinstance(targets, int) or (hasattr(targets, "ndim") and targets.ndim == 0):
                targets = [int(targets)] * len(images)
            targets = [ClassifierOutputTarget(int(t)) if not callable(t) else t for t in targets]
        if hasattr(images, "detach"):
            images = images.detach()  # never backpropagate into whatever produced the images
        params = list(self.model.parameters())
        saved = [(p, p.requires_grad, p.grad) for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                maps = self._cam(input_tensor=images, targets=targets)
        finally:
            for p, flag, grad in saved:  # BaseCAM calls model.zero_grad(): put .grad back
                p.requires_grad_(flag)
                p.grad = grad
        return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)

    def _restore_modes(self) -> None:
        for module, mode in self._modes:
            module.training = mode  # per module: a frozen BN stays in eval inside a training model
        self._modes = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._cam is not None:
                self._cam.activations_and_grads.release()
        finally:
            self._cam = None
            self._restore_modes()
        return False


def compute_cams(model, images, target_layer=None, targets: int | Sequence | None = None) -> np.ndarray:
    """Grad-CAM maps (B, H, W) in [0, 1] for normalised ``images`` (B, 3, H, W)."""
    with GradCAMContext(model, target_layer) as cam:
        return cam(images, targets)


def overlay_cams(images_01: Any, cams: Any, *, image_weight: float = 0.5) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] with their maps (B, h, w) -> uint8 RGB (B, H, W, 3)."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    imgs = to_numpy_images(images_01)
    maps = to_numpy(cams)
    if len(maps) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(maps)} maps")
    out = []
    for img, m in zip(imgs, maps):
        if m.shape != img.shape[:2]:
            m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
        out.append(show_cam_on_image(img, np.clip(m, 0, 1), use_rgb=True, image_weight=image_weight))
    return np.stack(out)


def cam_overlay_figure(images_01: Any, cams: Any, titles: Sequence[str] | None = None, *,
                       nrow: int = 8, image_weight: float = 0.5, title: str | None = None,
                       cell: float = 1.0):
    """Grid of Grad-CAM overlays (images in [0, 1], maps in [0, 1]); returns a Figure."""
    over = overlay_cams(images_01, cams, image_weight=image_weight)
    n = len(over)
    ncols = max(1, min(nrow, n))
    nrows = -(-n // ncols)
    extra = 0.18 if titles is not None else 0.0
    with style_context():
        fig = new_figure((ncols * cell, nrows * (cell + extra) + (0.35 if title else 0.0)))
        axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=dict(
            wspace=0.04, hspace=0.25 if titles is not None else 0.04, left=0.01, right=0.995,
            bottom=0.005, top=1.0 - (0.35 / fig.get_figheight() if title else 0.005)))
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i < n:
                ax.imshow(over[i], interpolation="nearest")
                if titles is not None:
                    ax.set_title(str(titles[i]), fontsize=6, pad=1.5)
        if title:
            fig.suptitle(title)
    return fig
