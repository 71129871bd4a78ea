"""Procedural fine-grained "toy birds": the embedded default dataset (no files, no downloads).

Scope: the class design (which part attributes make a class), scene sampling (the nuisance
variables of each image) and a vectorised numpy renderer. The torch ``Dataset`` wrapper and its
transforms live in :mod:`dfkd.data` (``create_dataset("toy_fgvc", ...)``).

What makes it fine-grained (see docs/decisions.md#data):
- every class shares ONE global structure: a stylised bird (tail wedge, body ellipse, wing
  ellipse, round head) drawn in the same layout;
- classes differ ONLY in five small local parts -- beak shape, beak colour, eye-ring colour,
  wing-bar pattern, crown patch -- and any two classes differ in at least two of them;
- the nuisance variation is large and shared by all classes: pose (rotation, mirror), scale,
  position, body colour, illumination, background colour/texture, a perch branch, pixel noise.

Geometry is defined in resolution-free "bird units" (x forward, y up, about 1.1 units from tail
to beak tip), so one scene renders at any size. Rendering is supersampled (2x below 128 px) and
box-filtered down for anti-aliasing.
"""
from __future__ import annotations

import functools

import numpy as np

PARTS: dict[str, tuple[str, ...]] = {
    "beak_shape": ("short", "long", "hooked"),
    "beak_colour": ("yellow", "orange", "black", "ivory"),
    "eye_ring": ("none", "white", "red", "yellow"),
    "wing_bar": ("none", "single", "double"),
    "crown": ("none", "red", "yellow", "blue"),
}
COLOURS = {  # saturated part colours (RGB in [0, 1]); body/background colours are muted
    "yellow": (0.96, 0.84, 0.10), "orange": (0.95, 0.42, 0.08), "black": (0.06, 0.06, 0.06),
    "ivory": (0.93, 0.91, 0.80), "white": (0.98, 0.98, 0.98), "red": (0.86, 0.08, 0.10),
    "blue": (0.12, 0.32, 0.92),
}
_CLASS_DESIGN_SEED = 2023   # fixed: the class definitions never depend on the data seed
_MIN_PART_DIFF = 2          # any two classes differ in >= 2 of the 5 parts


@functools.lru_cache(maxsize=None)
def _class_code() -> np.ndarray:
    """All attribute combinations in a fixed random order, greedily kept at Hamming distance >= 2.

    Returns int array (C_max, 5); row k is class k's part attributes (indices into PARTS).
    """
    sizes = [len(v) for v in PARTS.values()]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, len(sizes))
    grid = grid[np.random.default_rng(_CLASS_DESIGN_SEED).permutation(len(grid))]
    kept: list[np.ndarray] = []
    for row in grid:
        if all((row != k).sum() >= _MIN_PART_DIFF for k in kept):
            kept.append(row)
    return np.stack(kept)


def max_classes() -> int:
    """How many classes the design admits (all pairwise >= 2 parts apart)."""
    return len(_class_code())


def class_attributes(num_classes: int) -> np.ndarray:
    """Part attributes of the first ``num_classes`` classes: int array (K, 5), columns = PARTS keys."""
    if not 2 <= num_classes <= max_classes():
        raise ValueError(f"toy_fgvc num_classes must be in 2..{max_classes()}, got {num_classes}")
    return _class_code()[:num_classes].copy()


def class_names(num_classes: int) -> list[str]:
    """Readable names, e.g. ``'03_hooked-black-beak_red-ring_single-bar_blue-crown'``."""
    names = []
    for k, a in enumerate(class_attributes(num_classes)):
        v = {p: PARTS[p][i] for p, i in zip(PARTS, a)}
        names.append(f"{k:02d}_{v['beak_shape']}-{v['beak_colour']}-beak_{v['eye_ring']}-ring_"
                     f"{v['wing_bar']}-bar_{v['crown']}-crown")
    return names


