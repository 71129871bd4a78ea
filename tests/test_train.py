"""Teacher pretraining and data-free distillation loops on the embedded dataset (CPU).

The teacher trained here is shared (session scope) by the distillation tests: it is the small
teacher of the CPU smoke distillation that must lift the student well above chance.
"""
from __future__ import annotations

import math

import pytest
import torch

from dfkd import batch, paths, tracking
from dfkd.config import DistillConfig, TeacherConfig
from dfkd.train import distill, evaluate, eval_loader, load_teacher, train_teacher

TOY = dict(dataset="toy_fgvc", image_size=32, toy_num_classes=10, toy_train_per_class=60,
           toy_test_per_class=30, device="cpu", num_workers=0)


# The toy teacher fixture trains for minutes; under `make test`'s two xdist workers it shares the 2
# cores with the other worker's notebook kernels and took 382 s once, and over 600 s (pytest-timeout's
# default here) when it ran beside the whole smoke notebook batch: this file gets 20 minutes per test.
pytestmark = pytest.mark.timeout(1200)


class Killed(RuntimeError):
    pass


def _kill_at(n):
    def cb(step, row):
        if step == n:
            raise Killed(f"simulated kill after step {n}")
    return cb


def _state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    """A resnet_tiny_t teacher trained on toy_fgvc at 32 px with the demo recipe (one-cycle, 60
    epochs; 97.7 % top-1 on these 300 test images). Half the epochs was chaotic: 62.7, 36.3 and
    62.3 % for seeds 0-2 (and 86 % on another machine), and a 63 % teacher left the smoke
    distillation at 16 %. One thread, as every test (conftest): with two it trained beside the other
    xdist worker on a 2-core machine and took 248 s of a fresh clone's `make test`, against 152 s on
    one thread alone (97.7 %, 2-core Intel Xeon, 2026-12-07); the recipe's result does not hinge on
    the thread count (92-98 % over seeds and thread counts). The test split is evaluated every tenth
    epoch and at the last (the metrics rows are per epoch either way)."""
    root = tmp_path_factory.mktemp("teacher_runs")
    cfg = TeacherConfig(run_name="toy_t", arch="resnet_tiny_t", epochs=60, batch_size=32, lr=0.05,
                        schedule="onecycle", eval_every=10, **TOY)
    run = tracking.start_run("teacher", cfg.run_name, cfg, runs_root=root)
    summary = train_teacher(cfg, run, progress=False)
    return root, cfg, summary


def test_teacher_learns_toy_well_above_chance(toy_teacher):
    root, cfg, summary = toy_teacher
    chance = 100.0 / cfg.toy_num_classes
    assert summary["top1_last"] >= 8 * chance, summary   # 80 %: this recipe gave 92-98 %
    run = tracking.Run(root / "teacher" / cfg.run_name)
    for name in ("params.yaml", "env.json", "metrics.csv", "summary.json", "weights/best.safetensors",
                 "weights/best.json", "weights/last.safetensors", "weights/last.json", "state/last.pt"):
        assert (run.dir / name).exists(), name
    # env.json records the versions of the packages a run's results depend on (from their metadata)
    env = tracking.read_json(run.dir / "env.json")
    from importlib import metadata
    assert env["torch"] == torch.__version__ and env["papermill"] == metadata.version("papermill")
    assert env["sklearn"] == metadata.version("scikit-learn") and env["pytorch_grad_cam"] == metadata.version("grad-cam")
    meta = tracking.read_json(run.dir / "weights/last.json")
    assert meta["arch"] == "resnet_tiny_t" and meta["image_size"] == 32 and len(meta["classes"]) == 10
    # the saved weights reproduce the reported last-epoch accuracy
    model, _ = load_teacher(cfg.run_name, runs_root=root)
    _, loader = eval_loader(cfg)
    assert evaluate(model, loader, "cpu")["top1"] == pytest.approx(summary["top1_last"])
    assert len(run.metrics()) == cfg.epochs


