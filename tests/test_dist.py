"""Data-parallel training (``dfkd.dist``) on CPU: 2 ranks under torchrun with the gloo backend.

One torchrun launch (``tests/dist_worker.py all``) runs the tiny dfkd_fgvc method, a toy
``distill`` and a toy ``train_teacher`` on 2 ranks; the same functions then run here in one
process on the same global batch. Both ranks must hold identical weights, and those must match
the single process: gradients and losses to ~1e-5, weights after an iteration to 1e-3 (rounding
differs - sums over 4 rows instead of 8, E[x^2] - mean^2 for global BN statistics - and Adam's
first step turns gradients that are zero up to rounding, e.g. of a conv bias followed by BN, into
+-lr updates). The BN prior and SFCL reductions are also checked here without processes.

The same launch runs every registered method (``METHODS``, defaults) for 2 iterations: each is
equivalent to one process on the global batch (pools, banks and crafted batches included), and
three pool methods are killed and resumed under torchrun, bit-identical to uninterrupted runs on
every rank (``docs/decisions.md#speed``: global pools, per-rank rows gathered into checkpoints).
"""
from __future__ import annotations

import math
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
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


def test_dist_imports_no_training_code():
    """The methods import dfkd.dist; dfkd.dist imports nothing of the package that imports them
    (not even inside a function), so there is no import cycle: the torchrun entry is dfkd.launch."""
    import ast
    tree = ast.parse(Path(dist.__file__).read_text())
    own = sorted({(n.module or "") + ":" + ",".join(a.name for a in n.names) for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level > 0})
    assert own == ["seed:rng_state,set_rng_state"], own
    from dfkd import launch
    assert callable(launch.main)


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


