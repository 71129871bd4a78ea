"""Data-parallel training (``dfkd.dist``) on CPU: 2 ranks under torchrun with the gloo backend.

One torchrun launch (``tests/dist_worker.py all``) runs the tiny dfkd_fgvc method, a toy
``distill`` and a toy ``train_teacher`` on 2 ranks; the same functions then run here in one
process on the same global batch. Both ranks must hold identical weights, and those must match
the single process: gradients and losses to ~1e-5, weights after an iteration to 1e-3 (rounding
differs - sums over 4 rows instead of 8, E[x^2] - mean^2 for global BN statistics - and Adam's
first step turns gradients that are zero up to rounding, e.g. of a conv bias followed by BN, into
+-lr updates). The BN prior and SFCL reductions are also checked here without processes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfkd import dist, tracking
from dfkd.losses import BNPrior, sfcl_loss

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """Outputs of ``torchrun --nproc_per_node 2 tests/dist_worker.py all OUT`` (gloo, CPU)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "dist_worker.py"), "all", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return out


@pytest.fixture(scope="module")
def single_method():
    """The same steps in one process on the global batch of 8."""
    from dfkd import bench
    torch.set_num_threads(1)
    return worker.steps_then_iteration(bench.build_method(worker.SETTINGS, "cpu", "reference", **worker.SMALL))


# --------------------------------------------------------------------------------------------
# without processes
# --------------------------------------------------------------------------------------------
def test_helpers_are_no_ops_in_one_process():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    x = torch.randn(4, 3, requires_grad=True)
    assert dist.gather_rows(x) is x and dist.mean_across_ranks(x) is x and dist.all_reduce_mean(x) is x
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    assert dist.convert_batchnorm(bn) is bn and type(bn[0]) is torch.nn.BatchNorm2d
    assert dist.on_main(lambda: 7) == 7
    assert dist.local_batch_size(64) == 64
    assert dist.init_distributed() is False          # no WORLD_SIZE: nothing to join


def test_sfcl_with_gathered_negatives_averages_to_the_global_loss():
    """Per-rank SFCL with the global batch as candidates, averaged over ranks, is Eq. 9 on the
    global batch (simulated gather over 2 ranks), also for the symmetric variant."""
    torch.manual_seed(0)
    t, s = torch.randn(8, 5), torch.randn(8, 5)
    for symmetric in (False, True):
        full = sfcl_loss(t, s, tau=0.1, symmetric=symmetric)
        per_rank = []
        for r in range(2):
            rows = slice(4 * r, 4 * r + 4)
            parts = {id_: F.normalize(x, dim=1) for id_, x in (("t", t), ("s", s))}
            calls = iter(("t", "s"))

            def gather(local, r=r, rows=rows):
                full_rows = parts[next(calls)].clone()
                full_rows[rows] = local                   # this rank's own (normalised) rows
                return full_rows
            per_rank.append(sfcl_loss(t[rows], s[rows], tau=0.1, symmetric=symmetric, gather=gather, rank=r))
        torch.testing.assert_close(torch.stack(per_rank).mean(), full, rtol=1e-6, atol=1e-6)


def test_bn_prior_with_reduced_statistics_equals_the_global_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, 9, 9)
    with BNPrior(model) as bn:
        model(x)
    full = bn.loss()
    # rank 0's half, with the other half's statistics averaged in by the reducer
    other: list[torch.Tensor] = []
    with BNPrior(model, reduce=lambda st: other.append(st) or st) as bn1:
        model(x[4:])
    it = iter(other)
    with BNPrior(model, reduce=lambda st: (st + next(it)) / 2) as bn0:
        model(x[:4])
    torch.testing.assert_close(bn0.loss(), full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# two ranks under torchrun
# --------------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_both_ranks_hold_identical_weights(ddp):
    r0, r1 = _load(ddp / "rank0.pt"), _load(ddp / "rank1.pt")
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for key in ("g_grads", "s_grads"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    assert torch.equal(r0["rng"], r1["rng"])          # the global noise draw keeps the RNGs together
    assert r0["losses"] == r1["losses"]


def test_two_ranks_match_one_process_on_the_global_batch(ddp, single_method):
    r0, ref = _load(ddp / "rank0.pt"), single_method
    assert r0["budget"] == ref["budget"]              # global image counts
    for k, v in ref["losses"].items():
        assert r0["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    # gradients of the first generator step (BN prior over ranks, generator BN global) and of the
    # first student step (student/MHA BN global, SFCL negatives from the global batch)
    for key in ("g_grads", "s_grads"):
        total = torch.cat([g.flatten() for g in ref[key].values()]).norm()
        for k, g in ref[key].items():
            err = (r0[key][k] - g).norm()
            assert err <= 1e-4 * g.norm() + 1e-6 * total, (key, k, float(err), float(g.norm()))
    for k, v in ref["state"].items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-3, atol=1e-3,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_distill_under_torchrun_writes_one_run_matching_one_process(ddp, tmp_path):
    from dfkd import train
    s0, s1 = _load(ddp / "distill_rank0.pt")["summary"], _load(ddp / "distill_rank1.pt")["summary"]
    timing = ("time_s", "ms_per_iteration")
    assert {k: v for k, v in s0.items() if k not in timing} == {k: v for k, v in s1.items() if k not in timing}
    run = tracking.Run(ddp / "runs" / "distill" / "ddp_smoke")
    for name in ("params.yaml", "summary.json", "metrics.csv", "state/last.pt", "weights/student.safetensors",
                 "weights/generator.safetensors", "samples/last.pt"):
        assert (run.dir / name).exists(), name
    rows = run.metrics()
    assert [r["iter"] for r in rows] == [0, 1]        # one writer: no duplicated rows
    cfg = worker.distill_cfg()
    single = tracking.start_run("distill", cfg.run_name, cfg, runs_root=tmp_path)
    s = train.distill(cfg, single, progress=False)
    assert s["budget"] == s0["budget"] and s["batch_size"] == s0["batch_size"] == 8
    for a, b in zip(single.metrics(), rows):
        for k in ("g_bn", "g_kd", "g_loss", "s_kd", "s_mhad", "s_sfcl", "s_loss", "test_loss"):
            if a.get(k) is not None:
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (a["iter"], k)
    # the resume state written by rank 0 loads and holds the global counters
    state = run.load_state()
    assert state["global_iter"] == 2 and state["method"]["counters"]["images_generated"] == 32


def test_teacher_under_torchrun(ddp, tmp_path):
    from dfkd import train
    for preload in ("on", "off"):
        s0 = _load(ddp / f"teacher_{preload}_rank0.pt")["summary"]
        s1 = _load(ddp / f"teacher_{preload}_rank1.pt")["summary"]
        assert {k: v for k, v in s0.items() if k != "time_s"} == {k: v for k, v in s1.items() if k != "time_s"}
        run = tracking.Run(ddp / "runs" / "teacher" / f"ddp_teacher_{preload}")
        assert len(run.metrics()) == 1 and (run.dir / "weights" / "last.safetensors").exists()
    # preloaded images: the global batch is augmented alike on every rank, so 2 ranks = 1 process
    cfg = worker.teacher_cfg("on")
    single = tracking.start_run("teacher", cfg.run_name, cfg, runs_root=tmp_path)
    train.train_teacher(cfg, single, progress=False)
    a = single.metrics()[0]
    b = tracking.Run(ddp / "runs" / "teacher" / cfg.run_name).metrics()[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    wa, _ = tracking.load_weights(single.weights_dir / "last.safetensors")
    wb, _ = tracking.load_weights(ddp / "runs" / "teacher" / cfg.run_name / "weights" / "last.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
