"""dfkd.data: real-data loaders (shared_data), the Aircraft fixture, the toy set, errors, GPU path."""
from __future__ import annotations

import collections
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dfkd import data, paths, toydata
from dfkd.config import DataConfig

S = 32  # every real-data item check runs at 32 px (cheap)


def _check_items(ds, idx, k):
    for i in idx:
        x, y = ds[i]
        assert x.shape == (3, S, S) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert -2.2 < x.min() and x.max() < 2.7          # ImageNet-normalised [0, 1] pixels
        assert isinstance(y, int) and 0 <= y < k and y == ds.targets[i]


# ---------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("size", [224, 112, 64, 32])
def test_build_transform_sizes_and_normalisation(size):
    img = Image.new("RGB", (150, 100), tuple(int(round(m * 255)) for m in data.IMAGENET_MEAN))
    for train in (True, False):
        x = data.build_transform(size, train)(img)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.abs().max() < 0.02                      # the mean colour maps to ~0
    assert data.build_transform(size, True, crop="random")(img).shape == (3, size, size)
    assert data.resize_size(224) == 256 and data.resize_size(32) == 36


def test_build_transform_rejects_unknown_crop():
    with pytest.raises(data.DatasetError, match="crop"):
        data.build_transform(32, True, crop="centre")


# ---------------------------------------------------------------------------- CUB
@pytest.fixture(scope="module")
def cub(shared_data):
    return {s: data.create_dataset("cub200", shared_data, s, S) for s in ("train", "test")}


def test_cub_matches_provenance(cub, shared_data):
    tr, te = cub["train"], cub["test"]
    assert (len(tr), len(te)) == (1500, 1389)
    assert len(tr.classes) == 50 and tr.classes == te.classes
    assert tr.classes[0] == "Black_footed_Albatross" and tr.classes[-1] == "Eared_Grebe"
    assert collections.Counter(tr.targets) == {k: 30 for k in range(50)}
    counts = collections.Counter(te.targets)
    assert (counts[4], counts[5], counts[0]) == (14, 11, 30)  # class ids 5, 6, 1
    assert not {p for p, _ in tr.samples} & {p for p, _ in te.samples}
    itself = data.create_dataset("cub200", shared_data / "CUB_200_2011", "train", S)  # the folder itself
    assert itself.samples == tr.samples
    _check_items(tr, [0, 777, 1499], 50)
    _check_items(te, [0, 1388], 50)


def test_cub_max_classes_and_grayscale(shared_data, cub):
    ds = data.create_dataset("cub200", shared_data, "train", S, max_classes=5)
    assert len(ds.classes) == 5 and len(ds) == 150 and set(ds.targets) == set(range(5))
    # PROVENANCE: 2 source images stay single-channel; this is one of them
    hits = [(ds, i) for ds in cub.values() for i, (p, _) in enumerate(ds.samples)
            if p.name == "Brewer_Blackbird_0028_2682.jpg"]
    assert len(hits) == 1
    ds, i = hits[0]
    assert Image.open(ds.samples[i][0]).mode == "L"
    assert ds.load_image(i).mode == "RGB" and ds[i][0].shape == (3, S, S)


# ---------------------------------------------------------------------------- Cars
@pytest.fixture(scope="module")
def cars(shared_data):
    return {s: data.create_dataset("cars196", shared_data, s, S)
            for s in ("train", "heldout", "train_minus_heldout")}


def test_cars_train_matches_provenance(cars):
    tr = cars["train"]
    assert len(tr) == 8144 and len(tr.classes) == 196 and set(tr.targets) == set(range(196))
    assert tr.classes[0] == "AM General Hummer SUV 2000"
    c = collections.Counter(tr.targets)
    assert (c[0], c[135], c[118]) == (45, 24, 68)       # 1-based ids 1, 136, 119
    assert tr.samples[0][0].name == "00001.jpg"
    _check_items(tr, [0, 4000, 8143], 196)


