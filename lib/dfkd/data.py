"""Fine-grained datasets, transforms and loaders.

Scope: readers for CUB-200-2011, Stanford Cars, FGVC-Aircraft and Oxford-IIIT Pet in their
official on-disk layouts (nothing is ever downloaded), the embedded procedural ``toy_fgvc`` set
(rendered by :mod:`dfkd.toydata`), the paper's ImageNet-normalised transforms, seeded
DataLoaders, and a GPU path for small datasets (:func:`preload` + :func:`gpu_augment`).

Every dataset yields ``(image, label)``: image a float32 tensor (3, S, S) normalised with
ImageNet mean/std (roughly [-2.1, 2.6]); label an int in 0..K-1. It has ``.classes`` (K names)
and ``.targets`` (N ints). Choices the paper leaves open are in docs/decisions.md#data.
"""
from __future__ import annotations

import inspect
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dfkd import paths, toydata

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.35, 1.0)          # RandomResizedCrop area range (ours; see decisions)
TRAIN_SPLITS = ("train", "trainval", "train_minus_heldout")   # default train=True for these
SPLITS = {"toy_fgvc": ("train", "test"), "cub200": ("train", "test"),
          "cars196": ("train", "test", "heldout", "train_minus_heldout"),
          "aircraft": ("train", "val", "trainval", "test"), "pets": ("trainval", "train", "test")}


class DatasetError(Exception):
    """Base class of every data error raised here."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A root, metadata file or listed image is missing."""


class DatasetFormatError(DatasetError, ValueError):
    """Unknown name or split, malformed metadata, or an undecodable image."""


def resize_size(image_size: int) -> int:
    """Shorter side before cropping, as the paper's loader (Resize(256) -> crop 224): int(S*256/224)."""
    return int(image_size * 256 / 224)