# ------------------------------------------------------------------------------------------
# Scenes: every random choice of an image, drawn once per split (independent of resolution)
# ------------------------------------------------------------------------------------------
def _muted_rgb(rng, n, sat, val) -> np.ndarray:
    """(n, 3) RGB from random hue, saturation in ``sat``, value in ``val`` (HSV -> RGB)."""
    h = rng.uniform(0, 1, n)
    s = rng.uniform(*sat, n)
    v = rng.uniform(*val, n)
    k = (np.array([5, 3, 1])[None] + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def sample_scenes(labels: np.ndarray, attrs: np.ndarray, rng: np.random.Generator) -> dict:
    """Per-image parameters for ``labels`` (N,) given class attributes ``attrs`` (K, 5)."""
    n = len(labels)
    return {
        "parts": attrs[labels],                                  # (N, 5) the ONLY class signal
        "angle": rng.uniform(-0.5, 0.5, n),                      # rad, about +-29 deg
        "mirror": np.where(rng.random(n) < 0.5, -1.0, 1.0),       # facing left / right
        "scale": rng.uniform(0.50, 0.72, n),                     # image widths per bird unit
        "centre": rng.uniform(0.40, 0.60, (n, 2)),               # body centre, image fraction
        "body": _muted_rgb(rng, n, (0.05, 0.45), (0.35, 0.80)),
        "wing_shade": rng.uniform(0.55, 0.80, n),
        "bg": _muted_rgb(rng, n, (0.10, 0.50), (0.30, 0.90)),
        "tex_freq": rng.uniform(-6.0, 6.0, (n, 2, 2)),           # 2 waves x (fu, fv) cycles/image
        "tex_phase": rng.uniform(0, 2 * np.pi, (n, 2)),
        "tex_amp": rng.uniform(0.03, 0.12, (n, 2)),
        "perch": rng.uniform([-0.4, 0.70], [0.4, 0.95], (n, 2)),  # branch angle (rad), height
        "perch_on": rng.random(n) < 0.7,
        "light": rng.uniform(0.75, 1.15, n),                     # global illumination (parts too)
        "noise": rng.uniform(0.01, 0.05, n),                     # pixel noise std
    }


def _paint(img, mask, colour):
    """img (n,H,W,3) <- colour (n,3) where mask (n,H,W)."""
    np.copyto(img, colour[:, None, None, :], where=mask[..., None])


def _part_rgb(codes: np.ndarray, part: str, body: np.ndarray) -> np.ndarray:
    """(n, 3) colour of ``part`` per image; code 0 ("none") means the body colour."""
    table = np.array([(0, 0, 0)] + [COLOURS[c] for c in PARTS[part][1:]], np.float32)
    return np.where((codes == 0)[:, None], body, table[codes])


def render(scenes: dict, size: int, noise_rng: np.random.Generator, chunk: int = 128) -> np.ndarray:
    """Render scenes at ``size`` px: uint8 array (N, size, size, 3)."""
    n = len(scenes["angle"])
    ss = 2 if size < 128 else 1                      # supersampling factor (anti-aliasing)
    hr = size * ss
    out = np.empty((n, size, size, 3), np.uint8)
    t = (np.arange(hr, dtype=np.float32) + 0.5) / hr  # pixel centres in [0, 1]
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        s = {k: v[sl] for k, v in scenes.items()}
        m = len(s["angle"])
        e = lambda a: np.asarray(a, np.float32)[:, None, None]  # noqa: E731  (m,) -> (m,1,1)
        b = lambda a: np.asarray(a, bool)[:, None, None]         # noqa: E731
        u, v = t[None, None, :], t[None, :, None]                # image x right, y down
        # background: base colour + two oriented sinusoid textures
        f = s["tex_freq"]
        tex = sum(e(s["tex_amp"][:, i]) * np.sin(2 * np.pi * (e(f[:, i, 0]) * u + e(f[:, i, 1]) * v)
                                                 + e(s["tex_phase"][:, i])) for i in range(2))
        img = np.clip(s["bg"][:, None, None, :].astype(np.float32) + tex[..., None], 0, 1)
        # perch: a brown branch under the bird (clutter shared by all classes)
        pa, ph = e(s["perch"][:, 0]), e(s["perch"][:, 1])
        dist = np.abs((v - ph) * np.cos(pa) - (u - 0.5) * np.sin(pa))
        _paint(img, (dist < 0.035) & b(s["perch_on"]), np.tile([[0.35, 0.22, 0.10]], (m, 1)))
        # object frame: translate, rotate, scale, mirror  (x forward, y up, bird units)
        du, dv = u - e(s["centre"][:, 0]), -(v - e(s["centre"][:, 1]))
        ca, sa, sc = np.cos(e(s["angle"])), np.sin(e(s["angle"])), e(s["scale"])
        x = (ca * du + sa * dv) / sc * e(s["mirror"])
        y = (-sa * du + ca * dv) / sc
        body = s["body"].astype(np.float32)
        p = s["parts"]
        # global structure (identical for every class)
        tail = (x > -0.56) & (x < -0.20) & (np.abs(y + 0.02) < 0.03 + 0.45 * (-0.20 - x))
        _paint(img, tail, body * 0.7)
        _paint(img, (x / 0.32) ** 2 + (y / 0.18) ** 2 <= 1, body)
        wing = ((x + 0.05) / 0.22) ** 2 + ((y - 0.03) / 0.10) ** 2 <= 1
        _paint(img, wing, body * s["wing_shade"][:, None])
        # part: wing bar(s), white, across the wing
        bars = (b(p[:, 3] == 1) & (np.abs(x + 0.03) < 0.04)) | \
               (b(p[:, 3] == 2) & ((np.abs(x + 0.12) < 0.035) | (np.abs(x - 0.05) < 0.035)))
        _paint(img, wing & bars, np.tile([COLOURS["white"]], (m, 1)))
        hx, hy, hr_ = 0.30, 0.15, 0.14
        head = (x - hx) ** 2 + (y - hy) ** 2 <= hr_ ** 2
        _paint(img, head, body)
        # part: crown patch on top of the head
        _paint(img, head & (y > hy + 0.055), _part_rgb(p[:, 4], "crown", body))
        # part: beak, attached to the front of the head
        bx = x - (hx + hr_ - 0.03)                                      # 0 at the beak base
        length = np.array([0.11, 0.22, 0.13], np.float32)[p[:, 0]]
        base_w = np.array([0.055, 0.028, 0.070], np.float32)[p[:, 0]]
        frac = np.clip(bx / e(length), 0, 1)
        centre_y = hy - 0.02 - e(p[:, 0] == 2) * 3.0 * np.clip(bx, 0, None) ** 2  # hooked: tip bends down
        beak = (bx >= 0) & (bx <= e(length)) & (np.abs(y - centre_y) <= e(base_w) * (1 - frac) ** 0.8)
        _paint(img, beak, np.array([COLOURS[c] for c in PARTS["beak_colour"]], np.float32)[p[:, 1]])
        # part: eye ring (annulus) and the eye itself
        r2 = (x - 0.345) ** 2 + (y - 0.175) ** 2
        _paint(img, r2 < 0.062 ** 2, _part_rgb(p[:, 2], "eye_ring", body))
        _paint(img, r2 < 0.030 ** 2, np.tile([COLOURS["black"]], (m, 1)))
        # box-filter down, add pixel noise
        img = img.reshape(m, size, ss, size, ss, 3).mean((2, 4)) * e(s["light"])[..., None]
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * e(s["noise"])[..., None]
        out[sl] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=8)
