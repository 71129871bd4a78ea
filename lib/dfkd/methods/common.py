"""Pieces shared by the baseline methods (``zskd``, ``zskt``, ``dafl``, ``dfad``, ``adi``, ``dfq``,
``mad``, ``cmi``); the paper's own method does not use them.

Scope:
- :class:`GeneratorBaseline`: a :class:`DistillMethod` with a DCGAN ``GeneratorB`` generator and
  the online student step (fresh generator images, one loss function per method).
- :class:`ImagePool`: bounded FIFO pool of synthetic images (uint8, like the PNG files CMI, ADI
  and ZSKD write to disk), checkpointed through ``extra_state``.
- :class:`InputBatch`: a batch of images optimised directly with Adam (ZSKD, ADI).
- :class:`PooledMethod`: the student side of pool-based methods (KD on pool samples).
- small losses: :func:`attention_map` / :func:`at_loss` (Zagoruyko & Komodakis), :func:`js_competition`
  (Adaptive DeepInversion), :func:`random_resized_crop` (CMI's local view), :func:`clip_to_image`.

Images are (B, 3, S, S) in the teacher's input space (ImageNet-normalised unless
``output_map='raw_tanh'``) everywhere in this module unless a docstring says otherwise.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import dist
from ..generator import DCGANGenerator, from_teacher_input, to_teacher_input
from ..losses import bn_prior, kd_loss
from ..replay import random_flip, random_resized_crop  # noqa: F401  (re-exported: the pool-based baselines use them)
from .base import DistillMethod

# Pool capacity (images) when a pooled method's ``pool_size`` option is 0 (zskd, adi, cmi). 2048
# uint8 images are 308 MB at 224 px (on the device and in state/last.pt), 6 MB at 32 px; see
# docs/decisions.md#baselines.
DEFAULT_POOL_IMAGES = 2048


def rank_share(method, draw, n: int) -> torch.Tensor:
    """This rank's n rows of ``draw(n * world_size)`` (data parallel: the ranks together use what
    one process would draw, and their RNG states stay equal, as ``DistillMethod.sample_z``)."""
    ws = getattr(method, "world_size", 1)
    if ws == 1:
        return draw(n)
    r = method.rank
    return draw(n * ws)[r * n:(r + 1) * n]


def batch_mean(method, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a batch statistic) averaged over data-parallel ranks (differentiable; identity on one
    process), so batch-level terms (class balance, entropy) see the global batch."""
    reduce = getattr(method, "stat_reduce", None)
    return t if reduce is None else reduce(t)


def pool_capacity(method) -> int:
    """The method's ``pool_size`` option when set, else :data:`DEFAULT_POOL_IMAGES`; never below one
    global batch (``cfg.batch_size * world_size``: a method's cfg holds this rank's share under DDP)."""
    size = method.opts.pool_size
    cap = size if size > 0 else DEFAULT_POOL_IMAGES
    return max(cap, method.cfg.batch_size * getattr(method, "world_size", 1))


# ------------------------------------------------------------------------------------------------
# image-space helpers
# ------------------------------------------------------------------------------------------------
def clip_to_image(x: torch.Tensor, output_map: str) -> torch.Tensor:
    """Project teacher-space images onto the valid pixel range ([0, 1] before normalisation), as
    DeepInversion's ``clip`` does after every step. Not differentiable (use on ``.data``)."""
    return to_teacher_input(from_teacher_input(x, output_map) * 2.0 - 1.0, output_map)


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Activation-based attention (Zagoruyko & Komodakis 2017): the channel mean of squared
    activations, flattened and L2-normalised. f (B, C, H, W) -> (B, H*W) fp32."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def at_loss(ft: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
    """Squared distance of the attention maps of one stage pair, averaged over batch and positions
    (ZSKT's ``(at(x) - at(y)).pow(2).mean()``). The student map is bilinearly resized to the
    teacher's spatial size when they differ; channel counts need not match (AT averages them out)."""
    if fs.shape[-2:] != ft.shape[-2:]:
        fs = F.interpolate(fs.float(), size=ft.shape[-2:], mode="bilinear", align_corners=False)
    return (attention_map(ft) - attention_map(fs)).pow(2).mean()