def build_transform(image_size: int, train: bool, *, crop: str = "resized",
                    scale: tuple[float, float] = CROP_SCALE):
    """PIL image -> float tensor (3, S, S), ImageNet-normalised.

    train: Resize(shorter side R=int(S*256/224)) -> RandomResizedCrop(S, scale) (``crop="resized"``)
    or RandomCrop(S) (``crop="random"``, the paper's Aircraft loader) -> RandomHorizontalFlip.
    test: Resize(R) -> CenterCrop(S).
    """
    r = resize_size(image_size)
    if not train:
        head = [T.Resize(r), T.CenterCrop(image_size)]
    elif crop == "resized":
        head = [T.Resize(r), T.RandomResizedCrop(image_size, scale=scale), T.RandomHorizontalFlip()]
    elif crop == "random":
        head = [T.Resize(r), T.RandomCrop(image_size), T.RandomHorizontalFlip()]
    else:
        raise DatasetFormatError(f"crop must be 'resized' or 'random', got {crop!r}")
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ------------------------------------------------------------------------------------------
# File-backed datasets
# ------------------------------------------------------------------------------------------
def open_rgb(path: Path, crop_bottom: int = 0) -> Image.Image:
    """Decode an image file to RGB (grayscale/palette/RGBA converted); optionally drop bottom rows."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")      # also forces the full decode inside the try
    except FileNotFoundError:
        raise DatasetNotFoundError(f"image file missing: {path} (it is listed in the split files)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(f"cannot decode image {path}: {e}; expected a readable JPEG/PNG "
                                 "(re-copy the file from the dataset source)") from e
    if crop_bottom:
        im = im.crop((0, 0, im.width, max(1, im.height - crop_bottom)))
    return im


class ImageListDataset(Dataset):
    """A list of ``(path, label)`` read lazily with a PIL transform (None: items are PIL images).

    Attributes: ``classes`` (K names), ``targets`` (N ints), ``samples`` (N (Path, int)),
    ``root`` (the dataset folder), ``split``, ``transform``.
    """

    def __init__(self, name, root, split, samples, classes, transform, *, crop_bottom=0):
        missing = [p for p, _ in samples if not os.path.exists(p)]
        if missing:  # fail at construction, not mid-epoch
            raise DatasetNotFoundError(
                f"{name}: {len(missing)} of {len(samples)} images listed for split {split!r} are missing, "
                f"e.g. {missing[0]}" + (f", {missing[1]}" if len(missing) > 1 else "") +
                f"; expected them under {root} (re-copy the dataset or point DFKD_DATA/data_root elsewhere)")
        if not samples:
            raise DatasetFormatError(f"{name}: split {split!r} under {root} lists no images")
        self.name, self.root, self.split = name, Path(root), split
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.classes = list(classes)
        self.targets = [y for _, y in self.samples]
        self.transform = transform
        self.crop_bottom = crop_bottom
        self.crop_scale = CROP_SCALE          # for gpu_augment(scale=...)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image:
        """The i-th image as an RGB PIL image, before any transform."""
        return open_rgb(self.samples[i][0], self.crop_bottom)

    def __getitem__(self, i: int):
        img = self.load_image(i)
        return (self.transform(img) if self.transform else img), self.samples[i][1]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.classes)}, root='{self.root}')")


def _locate(root, folder: str, marker: str, title: str, expected: str) -> Path:
    """The dataset folder: ``root`` itself or ``root/folder``, whichever holds ``marker``."""
    source = ("the root argument" if root not in (None, "") else
              "$DFKD_DATA" if os.environ.get("DFKD_DATA") else "the default <project>/data")
    root = paths.data_root(root)
    for cand in (root, root / folder):
        if (cand / marker).exists():
            return cand
    raise DatasetNotFoundError(
        f"{title} not found: expected {root / marker} or {root / folder / marker} ({expected}). "
        f"Set DFKD_DATA or data_root to the folder that holds {folder}/ (root '{root}' came from {source})")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(f"missing {path}: {what}")
    return path


def _read_table(path: Path, what: str, ncols: int) -> list[list[str]]:
    """Whitespace-split rows (the last column keeps any spaces); skips blanks and '#' comments."""
    rows = []
    for n, line in enumerate(_need(path, what).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        row = line.strip().split(maxsplit=ncols - 1)
        if len(row) < ncols:
            raise DatasetFormatError(f"{path}:{n}: expected {ncols} columns ({what}), got {line!r}")
        rows.append(row)
    return rows


def _int(value: str, path: Path) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetFormatError(f"{path}: expected an integer id, got {value!r}") from None


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS[name]:
        raise DatasetFormatError(f"{name}: unknown split {split!r}; valid splits: {list(SPLITS[name])}")


def _transform(transform, image_size, train, split):
    """The given PIL transform, else the paper's (train-time iff ``train``, default by split)."""
    if transform is not None:
        return transform
    return build_transform(image_size, split in TRAIN_SPLITS if train is None else train)


def cub200(root=None, split="train", image_size=224, train=None, *, transform=None,
           max_classes: int = 0) -> ImageListDataset:
    """CUB-200-2011 (official layout). Classes = those in classes.txt whose image folder exists
    (first ``max_classes`` if > 0), relabelled 0..K-1 in class-id order. Splits: train, test."""
    _check_split("cub200", split)
    d = _locate(root, "CUB_200_2011", "images.txt", "CUB-200-2011",
                "images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/")
    paths_ = dict(_read_table(d / "images.txt", "CUB-200-2011 image list '<id> <path>'", 2))
    labels = dict(_read_table(d / "image_class_labels.txt", "CUB-200-2011 labels '<id> <class id>'", 2))
    is_train = dict(_read_table(d / "train_test_split.txt", "CUB-200-2011 split '<id> <0|1>'", 2))
    classes = [(_int(c, d / "classes.txt"), n)
               for c, n in _read_table(d / "classes.txt", "CUB-200-2011 classes '<id> <NNN.Name>'", 2)]
    present = sorted((c, n) for c, n in classes if (d / "images" / n).is_dir())
    if max_classes > 0:
        present = present[:max_classes]
    if not present:
        raise DatasetNotFoundError(f"no class folder of {d / 'classes.txt'} exists under {d / 'images'}")
    remap = {c: k for k, (c, _) in enumerate(present)}
    want = "1" if split == "train" else "0"
    samples = []
    for i, rel in paths_.items():
        if i not in labels or i not in is_train:
            raise DatasetFormatError(f"{d}: image id {i} ({rel}) has no label or split entry")
        c = _int(labels[i], d / "image_class_labels.txt")
        if c in remap and is_train[i] == want:
            samples.append((d / "images" / rel, remap[c]))
    names = [n.split(".", 1)[-1] for _, n in present]          # '001.Black_footed_Albatross' -> name
    tf = _transform(transform, image_size, train, split)
    return ImageListDataset("cub200", d, split, samples, names, tf)