def test_cars_heldout_is_a_stratified_deterministic_partition(cars, shared_data):
    tr, ho, rest = cars["train"], cars["heldout"], cars["train_minus_heldout"]
    hp, rp = {p for p, _ in ho.samples}, {p for p, _ in rest.samples}
    assert not hp & rp and hp | rp == {p for p, _ in tr.samples} and len(ho) + len(rest) == 8144
    n, h = collections.Counter(tr.targets), collections.Counter(ho.targets)
    assert all(h[k] == int(np.floor(0.2 * n[k] + 0.5)) for k in range(196))   # per class
    assert ho.classes == tr.classes
    _check_items(ho, [0, len(ho) - 1], 196)
    again = data.create_dataset("cars196", shared_data, "heldout", S)
    assert again.samples == ho.samples                  # deterministic
    other = data.create_dataset("cars196", shared_data, "heldout", S, split_seed=1)
    assert other.samples != ho.samples and len(other) == len(ho)
    half = data.create_dataset("cars196", shared_data, "heldout", S, heldout_fraction=0.5)
    assert 0.45 * 8144 < len(half) < 0.55 * 8144
    assert ho.transform.transforms[1].__class__.__name__ == "CenterCrop"   # eval transform
    assert data.default_splits("cars196", shared_data) == ("train_minus_heldout", "heldout")


def test_cars_official_test_missing_suggests_heldout(shared_data):
    with pytest.raises(data.DatasetNotFoundError, match="heldout") as e:
        data.create_dataset("cars196", shared_data, "test", S)
    assert "cars_test" in str(e.value)


# ---------------------------------------------------------------------------- Pets
def test_pets_matches_provenance(shared_data):
    tv = data.create_dataset("pets", shared_data, "trainval", S)
    te = data.create_dataset("pets", shared_data / "oxford-iiit-pet", "test", S)
    assert (len(tv), len(te)) == (300, 298)
    assert tv.classes == te.classes == ["Abyssinian", "american_bulldog", "Bengal"]
    assert collections.Counter(te.targets) == {0: 98, 1: 100, 2: 100}
    assert data.create_dataset("pets", shared_data, "train", S).samples == tv.samples  # alias
    _check_items(tv, [0, 150, 299], 3)
    _check_items(te, [0, 297], 3)


# ---------------------------------------------------------------------------- Aircraft
def test_aircraft_fixture_layout_and_loader(tmp_path):
    root = data.make_aircraft_fixture(tmp_path, variants=("707-320", "A320", "ATR-72", "Boeing 717"))
    assert (root / "data" / "images_variant_trainval.txt").read_text().splitlines()[0].count(" ") == 1
    sizes = {s: len(data.create_dataset("aircraft", tmp_path, s, S))
             for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 8, "val": 8, "trainval": 16, "test": 8}
    ds = data.create_dataset("aircraft", root, "trainval", S)
    assert ds.classes == ["707-320", "A320", "ATR-72", "Boeing 717"]
    assert collections.Counter(ds.targets) == {0: 4, 1: 4, 2: 4, 3: 4}
    _check_items(ds, range(len(ds)), 4)
    full = ds.load_image(0)
    cropped = data.create_dataset("aircraft", root, "test", S, crop_banner=True).load_image(0)
    assert full.size == (72, 68) and cropped.size == (72, 48)
    assert np.asarray(full)[-1].min() > 240 and np.asarray(cropped)[-1].max() < 240  # banner gone


# ---------------------------------------------------------------------------- toy_fgvc
def _fresh_toy(**kw):
    toydata.generate.cache_clear()
    toydata._scenes.cache_clear()
    return data.create_dataset("toy_fgvc", split=kw.pop("split", "train"), image_size=S, train=False, **kw)


