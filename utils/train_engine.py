"""The stage-2 training engine (MAE's ``engine_pretrain.py``): one MVTM step, one epoch, one evaluation.

``training_transformer.py`` builds and saves; this module runs. ``bench/train_throughput.py``
times the same :func:`train_step` the trainer runs.

Masks. The MVTM masks of a step are drawn on the CPU, for the step's whole global batch (every
accumulation micro-batch of every DDP rank), from a generator seeded with (seed, step)
(:func:`step_masks`). So a sample's mask depends only on (seed, step, its place in the global
batch): not on the number of processes, the accumulation split or the device, and a resumed run
needs no generator state. Drawing on the CPU also tells the host how many tokens are masked,
so the masked positions are gathered with a known size and nothing waits for the device.

Loss. Cross-entropy (with label smoothing) on the masked positions only, summed, and divided by
the number of masked tokens of the whole global batch: gradient accumulation and DDP give the
gradient of the larger batch. Scalars stay on the device; the trainer reads them every
``--log-every`` steps (nanoGPT), never per step.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from .masks import token_hole_bank
from .runtime import autocast, grad_scaler, make_generator, rng_state, set_rng_state
from .train_utils import EMA, NonFiniteLoss, warmup_cosine

EVAL_SEED = 12345  # fixed validation masks: losses are comparable across epochs
# on the CPU the validation forward runs this many sequences at a time (masks still drawn per batch):
# the lab-size transformer's attention maps are then 32 MiB, which utils.runtime.keep_freed_memory
# reuses; a batch of 256 made 512 MiB maps on fresh pages at every layer (README › CPU memory reuse)
CPU_EVAL_CHUNK = 8
HOLE_BANK_SIZE = 4096  # generated inpainting holes to draw from with --hole-frac


@dataclass(frozen=True)
class StepConfig:
    """What one optimizer step needs besides the model; fixed for a run."""
    batch_size: int = 64  # rows of one micro-batch over all processes (--batch-size)
    accum_grad: int = 1
    seed: int = 0
    clip_grad: float = 1.0
    label_smoothing: float = 0.1
    precision: str = "fp32"
    hole_frac: float = 0.0  # share of rows masked only inside a hole of ``TrainParts.holes``


@dataclass
class TrainParts:
    """The objects a training step touches."""
    model: torch.nn.Module  # MaskGit: the masking rule (``mask_tokens``) and the transformer's weights
    net: torch.nn.Module  # what runs forward: model.transformer, maybe DDP-wrapped and/or compiled
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    ema: EMA | None = None
    holes: torch.Tensor | None = None  # (K, N) bool hole bank on the CPU, True = hole token
    ddp: torch.nn.Module | None = None  # the DDP wrapper (for no_sync), None in one process
    rank: int = 0
    world: int = 1

    @property
    def raw(self) -> torch.nn.Module:
        return self.model.transformer

    @property
    def eval_net(self) -> torch.nn.Module:
        """The weights to validate and export: the EMA's when on."""
        return self.ema.model if self.ema is not None else self.raw


@functools.lru_cache(maxsize=2)
def hole_bank(count: int, seed: int, size: int, latent_resolution: int) -> torch.Tensor:
    """``utils.masks.token_hole_bank``, made once per process (seconds on a CPU; a resumed run reuses it)."""
    return token_hole_bank(count, seed, size, latent_resolution)