def _loadmat(path: Path, key: str, what: str):
    from scipy.io import loadmat  # lazy: scipy is only needed for Cars
    try:
        return loadmat(_need(path, what), squeeze_me=True)[key]
    except (ValueError, KeyError, OSError) as e:
        raise DatasetFormatError(f"cannot read {path} ({what}, field {key!r}): {e}") from e


def _cars_annos(path: Path, what: str) -> list[tuple[str, int]]:
    """(file name, 0-based class) per annotation of a devkit .mat file."""
    return [(str(a["fname"]), int(a["class"]) - 1) for a in _loadmat(path, "annotations", what)]


def heldout_indices(targets, fraction: float, seed: int = 0) -> list[int]:
    """Stratified held-out subset: per class, round(fraction * n_c) (>= 1) items chosen by a
    permutation seeded with (seed, class). Returns sorted indices into ``targets``."""
    if not 0 < fraction < 1:
        raise DatasetFormatError(f"heldout_fraction must be in (0, 1), got {fraction}")
    targets = np.asarray(targets)
    out = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = min(len(idx) - 1, max(1, int(np.floor(fraction * len(idx) + 0.5))))
        out.extend(idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))[:k]].tolist())
    return sorted(out)


def cars196(root=None, split="train", image_size=224, train=None, *, transform=None,
            heldout_fraction: float = 0.2, split_seed: int = 0) -> ImageListDataset:
    """Stanford Cars (devkit layout). Splits: train (8,144), test (official; needs cars_test/),
    heldout / train_minus_heldout (a stratified partition of the TRAIN images -- not the official
    test set). The images here are already bounding-box crops: they are not cropped again."""
    _check_split("cars196", split)
    d = _locate(root, "stanford_cars", "devkit/cars_meta.mat", "Stanford Cars",
                "devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/")
    classes = [str(c) for c in _loadmat(d / "devkit" / "cars_meta.mat", "class_names", "class names")]
    if split == "test":
        if not (d / "cars_test").is_dir():
            raise DatasetNotFoundError(
                f"Stanford Cars test images are missing: expected {d / 'cars_test'}/ (only the labels "
                f"{d / 'cars_test_annos_withlabels.mat'} may be present). Use split='heldout' (with "
                "'train_minus_heldout' for training) for a held-out split of the train images")
        annos = _cars_annos(d / "cars_test_annos_withlabels.mat", "Stanford Cars test labels")
        samples = [(d / "cars_test" / f, y) for f, y in annos]
    else:
        annos = _cars_annos(d / "devkit" / "cars_train_annos.mat", "Stanford Cars train annotations")
        samples = [(d / "cars_train" / f, y) for f, y in annos]
        if split != "train":
            held = set(heldout_indices([y for _, y in samples], heldout_fraction, split_seed))
            samples = [s for i, s in enumerate(samples) if (i in held) == (split == "heldout")]
    tf = _transform(transform, image_size, train, split)
    return ImageListDataset("cars196", d, split, samples, classes, tf)


