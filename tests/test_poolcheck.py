"""dfkd.poolcheck: a fresh student trained on a finished run's final replay pool."""
from __future__ import annotations

import pytest
import torch

import dfkd.poolcheck as poolcheck
import dfkd.replay as replay_mod
from dfkd import tracking
from dfkd.config import DistillConfig
from dfkd.train import build_model, distill

TOY = dict(dataset="toy_fgvc", image_size=32, toy_num_classes=4, toy_train_per_class=4, toy_test_per_class=4,
           device="cpu", num_workers=0, amp="off", channels_last=False)


def _teacher(runs_root):
    torch.manual_seed(0)
    model = build_model("resnet_tiny_t", 4, 32)
    run = tracking.start_run("teacher", "pc_teacher", {**TOY, "arch": "resnet_tiny_t"})
    run.save_weights("last", model, {"arch": model.arch, "num_classes": 4, "image_size": 32, "dataset": "toy_fgvc",
                                     "build_kwargs": dict(getattr(model, "build_kwargs", {}) or {})})
    return "pc_teacher"


def _distilled(name, **kw):
    cfg = DistillConfig(run_name=name, teacher_run="pc_teacher", epochs=1, iters_per_epoch=2, g_steps=1, s_steps=1,
                        batch_size=8, nz=16, ngf=8, sfcl_dim=16, **{**TOY, **kw})
    distill(cfg, tracking.start_run("distill", name, cfg), progress=False)
    return name


@pytest.mark.parametrize("method", ["dfkd_fgvc", "fast"])
def test_check_trains_a_fresh_student_on_the_final_pool_only(runs_root, monkeypatch, method):
    _teacher(runs_root)
    name = _distilled(f"pc_{method}", method=method, replay="pool", replay_size=64)
    saved = tracking.Run(runs_root / "distill" / name).load_state()["method"]["replay"]
    pool = {tuple(img.flatten().tolist()) for img in saved["images"]}
    seen = []
    real_augment = replay_mod.augment

    def spy(x, mode, output_map, pad):
        u8 = replay_mod.Replay(1, output_map, "cpu").pool.encode(x)   # back to the uint8 the pool keeps
        seen.extend(tuple(img.flatten().tolist()) for img in u8)
        assert mode == "crop_flip"                                     # the run's augmentation
        return real_augment(x, mode, output_map, pad)
    monkeypatch.setattr(replay_mod, "augment", spy)
    out = poolcheck.check_pool(name, steps=3, eval_every=2, progress=False)
    assert out["pool"] == int(saved["size"]) == 2 * 8
    assert [s for s, _ in out["evals"]] == [2, 3] and 0.0 <= out["top1_last"] <= 100.0
    assert len(seen) == 3 * 8 and set(seen) <= pool                     # every view drawn from the pool


def test_check_refuses_a_run_without_a_pool(runs_root):
    _teacher(runs_root)
    name = _distilled("pc_nopool", method="dfkd_fgvc", replay="off")
    with pytest.raises(ValueError, match="no replay pool"):
        poolcheck.check_pool(name, steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="no distill run"):
        poolcheck.check_pool("absent", steps=1, progress=False)