def test_adversarial_teacher_under_torchrun(ddp):
    """adv_eps > 0 on 2 ranks: the attack's forwards and input gradients pass the synchronised BN
    layers alike on both ranks (no hang, the same reduced summary), and the steps train on attacked
    batches (another loss and other weights than the clean run from the same weights and batches;
    the attack's labels are the model's own predictions, so the loss on the true labels need not rise)."""
    s0 = _load(ddp / "teacher_on_adv_rank0.pt")["summary"]
    s1 = _load(ddp / "teacher_on_adv_rank1.pt")["summary"]
    assert {k: v for k, v in s0.items() if k != "time_s"} == {k: v for k, v in s1.items() if k != "time_s"}
    clean = tracking.Run(ddp / "runs" / "teacher" / "ddp_teacher_on").metrics()[0]
    adv = tracking.Run(ddp / "runs" / "teacher" / "ddp_teacher_on_adv").metrics()[0]
    assert math.isfinite(adv["train_loss"]) and abs(adv["train_loss"] - clean["train_loss"]) > 1e-4
    wa, _ = tracking.load_weights(ddp / "runs" / "teacher" / "ddp_teacher_on" / "weights" / "last.safetensors")
    wb, _ = tracking.load_weights(ddp / "runs" / "teacher" / "ddp_teacher_on_adv" / "weights" / "last.safetensors")
    assert any(not torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


# --------------------------------------------------------------------------------------------
# every method: 2 ranks against one process; pool methods killed and resumed under torchrun
# --------------------------------------------------------------------------------------------
def _flat(obj, prefix: str = "") -> dict:
    """Nested dicts/lists of a checkpoint state -> {"a.b.0.c": leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: obj}


def _assert_identical(a: dict, b: dict, what: str) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), (what, sorted(fa.keys() ^ fb.keys())[:5])
    for k, v in fa.items():
        same = torch.equal(v, fb[k]) if torch.is_tensor(v) else v == fb[k]
        assert same, f"{what}: {k} differs"


def _is_optimizer_moment(key: str) -> bool:
    # Adam moments and SGD momenta: gradients that are zero up to rounding (a bias in front of BN)
    # make them noise (relative error ~1); their effect is checked through the weights
    return key.startswith(("s_opt.", "g_opt.")) or ".opt.state." in key


def _assert_equivalent(ddp: dict, ref: dict, variant: str) -> None:
    """Rank 0's checkpoint against one process's: pools (uint8) to one grey level, integers
    exactly, generator weights to 1e-2 absolute (Adam makes rounding-level gradients +-lr_g steps:
    4 steps of 1e-3 here), every other float tensor to 1e-2 of its norm (measured: <= 1.5e-3;
    a per-rank pool, batch statistic or contrastive candidate set gives 1e-1 .. 1e0)."""
    fd, fr = _flat(ddp), _flat(ref)
    assert fd.keys() == fr.keys(), (variant, sorted(fd.keys() ^ fr.keys())[:5])
    for k, b in fr.items():
        a = fd[k]
        if not torch.is_tensor(b):
            assert a == b, (variant, k, a, b)
        elif b.dtype == torch.uint8:            # pool images
            d = (a.int() - b.int()).abs()
            assert a.shape == b.shape and (d.numel() == 0 or (d.max() <= 1 and (d > 0).float().mean() < 0.01)), \
                (variant, k)
        elif not b.is_floating_point():
            assert torch.equal(a, b), (variant, k)
        elif _is_optimizer_moment(k) or b.numel() == 0:
            continue
        elif k.startswith("modules.generator"):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2, msg=lambda m, k=k: f"{variant} {k}: {m}")
        else:
            err, size = (a.double() - b.double()).norm(), b.double().norm()
            assert err <= 1e-2 * size + 1e-6, (variant, k, float(err), float(size))


@pytest.mark.parametrize("variant", list(worker.method_variants()))
def test_every_method_on_two_ranks_matches_one_process(ddp, variant):
    """Each registered method (defaults), 2 gloo ranks of 4 rows against one process on the global
    batch of 8, 2 iterations of (2 G + 2 S) steps: both ranks hold the same state (weights, BN
    statistics, optimisers, pools, CMI's bank, ADI's batch in progress, RNG), the same RNG as one
    process (the same draws were made), and losses, budget and state match that process.

    Why this holds for methods with per-sample randomness: every per-sample draw (noise, targets,
    augmentation parameters, pool indices) is the rank's rows of the global batch's draw
    (``dist.rank_rows``), pools and banks gather every rank's rows (each rank holds the single
    process's pool), batch statistics go through the differentiable collectives, CMI's candidates
    are the global batch, and inputs optimised per rank (ZSKD/ADI images, Fast's z) get the single
    process's gradient (``dist.scale_own_rows_grad``).

    ZSKT runs at beta = 25 in float32 and at its default beta = 250 in float64
    (``zskt_beta250_float64``): at 16 px beta = 250 makes the tiny student's steps unstable, and
    float32 rounding of another summation order (3e-6) grows to 2-5 % of its weights in two steps
    (``dist_worker.VARIANTS``), which says nothing about the distributed logic.

    ``dfkd_fgvc_pool_mixup_fresh`` (``replay_aug='crop_flip_mixup'``, ``replay_fresh=0.25``) is NOT
    equivalent, by design: mixup pairs each image with a partner among this rank's rows only (a
    global pairing would all-gather every student batch), and with a fresh share the augmentation
    draws meet the rows in another order (fresh rows of every rank first in one process); both
    are equal to one process in distribution only. For it the test checks the weaker property that
    data parallel needs: the ranks stay identical (same RNG, same weights, same pool).
    """
    r0 = _load(ddp / "methods" / f"{variant}_rank0.pt")
    r1 = _load(ddp / "methods" / f"{variant}_rank1.pt")
    _assert_identical(r0["checkpoint"], r1["checkpoint"], f"{variant}: rank 0 vs rank 1")
    assert torch.equal(r0["rng"], r1["rng"]) and r0["losses"] == r1["losses"]
    assert all(math.isfinite(v) for it in r0["losses"] for v in it.values()), r0["losses"]
    if variant in worker.NOT_EQUIVALENT:
        return
    ref = worker.record_variant(variant)
    assert r0["budget"] == ref["budget"]
    assert torch.equal(r0["rng"], ref["rng"]), f"{variant}: the ranks drew other random numbers than one process"
    for i, (got, want) in enumerate(zip(r0["losses"], ref["losses"])):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=2e-3, abs=1e-6), (variant, i, k)
    _assert_equivalent(r0["checkpoint"], ref["checkpoint"], variant)


@pytest.mark.parametrize("variant", worker.RESUME_VARIANTS)
def test_pool_method_killed_under_torchrun_resumes_bit_identical(ddp, variant):
    """``distill`` on 2 ranks killed after iteration 1 (every rank) and resumed from rank 0's
    ``state/last.pt`` ends bit-identical, on each rank, to the uninterrupted run: weights,
    optimisers, the replay pool / image pool, CMI's bank and round targets, ADI's batch in
    progress, RNG. Possible because the state rank 0 writes is the global one: pools hold every
    rank's images and per-rank rows (a batch being crafted) are gathered, and each rank restores
    its own rows. The state also loads into one process (any world size resumes)."""
    from dfkd.methods import create_method
    from dfkd.models import create_model
    for r in (0, 1):
        full = _load(ddp / "resume" / f"{variant}_full_rank{r}.pt")
        resumed = _load(ddp / "resume" / f"{variant}_killed_rank{r}.pt")
        _assert_identical(full, resumed, f"{variant} rank {r}: uninterrupted vs killed + resumed")
    at_kill = _load(ddp / "resume" / f"{variant}_at_kill.pt")
    assert at_kill["global_iter"] == 1
    state = at_kill["method"]
    # what one process holds after iteration 1 on the global batch of 8
    if variant == "dfkd_fgvc_pool":
        assert state["replay"]["size"] == 16               # 2 generator steps x 8 images
    elif variant == "cmi":
        assert state["pool"]["size"] == 8 and state["round_targets"].shape == (8,)
        assert int(state["modules"]["cmi_bank_count"]) == 8
    else:                                                   # adi: a batch 2 of 3 steps in, no pool yet
        assert state["pool"]["size"] == 0 and state["craft"]["steps"] == 2
        assert state["craft"]["x"].shape[0] == 8 and state["craft"]["opt"]["state"][0]["exp_avg"].shape[0] == 8
    cfg = worker.resume_cfg(variant, "single")
    torch.manual_seed(0)
    one = create_method(cfg.method, create_model(cfg.teacher_arch, 4), create_model(cfg.student_arch, 4), cfg,
                        num_classes=4, image_size=cfg.image_size, device="cpu")
    one.load_checkpoint_state(state)
    _assert_identical(one.checkpoint_state(), state, f"{variant}: 2-rank state loaded into one process")