def aircraft(root=None, split="trainval", image_size=224, train=None, *, transform=None,
             crop_banner: bool = False) -> ImageListDataset:
    """FGVC-Aircraft, variant level (100 classes in variants.txt order). Splits: train, val,
    trainval, test. ``crop_banner`` drops the 20-px copyright banner at the bottom of each image."""
    _check_split("aircraft", split)
    d = _locate(root, "fgvc-aircraft-2013b", "data/variants.txt", "FGVC-Aircraft",
                "data/variants.txt, data/images_variant_<split>.txt, data/images/")
    classes = [r[0] for r in _read_table(d / "data" / "variants.txt", "one variant name per line", 1)]
    index = {c: k for k, c in enumerate(classes)}
    rows = _read_table(d / "data" / f"images_variant_{split}.txt", "lines '<image id> <variant>'", 2)
    bad = [v for _, v in rows if v not in index]
    if bad:
        raise DatasetFormatError(f"{d / 'data' / f'images_variant_{split}.txt'}: variant {bad[0]!r} "
                                 f"is not in {d / 'data' / 'variants.txt'}")
    samples = [(d / "data" / "images" / f"{i}.jpg", index[v]) for i, v in rows]
    tf = _transform(transform, image_size, train, split)
    return ImageListDataset("aircraft", d, split, samples, classes, tf, crop_bottom=20 if crop_banner else 0)


def pets(root=None, split="trainval", image_size=224, train=None, *, transform=None) -> ImageListDataset:
    """Oxford-IIIT Pet. Classes = the class ids present in trainval.txt + test.txt, relabelled
    0..K-1 in id order and named by image prefix. Splits: trainval (alias train), test."""
    _check_split("pets", split)
    split = "trainval" if split == "train" else split
    d = _locate(root, "oxford-iiit-pet", "annotations/trainval.txt", "Oxford-IIIT Pet",
                "annotations/trainval.txt, annotations/test.txt, images/")
    ann = d / "annotations"
    rows = {s: _read_table(ann / f"{s}.txt", "lines '<image> <class id> <species> <breed id>'", 4)
            for s in ("trainval", "test")}
    names = {_int(r[1], ann): r[0].rsplit("_", 1)[0] for s in rows.values() for r in s}  # id -> breed
    remap = {c: k for k, c in enumerate(sorted(names))}
    samples = [(d / "images" / f"{r[0]}.jpg", remap[int(r[1])]) for r in rows[split]]
    return ImageListDataset("pets", d, split, samples, [names[c] for c in sorted(names)],
                            _transform(transform, image_size, train, split))


# ------------------------------------------------------------------------------------------
# Embedded procedural dataset
# ------------------------------------------------------------------------------------------
class ToyFGVC(Dataset):
    """Procedural fine-grained birds (:mod:`dfkd.toydata`), generated at ``image_size``.

    ``images``: uint8 (N, 3, S, S) in memory. Items as the file-backed sets; train=True adds a
    horizontal flip and a random crop of the reflect-padded image (pad S//16), torch RNG.
    """

    crop_scale = (0.6, 1.0)  # milder than CROP_SCALE: the parts are a few px at 32 (decisions)

    def __init__(self, root=None, split="train", image_size=32, train=None, *, num_classes=10,
                 train_per_class=60, test_per_class=30, seed=0):
        # root is accepted (and ignored) so every DATASETS entry has the same signature
        _check_split("toy_fgvc", split)
        train = split == "train" if train is None else train
        per_class = train_per_class if split == "train" else test_per_class
        imgs, labels = toydata.generate(num_classes, per_class, seed, split, image_size)
        self.images = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
        self.targets = labels.tolist()
        self.classes = toydata.class_names(num_classes)
        self.attributes = toydata.class_attributes(num_classes)  # (K, 5) part codes
        self.split, self.image_size, self.train, self.name = split, image_size, train, "toy_fgvc"
        self._key = (num_classes, per_class, seed, split)
        self._pad, self._padded = max(1, image_size // 16), None
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())

    def render(self, size: int) -> torch.Tensor:
        """The same scenes rendered at another size: uint8 (N, 3, size, size)."""
        imgs, _ = toydata.generate(*self._key, size)
        return torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))

    def __getitem__(self, i: int):
        x = self.images[i]                                      # (3, S, S) uint8
        if self.train:  # random S x S window of the reflect-padded copy (a view) + flip
            if self._padded is None:  # pad all once: per-item padding/gathers are tiny ops that
                # multi-threaded torch makes ~10x slower on busy shared cores
                p = ((0, 0), (0, 0), (self._pad, self._pad), (self._pad, self._pad))
                self._padded = torch.from_numpy(np.pad(self.images.numpy(), p, mode="reflect"))
            s = self.image_size
            top, left = torch.randint(0, 2 * self._pad + 1, (2,)).tolist()
            x = self._padded[i, :, top:top + s, left:left + s]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x.float().div(255) - self._mean) / self._std, self.targets[i]

    def __repr__(self) -> str:
        return (f"ToyFGVC(split={self.split!r}, n={len(self)}, classes={len(self.classes)}, "
                f"size={self.image_size})")


