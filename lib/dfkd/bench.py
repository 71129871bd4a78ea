"""Speed of one DFKD-FGVC iteration: the fast path against a plain fp32 eager reference.

Usage::

    python -m dfkd.bench                                   # paper preset on CUDA (CPU without one)
    python -m dfkd.bench --preset workbench --json runs/bench/workbench_h100.json
    python -m dfkd.bench --preset paper --compile          # fast path with torch.compile
    python -m dfkd.bench --preset tiny --device cpu        # about a minute on 2 CPU cores
    python -m dfkd.bench --preset paper --g-steps 2 --s-steps 2 --iters 2   # quick look

Presets (random-init teacher: no data and no teacher run are needed; timing does not depend on
the weights' values):

- ``paper``: 224 px, batch 64, ResNet-34 -> ResNet-18, 200 classes (CUB), nz 256, ngf 64.
- ``workbench``: 112 px, batch 64, ResNet-34 -> ResNet-18, 50 classes.
- ``tiny``: 32 px, batch 16, ``resnet_tiny_t`` -> ``resnet_tiny_s``, 10 classes, nz 64, ngf 16,
  4 generator and 3 student steps per iteration (CPU-sized).

``paper`` and ``workbench`` run the full method with t = 20 generator steps (Eq. 10) and
k = 15 student steps (Eq. 11) per iteration: SAM generator, BN prior, KL, MHAD and SFCL.

Two variants of the same math are built from the same seed and timed one after the other:

- ``fast``: bf16 autocast, channels_last (CUDA, and a CPU under bf16), fused/foreach optimisers (CUDA), optional
  ``torch.compile`` (``--compile``), ``cudnn.benchmark`` on CUDA;
- ``reference``: fp32 eager, contiguous (NCHW) tensors, single-tensor optimiser loops.

Reported per variant: milliseconds per generator step, per student step and per iteration,
synthetic images per second (``(t + k) * batch`` images are generated per iteration; the student
consumes ``k * batch``), achieved TFLOP/s (FLOPs of one generator and one student step, forward and
backward, counted once with ``torch.utils.flop_counter.FlopCounterMode`` outside the timed region
on the reference, times t and k), and peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS so far, which covers every variant run before it). On CUDA the timed loop is
bracketed by ``torch.cuda.synchronize()`` and per-step times come from CUDA events (no host sync
inside the loop). ``--json PATH`` writes everything, with the device name, torch version and the
preset's settings.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(image_size=224, batch_size=64, teacher_arch="resnet34", student_arch="resnet18",
                  num_classes=200, nz=256, ngf=64, g_steps=20, s_steps=15, iters=3, warmup=1),
    "workbench": dict(image_size=112, batch_size=64, teacher_arch="resnet34", student_arch="resnet18",
                      num_classes=50, nz=256, ngf=64, g_steps=20, s_steps=15, iters=5, warmup=1),
    "tiny": dict(image_size=32, batch_size=16, teacher_arch="resnet_tiny_t", student_arch="resnet_tiny_s",
                 num_classes=10, nz=64, ngf=16, g_steps=4, s_steps=3, iters=2, warmup=1),
}
VARIANTS = ("fast", "reference")
METRICS = ("ms_per_generator_step", "ms_per_student_step", "ms_per_iteration", "images_per_s",
           "student_images_per_s", "tflops", "peak_memory_mb")


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------
def preset_settings(preset: str, **overrides) -> dict[str, Any]:
    """The preset's settings with the non-None ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    s = dict(PRESETS[preset])
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s


def build_method(settings: dict[str, Any], device: str | torch.device, variant: str = "fast", *,
                 compile: bool = False, seed: int = 0, **cfg_overrides):
    """A ``dfkd_fgvc`` method with a random-init teacher for ``settings`` (see :data:`PRESETS`).

    ``variant="fast"``: amp bf16, channels_last (CUDA, and a CPU under bf16), fused/foreach optimisers
    (CUDA), ``compile`` as given. ``variant="reference"``: amp off, channels_last off, plain
    single-tensor optimisers, no compile. The same ``seed`` gives the same initial weights.
    ``cfg_overrides`` go to :class:`~dfkd.config.DistillConfig` (they win over the variant).
    """
    from .config import DistillConfig
    from .methods import create_method
    from .seed import seed_everything
    from .train import build_model
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    device = torch.device(device)
    fast = variant == "fast"
    kw = dict(method="dfkd_fgvc", image_size=settings["image_size"], batch_size=settings["batch_size"],
              teacher_arch=settings["teacher_arch"], student_arch=settings["student_arch"],
              nz=settings["nz"], ngf=settings["ngf"], g_steps=settings["g_steps"], s_steps=settings["s_steps"],
              device=str(device), seed=seed, amp="bf16" if fast else "off", channels_last=fast,
              compile=bool(fast and compile))
    kw.update(cfg_overrides)
    cfg = DistillConfig(**kw)
    seed_everything(seed)
    k, s = settings["num_classes"], settings["image_size"]
    teacher = build_model(cfg.teacher_arch, k, s).to(device).eval()
    student = build_model(cfg.student_arch, k, s)
    method = create_method("dfkd_fgvc", teacher, student, cfg, num_classes=k, image_size=s, device=device)
    if not fast:
        method.optim_impl = "plain"
        method.configure_optimizers()
    return method


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def count_flops(method) -> dict[str, int]:
    """FLOPs (forward + backward) of one generator step and one student step (runs one of each)."""
    from torch.utils.flop_counter import FlopCounterMode
    method.student.train()
    with method.generator_phase():
        with FlopCounterMode(display=False) as fc:
            method.generator_step()
    g = int(fc.get_total_flops())
    with FlopCounterMode(display=False) as fc:
        method.student_step()
    s = int(fc.get_total_flops())
    return {"generator_step": g, "student_step": s}