def test_toy_is_deterministic_and_seeded():
    kw = dict(num_classes=4, train_per_class=5, test_per_class=3)
    a, b = _fresh_toy(seed=0, **kw), _fresh_toy(seed=0, **kw)
    assert torch.equal(a.images, b.images) and a.targets == b.targets
    assert torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a.images, _fresh_toy(seed=1, **kw).images)
    te = _fresh_toy(seed=0, split="test", **kw)
    assert len(a) == 20 and len(te) == 12 and a.targets[:4] == [0, 1, 2, 3]
    flat_tr, flat_te = a.images.flatten(1), te.images.flatten(1)
    assert (torch.cdist(flat_tr.float(), flat_te.float()) > 0).all()  # disjoint seed streams
    for size in (16, 64):
        t = data.create_dataset("toy_fgvc", split="test", image_size=size, **kw)
        assert t[0][0].shape == (3, size, size)
    aug = data.create_dataset("toy_fgvc", split="train", image_size=S, **kw)  # train=True default
    assert aug.train and aug[0][0].shape == (3, S, S)


def test_toy_class_structure():
    attrs = toydata.class_attributes(20)
    diff = (attrs[:, None] != attrs[None]).sum(-1)
    assert (diff[~np.eye(20, dtype=bool)] >= 2).all()                 # >= 2 parts apart
    names = toydata.class_names(20)
    assert len(set(names)) == 20 and names[0].startswith("00_")
    with pytest.raises(ValueError, match="num_classes"):
        toydata.class_attributes(toydata.max_classes() + 1)
    # same nuisance, different class: only a small, local set of pixels changes
    rng = np.random.default_rng(7)
    scenes = toydata.sample_scenes(np.zeros(16, int), attrs, rng)
    other = dict(scenes, parts=np.tile(attrs[1], (16, 1)))
    a = toydata.render(scenes, 64, np.random.default_rng(0)).astype(int)
    b = toydata.render(other, 64, np.random.default_rng(0)).astype(int)
    changed = (np.abs(a - b).max(-1) > 10).mean((1, 2))              # per-image fraction of pixels
    assert (changed > 0.001).all() and (changed < 0.06).all()
    # nuisance variation dominates: class means differ far less than images within a class
    imgs, labels = toydata.generate(10, 30, 0, "test", S)
    x = imgs.reshape(len(imgs), -1).astype(np.float32) / 255
    means = np.stack([x[labels == k].mean(0) for k in range(10)])
    within = np.mean([x[labels == k].var(0).mean() for k in range(10)])
    assert means.var(0).mean() < 0.1 * within