# ------------------------------------------------------------------------------------------
# Registry and factory
# ------------------------------------------------------------------------------------------
DATASETS = {"toy_fgvc": ToyFGVC, "cub200": cub200, "cars196": cars196, "aircraft": aircraft, "pets": pets}


def create_dataset(name: str, root=None, split: str = "train", image_size: int = 224, *,
                   train: bool | None = None, **kw) -> Dataset:
    """Build a dataset by registry name.

    Args:
        root: data root or the dataset folder itself; None -> $DFKD_DATA -> <project>/data.
        train: train-time augmentation; default ``split in TRAIN_SPLITS``.
        kw: dataset options -- file-backed sets: transform (a PIL -> tensor callable replacing
            ``build_transform(image_size, train)``); cub200: max_classes; cars196:
            heldout_fraction, split_seed; aircraft: crop_banner; toy_fgvc: num_classes,
            train_per_class, test_per_class, seed.
    Returns a Dataset of ``(float (3, S, S) normalised, int label)`` with ``.classes``/``.targets``.
    """
    if name not in DATASETS:
        raise DatasetFormatError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    params = inspect.signature(DATASETS[name]).parameters.values()
    allowed = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise DatasetFormatError(f"{name}: unknown option(s) {unknown}; accepted: {allowed}")
    return DATASETS[name](root, split, image_size, split in TRAIN_SPLITS if train is None else train, **kw)


def default_splits(name: str, root=None) -> tuple[str, str]:
    """(train split, evaluation split) the workbench uses for ``name``. For cars196 without
    test images this is ("train_minus_heldout", "heldout") -- NOT the official test set."""
    if name not in DATASETS:
        raise DatasetFormatError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if name == "cars196":
        try:
            d = _locate(root, "stanford_cars", "devkit/cars_meta.mat", "Stanford Cars", "devkit/")
        except DatasetNotFoundError:
            return "train", "test"
        return ("train", "test") if (d / "cars_test").is_dir() else ("train_minus_heldout", "heldout")
    return {"aircraft": ("trainval", "test"), "pets": ("trainval", "test")}.get(name, ("train", "test"))


def dataset_kwargs(cfg) -> dict:
    """Dataset-specific kwargs for :func:`create_dataset` from a ``DataConfig``. The toy seed is
    not taken from the run seed: the dataset stays the same across training seeds."""
    if cfg.dataset == "toy_fgvc":
        return {"num_classes": cfg.toy_num_classes, "train_per_class": cfg.toy_train_per_class,
                "test_per_class": cfg.toy_test_per_class}
    if cfg.dataset == "cars196":
        return {"heldout_fraction": cfg.cars_heldout_fraction}
    return {}


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy/random follow it
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_size: int, *, train: bool, num_workers: int = 0, seed: int = 0,
                drop_last: bool | None = None) -> DataLoader:
    """DataLoader with a seeded order: shuffled iff ``train``; the same seed gives the same batches.

    ``drop_last`` defaults to ``train and len(dataset) >= batch_size`` (avoids a size-1 last batch
    in BatchNorm without emptying tiny smoke datasets).
    """
    if drop_last is None:
        drop_last = train and len(dataset) >= batch_size
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker,
                      generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# GPU path: decode once, augment batched on the device