def _scenes(num_classes: int, per_class: int, seed: int, split: str):
    """Scenes + labels of one split. Train and test come from disjoint SeedSequence children."""
    child = np.random.SeedSequence(seed).spawn(2)[{"train": 0, "test": 1}[split]]
    scene_ss, noise_ss = child.spawn(2)
    labels = np.tile(np.arange(num_classes), per_class)        # interleaved: 0,1,..,K-1,0,1,..
    scenes = sample_scenes(labels, class_attributes(num_classes), np.random.default_rng(scene_ss))
    return scenes, labels, noise_ss


@functools.lru_cache(maxsize=8)
def generate(num_classes: int, per_class: int, seed: int, split: str, size: int):
    """One split rendered at ``size``: (uint8 array (N, size, size, 3), int64 labels (N,)).

    Deterministic in (num_classes, per_class, seed, split, size); cached in memory (treat the
    returned arrays as read-only).
    """
    if split not in ("train", "test"):
        raise ValueError(f"toy_fgvc split must be 'train' or 'test', got {split!r}")
    if per_class < 1 or size < 8:
        raise ValueError(f"toy_fgvc needs per_class >= 1 and size >= 8, got {per_class}, {size}")
    scenes, labels, noise_ss = _scenes(num_classes, per_class, seed, split)
    images = render(scenes, size, np.random.default_rng(noise_ss))
    images.setflags(write=False)
    return images, labels
