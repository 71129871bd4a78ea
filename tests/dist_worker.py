"""Worker of ``tests/test_dist.py``, run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Modes (``all`` runs the five in turn, in one launch):

- ``method OUT``: the tiny dfkd_fgvc method (global batch 8 -> 4 per rank): one generator step and
  one student step (their averaged gradients), then one iteration (2 + 2 steps); this rank's
  state_dict, gradients and losses go to ``OUT/rank<r>.pt``.
- ``distill OUT``: ``train.distill`` on the toy dataset (1 epoch of 2 iterations), run folder
  under ``OUT/runs/distill`` (only rank 0 may write it); summary to ``OUT/distill_rank<r>.pt``.
- ``teacher OUT``: ``train.train_teacher`` on the toy dataset, 2 steps of batch 16, once with the
  images preloaded (global batch augmented alike, sliced per rank) and once through DataLoaders
  (each rank loads its rows), and once preloaded with adversarial training (``adv_eps`` 1, whose
  attack runs forwards and input gradients through the synchronised BN layers); summaries to
  ``OUT/teacher_<preload>[_adv]_rank<r>.pt``.
- ``methods OUT``: every registered method with its defaults (and the :data:`VARIANTS`), tiny,
  2 iterations of (2 G + 2 S) steps on the global batch 8; per-iteration losses, the final
  checkpoint state (modules, optimisers, pools, banks, a batch in progress) and the RNG to
  ``OUT/methods/<variant>_rank<r>.pt``.
- ``resume OUT``: per pool method (:data:`RESUME_VARIANTS`) ``train.distill`` of 2 iterations,
  once uninterrupted and once killed on every rank after iteration 1 and resumed from rank 0's
  ``state/last.pt``; each rank's final method state to ``OUT/resume/<variant>_<full|killed>_rank<r>.pt``,
  the state at the kill to ``OUT/resume/<variant>_at_kill.pt``.

The test runs the same functions in one process for the reference.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from dfkd import bench, dist

SETTINGS = bench.preset_settings("tiny", batch_size=8, g_steps=2, s_steps=2)
SMALL = dict(nz=32, ngf=8, sfcl_dim=16)


def run_method(out: Path) -> None:
    method = bench.build_method(SETTINGS, "cpu", "reference", **SMALL)
    assert method.world_size == dist.world_size() and method.cfg.batch_size == 8 // dist.world_size()
    torch.save(steps_then_iteration(method), out / f"rank{dist.rank()}.pt")


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def steps_then_iteration(method) -> dict:
    """One generator step and one student step (their rank-averaged gradients), then one
    iteration (2 + 2 steps); the loss means are averaged over ranks like ``distill`` logs them."""
    method.student.train()
    with method.generator_phase():
        method.generator_step()
    g_grads = grads(method.generator)
    method.student_step()
    s_grads = grads(method.student)
    losses = dist.all_reduce_mean_dict(method.iteration())
    return {"state": method.state_dict(), "losses": {k: float(v) for k, v in losses.items()},
            "g_grads": g_grads, "s_grads": s_grads, "budget": method.budget(),
            "rng": torch.get_rng_state()}


TOY = dict(dataset="toy_fgvc", image_size=32, toy_num_classes=4, toy_train_per_class=8,
           toy_test_per_class=4, device="cpu", num_workers=0, amp="off")


def distill_cfg():
    from dfkd.config import DistillConfig
    return DistillConfig(run_name="ddp_smoke", epochs=1, iters_per_epoch=2, g_steps=1, s_steps=1,
                         batch_size=8, nz=32, ngf=8, sfcl_dim=16, test_batch_size=16, **TOY)


def teacher_cfg(preload: str, adv_eps: float = 0.0):
    from dfkd.config import TeacherConfig
    name = f"ddp_teacher_{preload}" + ("_adv" if adv_eps else "")
    return TeacherConfig(run_name=name, arch="resnet_tiny_t", epochs=1, batch_size=16,
                         max_steps_per_epoch=2, gpu_preload=preload, adv_eps=adv_eps, adv_steps=2, **TOY)


def run_distill(out: Path) -> dict:
    from dfkd import tracking, train
    cfg = distill_cfg()
    run = tracking.start_run("distill", cfg.run_name, cfg, runs_root=out / "runs", write=dist.is_main())
    dist.barrier()
    summary = train.distill(cfg, run, progress=False)
    torch.save({"summary": summary}, out / f"distill_rank{dist.rank()}.pt")
    return summary


def run_teacher(out: Path) -> None:
    from dfkd import tracking, train
    for preload, adv_eps in (("on", 0.0), ("off", 0.0), ("on", 1.0)):   # the last: adversarial training
        cfg = teacher_cfg(preload, adv_eps)
        run = tracking.start_run("teacher", cfg.run_name, cfg, runs_root=out / "runs", write=dist.is_main())
        dist.barrier()
        summary = train.train_teacher(cfg, run, progress=False)
        tag = cfg.run_name.removeprefix("ddp_teacher_")   # on, off, on_adv
        torch.save({"summary": summary}, out / f"teacher_{tag}_rank{dist.rank()}.pt")


# --------------------------------------------------------------------------------------------
# every registered method (and dfkd_fgvc with the replay pool): 2 ranks against one process
# --------------------------------------------------------------------------------------------
K, S = 4, 16
# the only method-specific knobs these runs set (``method_options``: the method's own options):
# dfkd_fgvc with its replay pool; the same with the two replay options that are equal to one process
# in distribution only (mixup partners within a rank's rows, a fresh share); ADI with batches crafted
# over 3 steps, i.e. across iterations of 2 generator steps (a checkpoint then holds a batch in progress)
VARIANTS = {"dfkd_fgvc_pool": ("dfkd_fgvc", dict(replay="pool", replay_size=32)),
            "dfkd_fgvc_pool_mixup_fresh": ("dfkd_fgvc", dict(replay="pool", replay_size=32,
                                                             replay_aug="crop_flip_mixup", replay_fresh=0.25)),
            "adi_span": ("adi", dict(method_options={"craft_steps": 3})),
            # ZSKT's beta = 250 on 16-px maps (16, 4 and 1 positions per stage: each L2-normalised
            # entry ~4-16x its size at 32+ px) makes the tiny student's steps unstable: float32
            # summation-order rounding (3e-6 relative after iteration 0) grows to 2-5 % of the
            # student's weights within two student steps (measured, CPU-dependent). So ZSKT's
            # default beta runs in float64 (ranks and one process agree to 1e-6 over 4 iterations,
            # measured), and float32 runs at beta = 25 (agree to 5e-5, measured)
            "zskt": ("zskt", dict(method_options={"at": 25.0})),
            "zskt_beta250_float64": ("zskt", {})}
NOT_EQUIVALENT = ("dfkd_fgvc_pool_mixup_fresh",)   # ranks stay identical; one process differs
FLOAT64 = ("zskt_beta250_float64",)                 # built and run with float64 as the default dtype
RESUME_VARIANTS = ("dfkd_fgvc_pool", "cmi", "adi_span")


def method_variants() -> dict[str, tuple[str, dict]]:
    """Every registered method under its own name (defaults, except where :data:`VARIANTS` names
    it), plus the variants above."""
    from dfkd.methods import METHODS
    return {**{name: (name, {}) for name in sorted(METHODS)}, **VARIANTS}


def build_variant(variant: str):
    """A tiny method of ``variant`` (global batch 8, 16 px, 2 G + 2 S steps), identically seeded."""
    from dfkd.config import DistillConfig
    from dfkd.methods import create_method
    from dfkd.models import create_model
    from dfkd.seed import seed_everything
    name, options = method_variants()[variant]
    cfg = DistillConfig(method=name, image_size=S, batch_size=8, g_steps=2, s_steps=2, nz=16, ngf=4, sfcl_dim=8,
                        device="cpu", amp="off", channels_last=False, num_workers=0, **options)
    seed_everything(0)
    teacher = create_model("resnet_tiny_t", K)
    student = create_model("resnet_tiny_s", K)
    return create_method(name, teacher, student, cfg, num_classes=K, image_size=S, device="cpu")


def method_record(method, iterations: int = 2) -> dict:
    """``iterations`` iterations; per iteration the rank-mean losses; then the whole checkpoint
    state (modules, optimisers, pools) and the RNG."""
    losses = []
    for _ in range(iterations):
        losses.append({k: float(v) for k, v in dist.all_reduce_mean_dict(method.iteration()).items()})
    return {"losses": losses, "checkpoint": method.checkpoint_state(), "budget": method.budget(),
            "rng": torch.get_rng_state()}


@contextmanager
def variant_dtype(variant: str):
    """The default dtype ``variant`` is built and run under (:data:`FLOAT64`, else float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if variant in FLOAT64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def record_variant(variant: str) -> dict:
    """:func:`method_record` of a freshly built ``variant`` under its dtype."""
    with variant_dtype(variant):
        return method_record(build_variant(variant))


def run_methods(out: Path) -> None:
    (out / "methods").mkdir(exist_ok=True)
    for variant in method_variants():
        torch.save(record_variant(variant), out / "methods" / f"{variant}_rank{dist.rank()}.pt")


class Killed(RuntimeError):
    pass


def resume_cfg(variant: str, run_name: str):
    from dfkd.config import DistillConfig
    name, options = method_variants()[variant]
    return DistillConfig(run_name=run_name, method=name, epochs=1, iters_per_epoch=2, g_steps=2, s_steps=1,
                         batch_size=8, nz=16, ngf=4, sfcl_dim=8, test_batch_size=16, checkpoint_every=1,
                         **{**TOY, "image_size": S}, **options)


def run_resume(out: Path) -> None:
    """Per pool method: one uninterrupted ``distill`` (2 iterations) and one killed on every rank
    after iteration 1 (its state written), then resumed; each rank saves its final method state."""
    from dfkd import tracking, train
    (out / "resume").mkdir(exist_ok=True)

    def kill(it, row):
        if it == 0:
            raise Killed("simulated kill of every rank")

    for variant in RESUME_VARIANTS:
        for kind in ("full", "killed"):
            cfg = resume_cfg(variant, f"resume_{variant}_{kind}")
            held = {}
            attempts = [[kill], []] if kind == "killed" else [[]]
            for callbacks in attempts:
                run = tracking.start_run("distill", cfg.run_name, cfg, runs_root=out / "runs", write=dist.is_main())
                dist.barrier()
                try:
                    train.distill(cfg, run, progress=False, callbacks=callbacks,
                                  method_hook=lambda m: held.__setitem__("method", m))
                except Killed:
                    if dist.is_main():
                        torch.save(run.load_state(), out / "resume" / f"{variant}_at_kill.pt")
                dist.barrier()   # rank 0 has written the state before any rank resumes
            record = {"checkpoint": held["method"].checkpoint_state(), "rng": torch.get_rng_state()}
            torch.save(record, out / "resume" / f"{variant}_{kind}_rank{dist.rank()}.pt")


def run_all(out: Path) -> None:
    run_method(out)
    run_distill(out)
    run_teacher(out)
    run_methods(out)
    run_resume(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    assert dist.init_distributed(), "run me under torchrun with --nproc_per_node >= 2"
    try:
        {"method": run_method, "distill": run_distill, "teacher": run_teacher, "methods": run_methods,
         "resume": run_resume, "all": run_all}[mode](out)
    finally:
        dist.cleanup()