# ------------------------------------------------------------------------------------------
def _decode_fixed(dataset, i: int, r: int) -> torch.Tensor:
    im = TF.center_crop(TF.resize(dataset.load_image(i), r), [r, r])  # shorter side r, centre r x r
    return torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1)


def preload(dataset, image_size: int, *, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once at R = int(S*256/224): shorter side R, centre crop R x R.

    Returns (uint8 (N, 3, R, R) in 0..255, not normalised; int64 labels (N,)). The toy set is
    re-rendered natively at R. ``num_workers`` > 0 decodes in threads (PIL releases the GIL).
    """
    r = resize_size(image_size)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    if hasattr(dataset, "render"):
        return dataset.render(r), labels
    fn = lambda i: _decode_fixed(dataset, i, r)  # noqa: E731
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            imgs = list(pool.map(fn, range(len(dataset))))
    else:
        imgs = [fn(i) for i in range(len(dataset))]
    return torch.stack(imgs), labels


def gpu_augment(images: torch.Tensor, *, train: bool, image_size: int, generator=None,
                scale: tuple[float, float] = CROP_SCALE,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Batched augmentation on the images' device.

    Args:
        images: uint8 (B, 3, R, R) from :func:`preload` (any R >= S).
        train: per-sample random-resized crop (area ``scale``, aspect ``ratio``) + horizontal flip,
            one affine ``grid_sample``; else the centre S x S crop (as CenterCrop).
        generator: torch.Generator (CPU or the images' device) for reproducible draws.
    Returns float32 (B, 3, S, S), ImageNet-normalised.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError("gpu_augment expects uint8 (B, 3, R, R) from preload(), "
                        f"got {images.dtype} {tuple(images.shape)}")
    x = images.float().div_(255)
    b, s = x.shape[0], image_size
    if train:
        gdev = generator.device if generator is not None else x.device
        u = torch.rand(b, 5, generator=generator, device=gdev).to(x.device)
        area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
        logr = torch.log(torch.tensor(ratio, device=x.device))
        aspect = torch.exp(logr[0] + (logr[1] - logr[0]) * u[:, 1])
        w = torch.sqrt(area * aspect).clamp(max=1.0)         # crop width / image width
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - w) * (2 * u[:, 2] - 1)                     # crop centre in [-1, 1] coords
        cy = (1 - h) * (2 * u[:, 3] - 1)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [b, 3, s, s], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        top = int(round((x.shape[-2] - s) / 2.0))            # same rounding as torchvision CenterCrop
        left = int(round((x.shape[-1] - s) / 2.0))
        x = x[:, :, top:top + s, left:left + s]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------
# Fixture writer (no Aircraft images are available)
# ------------------------------------------------------------------------------------------
def make_aircraft_fixture(root, variants=("707-320", "A320", "ATR-72"), per_split: int = 2,
                          size: int = 48) -> Path:
    """Write a tiny FGVC-Aircraft in the official layout under ``root/fgvc-aircraft-2013b``.

    ``per_split`` images per variant in each of train/val/test (trainval = train + val). Each JPEG
    is (size + 20) x int(1.5 * size): a coloured scene plus a 20-px white banner at the bottom,
    as the real images carry. Returns the dataset folder.
    """
    d = Path(root) / "fgvc-aircraft-2013b" / "data"
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    rng = np.random.default_rng(0)
    lines = {s: [] for s in ("train", "val", "test")}
    n = 0
    for split in lines:
        for k, v in enumerate(variants):
            for _ in range(per_split):
                n += 1
                img_id = f"{1000000 + n:07d}"
                px = np.zeros((size + 20, int(1.5 * size), 3), np.uint8)
                px[:size] = (np.array([60 + 60 * k, 120, 200 - 50 * k]) + rng.integers(0, 40, 3)) % 256
                px[size:] = 255                                # the banner
                Image.fromarray(px).save(d / "images" / f"{img_id}.jpg", quality=90)
                lines[split].append(f"{img_id} {v}\n")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, ls in lines.items():
        (d / f"images_variant_{split}.txt").write_text("".join(ls))
    return d.parent
