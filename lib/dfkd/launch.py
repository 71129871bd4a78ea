"""The ``torchrun`` entry point: teacher pretraining or distillation, data parallel.

    torchrun --nproc_per_node N -m dfkd.launch {teacher,distill} [--params Y.yaml ...] [--set k=v ...]

Each rank builds the config from the parameter files and ``--set`` values (checked as a notebook's
parameters are), joins the process group (:func:`dfkd.dist.init_distributed`) and runs
:func:`dfkd.train.train_teacher` or :func:`dfkd.train.distill`; rank 0 writes the run folder. The
helpers the loops use live in :mod:`dfkd.dist`, which imports no training code, so this module is
the only one that sees both (``docs/decisions.md#speed``). The batch runner launches ``torchrun:``
jobs through it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from . import config, dist, tracking, train
from .batch import load_yaml, parse_sets


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc_per_node N -m dfkd.launch {teacher,distill} [--params Y.yaml ...] [--set k=v ...]``."""
    ap = argparse.ArgumentParser(prog="python -m dfkd.launch", description=main.__doc__)
    ap.add_argument("stage", choices=("teacher", "distill"))
    ap.add_argument("--params", action="append", default=[], metavar="YAML",
                    help="parameter files, later ones win (e.g. params/base.yaml params/paper/x.yaml)")
    ap.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs-dir", default=None, help="runs root (default: $DFKD_RUNS or <project>/runs)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    cls = config.TeacherConfig if args.stage == "teacher" else config.DistillConfig
    values: dict[str, Any] = {}
    for p in args.params:
        values.update(load_yaml(p) or {})
    sets = parse_sets(args.sets)
    known = config.field_types(cls)
    unknown = sorted(set(sets) - set(known))
    if unknown:
        ap.error(f"--set: unknown parameter(s) {unknown} for {cls.__name__}")
    values.update(sets)   # keys of the YAML files that other stages declare are ignored
    moved = [m for k in values if k not in known and (m := config.moved_parameter(k))] if args.stage == "distill" else []
    if moved:   # a pre-method_options name (cmi_tau, pool_size, ...) would be ignored silently
        ap.error("; ".join(moved))
    cfg = config.collect(cls, {}, **{k: v for k, v in values.items() if k in known})
    dist.init_distributed()
    try:
        run = tracking.start_run(args.stage, cfg.run_name, cfg, runs_root=args.runs_dir, device=cfg.device,
                                 write=dist.is_main())
        dist.barrier()   # rank 0 has checked/written params.yaml before anyone reads the folder
        fn = train.train_teacher if args.stage == "teacher" else train.distill
        summary = fn(cfg, run, progress=dist.is_main() and not args.no_progress)
        if dist.is_main():
            print({k: v for k, v in summary.items() if not isinstance(v, dict)}, flush=True)
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