def test_toy_is_learnable_fast():
    """A tiny CNN beats chance clearly within seconds (the lead's teacher test checks more).

    One intra-op thread: on 2 shared cores this is ~3 s, while 2 threads under contention spin
    for 20-40 s. Over torch seeds 0-3 this recipe reached 0.59-0.78 (chance 0.10).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        t0 = time.time()
        tr = data.create_dataset("toy_fgvc", split="train", image_size=S)
        te = data.create_dataset("toy_fgvc", split="test", image_size=S)

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.MaxPool2d(2))

        net = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        loader = data.make_loader(tr, 32, train=True)
        epochs = 8
        opt = torch.optim.Adam(net.parameters(), 5e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=epochs * len(loader),
                                                    pct_start=0.25)
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                sched.step()
        net.eval()
        x, y = next(iter(data.make_loader(te, len(te), train=False)))
        with torch.no_grad():
            acc = (net(x).argmax(1) == y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc >= 0.3, f"toy test accuracy {acc:.3f} (chance 0.10) after {time.time() - t0:.1f}s"


# ---------------------------------------------------------------------------- config, loaders
def test_dataset_kwargs_and_create_dataset_options():
    cfg = DataConfig(toy_num_classes=3, toy_train_per_class=4, toy_test_per_class=2)
    kw = data.dataset_kwargs(cfg)
    assert kw == {"num_classes": 3, "train_per_class": 4, "test_per_class": 2}
    ds = data.create_dataset(cfg.dataset, None, "test", cfg.image_size, **kw)
    assert len(ds) == 6 and len(ds.classes) == 3
    cars_cfg = DataConfig(dataset="cars196", cars_heldout_fraction=0.3)
    assert data.dataset_kwargs(cars_cfg) == {"heldout_fraction": 0.3}
    assert data.dataset_kwargs(DataConfig(dataset="cub200")) == {}
    assert set(data.DATASETS) == {"toy_fgvc", "cub200", "cars196", "aircraft", "pets"}


def test_make_loader_is_seeded():
    ds = data.create_dataset("toy_fgvc", split="train", image_size=16, num_classes=4, train_per_class=10)
    def order(seed):
        return torch.cat([y for _, y in data.make_loader(ds, 8, train=True, seed=seed)])

    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert len(order(0)) == 40                                   # 40 % 8 == 0: nothing dropped
    ev = data.make_loader(ds, 16, train=False)
    assert not ev.drop_last and torch.cat([y for _, y in ev]).tolist() == ds.targets
    assert data.make_loader(ds, 64, train=True).drop_last is False  # tiny set is not emptied
    assert data.make_loader(ds, 8, train=True, num_workers=1).persistent_workers


# ---------------------------------------------------------------------------- GPU path (on CPU)
def test_preload_and_gpu_augment(shared_data):
    ds = data.create_dataset("cub200", shared_data, "test", S, max_classes=1)
    imgs, labels = data.preload(ds, S, num_workers=2)
    assert imgs.dtype == torch.uint8 and imgs.shape == (len(ds), 3, 36, 36)
    assert labels.dtype == torch.long and labels.tolist() == ds.targets
    ev = data.gpu_augment(imgs, train=False, image_size=S)
    cpu = torch.stack([ds[i][0] for i in range(len(ds))])
    assert ev.shape == cpu.shape and ev.dtype == torch.float32
    assert (ev - cpu).abs().mean() < 0.1                         # same pipeline up to 1-px rounding
    g = lambda s: torch.Generator().manual_seed(s)                # noqa: E731
    a = data.gpu_augment(imgs, train=True, image_size=S, generator=g(0))
    assert a.shape == (len(ds), 3, S, S) and torch.isfinite(a).all()
    assert torch.equal(a, data.gpu_augment(imgs, train=True, image_size=S, generator=g(0)))
    assert not torch.equal(a, data.gpu_augment(imgs, train=True, image_size=S, generator=g(1)))
    # full-image crop: the affine path equals a plain resize, possibly mirrored
    full = data.gpu_augment(imgs, train=True, image_size=S, generator=g(0), scale=(1, 1), ratio=(1, 1))
    ref = nn.functional.interpolate(imgs.float() / 255, size=S, mode="bilinear", align_corners=False)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    ref = (ref - mean) / torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    err = torch.minimum((full - ref).abs().amax((1, 2, 3)), (full - ref.flip(-1)).abs().amax((1, 2, 3)))
    assert (err < 1e-4).all()


def test_preload_toy_renders_natively():
    ds = data.create_dataset("toy_fgvc", split="test", image_size=S, num_classes=3, test_per_class=2)
    imgs, labels = data.preload(ds, S)
    assert imgs.shape == (6, 3, 36, 36) and labels.tolist() == ds.targets
    assert data.gpu_augment(imgs, train=True, image_size=S, scale=ds.crop_scale).shape == (6, 3, S, S)


# ---------------------------------------------------------------------------- errors
def _tiny_cub(shared_data, dst):
    """CUB layout with class 001 only (metadata files copied whole: other classes are absent)."""
    src = shared_data / "CUB_200_2011"
    d = dst / "CUB_200_2011"
    (d / "images").mkdir(parents=True)
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        shutil.copy(src / f, d / f)
    cls = "001.Black_footed_Albatross"
    shutil.copytree(src / "images" / cls, d / "images" / cls)
    return d


def test_unknown_name_split_option():
    with pytest.raises(data.DatasetError, match="known: .*cub200"):
        data.create_dataset("cub", split="train")
    for name, bad in [("cub200", "val"), ("cars196", "valid"), ("aircraft", "heldout"), ("pets", "val"),
                      ("toy_fgvc", "val")]:
        with pytest.raises(data.DatasetError, match="valid splits: .*test"):
            data.create_dataset(name, "/nonexistent", bad, S)
    with pytest.raises(data.DatasetError, match="accepted: .*max_classes"):
        data.create_dataset("cub200", "/nonexistent", "train", S, heldout_fraction=0.2)


def test_missing_root_names_path_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("DFKD_DATA", raising=False)
    for name in ("cub200", "cars196", "aircraft", "pets"):
        with pytest.raises(data.DatasetNotFoundError, match="DFKD_DATA") as e:
            data.create_dataset(name, tmp_path / "nope", "test", S)
        assert str(tmp_path / "nope") in str(e.value)
    monkeypatch.setenv("DFKD_DATA", str(tmp_path / "from_env"))
    with pytest.raises(FileNotFoundError, match="from_env"):
        data.create_dataset("pets", None, "test", S)
    assert paths.data_root(None) == tmp_path / "from_env"


def test_env_var_root(shared_data, monkeypatch):
    monkeypatch.setenv("DFKD_DATA", str(shared_data))
    assert len(data.create_dataset("pets", None, "test", S)) == 298


def test_missing_metadata_and_listed_image(shared_data, tmp_path):
    d = _tiny_cub(shared_data, tmp_path)
    ds = data.create_dataset("cub200", tmp_path, "train", S)
    assert len(ds) == 30 and ds.classes == ["Black_footed_Albatross"]
    victim = ds.samples[3][0]
    victim.unlink()
    with pytest.raises(data.DatasetNotFoundError, match="1 of 30") as e:
        data.create_dataset("cub200", d, "train", S)
    assert str(victim) in str(e.value)
    (d / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        data.create_dataset("cub200", d, "test", S)
    # Cars: annotations present, no images at all
    cars = tmp_path / "stanford_cars"
    shutil.copytree(shared_data / "stanford_cars" / "devkit", cars / "devkit")
    with pytest.raises(data.DatasetNotFoundError, match="8144 of 8144") as e:
        data.create_dataset("cars196", tmp_path, "train", S)
    assert str(cars / "cars_train" / "00001.jpg") in str(e.value)
    # Pets: one split file missing
    ann = tmp_path / "oxford-iiit-pet" / "annotations"
    ann.mkdir(parents=True)
    shutil.copy(shared_data / "oxford-iiit-pet" / "annotations" / "trainval.txt", ann)
    with pytest.raises(FileNotFoundError, match=r"annotations/test\.txt"):
        data.create_dataset("pets", tmp_path, "trainval", S)
    # Aircraft: split file missing
    root = data.make_aircraft_fixture(tmp_path / "air")
    (root / "data" / "images_variant_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="images_variant_test.txt"):
        data.create_dataset("aircraft", root, "test", S)


def test_corrupt_image_names_path(shared_data, tmp_path):
    _tiny_cub(shared_data, tmp_path)
    ds = data.create_dataset("cub200", tmp_path, "test", S)
    bad, trunc = ds.samples[0][0], ds.samples[1][0]
    bad.write_bytes(b"this is not a jpeg")
    trunc.write_bytes(trunc.read_bytes()[:200])                       # truncated JPEG
    for i, p in ((0, bad), (1, trunc)):
        with pytest.raises(data.DatasetFormatError, match="cannot decode") as e:
            ds[i]
        assert str(p) in str(e.value)
    with pytest.raises(data.DatasetFormatError):
        data.preload(ds, S)


def test_no_images_committed_under_data():
    root = paths.project_root()
    try:
        out = subprocess.run(["git", "ls-files", "data"], cwd=root, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    exts = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".mat", ".tgz", ".tar", ".zip", ".npz", ".pt")
    assert not [f for f in out.splitlines() if f.lower().endswith(exts)]
