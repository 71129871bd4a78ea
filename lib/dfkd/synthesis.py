"""The generator stage on its own (notebook 20): train a generator for ``steps`` steps of Eq. 10
against the frozen teacher and a fixed random student, and record what it learns to produce.

Writes ``runs/synthesis/<run_name>/`` with per-step BN-prior and adversarial terms
(``metrics.csv``), the synthetic grid and teacher predictions at fixed noise (``samples/``),
the SAM attention maps of every generator block (``samples/attention.pt``), the generator
weights and a ``summary.json`` (final terms, class coverage of the teacher's predictions).
"""
from __future__ import annotations

import time

import torch

from .config import SynthConfig
from .methods import create_method
from .seed import resolve_device, seed_everything
from .tracking import Run, atomic_torch_save


def synthesize(cfg: SynthConfig, run: Run, *, progress: bool = True) -> dict:
    """Run the generator stage; returns the summary (a finished run returns its summary)."""
    from .train import _progress, build_model, eval_loader, load_teacher, save_samples

    if run.is_finished():
        return run.summary()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    test_ds, _ = eval_loader(cfg)
    k = len(test_ds.classes)
    if cfg.teacher_run:
        teacher, _ = load_teacher(cfg.teacher_run, device=device)
    else:
        teacher = build_model(cfg.teacher_arch, k, cfg.image_size).to(device).eval()
    student = build_model(cfg.student_arch, k, cfg.image_size)
    method = create_method(cfg.method, teacher, student, cfg, num_classes=k, image_size=cfg.image_size,
                           device=device)
    if not method.uses_generator:
        raise ValueError(f"method {cfg.method!r} has no generator; notebook 20 needs a generator-based method")
    t0 = time.time()
    steps = _progress(range(cfg.steps), progress, desc="generator steps")
    with method.generator_phase():
        for step in steps:
            losses = method.generator_step()
            method.counters["g_steps"] += 1
            run.log({"step": step, **{f"g_{n}": float(v) for n, v in losses.items()}})
    z = torch.randn(cfg.n_samples, cfg.nz, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    save_samples(method, z, run, epoch=0)
    maps = attention_maps(method.generator, z.to(device))
    if maps:
        atomic_torch_save({"maps": [m.cpu() for m in maps]}, run.samples_dir / "attention.pt")
    with torch.no_grad():
        probs = teacher(method.synthesize(cfg.n_samples, z.to(device))).float().softmax(1)
    pred = probs.argmax(1)
    run.save_weights("generator", method.generator, {"arch": type(method.generator).__name__, "nz": cfg.nz,
                                                      "image_size": cfg.image_size, "ngf": cfg.ngf,
                                                      "method": cfg.method, "output_map": cfg.output_map})
    last = run.metrics()[-1]
    return run.finish({
        "stage": "synthesis", "method": cfg.method, "steps": cfg.steps, "image_size": cfg.image_size,
        "g_bn_last": last.get("g_bn"), "g_kd_last": last.get("g_kd"), "g_loss_last": last.get("g_loss"),
        "class_coverage": int(pred.unique().numel()), "num_classes": k,
        "teacher_confidence": float(probs.max(1).values.mean()), "time_s": time.time() - t0,
    })


@torch.no_grad()
def attention_maps(generator, z: torch.Tensor) -> list[torch.Tensor]:
    """Per SAM block, the channel-mean spatial attention ``softmax(A_s)`` (B, H, W) for noise z (B, nz).

    Empty when the generator has no SAM modules (lam = 0 or a DCGAN generator).
    """
    if not list(getattr(generator, "sams", []) or []):
        return []
    was = generator.training
    generator.eval()
    try:
        _, maps = generator(z, return_attention=True)
        return [m.float().mean(1) for m in maps]
    finally:
        generator.train(was)