def test_teacher_resume_after_kill_matches_uninterrupted(runs_root):
    common = dict(arch="resnet_tiny_s", epochs=3, batch_size=16, lr=0.05, max_steps_per_epoch=3, **TOY)
    cfg_a = TeacherConfig(run_name="a", **common)
    sa = train_teacher(cfg_a, tracking.start_run("teacher", "a", cfg_a), progress=False)
    cfg_b = TeacherConfig(run_name="b", **common)
    run_b = tracking.start_run("teacher", "b", cfg_b)
    with pytest.raises(Killed):
        train_teacher(cfg_b, run_b, progress=False, callbacks=[_kill_at(0)])
    assert not run_b.is_finished() and run_b.state_path.exists()
    sb = train_teacher(cfg_b, tracking.start_run("teacher", "b", cfg_b), progress=False)
    wa, _ = tracking.load_weights(runs_root / "teacher/a/weights/last.safetensors")
    wb, _ = tracking.load_weights(runs_root / "teacher/b/weights/last.safetensors")
    _state_equal(wa, wb)
    assert sa["top1_last"] == sb["top1_last"]
    assert [r["epoch"] for r in tracking.Run(runs_root / "teacher/b").metrics()] == [0, 1, 2]


def test_resume_with_other_parameters_is_refused(runs_root):
    cfg = TeacherConfig(run_name="c", arch="resnet_tiny_s", epochs=2, batch_size=16, max_steps_per_epoch=1, **TOY)
    with pytest.raises(Killed):
        train_teacher(cfg, tracking.start_run("teacher", "c", cfg), progress=False, callbacks=[_kill_at(0)])
    other = TeacherConfig(run_name="c", arch="resnet_tiny_t", epochs=2, batch_size=16, max_steps_per_epoch=1, **TOY)
    with pytest.raises(RuntimeError, match="arch"):
        tracking.start_run("teacher", "c", other)


def _distill_cfg(teacher_run, **kw):
    # the demo's generator and student settings (params/demo/distill.yaml) at a small budget without
    # the replay pool (the smoke test adds the demo's pool and step counts): BN in the generator blocks
    # and lr_g 3e-3 keep the generator from collapsing within this tiny budget (docs/decisions.md#loop)
    base = dict(TOY, method="dfkd_fgvc", teacher_run=teacher_run, student_arch="resnet_tiny_s", nz=64,
                ngf=16, batch_size=32, g_steps=10, s_steps=5, epochs=4, iters_per_epoch=10, lr_s=0.05,
                lr_g=3e-3, block_norm="bn", test_batch_size=150)
    base.update(kw)
    return DistillConfig(**base)


