"""Worker of ``tests/test_dist.py``, run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Modes (``all`` runs the three in turn, in one launch):

- ``method OUT``: the tiny dfkd_fgvc method (global batch 8 -> 4 per rank): one generator step and
  one student step (their averaged gradients), then one iteration (2 + 2 steps); this rank's
  state_dict, gradients and losses go to ``OUT/rank<r>.pt``.
- ``distill OUT``: ``train.distill`` on the toy dataset (1 epoch of 2 iterations), run folder
  under ``OUT/runs/distill`` (only rank 0 may write it); summary to ``OUT/distill_rank<r>.pt``.
- ``teacher OUT``: ``train.train_teacher`` on the toy dataset, 2 steps of batch 16, once with the
  images preloaded (global batch augmented alike, sliced per rank) and once through DataLoaders
  (each rank loads its rows); summaries and weights to ``OUT/teacher_<preload>_rank<r>.pt``.

The test runs the same functions in one process for the reference.
"""
from __future__ import annotations

import sys
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


def teacher_cfg(preload: str):
    from dfkd.config import TeacherConfig
    return TeacherConfig(run_name=f"ddp_teacher_{preload}", arch="resnet_tiny_t", epochs=1, batch_size=16,
                         max_steps_per_epoch=2, gpu_preload=preload, **TOY)


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
    for preload in ("on", "off"):
        cfg = teacher_cfg(preload)
        run = tracking.start_run("teacher", cfg.run_name, cfg, runs_root=out / "runs", write=dist.is_main())
        dist.barrier()
        summary = train.train_teacher(cfg, run, progress=False)
        torch.save({"summary": summary}, out / f"teacher_{preload}_rank{dist.rank()}.pt")


def run_all(out: Path) -> None:
    run_method(out)
    run_distill(out)
    run_teacher(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    assert dist.init_distributed(), "run me under torchrun with --nproc_per_node >= 2"
    try:
        {"method": run_method, "distill": run_distill, "teacher": run_teacher, "all": run_all}[mode](out)
    finally:
        dist.cleanup()