class _Marks:
    """Step boundaries: CUDA events (read after one final synchronize) or host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {"g": [], "s": []}

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, kind: str) -> float:
        spans = self.spans[kind]
        if not spans:
            return float("nan")
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in spans) / len(spans)
        return 1000.0 * sum(b - a for a, b in spans) / len(spans)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(method, *, iters: int, warmup: int, flops: dict[str, int] | None = None) -> dict[str, Any]:
    """Run ``warmup`` then ``iters`` iterations; return the timing metrics (see module docstring)."""
    device = method.device
    marks = _Marks(device)
    steps = {"g": type(method).generator_step.__get__(method), "s": type(method).student_step.__get__(method)}

    def wrap(kind):
        def step():
            a = marks.mark()
            out = steps[kind]()
            marks.spans[kind].append((a, marks.mark()))
            return out
        return step

    method.generator_step, method.student_step = wrap("g"), wrap("s")   # instance attributes
    try:
        for _ in range(warmup):
            method.iteration()
        _sync(device)
        marks.spans = {"g": [], "s": []}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        losses = {}
        for _ in range(iters):
            losses = method.iteration()
        _sync(device)
        iter_s = (time.perf_counter() - t0) / max(1, iters)
    finally:
        del method.generator_step, method.student_step
    cfg = method.cfg
    out: dict[str, Any] = {
        "ms_per_generator_step": marks.ms("g"),
        "ms_per_student_step": marks.ms("s"),
        "ms_per_iteration": 1000.0 * iter_s,
        "images_per_s": (cfg.g_steps + cfg.s_steps) * cfg.batch_size / iter_s,
        "student_images_per_s": cfg.s_steps * cfg.batch_size / iter_s,
        "last_losses": {k: float(v) for k, v in losses.items()},
    }
    if flops:
        per_iter = cfg.g_steps * flops["generator_step"] + cfg.s_steps * flops["student_step"]
        out["tflops"] = per_iter / iter_s / 1e12
        out["generator_tflops"] = flops["generator_step"] / (out["ms_per_generator_step"] / 1e3) / 1e12
        out["student_tflops"] = flops["student_step"] / (out["ms_per_student_step"] / 1e3) / 1e12
    else:
        out["tflops"] = None
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_memory_kind"] = "cuda max_memory_allocated during the timed iterations"
    else:
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out["peak_memory_kind"] = "process peak RSS so far (includes earlier variants)"
    return out


def _optimizer_desc(opt) -> str | None:
    if opt is None:
        return None
    d = opt.defaults
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "plain" \
        if d.get("foreach") is False else "default"
    return f"{type(opt).__name__}({impl})"


def variant_config(method) -> dict[str, Any]:
    return {"amp": str(method.amp_dtype).replace("torch.", "") if method.amp_dtype else "off",
            "channels_last": bool(method.channels_last), "compile": bool(method.cfg.compile),
            "g_opt": _optimizer_desc(method.g_opt), "s_opt": _optimizer_desc(method.s_opt)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark(preset: str = "paper", device: str | torch.device | None = None, *, iters: int | None = None,
              warmup: int | None = None, g_steps: int | None = None, s_steps: int | None = None,
              batch_size: int | None = None, compile: bool = False, variants=VARIANTS, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """Measure ``variants`` of the preset on ``device`` (default: CUDA if available) -> result dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available here; use --device cpu")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True      # fixed shapes: pick the fastest conv algorithms
    settings = preset_settings(preset, iters=iters, warmup=warmup, g_steps=g_steps, s_steps=s_steps,
                               batch_size=batch_size)
    result: dict[str, Any] = {
        "preset": preset, "settings": settings, "device": str(device), "device_name": device_name(device),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "num_threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "backend_flags": {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "method": "dfkd_fgvc (SAM generator, BN prior, KL, MHAD, SFCL)", "variants": {},
    }
    flops = None
    for variant in ("reference", "fast"):     # FLOPs are counted on the eager reference first
        if variant not in variants and not (variant == "reference" and flops is None):
            continue
        method = build_method(settings, device, variant, compile=compile, seed=seed)
        if flops is None:
            flops = count_flops(method)
            result["flops"] = {**flops, "iteration": settings["g_steps"] * flops["generator_step"]
                               + settings["s_steps"] * flops["student_step"]}
            if variant not in variants:
                del method
                continue
        if progress:
            print(f"[bench] {variant}: {settings['warmup']} warm-up + {settings['iters']} timed iteration(s) ...",
                  file=sys.stderr, flush=True)
        metrics = time_method(method, iters=settings["iters"], warmup=settings["warmup"], flops=flops)
        metrics["config"] = variant_config(method)
        result["variants"][variant] = metrics
        del method
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["variants"] = {v: result["variants"][v] for v in VARIANTS if v in result["variants"]}
    if all(v in result["variants"] for v in VARIANTS):
        f, r = result["variants"]["fast"], result["variants"]["reference"]
        ratio = {}
        for k in METRICS:
            a, b = r.get(k), f.get(k)
            if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
                ratio[k] = None
            else:
                ratio[k] = a / b
        result["ratio_ref_over_fast"] = ratio
        # speed-up of the fast path: ref/fast for times and memory, fast/ref for rates
        rates = ("images_per_s", "student_images_per_s", "tflops")
        result["speedup"] = {k: (None if v is None else (1.0 / v if k in rates else v)) for k, v in ratio.items()}
    return result


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"dfkd.bench  preset={result['preset']}  device={result['device']} ({result['device_name']})  "
             f"torch {result['torch_version']}",
             f"  {s['image_size']} px, batch {s['batch_size']}, {s['teacher_arch']} -> {s['student_arch']}, "
             f"{s['num_classes']} classes, nz {s['nz']}, ngf {s['ngf']}, t={s['g_steps']} generator + "
             f"k={s['s_steps']} student steps per iteration, {s['iters']} timed iteration(s) after "
             f"{s['warmup']} warm-up"]
    if "flops" in result:
        fl = result["flops"]
        lines.append(f"  FLOPs: generator step {fl['generator_step'] / 1e9:.2f} G, student step "
                     f"{fl['student_step'] / 1e9:.2f} G, iteration {fl['iteration'] / 1e12:.3f} T")
    vs = result["variants"]
    names = list(vs)
    has_ratio = "speedup" in result
    header = f"  {'':26s}" + "".join(f"{n:>16s}" for n in names) + (f"{'speed-up':>11s}" if has_ratio else "")
    lines += ["", header]
    rows = [("ms / generator step", "ms_per_generator_step", "{:.2f}"),
            ("ms / student step", "ms_per_student_step", "{:.2f}"),
            ("ms / iteration", "ms_per_iteration", "{:.1f}"),
            ("images / s (generated)", "images_per_s", "{:.1f}"),
            ("images / s (student)", "student_images_per_s", "{:.1f}"),
            ("achieved TFLOP/s", "tflops", "{:.4f}"),
            ("peak memory (MiB)", "peak_memory_mb", "{:.0f}")]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            v = vs[n].get(key)
            cells.append(f"{'-' if v is None else fmt.format(v):>16s}")
        line = f"  {label:26s}" + "".join(cells)
        if has_ratio:
            r = result["speedup"].get(key)
            line += f"{'-' if r is None else f'{r:.2f}x':>11s}"
        lines.append(line)
    lines.append("")
    for n in names:
        c = vs[n]["config"]
        lines.append(f"  {n}: amp={c['amp']} channels_last={c['channels_last']} compile={c['compile']} "
                     f"g_opt={c['g_opt']} s_opt={c['s_opt']}")
    if has_ratio:
        lines.append("  speed-up = reference / fast for times and memory, fast / reference for rates "
                     "(> 1: the fast path is better)")
    if result["device"].startswith("cpu"):
        lines.append("  peak memory on CPU = process peak RSS so far (not per variant)")
    return "\n".join(lines)


def _finite(v: Any) -> Any:
    """NaN/inf -> None (JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfkd.bench",
                                 description="Time the DFKD-FGVC iteration: fast path vs fp32 eager reference.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (preset default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations (preset default)")
    ap.add_argument("--g-steps", type=int, default=None, help="generator steps t per iteration")
    ap.add_argument("--s-steps", type=int, default=None, help="student steps k per iteration")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast path (warm-up >= 1)")
    ap.add_argument("--variants", default="fast,reference", help="comma list of: fast, reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if args.compile and args.warmup == 0:
        print("[bench] warning: --compile with --warmup 0 times the compilation too", file=sys.stderr)
    result = benchmark(args.preset, args.device, iters=args.iters, warmup=args.warmup, g_steps=args.g_steps,
                       s_steps=args.s_steps, batch_size=args.batch_size, compile=args.compile,
                       variants=variants, seed=args.seed)
    print(format_table(result), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(result), indent=2, sort_keys=True, default=str) + "\n")
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
