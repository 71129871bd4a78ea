"""Data-parallel training on several GPUs (or CPU processes) under ``torchrun``.

Usage (one node, 8 GPUs; every rank runs the same loop on its share of the global batch)::

    torchrun --nproc_per_node 8 -m dfkd.launch teacher --params params/base.yaml \\
        --params params/paper/teacher.yaml --set run_name=resnet34_cub200_ddp dataset=cub200
    torchrun --nproc_per_node 8 -m dfkd.launch distill --params params/base.yaml \\
        --params params/paper/distill.yaml --set run_name=dfkd_cub200_ddp teacher_run=resnet34_cub200_ddp

(the entry point is :mod:`dfkd.launch`, which imports the training loops; this module imports none
of them, so ``dfkd.methods`` can import it without a cycle). Without torchrun (no ``WORLD_SIZE`` in
the environment) every helper is a no-op and the code runs
single-process exactly as before.

Design (``docs/decisions.md#speed``):
- ``cfg.batch_size`` is the *global* batch; each rank generates/consumes ``batch_size // world_size``
  images. :meth:`DistillMethod.sample_z` draws the global noise batch from the (identically seeded)
  global RNG on every rank and keeps rank r's rows, so the ranks together see exactly the noise a
  single process would see, and their RNG states stay equal.
- Gradients are averaged by hand just before each optimiser step (:func:`average_gradients_on_step`,
  an optimiser step pre-hook: one flat all-reduce per step). A method owns several modules and
  steps them at different times (generator steps, then student steps), which fits a hook on the
  optimiser better than ``DistributedDataParallel`` wrappers around each module.
- BatchNorm layers that run in train mode (student, generator, SAM/MHA) use statistics of the
  global batch: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere (SyncBatchNorm
  refuses CPU tensors). The teacher's BN prior (Eq. 3) averages mean and E[x^2] over ranks
  (``BNPrior(reduce=...)``), SFCL takes its negatives from the global batch (:func:`gather_rows`).
- Every per-sample random draw (augmentation, pool indices) is the rank's rows of the global
  draw (:func:`rank_rows`); image pools and CMI's bank gather every rank's rows
  (:func:`all_gather_rows`), so each rank holds the pool one process would; inputs optimised per
  rank get the single process's gradient (:func:`scale_own_rows_grad`). Every method then
  computes what one process computes on the global batch (``tests/test_dist.py``).
- Rank 0 writes the run folder, evaluates and saves; every rank reads the resume state. The saved
  state is the global one (per-rank rows gathered by ``checkpoint_state``, a collective), and each
  rank restores its own rows, so a killed torchrun run resumes exactly.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
import torch.distributed as tdist
import torch.nn as nn


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------
def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Returns True when this process is part of a group of more than one rank. The backend is
    ``nccl`` when CUDA is available (and then ``torch.cuda.set_device(LOCAL_RANK)``), ``gloo``
    otherwise. Without those variables (or with ``WORLD_SIZE=1``) nothing happens.
    """
    if is_initialized():
        return tdist.get_world_size() > 1
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import datetime
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if is_initialized():
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else (also ``cuda:N``) unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and world_size() > 1 and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def local_batch_size(batch_size: int) -> int:
    """This rank's share of the global ``batch_size`` (which must divide evenly)."""
    ws = world_size()
    if batch_size % ws:
        raise ValueError(f"batch_size={batch_size} does not split evenly over {ws} ranks; use a "
                         f"multiple of {ws}")
    if batch_size // ws < 2:
        raise ValueError(f"batch_size={batch_size} over {ws} ranks leaves {batch_size // ws} image(s) "
                         "per rank; BatchNorm in train mode needs at least 2")
    return batch_size // ws


# --------------------------------------------------------------------------------------------
# reductions (no autograd)
# --------------------------------------------------------------------------------------------
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself is unchanged). Identity on one rank."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    tdist.all_reduce(out)
    return out / world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return t
    out = t.detach().clone()
    tdist.all_reduce(out)
    return out