def stage_pairs(n_teacher: int, n_student: int, t_sizes: list, s_sizes: list) -> list[tuple[int, int]]:
    """Index pairs (teacher stage, student stage) for attention transfer.

    Same number of stages: pair them in order (ResNet -> ResNet, resized if needed). Otherwise pair
    each student stage with the deepest teacher stage of the same spatial size; stages without a
    partner are skipped (WRN40-2: 3 stages; MobileNetV2: other strides).
    """
    if n_teacher == n_student:
        return list(zip(range(n_teacher), range(n_student)))
    pairs = []
    for j, size in enumerate(s_sizes):
        same = [i for i, ts in enumerate(t_sizes) if ts == size]
        if same:
            pairs.append((same[-1], j))
    return pairs


def js_competition(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 3.0, reduce=None) -> torch.Tensor:
    """Adaptive DeepInversion's competition term: ``1 - JS(P_s || P_t)`` at temperature T (the
    NVlabs code: softmax at T=3, probabilities clamped to [0.01, 0.99], batch-mean KL to the
    mixture M, result clamped to [0, 1]). Minimising it drives the inputs towards teacher/student
    disagreement. 0-d fp32; equals 1 exactly when the student agrees with the teacher. ``reduce``
    (data parallel: ``dist.mean_across_ranks``) averages the batch-mean JS over ranks before the
    clamp, so it is the global batch's."""
    p = F.softmax(s_logits.float() / T, dim=1)
    q = F.softmax(t_logits.float() / T, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    js = reduce(js) if reduce is not None else js
    return 1.0 - js.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# bounded image pool
# ------------------------------------------------------------------------------------------------
class ImagePool:
    """FIFO ring buffer of synthetic images, stored as uint8 in display space ([0, 1] * 255).

    uint8 is what the originals keep (CMI, ADI and ZSKD write their synthetic images to disk as
    PNG); it quarters the memory of fp32. Images go in and come out in the teacher's input space.
    ``sample`` draws uniformly with the torch RNG of the pool's device, so a resumed run draws the
    same batches. ``state()`` / ``load()`` hold the filled part of the buffer, the write pointer
    and the size (CPU tensors / ints).

    Data parallel (``dfkd.dist``): the pool is global. ``add`` gathers every rank's rows of the
    batch (rank order), so each rank holds the very pool one process would hold on the global
    batch, and ``sample`` keeps this rank's rows of one global index draw. The ranks' pools stay
    identical, a student batch is the single process's, and rank 0's checkpoint restores every
    rank (and resumes under any world size). Each rank keeps ``capacity`` images, as before.

    Optional labels: ``add(x, labels)`` also keeps one class index per image (the teacher's argmax
    when the image was made), and ``sample(n, balance=b)`` with b > 0 then draws image i with
    probability proportional to n_c(i)^-b, n_c the number of pooled images of its class (b = 1:
    every class equally often; ``replay_balance``, docs/decisions.md#synthesis).

    Args:
        capacity: maximum number of images kept (the oldest are overwritten).
        output_map: the run's ``output_map`` (how teacher space maps to pixels).
        device: where the buffer lives (the method's device).
    """

    def __init__(self, capacity: int, output_map: str, device):
        self.capacity = int(capacity)
        self.output_map = output_map
        self.device = torch.device(device)
        self.images: torch.Tensor | None = None   # (capacity, 3, S, S) uint8, allocated on first add
        self.labels: torch.Tensor | None = None   # (capacity,) int64, allocated on the first add with labels
        self.size = 0
        self.ptr = 0

    def __len__(self) -> int:
        return self.size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (from_teacher_input(x.detach().float(), self.output_map) * 255.0).round().to(torch.uint8)

    def decode(self, u8: torch.Tensor) -> torch.Tensor:
        return to_teacher_input(u8.float() / 127.5 - 1.0, self.output_map)

    @torch.no_grad()
    def add(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Append a batch x (B, 3, S, S) (teacher space) and, optionally, its class indices (B,);
        overwrites the oldest when full. A pool that keeps labels needs them with every batch. Data
        parallel: every rank's B rows are added (collective: all ranks call it together)."""
        if labels is None and self.labels is not None:
            raise ValueError("this pool keeps a class label per image (replay_balance > 0): pass labels to add()")
        u8 = dist.all_gather_rows(self.encode(x).to(self.device))
        if labels is not None:
            labels = dist.all_gather_rows(labels.detach().to(self.device, torch.long).reshape(-1))
            if labels.shape[0] != u8.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {u8.shape[0]} images")
        if self.images is None:
            self.images = torch.zeros((self.capacity, *u8.shape[1:]), dtype=torch.uint8, device=self.device)
        if labels is not None and self.labels is None:
            if self.size:
                raise ValueError("this pool already holds unlabelled images, so it cannot start keeping labels "
                                 "(a checkpoint written with replay_balance=0?): resume with replay_balance=0 "
                                 "or start a new run_name")
            self.labels = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        if u8.shape[0] > self.capacity:
            u8 = u8[-self.capacity:]
            labels = labels[-self.capacity:] if labels is not None else None
        n = u8.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        self.images.index_copy_(0, idx, u8)
        if labels is not None:
            self.labels.index_copy_(0, idx, labels)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, balance: float = 0.0) -> torch.Tensor:
        """(n, 3, S, S) teacher-space images drawn with replacement (data parallel: this rank's n
        rows of the global batch's draw): uniformly (``balance`` 0, CMI's and Fast's draw) or with
        probability proportional to n_c^-balance of the image's class c (needs labels)."""
        if self.size == 0:
            raise RuntimeError("the image pool is empty")
        if balance > 0:
            w = self.draw_weights(balance)
            idx = dist.rank_rows(lambda m: torch.multinomial(w, m, replacement=True), n)
        else:
            idx = dist.rank_rows(lambda m: torch.randint(0, self.size, (m,), device=self.device), n)
        return self.decode(self.images[idx])

    def draw_weights(self, balance: float) -> torch.Tensor:
        """(size,) unnormalised draw weights n_c(i)^-balance of the pooled images (``replay_balance``)."""
        if self.labels is None:
            raise ValueError("class-balanced draws need the pool's labels: add batches with labels "
                             "(dfkd_fgvc does when replay_balance > 0)")
        lab = self.labels[:self.size]
        counts = torch.bincount(lab).double()
        return counts[lab].pow(-float(balance))

    def sample_recent(self, n: int, window: int) -> torch.Tensor:
        """(n, 3, S, S) teacher-space images drawn uniformly with replacement from the ``window``
        most recently added ones (all of them when the pool holds fewer); data parallel as
        :meth:`sample`."""
        if self.size == 0:
            raise RuntimeError("the image pool is empty")
        w = max(1, min(int(window), self.size))
        k = dist.rank_rows(lambda m: torch.randint(0, w, (m,), device=self.device), n)
        return self.decode(self.images[(self.ptr - 1 - k) % self.capacity])

    def latest(self, n: int) -> torch.Tensor:
        """The n most recently added images (repeated when the pool holds fewer), no RNG used."""
        if self.size == 0:
            raise RuntimeError("the image pool is empty")
        k = torch.arange(n, device=self.device) % self.size
        idx = (self.ptr - 1 - k) % self.capacity
        return self.decode(self.images[idx])

    def state(self) -> dict[str, Any]:
        imgs = self.images[:self.size].cpu().clone() if self.images is not None else torch.zeros(0, dtype=torch.uint8)
        out = {"images": imgs, "ptr": self.ptr, "size": self.size, "capacity": self.capacity}
        if self.labels is not None:
            out["labels"] = self.labels[:self.size].cpu().clone()
        return out

    def load(self, state: dict[str, Any]) -> None:
        if int(state["size"]) > self.capacity:
            raise ValueError(f"the checkpoint's pool holds {state['size']} images, more than this run's "
                             f"capacity {self.capacity} (method_options pool_size changed?)")
        self.size, self.ptr = int(state["size"]), int(state["ptr"])
        imgs = state["images"]
        self.labels = None
        if self.size == 0:
            self.images = None
            return
        self.images = torch.zeros((self.capacity, *imgs.shape[1:]), dtype=torch.uint8, device=self.device)
        self.images[:self.size] = imgs.to(self.device)
        if state.get("labels") is not None:
            self.labels = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
            self.labels[:self.size] = state["labels"].to(self.device)


# ------------------------------------------------------------------------------------------------
# directly optimised inputs
# ------------------------------------------------------------------------------------------------
class InputBatch:
    """A batch of synthetic images optimised directly by Adam (no generator).

    Args:
        x: (B, 3, S, S) initial images (teacher space); copied into a leaf tensor with grad.
        targets: what the batch is optimised towards (class indices (B,) or soft labels (B, K)).
        lr, betas: Adam settings of the inputs.

    Data parallel: each rank optimises its own rows; ``state()`` (a collective then) holds the
    global batch (images, targets and Adam moments of every rank, rank order), ``from_state``
    keeps this rank's rows, so rank 0's checkpoint resumes every rank.
    """

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, lr: float, betas=(0.9, 0.999)):
        self.x = x.detach().clone().requires_grad_(True)
        self.targets = targets
        self.steps = 0
        self.lr, self.betas = lr, tuple(betas)
        self.opt = torch.optim.Adam([self.x], lr=lr, betas=self.betas)

    def state(self) -> dict[str, Any]:
        rows = self.x.shape

        def save(v):   # per-row tensors: the global batch (every rank's rows)
            if not torch.is_tensor(v):
                return v
            v = dist.all_gather_rows(v.detach()) if v.dim() and v.shape[0] == rows[0] else v.detach()
            return v.cpu().clone()
        opt = self.opt.state_dict()
        opt_state = {k: {n: save(v) for n, v in s.items()} for k, s in opt["state"].items()}
        return {"x": save(self.x), "targets": save(self.targets),
                "steps": self.steps, "opt": {"state": opt_state, "param_groups": opt["param_groups"]}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device) -> "InputBatch":
        pg = state["opt"]["param_groups"][0]
        n = state["x"].shape[0]

        def mine(v):   # this rank's rows of a saved global-batch tensor
            return dist.own_rows(v) if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
        batch = cls(mine(state["x"]).to(device), mine(state["targets"]).to(device), lr=pg["lr"], betas=pg["betas"])
        batch.opt.load_state_dict({"state": {k: {m: mine(v) for m, v in s.items()}
                                             for k, s in state["opt"]["state"].items()},
                                   "param_groups": state["opt"]["param_groups"]})
        batch.steps = int(state["steps"])
        return batch