def make_parts(model, device, precision: str, *, lr: float, weight_decay: float = 0.05, warmup_steps: int = 0,
               total_steps=None, ema: float = 0.0, compile: bool = False, hole_frac: float = 0.0, seed: int = 0,
               rank: int = 0, world: int = 1) -> TrainParts:
    """The trainer's parts for ``model`` on ``device``: DDP when ``world`` > 1, ``torch.compile``
    on request, AdamW (fused on CUDA; no decay on biases, norms, embeddings), GradScaler (active
    for fp16 only), warmup + cosine LR over ``total_steps()`` (a callable: the time budget may
    change it; None: constant LR), the weight EMA when ``ema`` > 0, and the bank of generated
    inpainting holes (seeded) when ``hole_frac`` > 0."""
    raw = model.transformer
    ddp = None
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)
    opt = torch.optim.AdamW(param_groups(raw, weight_decay), lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    sched = None if total_steps is None else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps, total_steps()))
    vq = model.vqgan.cfg
    holes = hole_bank(HOLE_BANK_SIZE, seed, vq.img_resolution, vq.latent_resolution) if hole_frac > 0 else None
    net = ddp or raw
    return TrainParts(model, torch.compile(net) if compile else net, opt, grad_scaler(device, precision), sched,
                      EMA(raw, ema) if ema > 0 else None, holes, ddp, rank, world)


@dataclass
class LoopState:
    """What changes while training; saved in ``last.pt`` so a resumed run continues exactly."""
    steps_per_epoch: int
    epochs: int  # planned; --time-budget-min sets it from the measured speed
    step: int = 0
    budgeted: bool = False  # epochs set by --time-budget-min: kept on --resume, never measured again
    best_val: float = math.inf
    epoch_losses: torch.Tensor | None = None  # (S, 2) per step of this epoch: (loss, unsmoothed CE), on device

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, embeddings and the positional / logit bias parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "emb" not in name and name != "bias" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def mvtm_masks(model, n: int, gen: torch.Generator, holes=None, hole_frac: float = 0.0) -> torch.Tensor:
    """(n, N) bool on the CPU, True = masked: the lab's MVTM masks (``model.mask_tokens``: per row
    r ~ U(0,1), ceil(gamma(r, N) N) random positions) of n sequences; with ``holes``, a
    ``hole_frac`` share of the rows is masked only inside a random hole of the bank."""
    region = None
    if holes is not None and hole_frac > 0:
        pick = torch.randint(len(holes), (n,), generator=gen)  # (n,)
        use = torch.rand(n, generator=gen) < hole_frac  # (n,)
        region = holes[pick] & use[:, None]  # (n, N); all-False rows: masked anywhere
    ids = torch.zeros(n, model.num_image_tokens, dtype=torch.long)  # only the mask depends on the draw
    return model.mask_tokens(ids, gen, region)[1]


def step_masks(parts: TrainParts, cfg: StepConfig, n: int, step: int) -> torch.Tensor:
    """The masks of a step's global batch of n rows, keyed on (seed, step) only."""
    return mvtm_masks(parts.model, n, make_generator(step_seed(cfg.seed, step)), parts.holes, cfg.hole_frac)


def masked_positions(mask: torch.Tensor, device) -> torch.Tensor:
    """(B, N) CPU bool mask -> (M,) flat indices into B*N of the masked positions, on ``device``
    (pinned and asynchronous on CUDA: its size is known on the host)."""
    idx = mask.reshape(-1).nonzero().squeeze(1)  # (M,)
    if torch.device(device).type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def masked_token_loss(logits: torch.Tensor, ids: torch.Tensor, idx: torch.Tensor, label_smoothing: float = 0.0):
    """Cross-entropy summed over the masked positions ``idx`` (flat indices into B*N) only.

    logits (B, N, V), ids (B, N) the true tokens. Only the M masked rows are upcast to fp32.
    Returns (smoothed sum, unsmoothed sum, masked logits (M, V), targets (M,)); per position the
    smoothed loss is (1 - eps) * -log p_y + eps * mean_k(-log p_k), as ``F.cross_entropy``'s."""
    logits_m = logits.reshape(-1, logits.shape[-1]).index_select(0, idx)  # (M, V)
    target = ids.reshape(-1).index_select(0, idx)  # (M,)
    logp = logits_m.float().log_softmax(-1)  # (M, V)
    nll = -logp.gather(1, target[:, None]).sum()
    if label_smoothing == 0:
        return nll, nll.detach(), logits_m, target
    smooth = -logp.mean(-1).sum()
    return (1 - label_smoothing) * nll + label_smoothing * smooth, nll.detach(), logits_m, target


