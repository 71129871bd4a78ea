"""The two training loops: supervised teacher pretraining and data-free distillation.

``train_teacher`` trains a classifier on real images (SGD, cosine or one-cycle schedule, label
smoothing, bf16 + channels_last on CUDA, decoded images held on the GPU for small datasets).
``distill`` runs Algorithm 1 with any registered method on synthetic images only, evaluating the
student on the real test split once per epoch (the paper's protocol; we report the last epoch as
well as the best). Both loops write their run folder (``dfkd.tracking``) and resume from
``state/last.pt`` after a kill: re-running the same call continues where the last state was
written and ends with the same weights as an uninterrupted run.

Under ``torchrun`` (``python -m dfkd.launch``) both loops are data parallel: ``batch_size`` is the
global batch split over the ranks, gradients are averaged, BatchNorm statistics are global, rank 0
alone evaluates and writes the run folder, and every rank reads the resume state.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from . import dist
from . import robustness
from .config import DistillConfig, TeacherConfig, to_dict
from .losses import check_finite
from .methods import create_method
from .methods.base import make_optimizer
from .models import create_model
from .seed import resolve_device, rng_state, seed_everything, set_rng_state
from .tracking import Run, epochs_changed_message, load_into, load_weights, open_run

# which split trains and which one measures, per dataset (Cars: our held-out part of train,
# because the official test images are not available here; see data/README.md)
TRAIN_SPLIT = {"cars196": "train_minus_heldout", "pets": "trainval", "aircraft": "trainval"}
EVAL_SPLIT = {"cars196": "heldout"}


def train_split(dataset: str) -> str:
    return TRAIN_SPLIT.get(dataset, "train")


def eval_split(dataset: str) -> str:
    return EVAL_SPLIT.get(dataset, "test")


def _rank0_run(run: Run) -> Run:
    """Only rank 0 writes the run folder (whatever the caller passed to ``start_run``)."""
    if not dist.is_main():
        run.write = False
    return run


def _setup_device(name: str) -> torch.device:
    device = dist.rank_device(resolve_device(name))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # fixed shapes: fastest conv algorithms
    return device


def _progress(iterable, enabled: bool, **kw):
    if not enabled or not dist.is_main():
        return iterable
    from tqdm.auto import tqdm
    # at most one redraw a second: in JupyterLab every redraw is a widget update that the browser
    # renders on the same cores (notebook 10's loop took 289 s there against 251 s under papermill)
    kw.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kw)


def _autocast(device: torch.device, amp: str):
    # "native" (the distillation steps' CPU bf16, dfkd.methods.base) reads as "auto" here: teacher
    # training and evaluation stay fp32 on a CPU
    dtype = torch.bfloat16 if (amp == "bf16" or (amp in ("auto", "native") and device.type == "cuda")) else None
    if dtype is None:
        import contextlib
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_model(arch: str, num_classes: int, image_size: int, *, pretrained: bool = False,
                build_kwargs: dict | None = None) -> nn.Module:
    """``create_model`` plus the architecture options that depend on the input size.

    ``build_kwargs`` (from a weights sidecar) rebuilds exactly the saved layout (e.g. WRN's stem).
    """
    kw = dict(build_kwargs) if build_kwargs is not None else size_kwargs(arch, image_size)
    return create_model(arch, num_classes, pretrained=pretrained, **kw)


def size_kwargs(arch: str, image_size: int) -> dict:
    """Builder options that depend on the input resolution (WRN's stem; see decisions.md)."""
    return {"image_size": image_size} if arch.startswith("wrn") else {}


def _check_resume_epochs(run: Run, old, new: int, *, t_max_only: bool = False) -> None:
    """Refuse to resume a state written for another ``epochs`` (its schedules were fixed for that
    total: past the old cosine T_max the student's learning rate would climb again). ``start_run``
    refuses the same from params.yaml; this guards callers that open the Run themselves."""
    if old is None:
        return
    if (max(1, int(new)) != int(old)) if t_max_only else (int(old) != int(new)):
        raise RuntimeError(epochs_changed_message(run.dir, old, new))


# ============================================================================================
# evaluation
# ============================================================================================
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, *, max_batches: int = 0, amp: str = "auto") -> dict:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader``; restores train mode."""
    device = torch.device(device)
    was = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    n = 0
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += y.numel()
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("evaluation loader yielded no images")
    return {"top1": 100.0 * correct.item() / n, "loss": loss_sum.item() / n, "n": n}


def eval_loader(cfg, *, batch_size: int | None = None):
    ds = data_mod.create_dataset(cfg.dataset, cfg.data_root or None, split=eval_split(cfg.dataset),
                                 image_size=cfg.image_size, train=False, **data_mod.dataset_kwargs(cfg))
    bs = batch_size or getattr(cfg, "test_batch_size", None) or cfg.batch_size
    return ds, data_mod.make_loader(ds, bs, train=False, num_workers=cfg.num_workers, seed=cfg.seed)


# ============================================================================================
# teacher pretraining
# ============================================================================================
def _weights_meta(model, cfg, classes, extra: dict) -> dict:
    return {"arch": model.arch, "build_kwargs": dict(getattr(model, "build_kwargs", {}) or {}),
            "num_classes": len(classes), "classes": list(classes),
            "image_size": cfg.image_size, "dataset": cfg.dataset,
            "normalization": {"mean": list(data_mod.IMAGENET_MEAN), "std": list(data_mod.IMAGENET_STD)},
            **extra}


def train_teacher(cfg: TeacherConfig, run: Run, *, progress: bool = True,
                  callbacks: list[Callable[[int, dict], None]] | None = None) -> dict:
    """Train ``cfg.arch`` on the real train split; evaluate on the test split every epoch.

    Writes ``weights/best`` and ``weights/last`` (safetensors + sidecar), ``metrics.csv``,
    ``state/last.pt`` after every epoch, and ``summary.json`` at the end. Calling it again on
    the same run resumes from the last state (or returns the summary of a finished run).
    ``callbacks(epoch, row)`` run after each epoch's state is saved (tests use one to simulate a kill).
    """
    if run.is_finished():
        return run.summary()
    device = _setup_device(cfg.device)
    run = _rank0_run(run)
    progress = progress and dist.is_main()
    ws, rank = dist.world_size(), dist.rank()
    b = dist.local_batch_size(cfg.batch_size) if ws > 1 else cfg.batch_size   # this rank's share
    seed_everything(cfg.seed)
    train_ds = data_mod.create_dataset(cfg.dataset, cfg.data_root or None, split=train_split(cfg.dataset),
                                       image_size=cfg.image_size, train=True, **data_mod.dataset_kwargs(cfg))
    test_ds, test_loader = eval_loader(cfg)
    classes = train_ds.classes
    model = build_model(cfg.arch, len(classes), cfg.image_size, pretrained=cfg.pretrained)
    model = dist.convert_batchnorm(model).to(device)    # several ranks: BN over the global batch
    dist.broadcast_module(model)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    # images decoded once and held on the GPU (augmented there) for small datasets
    preload = cfg.gpu_preload == "on" or (cfg.gpu_preload == "auto" and device.type == "cuda"
                                          and cfg.dataset != "toy_fgvc")
    if preload:
        images_u8, labels = data_mod.preload(train_ds, cfg.image_size)
        images_u8, labels = images_u8.to(device), labels.to(device)
        steps_per_epoch = len(labels) // cfg.batch_size
    else:
        steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the train split ({len(train_ds)} images)")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    opt = make_optimizer(torch.optim.SGD, model.parameters(), device, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, nesterov=True)   # averages gradients over ranks
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    else:
        warm = cfg.warmup_epochs * steps_per_epoch

        def lr_lambda(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    start_epoch, best, history = 0, {"top1": -1.0, "epoch": -1}, []
    state = run.load_state()
    if state is not None:
        _check_resume_epochs(run, state.get("epochs"), cfg.epochs)
        load_into(model, state["model"], what="resume state model", expected_arch=cfg.arch,
                  meta={"arch": state.get("arch")})
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        set_rng_state(state["rng"])
        start_epoch, best = int(state["epoch"]) + 1, dict(state["best"])
        run.truncate_metrics(lambda r: r.get("epoch") is not None and r["epoch"] <= state["epoch"])
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loader_gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # same order after resume
        if preload:
            order = torch.randperm(len(labels), generator=loader_gen).to(device)
            batches = ((order[i * cfg.batch_size:(i + 1) * cfg.batch_size]) for i in range(steps_per_epoch))
        elif ws == 1:
            loader = data_mod.make_loader(train_ds, cfg.batch_size, train=True, num_workers=cfg.num_workers,
                                          seed=int(torch.randint(0, 2**31 - 1, (1,), generator=loader_gen)))
            batches = iter(loader)
        else:   # this rank's rows of every global batch of a seeded permutation
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=loader_gen))
            order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))
            mine = order[:steps_per_epoch * cfg.batch_size].view(steps_per_epoch, ws, b)[:, rank].reshape(-1)
            loader = data_mod.make_loader(torch.utils.data.Subset(train_ds, mine.tolist()), b, train=False,
                                          num_workers=cfg.num_workers, seed=seed + rank, drop_last=True)
            batches = iter(loader)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for step in _progress(range(steps_per_epoch), progress, desc=f"teacher epoch {epoch + 1}/{cfg.epochs}",
                              leave=False):
            if preload:
                idx = next(batches)
                x = data_mod.gpu_augment(images_u8[idx], train=True, image_size=cfg.image_size,
                                         scale=getattr(train_ds, "crop_scale", data_mod.CROP_SCALE))
                y = labels[idx]
                if ws > 1:   # the global batch is augmented alike on every rank; keep this rank's rows
                    x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
            else:
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, cfg.amp):
                if cfg.adv_eps > 0:   # adversarial training: the step sees the attacked batch (dfkd.robustness)
                    x = robustness.l2_pgd(model, x, cfg.adv_eps, cfg.adv_steps)
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
        if ws > 1:
            loss_sum = dist.all_reduce_mean(loss_sum)
            correct, seen = dist.all_reduce_sum(correct), seen * ws
        train_loss = loss_sum.item() / steps_per_epoch
        check_finite({"train_loss": torch.tensor(train_loss)}, f"teacher epoch {epoch + 1}")
        row = {"epoch": epoch, "train_loss": train_loss, "train_top1": 100.0 * correct.item() / seen,
               "lr": opt.param_groups[0]["lr"], "time_s": time.time() - t0}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            ev = dist.on_main(lambda: evaluate(model, test_loader, device, amp=cfg.amp))
            row.update(test_top1=ev["top1"], test_loss=ev["loss"])
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "epoch": epoch}
                run.save_weights("best", model, _weights_meta(model, cfg, classes, {"top1": ev["top1"], "epoch": epoch}))
        run.log(row)
        history.append(row)
        if run.write:
            run.save_state({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "rng": rng_state(), "epoch": epoch, "best": best, "arch": cfg.arch,
                            "epochs": cfg.epochs})
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.3f}  "
                  + (f"test top1 {row['test_top1']:.2f}%" if "test_top1" in row else ""), flush=True)
        for cb in callbacks or []:
            cb(epoch, row)
    dist.barrier()   # rank 0 has written metrics.csv
    rows = run.metrics()
    last = [r for r in rows if r.get("test_top1") is not None][-1]
    run.save_weights("last", model, _weights_meta(model, cfg, classes, {"top1": last["test_top1"], "epoch": cfg.epochs - 1}))
    return run.finish({
        "stage": "teacher", "arch": cfg.arch, "dataset": cfg.dataset, "image_size": cfg.image_size,
        "num_classes": len(classes), "epochs": cfg.epochs, "top1_last": last["test_top1"],
        "top1_best": best["top1"], "best_epoch": best["epoch"], "test_images": len(test_ds),
        "train_images": len(train_ds), "device": str(device),
        "time_s": rows[-1]["time_s"] if rows else 0.0,
    })


# ============================================================================================
# teacher loading
# ============================================================================================
def load_teacher(teacher_run: str, *, device="cpu", runs_root=None, which: str = "last"):
    """``(model, meta)`` from ``runs/teacher/<teacher_run>/weights/<which>.safetensors``."""
    run = open_run("teacher", teacher_run, runs_root)
    path = run.weights_dir / f"{which}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"teacher run {run.dir} has no weights/{which}.safetensors: it did not "
                                "finish; re-run notebooks/10_teacher_pretraining.py with the same run_name to resume it")
    state, meta = load_weights(path)
    for key in ("arch", "num_classes", "image_size"):
        if key not in meta:
            raise ValueError(f"sidecar {path.with_suffix('.json')} lacks {key!r}; it was not written by dfkd")
    model = build_model(meta["arch"], meta["num_classes"], meta["image_size"], build_kwargs=meta.get("build_kwargs"))
    load_into(model, state, what=f"teacher weights {path}", expected_arch=meta["arch"], meta=meta)
    return model.to(device).eval(), meta


# ============================================================================================
# data-free distillation (Algorithm 1)
# ============================================================================================
def distill(cfg: DistillConfig, run: Run, *, progress: bool = True,
            callbacks: list[Callable[[int, dict], None]] | None = None, method_hook=None) -> dict:
    """Distil a student from the frozen teacher with ``METHODS[cfg.method]`` on synthetic images.

    One epoch = ``iters_per_epoch`` iterations of (``g_steps`` generator steps, ``s_steps``
    student steps). The student is evaluated on the real test split after every epoch. The resume
    state is written at the end of every epoch (and every ``checkpoint_every`` iterations).
    ``callbacks(global_iteration, row)`` run after each logged iteration (tests simulate kills).
    """
    if run.is_finished():
        return run.summary()
    device = _setup_device(cfg.device)
    run = _rank0_run(run)
    progress = progress and dist.is_main()
    seed_everything(cfg.seed)
    test_ds, test_loader = eval_loader(cfg)
    classes = test_ds.classes
    if cfg.teacher_run:
        teacher, tmeta = load_teacher(cfg.teacher_run, device=device)
        if tmeta["num_classes"] != len(classes):
            raise ValueError(f"teacher {cfg.teacher_run!r} has {tmeta['num_classes']} classes but "
                             f"{cfg.dataset} has {len(classes)}: distil on the teacher's dataset "
                             f"({tmeta.get('dataset')!r})")
        if tmeta["image_size"] != cfg.image_size:
            raise ValueError(f"teacher {cfg.teacher_run!r} was trained at {tmeta['image_size']} px; set "
                             f"image_size={tmeta['image_size']} (synthetic images match the teacher's input size)")
    else:  # random teacher: smoke tests only
        teacher, tmeta = build_model(cfg.teacher_arch, len(classes), cfg.image_size).to(device).eval(), {
            "arch": cfg.teacher_arch}
    student = build_model(cfg.student_arch, len(classes), cfg.image_size)  # random init (decisions.md)
    method = create_method(cfg.method, teacher, student, cfg, num_classes=len(classes),
                           image_size=cfg.image_size, device=device)
    if method_hook is not None:
        method_hook(method)
    teacher_eval = dist.on_main(lambda: evaluate(teacher, test_loader, device, max_batches=cfg.max_eval_batches,
                                                 amp=cfg.amp))

    gen_seed = torch.Generator().manual_seed(cfg.seed + 12345)
    fixed_z = torch.randn(min(64, cfg.batch_size * 4), cfg.nz, generator=gen_seed)
    start_it, best = 0, {"top1": -1.0, "epoch": -1}
    elapsed0 = 0.0
    state = run.load_state()
    if state is not None:
        # states written before "epochs" was saved: the student's cosine T_max is max(1, epochs)
        old_epochs = state.get("epochs", state["method"].get("s_sched", {}).get("T_max"))
        _check_resume_epochs(run, old_epochs, cfg.epochs, t_max_only="epochs" not in state)
        method.load_checkpoint_state(state["method"])
        set_rng_state(state["rng"])
        start_it, best, elapsed0 = int(state["global_iter"]), dict(state["best"]), float(state["elapsed_s"])
        run.truncate_metrics(lambda r: r.get("iter") is not None and r["iter"] < start_it)

    def save_state(global_iter: int, elapsed: float):
        # every rank builds the state (per-rank rows, e.g. a batch being crafted, are gathered into
        # the global batch: a collective); rank 0 alone writes it
        state = method.checkpoint_state()
        if run.write:
            run.save_state({"method": state, "rng": rng_state(), "global_iter": global_iter,
                            "best": best, "elapsed_s": elapsed, "epochs": cfg.epochs})

    total_iters = cfg.epochs * cfg.iters_per_epoch
    t0 = time.time() - elapsed0
    acc_sum, acc_n = {}, 0
    for it in _progress(range(start_it, total_iters), progress, desc=f"{cfg.method}", initial=start_it,
                        total=total_iters):
        epoch = it // cfg.iters_per_epoch
        losses = method.iteration()
        method.iteration_end()
        for k, v in losses.items():
            acc_sum[k] = acc_sum.get(k, 0) + v
        acc_n += 1
        end_of_epoch = (it + 1) % cfg.iters_per_epoch == 0
        row = None
        if (it + 1) % cfg.log_every == 0 or end_of_epoch:
            means = dist.all_reduce_mean_dict({k: v / acc_n for k, v in acc_sum.items()})   # over ranks
            check_finite(means, f"{cfg.method} iteration {it + 1}")  # one host sync per log step
            row = {"iter": it, "epoch": epoch, **{k: float(v) for k, v in means.items()}, **method.lr(),
                   "time_s": time.time() - t0}
            acc_sum, acc_n = {}, 0
        if end_of_epoch:
            method.epoch_end()
            ev = dist.on_main(lambda: evaluate(method.student, test_loader, device,
                                               max_batches=cfg.max_eval_batches, amp=cfg.amp))
            row.update(test_top1=ev["top1"], test_loss=ev["loss"], **method.budget())
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "epoch": epoch}
            if (epoch + 1) % cfg.sample_every == 0 or it + 1 == total_iters:
                save_samples(method, fixed_z, run, epoch)
            if progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}  student top1 {ev['top1']:.2f}%  "
                      f"(teacher {teacher_eval['top1']:.2f}%)", flush=True)
        if row is not None:
            run.log(row)
        if end_of_epoch or (cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0):
            save_state(it + 1, time.time() - t0)
        if row is not None:
            for cb in callbacks or []:
                cb(it, row)
    elapsed = time.time() - t0
    dist.barrier()   # rank 0 has written metrics.csv
    rows = run.metrics()
    evals = [r for r in rows if r.get("test_top1") is not None]
    meta = _weights_meta(method.student, cfg, classes, {"top1": evals[-1]["test_top1"], "method": cfg.method,
                                                         "teacher_run": cfg.teacher_run})
    run.save_weights("student", method.student, meta)
    if getattr(method, "generator", None) is not None:
        run.save_weights("generator", method.generator, {"arch": type(method.generator).__name__, "nz": cfg.nz,
                                                          "image_size": cfg.image_size, "ngf": cfg.ngf,
                                                          "method": cfg.method, "output_map": cfg.output_map})
    budget = method.budget()
    return run.finish({
        "stage": "distill", "method": cfg.method, "dataset": cfg.dataset, "image_size": cfg.image_size,
        "teacher_arch": tmeta["arch"], "student_arch": cfg.student_arch, "teacher_run": cfg.teacher_run,
        "teacher_top1": teacher_eval["top1"], "student_top1_last": evals[-1]["test_top1"],
        "student_top1_best": best["top1"], "best_epoch": best["epoch"], "epochs": cfg.epochs,
        "iters_per_epoch": cfg.iters_per_epoch, "g_steps": cfg.g_steps, "s_steps": cfg.s_steps,
        "batch_size": cfg.batch_size, "time_s": elapsed, "device": str(device),
        "ms_per_iteration": 1000.0 * elapsed / max(1, budget["iterations"]),
        "budget": budget, "num_classes": len(classes), "chance_top1": 100.0 / len(classes),
    })


def save_samples(method, fixed_z: torch.Tensor, run: Run, epoch: int) -> None:
    """A grid of synthetic images at fixed noise: ``samples/epoch_XXX.png`` and ``samples/last.pt``."""
    if not run.write or not hasattr(method, "synthesize"):
        return
    from .generator import from_teacher_input
    from .tracking import atomic_torch_save
    imgs = method.synthesize(fixed_z.shape[0], fixed_z.to(method.device) if method.uses_generator else None)
    imgs01 = from_teacher_input(imgs.float().cpu(), method.cfg.output_map).clamp(0, 1)
    with torch.no_grad():
        preds = method.teacher(imgs.to(method.device)).float().argmax(1).cpu()
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"images": (imgs01 * 255).round().to(torch.uint8), "teacher_pred": preds, "epoch": epoch},
                      run.samples_dir / "last.pt")
    import torchvision.utils as vutils
    import io
    from .tracking import atomic_write_bytes
    buf = io.BytesIO()
    vutils.save_image(imgs01, buf, nrow=8, format="png")
    atomic_write_bytes(run.samples_dir / f"epoch_{epoch:03d}.png", buf.getvalue())
