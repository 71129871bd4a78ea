"""What a finished run's synthetic images hold, apart from the schedule its student saw them on.

    python -m dfkd.poolcheck <distill run> [--steps 1000] [--lr 0.05] [--eval-every 500] [--seed 0]

Trains a *fresh* student (the run's ``student_arch``) on the run's final replay pool
(``state/last.pt``, methods with ``replay: pool`` or a memory bank: ``dfkd_fgvc``, ``fast``): KD at
the run's ``kd_T`` on the run's pool augmentation (``replay_aug``, ``replay_pad``), every view
labelled afresh by the run's teacher, SGD (momentum 0.9, weight decay 5e-4) with a cosine over
``--steps``, batch ``batch_size``; evaluated on the real test split every ``--eval-every`` steps.
The KL term only, whatever the method: the check scores the images, not the student's loss.

A run's own student learns from a pool that grows while the generator improves, at a learning rate
that has decayed by the time the best images exist; this check shows how far that schedule is
from what the final images can teach (docs/decisions.md, 'A distillation tail'). Nothing is
written to the run's folder; the result is printed, one line per evaluation, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import tracking
from .config import DistillConfig
from .losses import kd_loss
from .methods.base import DistillMethod
from .replay import Replay
from .seed import seed_everything
from .train import build_model, eval_loader, evaluate, load_teacher

# DistillConfig fields the check reads from the run's params.yaml (the data, the models, the pool's
# augmentation and the KD temperature); everything else keeps the library default
FIELDS = ("dataset", "image_size", "data_root", "toy_num_classes", "toy_train_per_class", "toy_test_per_class",
          "cars_heldout_fraction", "student_arch", "teacher_run", "output_map", "replay_aug", "replay_pad",
          "kd_T", "kd_direction", "batch_size", "test_batch_size", "weight_decay", "momentum")


def final_pool(run: tracking.Run, cfg: DistillConfig) -> Replay:
    """The replay pool saved in ``run``'s ``state/last.pt``, drawn as the run drew it (uniformly, with
    its ``replay_aug`` and ``replay_pad``); a clear error when there is none."""
    state = run.load_state()
    if state is None:
        raise FileNotFoundError(f"{run.dir} has no state/last.pt: the run has not written a checkpoint "
                                "(it ends each epoch with one); finish or resume it first")
    saved = state["method"].get("replay")
    if not isinstance(saved, dict) or not int(saved.get("size", 0)):
        raise ValueError(f"the checkpoint of {run.dir} holds no replay pool: poolcheck needs a run with "
                         "`replay: pool` (dfkd_fgvc) or a memory bank (fast)")
    # capacity: the images it holds, not the run's replay_size
    pool = Replay(int(saved["size"]), cfg.output_map, "cpu", aug=cfg.replay_aug, pad=cfg.replay_pad)
    pool.load(saved)
    return pool


def check_pool(run_name: str, *, steps: int = 1000, lr: float = 0.05, eval_every: int = 500, seed: int = 0,
               runs_root=None, progress: bool = True) -> dict:
    """Train a fresh student on ``run_name``'s final pool; returns ``{"run", "pool", "steps",
    "evals": [(step, top1), ...], "top1_last", "time_s"}``."""
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps ({steps}) and eval_every ({eval_every}) must be at least 1")
    run = tracking.open_run("distill", run_name, runs_root)
    params = run.params()
    cfg = DistillConfig(**{k: params[k] for k in FIELDS if k in params}, device="cpu", num_workers=0)
    pool = final_pool(run, cfg)
    seed_everything(seed)
    teacher, meta = load_teacher(cfg.teacher_run, runs_root=runs_root)
    _, test = eval_loader(cfg)
    student = build_model(cfg.student_arch, int(meta["num_classes"]), cfg.image_size)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    evals, t0 = [], time.time()
    student.train()
    for step in range(1, steps + 1):
        x = pool.batch(cfg.batch_size, fresh_images=None)   # no fresh share: pool images only
        with torch.no_grad():
            t_logits = teacher(x)
        loss = kd_loss(student(x), t_logits, cfg.kd_T, cfg.kd_direction)
        DistillMethod.optimize(opt, loss)
        sched.step()
        if step % eval_every == 0 or step == steps:
            top1 = evaluate(student, test, "cpu")["top1"]
            evals.append((step, top1))
            if progress:
                print(f"{run_name}: step {step}/{steps}  kd {loss.item():.3f}  test top-1 {top1:.2f} %  "
                      f"({time.time() - t0:.0f} s)", flush=True)
    return {"run": run_name, "pool": len(pool), "steps": steps, "lr": lr, "seed": seed, "evals": evals,
            "top1_last": evals[-1][1], "time_s": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfkd.poolcheck", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished distill run with a replay pool (runs/distill/<run>)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", default=None)
    a = ap.parse_args(argv)
    out = check_pool(a.run, steps=a.steps, lr=a.lr, eval_every=a.eval_every, seed=a.seed, runs_root=a.runs_dir)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