def all_reduce_mean_dict(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank mean of every 0-d tensor of ``d`` in one collective (for logging)."""
    if world_size() == 1 or not d:
        return d
    keys = sorted(d)
    stacked = all_reduce_mean(torch.stack([torch.as_tensor(d[k]).detach().float().reshape(()) for k in keys]))
    return dict(zip(keys, stacked.unbind(0)))


# --------------------------------------------------------------------------------------------
# rows of the global batch
# --------------------------------------------------------------------------------------------
def rank_rows(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """This rank's n rows of ``draw(n * world_size)`` (rows ``rank*n:(rank+1)*n``).

    For per-sample random draws (augmentation parameters, pool indices): every rank draws the
    global batch's values from the shared, identically seeded RNG and keeps its own rows, so the
    ranks together use exactly what one process would draw for the global batch, and their RNG
    states stay equal. One rank: ``draw(n)``.
    """
    ws = world_size()
    if ws == 1:
        return draw(n)
    r = rank()
    return draw(n * ws)[r * n:(r + 1) * n]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (n * world_size, ...) in rank order, without autograd (pools,
    memory banks, checkpoints: the global batch as one process holds it). Every rank must call it
    with the same n. Identity on one rank."""
    ws = world_size()
    if ws == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(ws)]
    tdist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def own_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global-batch tensor (n * world_size, ...) (inverse of
    :func:`all_gather_rows`); the tensor itself on one rank."""
    ws = world_size()
    if ws == 1:
        return x
    if x.shape[0] % ws:
        raise ValueError(f"{x.shape[0]} rows do not split over {ws} ranks: this state was written for "
                         f"another global batch size; resume with the run's batch_size")
    n = x.shape[0] // ws
    return x[rank() * n:(rank() + 1) * n]


def scale_own_rows_grad(tensors: Iterable[torch.Tensor]) -> None:
    """Divide ``t.grad`` by the world size for tensors of which each rank holds its own rows of
    the global batch (inputs optimised directly, Fast's noise z); they are never averaged.

    A rank's loss is a mean over its n rows (batch statistics through the differentiable
    collectives above), so its gradient with respect to its own rows is world_size times that of
    the single-process loss on the global batch (a mean over n * world_size rows); divided, each
    row gets exactly the single process's gradient (Adam is not exactly scale invariant: eps).
    One rank: nothing.
    """
    ws = world_size()
    if ws == 1:
        return
    for t in tensors:
        if t.grad is not None:
            t.grad.div_(ws)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` (identical start)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            tdist.broadcast(t.data, src)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each ``p.grad`` by its mean over ranks: one flat all-reduce per (device, dtype).

    Parameters whose ``grad`` is None are skipped; which ones are None must be the same on every
    rank (it is: every rank runs the same code path).
    """
    ws = world_size()
    if ws == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat.div_(ws)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def average_gradients_on_step(opt: torch.optim.Optimizer):
    """Register a step pre-hook on ``opt`` that averages its parameters' gradients over ranks.

    Returns the hook handle (None on one rank: nothing is registered).
    """
    if world_size() == 1:
        return None

    def hook(optimizer, args, kwargs):
        average_gradients(p for group in optimizer.param_groups for p in group["params"])
    return opt.register_step_pre_hook(hook)