# ------------------------------------------------------------------------------------------------
# method skeletons
# ------------------------------------------------------------------------------------------------
class GeneratorBaseline(DistillMethod):
    """A generative baseline: DCGAN ``GeneratorB`` (BN in the blocks, tanh output; init size S/16,
    so 2 -> 32 px and 14 -> 224 px) and an online student step on fresh generator images.

    Subclasses implement :meth:`student_losses` and either :meth:`generator_losses` or
    :meth:`adversarial_term` (the default generator objective maximises it).
    """

    def build(self) -> None:
        cfg = self.cfg
        self.generator = DCGANGenerator(nz=cfg.nz, img_size=self.image_size, ngf=cfg.ngf, out="tanh")

    def generator_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generator objective on teacher-space images x (with grad); must hold ``loss``.
        Default: maximise the subclass's ``adversarial_term(x)`` (DFAD, ZSKT), the 0-d
        teacher-student discrepancy; a method without one (DAFL) overrides this."""
        adv = self.adversarial_term(x)
        return {"loss": -adv, "adv": adv}

    def bn_and_adversarial(self, x: torch.Tensor):
        """Teacher logits (B, K) under the BN prior, L_BN (Eq. 3) and KL(T || S) on x (DFQ, MAD)."""
        cfg = self.cfg
        with bn_prior(self.teacher, reduce=self.stat_reduce) as bn:
            t = self.teacher_forward(x)
        l_bn = bn.loss()
        return t, l_bn, kd_loss(self.student(x), t, T=cfg.kd_T, direction=cfg.kd_direction)

    def generator_step(self) -> dict[str, torch.Tensor]:
        with self.autocast():
            x = self.generate(self.cfg.batch_size)
            out = self.generator_losses(x)
        self.optimize(self.g_opt, out["loss"])
        return {k: v.detach() for k, v in out.items()}

    def student_step(self) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self.autocast():
            x = self.generate(self.cfg.batch_size)
        return self.train_student_on(x)

    def kd_losses(self, x: torch.Tensor, T: float | None = None) -> dict[str, torch.Tensor]:
        """Plain KD (Eq. 2, ``kd_T`` and ``kd_direction`` of the run unless T is given)."""
        with torch.no_grad():
            t = self.teacher_forward(x)
        s = self.student(x)
        kd = kd_loss(s, t, T=self.cfg.kd_T if T is None else T, direction=self.cfg.kd_direction)
        return {"loss": kd, "kd": kd}


class PooledMixin:
    """Student side of pool-based methods: KD on images drawn from ``self.pool``.

    Pool images are flipped at random per sample (the CMI/ADI student loaders flip); when the pool
    is still empty (a crafted batch that spans several iterations) the student trains on the batch
    being crafted. The pool and any in-progress batch are saved in ``extra_state``.
    """

    pool: ImagePool

    def pool_batch(self) -> torch.Tensor:
        n = self.cfg.batch_size
        if len(self.pool) == 0:
            x = self.fallback_batch(n)
        else:
            x = self.pool.sample(n)
        x = random_flip(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def fallback_batch(self, n: int) -> torch.Tensor:
        raise RuntimeError("the image pool is empty")

    def pool_images(self, n: int) -> torch.Tensor:
        """n teacher-space images for display: the newest pool images (no RNG drawn)."""
        return self.pool.latest(n).float()


class CraftingMethod(PooledMixin, DistillMethod):
    """Input-optimisation methods (ZSKD, ADI): no generator; the synthetic batch is optimised.

    One generator step = one Adam step on the batch being crafted (:meth:`new_batch` starts one,
    :meth:`craft_losses` gives its loss); after ``craft_steps`` steps the batch joins the pool and
    the next generator step starts a new one. Student steps run KD at :meth:`student_T` on pool
    samples. The pool and the batch in progress (images, targets, Adam state, step) are saved in
    ``extra_state``, so a resume continues the very same batch.
    """

    uses_generator = False

    # Data parallel: every rank crafts its own rows of the global batch (noise and targets are
    # rank slices of one global draw) with its own Adam; batch statistics (the BN prior, ADI's TV
    # norm and competition term) are those of the global batch, and each rank's input gradients
    # are scaled to the single process's (dist.scale_own_rows_grad), so 2 ranks craft what one
    # process crafts on the global batch. The pool is global (ImagePool), the batch in progress is
    # gathered into the checkpoint (InputBatch.state): rank 0's checkpoint resumes every rank.

    def setup_crafting(self, craft_steps: int) -> None:
        self.pool = ImagePool(pool_capacity(self), self.cfg.output_map, self.device)
        self.craft: InputBatch | None = None
        self.craft_steps = craft_steps if craft_steps > 0 else self.cfg.g_steps

    def noise(self, n: int) -> torch.Tensor:
        """(n, 3, S, S) N(0, 1) noise in teacher space, clipped to the valid image range."""
        x = rank_share(self, lambda m: torch.randn(m, 3, self.image_size, self.image_size, device=self.device), n)
        return clip_to_image(x, self.cfg.output_map)

    def new_batch(self, n: int) -> InputBatch:
        raise NotImplementedError

    def craft_losses(self, batch: InputBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_T(self) -> float:
        return self.cfg.kd_T

    def craft_lr(self, step: int) -> float | None:
        """Adam lr of the inputs at ``step`` (0-based) of a batch; None keeps the batch's own lr."""
        return None

    def generator_step(self) -> dict[str, torch.Tensor]:
        if self.craft is None:
            self.craft = self.new_batch(self.cfg.batch_size)
            self.counters["images_generated"] += self.cfg.batch_size
        b = self.craft
        with self.autocast():
            out = self.craft_losses(b)
        b.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        dist.scale_own_rows_grad([b.x])   # data parallel: this rank's rows get one process's gradient
        lr = self.craft_lr(b.steps)
        if lr is not None:   # set before every step from the step count: a resumed batch continues alike
            for group in b.opt.param_groups:
                group["lr"] = lr
        b.opt.step()
        with torch.no_grad():
            b.x.copy_(clip_to_image(b.x, self.cfg.output_map))
        b.steps += 1
        if b.steps >= self.craft_steps:
            self.pool.add(b.x)
            self.craft = None
        return {k: v.detach() for k, v in out.items()}

    def fallback_batch(self, n: int) -> torch.Tensor:
        if self.craft is None:
            raise RuntimeError(f"{self.name}: nothing crafted yet (run a generator step first)")
        return self.craft.x.detach()[:n]

    def student_step(self) -> dict[str, torch.Tensor]:
        x = self.pool_batch()
        with self.autocast():
            with torch.no_grad():
                t = self.teacher_forward(x)
            kd = kd_loss(self.student(x), t, T=self.student_T(), direction=self.cfg.kd_direction)
        self.optimize(self.s_opt, kd)
        self.counters["images_consumed"] += int(x.shape[0])
        return {"loss": kd.detach(), "kd": kd.detach()}

    @torch.no_grad()
    def synthesize(self, n: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """n crafted images for display: the newest pool images, else the batch being crafted, else
        clipped noise (RNG forked, so training is unaffected). ``z`` is ignored (no generator)."""
        if len(self.pool):
            return self.pool_images(n)
        if self.craft is not None:
            x = self.craft.x.detach()
            return x[torch.arange(n, device=x.device) % x.shape[0]].float()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self.noise(n)

    def extra_state(self) -> dict[str, Any]:
        return {"pool": self.pool.state(), "craft": self.craft.state() if self.craft is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool.load(state["pool"])
        self.craft = InputBatch.from_state(state["craft"], self.device) if state.get("craft") else None
