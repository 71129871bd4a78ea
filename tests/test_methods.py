"""Every registered distillation method against the one ``DistillMethod`` interface.

Tiny models (``resnet_tiny_t`` -> ``resnet_tiny_s``) at 32 px on CPU. Per method: one iteration
trains the student and the synthesiser (generator, or the crafted inputs), every loss is finite,
every adversarial term is non-zero and depends on the student (the peer bug of passing the teacher
as the student zeroes it silently), resume from ``checkpoint_state`` reproduces the next iteration
bit for bit, and ``distill`` writes the same results format for all methods, from which
``dfkd.report`` builds the comparison table.
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch

from dfkd import report
from dfkd.config import DistillConfig
from dfkd.losses import kd_loss
from dfkd.methods import METHODS, create_method
from dfkd.methods.common import ImagePool
from dfkd.models import create_model

K = 6
S = 32
ALL = sorted(METHODS)
GENERATIVE = [m for m in ALL if METHODS[m].uses_generator]
CRAFTING = [m for m in ALL if not METHODS[m].uses_generator]          # zskd, adi
ADVERSARIAL = ["cmi", "dfad", "dfkd_fgvc", "dfq", "fast", "mad", "zskt"]       # G maximises a T/S divergence
NON_ADVERSARIAL_G = ["dafl"]                                           # DAFL's G ignores the student


# each method's own options at test sizes (their defaults are the papers': a 4096-row CMI bank,
# 2048-image pools); a test's method_options go on top
TINY_OPTIONS = {"cmi": dict(dim=16, bank_size=32, pool_size=32), "zskd": dict(pool_size=32),
                "adi": dict(pool_size=32)}


def tiny_cfg(method: str = "dfkd_fgvc", *, method_options: dict | None = None, **kw) -> DistillConfig:
    base = dict(batch_size=8, g_steps=2, s_steps=2, nz=32, ngf=8, device="cpu", amp="off",
                channels_last=False, sfcl_dim=16, num_workers=0)
    base.update(kw)
    opts = {**TINY_OPTIONS.get(method, {}), **(method_options or {})}
    return DistillConfig(method=method, method_options=opts, **base)


def build(name: str, *, seed: int = 0, student=None, teacher=None, **kw):
    torch.manual_seed(seed)
    teacher = create_model("resnet_tiny_t", K) if teacher is None else teacher
    student = create_model("resnet_tiny_s", K) if student is None else student
    return create_method(name, teacher, student, tiny_cfg(name, **kw), num_classes=K, image_size=S, device="cpu")


def params_of(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module) -> bool:
    return any(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))


def roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), exactly as state/last.pt is read back."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def teacher_twin(teacher):
    """A trainable copy of the teacher, to be passed as the student (the peer bug)."""
    return copy.deepcopy(teacher).requires_grad_(True)


def adversarial(method, x):
    """The term the generator maximises, on images x (with grad)."""
    if method.name == "dfkd_fgvc":
        return kd_loss(method.student(x), method.teacher_forward(x), T=method.cfg.kd_T,
                       direction=method.cfg.kd_direction)
    return method.adversarial_term(x)


def test_registry_lists_every_method():
    assert set(METHODS) == {"dfkd_fgvc", "zskd", "zskt", "dafl", "dfad", "adi", "dfq", "mad", "cmi", "fast"}
    for name, cls in METHODS.items():
        assert cls.name == name
        assert cls.__doc__ and cls.__module__.split(".")[-1] == name
        assert (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip(), f"{name}: module docstring"


@pytest.mark.parametrize("name", ALL)
def test_iteration_trains_student_and_synthesiser(name):
    m = build(name)
    s0 = params_of(m.student)
    g0 = params_of(m.generator) if m.uses_generator else None
    losses = m.iteration()
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    assert any(k.startswith("g_") for k in losses) and any(k.startswith("s_") for k in losses)
    assert changed(s0, m.student), "the student did not change"
    if m.uses_generator:
        assert changed(g0, m.generator), "the generator did not change"
    b = m.budget()
    cfg = m.cfg
    assert b["iterations"] == 1 and b["g_steps"] == cfg.g_steps and b["s_steps"] == cfg.s_steps
    assert b["images_consumed"] == cfg.s_steps * cfg.batch_size
    assert b["images_generated"] >= cfg.batch_size and b["teacher_forwards"] >= b["images_consumed"]
    img = m.synthesize(5)
    assert img.shape == (5, 3, S, S) and torch.isfinite(img).all()


@pytest.mark.parametrize("name", CRAFTING)
def test_crafted_inputs_change_and_join_the_pool(name):
    m = build(name, method_options={"craft_steps": 3})
    with m.generator_phase():
        m.generator_step()
        x1 = m.craft.x.detach().clone()
        m.generator_step()
        assert not torch.equal(x1, m.craft.x.detach()), "the crafted inputs did not change"
        assert len(m.pool) == 0
        m.generator_step()                     # third step completes the batch
    assert m.craft is None and len(m.pool) == m.cfg.batch_size
    assert m.budget()["images_generated"] == m.cfg.batch_size   # one batch crafted, however many steps


def test_cmi_fills_pool_bank_and_trains_head():
    m = build("cmi")
    h0 = params_of(m.head)
    m.iteration()
    assert changed(h0, m.head)
    assert len(m.pool) == m.cfg.batch_size and int(m.cmi_bank_count) == m.cfg.batch_size
    assert "cmi_bank" in m.state_dict() and "head.net.0.weight" in m.state_dict()


def test_mad_ema_generator_follows_generator_and_is_saved():
    m = build("mad", method_options={"momentum": 0.75})
    e0 = params_of(m.generator_ema)
    m.iteration()
    assert changed(e0, m.generator_ema)
    with torch.no_grad():                      # theta' <- m theta' + (1 - m) theta
        for p in m.generator.parameters():
            p.add_(1.0)
    before = params_of(m.generator_ema)
    m.update_ema()
    for a, g, e in zip(before, m.generator.parameters(), m.generator_ema.parameters()):
        assert torch.allclose(e, 0.75 * a + 0.25 * g, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(m.generator.buffers(), m.generator_ema.buffers()))
    assert any(k.startswith("generator_ema.") for k in m.state_dict())
    assert not any(p.requires_grad for p in m.generator_ema.parameters())


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_term_is_nonzero_and_depends_on_the_student(name):
    m = build(name)
    gparams = list(m.generator.parameters())
    with m.generator_phase():
        adv = adversarial(m, m.generate(8))
        grads = torch.autograd.grad(adv, gparams, allow_unused=True)
    assert adv.item() > 1e-6, f"{name}: adversarial term is {adv.item()}"
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0, "no gradient reaches G"
    out = m.generator_step()
    key = "kd" if name == "dfkd_fgvc" else "adv"
    assert out[key].item() > 1e-6

    # the peer bug: the teacher passed as the student -> the term (and its gradient) vanishes
    torch.manual_seed(0)
    twin = build(name)
    bugged = create_method(name, twin.teacher, teacher_twin(twin.teacher), twin.cfg, num_classes=K,
                           image_size=S, device="cpu")
    with bugged.generator_phase():
        adv_bug = adversarial(bugged, bugged.generate(8))
        grads = torch.autograd.grad(adv_bug, list(bugged.generator.parameters()), allow_unused=True)
    assert abs(adv_bug.item()) < 1e-6
    assert sum(g.abs().sum().item() for g in grads if g is not None) < 1e-8


def test_adi_competition_term_depends_on_the_student():
    m = build("adi")
    x = m.noise(8).requires_grad_(True)
    with m.generator_phase():
        c = m.competition_term(x)
        (gx,) = torch.autograd.grad(c, x)
    assert 0.0 <= c.item() < 1.0, "1 - JS must be below 1 when student and teacher differ"
    assert gx.abs().sum().item() > 0, "the competition term does not reach the inputs"
    out = m.iteration()
    assert 0 < out["g_competition"].item() < 1.0
    bugged = create_method("adi", m.teacher, teacher_twin(m.teacher), m.cfg, num_classes=K, image_size=S,
                           device="cpu")
    with bugged.generator_phase():
        assert bugged.competition_term(x.detach()).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", NON_ADVERSARIAL_G)
def test_generator_objective_without_adversarial_term_ignores_the_student(name):
    m = build(name)
    assert not hasattr(m, "adversarial_term")
    other = create_method(name, m.teacher, create_model("resnet_tiny_s", K), m.cfg, num_classes=K,
                          image_size=S, device="cpu")
    other.generator.load_state_dict(m.generator.state_dict())
    torch.manual_seed(3)
    a = m.generator_step()
    torch.manual_seed(3)
    b = other.generator_step()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALL)
def test_resume_reproduces_the_next_iteration(name):
    extra = {"method_options": {"craft_steps": 3}} if name in CRAFTING else {}   # resume mid-batch
    a = build(name, **extra)
    a.iteration()
    state = roundtrip(a.checkpoint_state())
    b = build(name, seed=123, teacher=copy.deepcopy(a.teacher), **extra)   # the frozen teacher is not saved
    b.load_checkpoint_state(state)
    assert b.budget() == a.budget()
    torch.manual_seed(7)
    la = a.iteration()
    torch.manual_seed(7)
    lb = b.iteration()
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k], lb[k]), f"{name}: {k} {la[k].item()} != {lb[k].item()}"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("name", ["adi", "cmi", "mad", "zskd"])
def test_distill_kill_and_resume_matches_uninterrupted(name, runs_root):
    """Through state/last.pt: pools, memory bank, EMA generator and a half-crafted batch survive."""
    from dfkd.tracking import Run, load_weights, start_run
    from dfkd.train import distill

    def cfg(run_name):
        extra = {"method_options": {"craft_steps": 3}} if name in CRAFTING else {}   # kill lands mid-batch
        return tiny_cfg(run_name=run_name, method=name, dataset="toy_fgvc", image_size=S, toy_num_classes=K,
                        toy_train_per_class=2, toy_test_per_class=3, epochs=2, iters_per_epoch=1,
                        max_eval_batches=1, test_batch_size=16, sample_every=100, **extra)

    def kill(step, row):
        if step == 0:
            raise Killed("simulated kill after the first epoch's state was written")

    a = cfg("a")
    distill(a, start_run("distill", "a", a), progress=False)
    b = cfg("b")
    with pytest.raises(Killed):
        distill(b, start_run("distill", "b", b), progress=False, callbacks=[kill])
    distill(b, start_run("distill", "b", b), progress=False)
    ra, rb = Run(runs_root / "distill/a").metrics(), Run(runs_root / "distill/b").metrics()
    assert [r["iter"] for r in rb] == [0, 1]
    for x, y in zip(ra, rb):
        for k in x:
            if k.startswith(("g_", "s_")) or k in ("test_top1", "images_generated", "teacher_forwards"):
                assert x[k] == y[k], (name, x["iter"], k, x[k], y[k])
    wa, _ = load_weights(runs_root / "distill/a/weights/student.safetensors")
    wb, _ = load_weights(runs_root / "distill/b/weights/student.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_of_another_method_is_refused():
    a = build("dfq")
    b = build("mad")
    with pytest.raises(ValueError, match="written by method 'dfq'"):
        b.load_checkpoint_state(a.checkpoint_state())


def test_image_pool_is_bounded_fifo_and_roundtrips():
    pool = ImagePool(5, "imagenet", "cpu")
    x = torch.randn(3, 3, 8, 8)
    pool.add(x)
    pool.add(torch.randn(4, 3, 8, 8))
    assert len(pool) == 5 and pool.ptr == 2
    back = ImagePool(5, "imagenet", "cpu")
    back.load(roundtrip(pool.state()))
    torch.manual_seed(0)
    s1 = pool.sample(6)
    torch.manual_seed(0)
    assert torch.equal(s1, back.sample(6))
    # uint8 storage: within half a grey level of the clipped input
    p = ImagePool(4, "imagenet", "cpu")
    p.add(x)
    from dfkd.generator import from_teacher_input
    err = (from_teacher_input(p.latest(3).flip(0)) - from_teacher_input(x)).abs().max()
    assert err <= 0.5 / 255 + 1e-6


def test_all_methods_write_the_same_results_format(runs_root):
    from dfkd.tracking import start_run
    from dfkd.train import distill

    names = []
    for name in ALL:
        cfg = tiny_cfg(run_name=f"fmt_{name}", method=name, dataset="toy_fgvc", image_size=S, toy_num_classes=K,
                       toy_train_per_class=2, toy_test_per_class=3, epochs=1, iters_per_epoch=1, g_steps=1,
                       s_steps=1, max_eval_batches=1, test_batch_size=16)
        run = start_run("distill", cfg.run_name, cfg)
        distill(cfg, run, progress=False)
        names.append(cfg.run_name)

    summaries = {n: json.loads((runs_root / "distill" / n / "summary.json").read_text()) for n in names}
    keys = {n: set(s) for n, s in summaries.items()}
    first = keys[names[0]]
    assert all(k == first for k in keys.values()), {n: sorted(k ^ first) for n, k in keys.items()}
    budget_keys = {n: set(s["budget"]) for n, s in summaries.items()}
    assert len({frozenset(b) for b in budget_keys.values()}) == 1

    def numbers(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                yield from numbers(v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            yield obj
        elif isinstance(obj, str):
            assert obj not in ("nan", "inf", "-inf"), "non-finite value written as a string"

    for n, s in summaries.items():
        assert all(math.isfinite(v) for v in numbers(s)), n
        assert s["method"] == n.removeprefix("fmt_")
        assert s["budget"]["images_consumed"] == s["batch_size"] and s["budget"]["iterations"] == 1
        for f in ("metrics.csv", "params.yaml", "weights/student.safetensors", "state/last.pt"):
            assert (runs_root / "distill" / n / f).exists(), f"{n}: {f}"

    rows = report.collect_runs("distill", names=names)
    assert [r["run"] for r in rows] == names
    table = report.comparison_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(names)
    for header in ("method", "student top-1 last", "images generated", "images consumed", "G/S steps",
                   "teacher forwards", "ms/iteration"):
        assert header in lines[0]
    for name, line in zip(ALL, lines[2:]):
        assert line.startswith(f"| {name} |")
    md, csv_path = report.write_table(rows, runs_root / "table")
    assert md.read_text() == table
    assert csv_path.read_text().splitlines()[0].split(",")[0] == "method"
    assert len(report.collect_runs("distill")) == len(names)
    with pytest.raises(FileNotFoundError, match="fmt_missing"):
        report.collect_runs("distill", names="fmt_missing")


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_iteration_runs_and_stays_finite(name):
    m = build(name, amp="bf16")
    losses = m.iteration()
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in losses.values()), losses


@pytest.mark.parametrize("name", ALL)
def test_cpu_fast_path_bf16_channels_last_iteration_runs(name):
    """The CPU fast path (bf16 autocast + channels_last networks, MHAD's modules left NCHW) runs a
    whole iteration of every method with finite fp32 losses."""
    m = build(name, amp="bf16", channels_last=True)
    assert m.channels_last
    losses = m.iteration()
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in losses.values()), losses


def test_amp_native_and_channels_last_policy_on_cpu(monkeypatch):
    """amp 'native' is bf16 exactly when the CPU has bf16 instructions; channels_last applies on a
    CPU only under bf16, and dfkd_fgvc's MHAD modules then stay NCHW while the networks go NHWC."""
    import dfkd.methods.base as base_mod
    for has in (True, False):
        monkeypatch.setattr(base_mod, "cpu_has_native_bf16", lambda has=has: has)
        m = build("dfkd_fgvc", amp="native", channels_last=True)
        assert m.amp_dtype == (torch.bfloat16 if has else None)
        assert m.channels_last is has
    assert build("dfkd_fgvc", amp="auto", channels_last=True).amp_dtype is None   # auto: fp32 on a CPU
    assert not build("dfkd_fgvc", amp="off", channels_last=True).channels_last
    m = build("dfkd_fgvc", amp="bf16", channels_last=True)
    conv = next(c for c in m.student.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    for adapter, mha in zip(m.adapters, m.mhas):   # NCHW in, NCHW out (an NHWC weight makes NHWC)
        x = torch.randn(2, adapter.in_channels, 4, 4)
        assert adapter(x).is_contiguous() and mha(torch.randn(2, mha.channels, 4, 4)).is_contiguous()


def test_few_channel_batchnorm_computes_in_nchw_on_the_cpu_fast_path():
    """Under channels_last on a CPU, BN layers with fewer than 16 channels (resnet_tiny_s's first
    stage) get NCHW input and hand channels_last on; wider ones are left alone; the student's
    outputs and weight gradients equal those of the same student in NCHW, and the
    pair alone does not count as a hook that keeps the teacher off its compiled feature pass."""
    import dfkd.methods.base as base_mod
    from dfkd.losses import bn_prior
    m = build("dfkd_fgvc", amp="bf16", channels_last=True)
    bns = [b for b in m.student.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    few = [b for b in bns if b.num_features < base_mod.NCHW_BN_BELOW]
    assert few and len(few) < len(bns)
    seen = {}
    hooks = [b.register_forward_hook(lambda mod, a, out, b=b: seen.__setitem__(b, (a[0], out))) for b in bns]
    x = m.synthesize(4).requires_grad_(False)
    ref = copy.deepcopy(m.student)          # the same weights in NCHW, without the layout pair
    for b in ref.modules():
        b._forward_pre_hooks.clear()
        b._forward_hooks.clear()
    ref.to(memory_format=torch.contiguous_format)
    out, out_ref = m.student(x), ref(x.contiguous())   # fp32: the layout, not bf16 rounding, is compared
    for h in hooks:
        h.remove()
    for b in bns:
        inp, o = seen[b]
        assert o.is_contiguous(memory_format=torch.channels_last)
        if b in few:
            assert inp.is_contiguous() and not inp.is_contiguous(memory_format=torch.channels_last)
        else:
            assert inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous()
    torch.testing.assert_close(out, out_ref, rtol=1e-3, atol=1e-4)   # summation order only
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (n, p), q in zip(m.student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3 * q.grad.abs().max().item(), msg=n)
    assert not base_mod.has_foreign_forward_hooks(m.student)
    with bn_prior(m.teacher):
        assert base_mod.has_foreign_forward_hooks(m.teacher)
    assert not any(b._forward_pre_hooks for b in build("dfkd_fgvc", amp="off", channels_last=True).student.modules())


def test_mhad_from_distils_only_the_later_stages(monkeypatch):
    """mhad_from k: MHAD (Eq. 7) gets the stages k.. of both networks with their own adapters and
    MHAs (the same modules a k = 0 run builds, so the frozen lens of a stage does not depend on k);
    the skipped stages' adapters get no update. k = 0 (the paper) distils every block."""
    import dfkd.methods.dfkd_fgvc as fg
    seen = []
    real = fg.mhad_loss
    monkeypatch.setattr(fg, "mhad_loss", lambda tf, sf, ad, mh, **kw: seen.append((tf, sf, ad, mh)) or real(tf, sf, ad, mh, **kw))
    full = build("dfkd_fgvc")
    m = build("dfkd_fgvc", mhad_from=1)
    assert len(m.adapters) == len(full.adapters) == 4
    for a, b in zip(m.mhas.parameters(), full.mhas.parameters()):
        assert torch.equal(a, b)
    before = [params_of(a) for a in m.adapters]
    x = m.synthesize(m.cfg.batch_size)
    out = m.train_student_on(x)
    tf, sf, ad, mh = seen[-1]
    with torch.no_grad():
        t = m.teacher.forward_features(x)
    assert len(tf) == len(sf) == len(ad) == len(mh) == 3
    assert [f.shape for f in tf] == [f.shape for f in t.stages[1:]]
    assert all(a is b for a, b in zip(ad, m.adapters[1:])) and all(a is b for a, b in zip(mh, m.mhas[1:]))
    assert not changed(before[0], m.adapters[0]) and changed(before[1], m.adapters[1])
    assert out["mhad"] > 0
    full.train_student_on(x)
    assert len(seen[-1][0]) == 4                                  # the paper: every block
    with pytest.raises(ValueError, match="mhad_from"):
        build("dfkd_fgvc", mhad_from=4)                           # resnet_tiny has 4 stages
    with pytest.raises(ValueError, match="mhad_from"):
        build("dfkd_fgvc", mhad_from=1, mhad_mode="penultimate")
    from dfkd.config import ConfigError, validate
    with pytest.raises(ConfigError, match="mhad_from"):
        validate(DistillConfig(mhad_from=-1))