def test_smoke_distillation_lifts_student_well_above_chance(toy_teacher, monkeypatch):
    root, tcfg, tsum = toy_teacher
    monkeypatch.setenv("DFKD_RUNS", str(root))
    # the demo recipe, read from params/demo/distill.yaml (keep-all replay pool with one extra no-grad
    # batch per G step and 8 px crop shifts, alpha 3, DFQ's class-coverage terms, no SAM term, MHAD on
    # stages 1-3, SFCL weight 1, the student's cosine per iteration), in fp32 on this file's 300 test
    # images, at a third of its iterations: 30 x (10 G + 25 S) = 300 generator, 750 student steps
    recipe = batch.load_yaml(paths.project_root() / "params/demo/distill.yaml")
    recipe.update(TOY, method="dfkd_fgvc", teacher_run=tcfg.run_name, run_name="smoke", epochs=6,
                  iters_per_epoch=5, replay_size=20000, amp="auto")
    cfg = DistillConfig(**recipe)
    summary = distill(cfg, tracking.start_run("distill", "smoke", cfg), progress=False)
    chance = 100.0 / tcfg.toy_num_classes
    # measured on the real (toy) test images, never on the generator's. A student that learns
    # nothing transferable stays at chance (10 %). This recipe measured 34.3 and 40.3 % last epoch
    # from the fixture's teacher trained with seeds 0 and 1 (97.7 / 96.7 %; one thread, 128 / 152 s
    # on the 2-core Intel Xeon of 2026-12-07), where the former recipe (20 x (10 G + 25 S), the
    # demo's levers of 2026-12-03 off) gave 20.0 and 23.3 % from the same two teachers and had
    # passed only from the two-thread teacher (42.0 % on the AMD EPYC of 2026-12-02). One standard
    # error on these 300 images is 2.8 points at 35 %.
    assert summary["student_top1_last"] >= 2.5 * chance, summary
    assert summary["teacher_top1"] == pytest.approx(tsum["top1_last"])
    for k in ("images_generated", "images_consumed", "g_steps", "s_steps", "teacher_forwards"):
        assert summary["budget"][k] > 0
    assert summary["budget"]["s_steps"] == cfg.epochs * cfg.iters_per_epoch * cfg.s_steps
    rows = tracking.Run(root / "distill/smoke").metrics()
    for key in ("g_bn", "g_kd", "s_kd", "s_mhad", "s_sfcl"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert (root / "distill/smoke/weights/student.safetensors").exists()
    assert (root / "distill/smoke/samples/last.pt").exists()


def test_distill_resume_reproduces_next_losses_exactly(toy_teacher, monkeypatch, tmp_path):
    root, tcfg, _ = toy_teacher
    monkeypatch.setenv("DFKD_RUNS", str(root))
    kw = dict(epochs=2, iters_per_epoch=2, g_steps=1, s_steps=1, batch_size=8, max_eval_batches=1)
    cfg_a = _distill_cfg(tcfg.run_name, run_name="res_a", **kw)
    distill(cfg_a, tracking.start_run("distill", "res_a", cfg_a), progress=False)
    cfg_b = _distill_cfg(tcfg.run_name, run_name="res_b", **kw)
    with pytest.raises(Killed):  # killed right after the first epoch's state was written
        distill(cfg_b, tracking.start_run("distill", "res_b", cfg_b), progress=False, callbacks=[_kill_at(1)])
    distill(cfg_b, tracking.start_run("distill", "res_b", cfg_b), progress=False)
    ra = tracking.Run(root / "distill/res_a").metrics()
    rb = tracking.Run(root / "distill/res_b").metrics()
    assert [r["iter"] for r in rb] == [0, 1, 2, 3]
    for a, b in zip(ra, rb):
        for k in a:
            if k.startswith(("g_", "s_")) or k == "test_top1":
                assert a[k] == b[k], (a["iter"], k, a[k], b[k])
    wa, _ = tracking.load_weights(root / "distill/res_a/weights/student.safetensors")
    wb, _ = tracking.load_weights(root / "distill/res_b/weights/student.safetensors")
    _state_equal(wa, wb)


def test_nan_loss_fails_clearly_and_keeps_last_state(toy_teacher, monkeypatch):
    root, tcfg, _ = toy_teacher
    monkeypatch.setenv("DFKD_RUNS", str(root))
    cfg = _distill_cfg(tcfg.run_name, run_name="nan", epochs=2, iters_per_epoch=1, g_steps=1, s_steps=1,
                       batch_size=8, max_eval_batches=1)

    def poison(method):
        real = method.iteration
        calls = {"n": 0}

        def it():
            out = real()
            calls["n"] += 1
            if calls["n"] == 2:
                out["s_kd"] = torch.tensor(float("nan"))
            return out
        method.iteration = it

    run = tracking.start_run("distill", "nan", cfg)
    with pytest.raises(FloatingPointError, match="s_kd"):
        distill(cfg, run, progress=False, method_hook=poison)
    state = run.load_state()
    assert state is not None and state["global_iter"] == 1  # the good first epoch is kept
    assert not run.is_finished()


def test_teacher_from_another_architecture_is_refused(toy_teacher, monkeypatch):
    root, tcfg, _ = toy_teacher
    state, meta = tracking.load_weights(root / "teacher" / tcfg.run_name / "weights/last.safetensors")
    from dfkd.train import build_model
    other = build_model("resnet_tiny_s", 10, 32)
    with pytest.raises(ValueError, match="resnet_tiny_t"):
        tracking.load_into(other, state, what="teacher weights", expected_arch="resnet_tiny_s", meta=meta)
    with pytest.raises(ValueError, match="do not fit"):
        tracking.load_into(other, state, what="teacher weights")


def test_missing_teacher_run_names_the_folder(runs_root):
    cfg = _distill_cfg("no_such_teacher", run_name="x")
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        distill(cfg, tracking.start_run("distill", "x", cfg), progress=False)