# --------------------------------------------------------------------------------------------
# differentiable collectives
# --------------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward: the sum over ranks of the incoming gradients (every rank's loss
    depends on the sum, so each rank's input receives all of their gradients)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad)
        return grad


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (identity on one rank)."""
    return t if world_size() == 1 else _AllReduceSum.apply(t)


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks (forward all-reduce; backward all-reduce of the gradient).

    Why the gradients come out right: every rank computes the same term f(S) of S = mean_r s_r,
    so the mean of the ranks' losses counts it once, as one process would. In backward each s_r
    receives W * df/dS / W = df/dS (all W ranks' gradients, times 1/W); averaging parameter
    gradients over ranks then gives df/dS * mean_r ds_r/dtheta = df/dS * dS/dtheta.
    """
    ws = world_size()
    if ws == 1:
        return t
    return _AllReduceSum.apply(t) / ws


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 in rank order; backward: all-reduce the gradient, keep own rows.

    (torch.distributed.nn.functional.all_gather needs reduce_scatter or all_to_all in backward,
    which not every backend offers; this needs only all_reduce.)
    """

    @staticmethod
    def forward(ctx, x):
        ws, r = tdist.get_world_size(), tdist.get_rank()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ws)]
        tdist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], r
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (n * world_size, ...) with rank r's rows at r*n (differentiable).

    Every rank must pass the same n.
    """
    if world_size() == 1:
        return x
    return _GatherRows.apply(x)


# --------------------------------------------------------------------------------------------
# BatchNorm with global statistics
# --------------------------------------------------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode statistics are those of the batch over all ranks.

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm{1,2,3}d``; eval mode (and a
    single rank) is plain BatchNorm. Used where ``nn.SyncBatchNorm`` is unavailable (CPU/gloo).
    Per-channel sums, sums of squares and counts are all-reduced (differentiably) in fp32; the
    variance is E[x^2] - mean^2 (biased for normalising, unbiased for the running estimate).
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            count = torch.full((c,), float(x.numel() // c), device=x.device)
            stats = sum_across_ranks(torch.stack([xf.sum(dims), (xf * xf).sum(dims), count]))
            n = stats[2]
            mean = stats[0] / n
            var = (stats[1] / n - mean * mean).clamp_min(0)
            if self.track_running_stats and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.mul_(1 - f).add_(mean.detach() * f)
                    self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1).clamp_min(1)) * f)
            shape = [1, c] + [1] * (x.dim() - 2)
            y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            if self.affine:
                y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, *, kind: str = "auto") -> nn.Module:
    """Replace every BatchNorm of ``module`` (in place where possible; returns the result) by a
    global-statistics one: ``kind="sync"`` -> ``nn.SyncBatchNorm`` (CUDA only), ``"global"`` ->
    :class:`GlobalBatchNorm`, ``"auto"`` -> sync under the nccl backend, global otherwise.
    Parameters and buffers stay the same objects (optimisers built before stay valid); state_dict
    keys are unchanged. One rank: returned as is."""
    if world_size() == 1:
        return module
    if kind == "auto":
        kind = "sync" if tdist.get_backend() == "nccl" else "global"
    if kind == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        new = _convert_global(child)
        if new is not child:
            out.add_module(name, new)
    return out


# --------------------------------------------------------------------------------------------
# rank-0 sections
# --------------------------------------------------------------------------------------------
def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result (and rank 0's RNG state, so RNG
    draws inside ``fn``, e.g. by a data loader, do not desynchronise the ranks' noise).

    One rank: just ``fn()``. An exception on rank 0 is re-raised there and reported on the others.
    ``fn`` must not call collectives (evaluation uses BN in eval mode: no communication).
    """
    if world_size() == 1:
        return fn()
    from .seed import rng_state, set_rng_state
    payload: list[Any] = [None]
    err: BaseException | None = None
    if is_main():
        try:
            payload[0] = ("ok", fn(), rng_state())
        except BaseException as e:          # noqa: BLE001 - re-raised below after telling the others
            err = e
            payload[0] = ("error", f"{type(e).__name__}: {e}", None)
    tdist.broadcast_object_list(payload, src=0)
    status, value, rng = payload[0]
    if err is not None:
        raise err
    if status == "error":
        raise RuntimeError(f"rank 0 failed in a rank-0 section: {value}")
    if not is_main():
        set_rng_state(rng)
    return value