def apply_mask(ids: torch.Tensor, idx: torch.Tensor, mask_id: int) -> torch.Tensor:
    """ids (B, N) with the flat positions ``idx`` set to the mask token."""
    return ids.reshape(-1).index_fill(0, idx, mask_id).view_as(ids)


def train_step(parts: TrainParts, cfg: StepConfig, ids: torch.Tensor, step: int):
    """One optimizer step of MVTM: mask, forward, loss, backward, clip, optimizer, LR, EMA.

    ``ids`` (A*W*b, N) long on the device: the token ids of the step's global batch (A
    accumulation micro-batches x W processes x b rows). This process trains on its rows,
    ``ids.view(A, W, b, N)[:, rank]``. Returns device tensors, nothing read on the host:
    ``(stats (2,) = global (loss, unsmoothed CE) per masked token, grad norm)``.
    """
    A, W, N = cfg.accum_grad, parts.world, ids.shape[1]
    masks = step_masks(parts, cfg, len(ids), step)  # (A*W*b, N) on the CPU
    scale = W / int(masks.sum())  # DDP averages over W: the gradient is that of (sum of losses / masked tokens)
    masks = masks.view(A, W, -1, N)[:, parts.rank]  # (A, b, N) this process's rows
    ids = ids.view(A, W, -1, N)[:, parts.rank]  # (A, b, N)
    sums = torch.zeros(2, device=ids.device)
    parts.opt.zero_grad(set_to_none=True)
    for a in range(A):
        later = parts.ddp is not None and a < A - 1  # all-reduce the gradients once, at the last micro-batch
        with parts.ddp.no_sync() if later else contextlib.nullcontext():
            idx = masked_positions(masks[a], ids.device)  # (M_a,)
            with autocast(ids.device, cfg.precision):
                logits = parts.net(apply_mask(ids[a], idx, parts.model.mask_token_id))  # (b, N, V)
            loss, ce = masked_token_loss(logits, ids[a], idx, cfg.label_smoothing)[:2]
            parts.scaler.scale(loss * scale).backward()
        sums += torch.stack([loss.detach(), ce])
    parts.scaler.unscale_(parts.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(parts.raw.parameters(), cfg.clip_grad)
    parts.scaler.step(parts.opt)
    parts.scaler.update()
    if parts.sched is not None:
        parts.sched.step()
    if parts.ema is not None:
        parts.ema.update(parts.raw, step)
    stats = sums * (scale / W)  # this process's share of the global means
    if W > 1:
        dist.all_reduce(stats)
    return stats, gnorm


def epoch_order(n: int, seed: int, epoch: int, steps: int, step_batch: int) -> torch.Tensor:
    """(steps, step_batch) row indices of an epoch: a permutation seeded on (seed, epoch), the same
    in every process (each takes its rows in :func:`train_step`)."""
    perm = torch.randperm(n, generator=make_generator(seed + 7919 * epoch))
    return perm[: steps * step_batch].view(steps, step_batch)


class Monitor:
    """The per-step bookkeeping of a run, without host syncs between log steps: progress bar,
    metric rows, the NaN guard, ``--time-budget-min``, and the stop conditions."""

    def __init__(self, state: LoopState, parts: TrainParts, metrics, log, *, step_images: int, log_every: int = 10,
                 progress: bool = True, time_budget_min: float = 0.0, stop_after_steps: int = 0, stop_flag=None):
        self.parts, self.metrics, self.log = parts, metrics, log
        self.step_images, self.log_every = step_images, log_every
        self.time_budget_min, self.stop_after_steps, self.stop_flag = time_budget_min, stop_after_steps, stop_flag
        self.start_step, self.t0 = state.step, time.time()
        self.pbar = tqdm(total=state.total_steps, initial=state.step, desc="train",
                         disable=not progress or parts.rank != 0)

    def images_per_s(self, state: LoopState) -> float:
        return (state.step - self.start_step) * self.step_images / max(1e-9, time.time() - self.t0)

    def after_step(self, state: LoopState, stats: torch.Tensor, gnorm: torch.Tensor) -> str | None:
        """Called after every step; reads scalars only at log steps. Returns why to stop, or None."""
        self.pbar.update(1)
        done = state.step - self.start_step
        if self.time_budget_min and not state.budgeted and done == 30:  # set the epochs from the measured speed
            _sync(stats)
            epoch_s = state.steps_per_epoch * (time.time() - self.t0) / 30 * 1.05  # + validation
            state.epochs, state.budgeted = max(1, int(self.time_budget_min * 60 / epoch_s)), True
            self.pbar.total = state.total_steps
            self.log.info("time budget %.1f min: %.1f s/epoch -> %d epochs", self.time_budget_min, epoch_s,
                          state.epochs)
        at_log = state.step % self.log_every == 0 or done == 1
        if at_log:
            loss, ce = stats.tolist()
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss} at step {state.step}: stopping; the last good checkpoint is "
                                    "untouched (try a lower --learning-rate, or fp32)")
            lr, speed = self.parts.opt.param_groups[0]["lr"], self.images_per_s(state)
            self.pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
            self.metrics.log(state.step, train_loss=loss, train_ce=ce, lr=lr, grad_norm=float(gnorm),
                             images_per_s=speed)
        if self.stop_after_steps and state.step >= self.stop_after_steps:
            return "--stop-after-steps"
        if self._signalled(at_log):
            return f"signal {self.stop_flag.signal}"
        return None

    def _signalled(self, at_log: bool) -> bool:
        """The stop flag; under DDP agreed by all processes at log steps (they must stop together)."""
        if self.stop_flag is None:
            return False
        if self.parts.world == 1:
            return self.stop_flag.stop
        if not at_log:
            return False
        flag = torch.tensor([float(self.stop_flag.stop)], device=self.parts.opt.param_groups[0]["params"][0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self.stop_flag.signal is None:
            self.stop_flag.signal = "on another process"
        return stop


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def train_one_epoch(parts: TrainParts, cfg: StepConfig, data: torch.Tensor, state: LoopState, monitor: Monitor):
    """Run the steps left in the current epoch (``data``: the token cache (n, N) on the device).
    Returns (the losses of the steps run, as floats; why it stopped early, or None)."""
    S, epoch = state.steps_per_epoch, state.step // state.steps_per_epoch
    order = epoch_order(len(data), cfg.seed, epoch, S, cfg.batch_size * cfg.accum_grad).to(data.device)  # (S, A*W*b)
    if state.epoch_losses is None or state.step % S == 0:
        state.epoch_losses = torch.zeros(S, 2, device=data.device)
    first, why = state.step % S, None
    parts.raw.train()
    while why is None and state.step < state.total_steps and state.step // S == epoch:
        i = state.step % S
        stats, gnorm = train_step(parts, cfg, data[order[i]].long(), state.step)
        state.epoch_losses[i] = stats  # on the device: no sync
        state.step += 1
        why = monitor.after_step(state, stats, gnorm)
    last = (state.step - 1) % S + 1
    return state.epoch_losses[first:last, 0].tolist(), why


@torch.no_grad()
def evaluate(model, net: torch.nn.Module, ids: torch.Tensor, precision: str = "fp32", batch_size: int = 256,
             max_batches: int = 0, progress: bool = False, desc: str = "validate") -> dict:
    """Masked-token cross-entropy (no label smoothing) and accuracy of ``net`` on token ids (n, N),
    with the same masks at every call (seed ``EVAL_SEED``): comparable across epochs. On the CPU
    the forward pass runs ``CPU_EVAL_CHUNK`` sequences at a time (the same masks and results)."""
    was_training = net.training
    net.eval()
    gen = make_generator(EVAL_SEED)
    tot, n = torch.zeros(2, device=ids.device), 0  # (CE sum, correct) on the device, masked tokens on the host
    starts = range(0, len(ids), batch_size)[:max_batches or None]
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        z = ids[s:s + batch_size].long()  # (b, N)
        idx = masked_positions(mvtm_masks(model, len(z), gen), z.device)  # (M,)
        x = apply_mask(z, idx, model.mask_token_id)
        chunk = CPU_EVAL_CHUNK if z.device.type == "cpu" else len(x)
        with autocast(z.device, precision):
            logits = torch.cat([net(x[i:i + chunk]) for i in range(0, len(x), chunk)])  # (b, N, V)
        ce, _, logits_m, target = masked_token_loss(logits, z, idx)
        tot += torch.stack([ce, (logits_m.argmax(-1) == target).sum().float()])
        n += len(idx)
    net.train(was_training)
    ce, correct = tot.tolist()
    return {"loss": ce / max(1, n), "acc": correct / max(1, n)}


def training_state(parts: TrainParts, state: LoopState) -> dict:
    """What resume needs, as plain data: weights, EMA, optimizer, LR schedule, scaler, loop state,
    and every process's RNG state (a collective under DDP: call it on every rank)."""
    rngs = [rng_state()] * parts.world
    if parts.world > 1:
        dist.all_gather_object(rngs, rng_state())
    return {"model": parts.raw.state_dict(), "ema": parts.ema.model.state_dict() if parts.ema else None,
            "optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict() if parts.sched else None,
            "scaler": parts.scaler.state_dict(), "step": state.step, "epochs": state.epochs,
            "budgeted": state.budgeted, "best_val": state.best_val, "rng": rngs,
            "epoch_losses": None if state.epoch_losses is None else state.epoch_losses.cpu()}


def load_training_state(parts: TrainParts, state: LoopState, ck: dict, keep_epochs: bool = False) -> None:
    """Inverse of :func:`training_state` (this process's RNG state included); ``keep_epochs``: take
    the planned epochs from the checkpoint (set by a time budget) instead of the current option, and
    when the budget had already set them, do not measure again (the step total stays fixed)."""
    parts.raw.load_state_dict(ck["model"])
    parts.opt.load_state_dict(ck["optimizer"])
    if parts.sched is not None:
        parts.sched.load_state_dict(ck["scheduler"])
    parts.scaler.load_state_dict(ck["scaler"])
    if parts.ema is not None and ck.get("ema") is not None:
        parts.ema.model.load_state_dict(ck["ema"])
    state.step, state.best_val = ck["step"], ck["best_val"]
    if keep_epochs:
        state.epochs, state.budgeted = ck["epochs"], ck.get("budgeted", False)
    losses = ck.get("epoch_losses")
    state.epoch_losses = None if losses is None else losses.to(next(parts.raw.parameters()).device)
    set_rng_state(ck["rng"][parts.rank])


def init_distributed():
    """(rank, world_size, device name or None); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, f"cuda:{local}" if torch.cuda.is_available() else None


def finish_distributed(parts: TrainParts, check_path: str, losses: list) -> None:
    """Write every rank's weight checksum to ``check_path`` (DDP keeps them identical), then free
    the DDP wrapper (its reducer holds the group) and let every rank get here before the group
    goes: a gloo group destroyed at interpreter exit, or while a peer still talks to it, aborts."""
    with torch.no_grad():
        sums = [None] * parts.world
        dist.all_gather_object(sums, sum(p.double().sum() for p in parts.raw.parameters()).item())
    if parts.rank == 0:
        with open(check_path, "w") as f:
            json.dump({"weight_sums": sums, "losses": losses}, f)
    parts.ddp = parts.net = None
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
