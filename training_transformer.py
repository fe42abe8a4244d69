"""Stage 2: train the bidirectional transformer with masked visual token modeling (MVTM).

    python training_transformer.py                                   # the lab's command
    torchrun --nproc_per_node 4 training_transformer.py ...          # several GPUs (DDP)

The frozen tokenizer encodes the training set once (token cache); training then reads token
ids. Writes into ``--out_d_path``: ``last.pt`` (resumable), ``best.pt`` (by val loss),
``transformer_last.pth`` / ``transformer_best.pth`` (raw lab-layout state_dicts that the lab's
own inpainting code loads), ``epoch_N.pth`` every ``--ckpt-interval`` epochs, TensorBoard
scalars, ``metrics.csv`` and ``loss.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.build import build_maskgit
from utils.checkpoint import atomic_save, load_checkpoint
from utils.config import load_maskgit_config, resolve_path
from utils.data import default_data_root, find_lab_layout
from utils.masks import token_hole_bank
from utils.runtime import (autocast, create_logger, get_device, grad_scaler, make_generator, resolve_precision,
                           rng_state, seed_everything, set_rng_state)
from utils.tokens import cached_tokens, state_dict_fingerprint, unseen_indices
from utils.train_utils import EMA, MetricLog, NonFiniteLoss, StopFlag, check_finite, warmup_cosine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MaskGIT stage 2: train the transformer (MVTM)")
    # the lab's flags, with the lab's spellings
    p.add_argument("--train_d_path", default=None,
                   help="training images (default: train/ of the first lab dataset found: ./lab3_dataset, "
                        "./lab5_dataset, ../shared/data/lab3_dataset)")
    p.add_argument("--val_d_path", default=None, help="validation images (default: val/ beside train)")
    p.add_argument("--out_d_path", default="./checkpoints/transformer", help="output folder")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--num_workers", type=int, default=0, help="unused: training reads cached tokens")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--partial", type=float, default=1.0, help="fraction of the training set to use")
    p.add_argument("--accum-grad", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--save-per-epoch", "--ckpt-interval", dest="ckpt_interval", type=int, default=0,
                   help="also write epoch_N.pth every N epochs (0: off)")
    p.add_argument("--start-from-epoch", type=int, default=0, help="with --resume: ignored (the checkpoint knows)")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--MaskGitConfig", default="config/MaskGit.yml")
    # ours
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--vqgan-ckpt", default=None, help="tokenizer weights (default: VQ_CKPT_path of the config)")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out_d_path>/last.pt")
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off), e.g. 0.999")
    p.add_argument("--hflip", action="store_true", help="also train on mirrored images (cached once)")
    p.add_argument("--hole-frac", type=float, default=0.0,
                   help="fraction of each batch masked inside a generated inpainting hole (lab-like random "
                        "walks and blobs) instead of anywhere in the image; 0 = the lab's MVTM")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="cache", help="token cache folder")
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after this global step (0: off)")
    p.add_argument("--val-batches", type=int, default=0, help="limit validation batches (0: all)")
    p.add_argument("--time-budget-min", type=float, default=0,
                   help="fit the run into this many minutes: --epochs is set from the throughput of the first steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 <= args.hole_frac <= 1.0:
        p.error(f"--hole-frac must lie in [0, 1], got {args.hole_frac}")
    return args


def init_distributed():
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return dist.get_rank(), world, local


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, embeddings and the positional / logit bias parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "emb" not in name and name != "bias" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, transformer, ids: torch.Tensor, device, precision, batch_size: int, seed: int,
             max_batches: int = 0) -> dict:
    """Masked-token loss and accuracy with a fixed masking seed (comparable across epochs)."""
    transformer.eval()
    gen = make_generator(seed, device)
    tot_loss, tot_correct, tot_masked = 0.0, 0, 0
    n_batches = math.ceil(len(ids) / batch_size)
    for b in range(n_batches if not max_batches else min(n_batches, max_batches)):
        z = ids[b * batch_size:(b + 1) * batch_size].to(device).long()
        inputs, mask = model.mask_tokens(z, gen)
        with autocast(device, precision):
            logits = transformer(inputs)
        logits = logits.float()[mask]  # (M, V) masked positions only
        target = z[mask]
        tot_loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        tot_correct += (logits.argmax(-1) == target).sum().item()
        tot_masked += mask.sum().item()
    transformer.train()
    return {"loss": tot_loss / max(1, tot_masked), "acc": tot_correct / max(1, tot_masked)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, local_rank = init_distributed()
    if rank == 0:
        os.makedirs(args.out_d_path, exist_ok=True)
    log = create_logger("maskgit", os.path.join(args.out_d_path, "train.log") if rank == 0 else None, rank)
    device = get_device(f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else args.device)
    precision = resolve_precision(args.precision, device)
    seed_everything(args.seed + rank)

    cfg = load_maskgit_config(args.MaskGitConfig, args.set)
    if args.vqgan_ckpt:
        cfg["model_param"]["VQ_Configs"] = dict(cfg["model_param"].get("VQ_Configs") or {},
                                                VQ_CKPT_path=os.path.abspath(resolve_path(args.vqgan_ckpt)))
    model = build_maskgit(cfg).to(device)
    image_size = cfg["vqgan"]["img_resolution"]
    vq_key = state_dict_fingerprint(model.vqgan)

    # --- token cache (rank 0 encodes, the others wait and read) ---------------------------------
    if args.train_d_path is None or args.val_d_path is None:
        root = default_data_root()
        if root is None:
            raise SystemExit("error: no dataset: pass --train_d_path and --val_d_path (lab3_dataset/train, .../val)")
        lay = find_lab_layout(root)
    train_dir = resolve_path(args.train_d_path or lay.train)
    val_dir = resolve_path(args.val_d_path or lay.val)
    if rank == 0:
        train = cached_tokens(model.vqgan, train_dir, args.cache_dir, device, image_size, args.hflip, "fp32",
                              not args.no_progress, vq_key)
        val = cached_tokens(model.vqgan, val_dir, args.cache_dir, device, image_size, False, "fp32",
                            not args.no_progress, vq_key)
    if world > 1:
        dist.barrier()
    if rank != 0:
        train = cached_tokens(model.vqgan, train_dir, args.cache_dir, device, image_size, args.hflip, "fp32", False,
                              vq_key)
        val = cached_tokens(model.vqgan, val_dir, args.cache_dir, device, image_size, False, "fp32", False, vq_key)
    unseen_path = os.path.join(args.cache_dir, f"unseen_{val['folder_key']}_{train['folder_key']}.pt")
    if rank == 0 and not os.path.exists(unseen_path):
        atomic_save(unseen_indices(val_dir, train_dir), unseen_path)
    if world > 1:
        dist.barrier()
    unseen = torch.load(unseen_path)
    train_ids = train["ids"]
    if args.partial < 1.0:
        train_ids = train_ids[: max(1, int(len(train_ids) * args.partial))]
    val_ids, val_unseen_ids = val["ids"], val["ids"][unseen]

    transformer = model.transformer
    if world > 1:
        transformer = torch.nn.parallel.DistributedDataParallel(
            transformer, device_ids=[local_rank] if device.type == "cuda" else None)
    fwd = torch.compile(transformer) if args.compile else transformer
    raw = model.transformer
    opt = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    per_rank_batch = args.batch_size // world
    if per_rank_batch < 1 or args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the number of processes {world}")
    steps_per_epoch = len(train_ids) // (args.batch_size * args.accum_grad)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_ids)} training sequences are fewer than one step of "
                         f"{args.batch_size}x{args.accum_grad}")
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, args.warmup_steps, steps_per_epoch * args.epochs))
    scaler = grad_scaler(device, precision)
    ema = EMA(raw, args.ema) if args.ema > 0 else None
    mask_gen = make_generator(args.seed * 100 + rank, device)
    holes = token_hole_bank(4096, args.seed, image_size, model.vqgan.cfg.latent_resolution).to(device) \
        if args.hole_frac > 0 else None

    def masked_batch(z):
        region = None
        if holes is not None:  # rows left all-False are masked anywhere (the lab's MVTM)
            pick = torch.randint(len(holes), (z.shape[0],), generator=mask_gen, device=device)
            use = torch.rand(z.shape[0], generator=mask_gen, device=device) < args.hole_frac
            region = holes[pick] & use[:, None]
        return model.mask_tokens(z, mask_gen, region)

    step, best_val = 0, math.inf
    last_path, best_path = os.path.join(args.out_d_path, "last.pt"), os.path.join(args.out_d_path, "best.pt")
    if args.resume:
        if not os.path.exists(last_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        ck = load_checkpoint(last_path, "training checkpoint")
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.model.load_state_dict(ck["ema"])
        step, best_val = ck["step"], ck["best_val"]
        mask_gen.set_state(ck["mask_gen"][rank] if isinstance(ck["mask_gen"], list) else ck["mask_gen"])
        set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
        log.info("resumed from %s at step %d (epoch %d)", last_path, step, step // steps_per_epoch)

    n_params = sum(p.numel() for p in raw.parameters())
    log.info("transformer %.2fM params | %d train sequences (%s), %d val (%d unseen in train) | %d steps/epoch x %d "
             "epochs | device %s x%d, %s", n_params / 1e6, len(train_ids), "with flips" if args.hflip else "no flips",
             len(val_ids), len(val_unseen_ids), steps_per_epoch, args.epochs, device, world, precision)
    metrics = MetricLog(args.out_d_path, enabled=rank == 0)

    def gather(x):
        if world == 1:
            return [x]
        out = [None] * world
        dist.all_gather_object(out, x)
        return out

    def save(path, epoch_done: int, val_loss=None):
        states = gather(mask_gen.get_state().cpu()), gather(rng_state())
        if rank != 0:
            return
        state = {"model": raw.state_dict(), "ema": ema.model.state_dict() if ema else None,
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "epoch": epoch_done, "best_val": best_val, "val_loss": val_loss,
                 "mask_gen": states[0] if world > 1 else states[0][0], "rng": states[1] if world > 1 else states[1][0],
                 "config": cfg, "args": vars(args)}
        atomic_save(state, path)

    def export(name):
        if rank == 0:
            atomic_save((ema.model if ema else raw).state_dict(), os.path.join(args.out_d_path, name))

    losses, history = [], []

    def validate(net, epoch_done: int, at_step: int):
        """Masked-token loss/accuracy on val and on unseen val, recorded in history and the metric log."""
        v = evaluate(model, net, val_ids, device, precision, 256, 12345, args.val_batches)
        vu = evaluate(model, net, val_unseen_ids, device, precision, 256, 12345, args.val_batches)
        history.append({"epoch": epoch_done, "step": at_step, "val_loss": v["loss"], "val_acc": v["acc"],
                        "val_unseen_loss": vu["loss"], "val_unseen_acc": vu["acc"]})
        metrics.log(at_step, val_loss=v["loss"], val_acc=v["acc"], val_unseen_loss=vu["loss"],
                    val_unseen_acc=vu["acc"])
        return v, vu

    if step == 0:  # the starting point, so every curve shows what training bought
        v0, vu0 = validate(raw, 0, 0)
        log.info("step 0 | val %.4f acc %.3f | val-unseen %.4f acc %.3f", v0["loss"], v0["acc"], vu0["loss"],
                 vu0["acc"])
    t0, tokens_seen, imgs_seen = time.time(), 0, 0
    pbar = tqdm(total=total_steps, initial=step, disable=args.no_progress or rank != 0, desc="train")
    stopped = False
    with StopFlag() as stop:
        while step < total_steps:
            epoch = step // steps_per_epoch
            perm = torch.randperm(len(train_ids), generator=make_generator(args.seed + 7919 * epoch))
            perm = perm[: steps_per_epoch * args.batch_size * args.accum_grad]
            perm = perm.view(steps_per_epoch, args.accum_grad, world, per_rank_batch)  # (S, A, R, b)
            raw.train()
            while step < total_steps and step // steps_per_epoch == epoch:
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for a in range(args.accum_grad):
                    z = train_ids[perm[step % steps_per_epoch, a, rank]].to(device, non_blocking=True).long()
                    sync_later = world > 1 and a < args.accum_grad - 1
                    with transformer.no_sync() if sync_later else contextlib.nullcontext():
                        inputs, mask = masked_batch(z)
                        with autocast(device, precision):
                            logits = fwd(inputs)
                        loss = model.loss(logits, z.masked_fill(~mask, -100), args.label_smoothing)
                        check_finite(loss, step)
                        scaler.scale(loss / args.accum_grad).backward()
                    step_loss += loss.item() / args.accum_grad
                    tokens_seen += z.numel() * world
                    imgs_seen += z.shape[0] * world
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
                scaler.step(opt)
                scaler.update()
                sched.step()
                if ema is not None:
                    ema.update(raw)
                step += 1
                losses.append(step_loss)
                if args.time_budget_min and step == 30:  # set the epochs from the measured speed
                    epoch_s = steps_per_epoch * (time.time() - t0) / 30 * 1.05  # + validation
                    args.epochs = max(1, int(args.time_budget_min * 60 / epoch_s))
                    total_steps = steps_per_epoch * args.epochs
                    pbar.total = total_steps
                    log.info("time budget %.1f min: %.1f s/epoch -> %d epochs", args.time_budget_min, epoch_s,
                             args.epochs)
                dt = max(1e-9, time.time() - t0)
                pbar.update(1)
                pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                 img_s=f"{imgs_seen / dt:.0f}", tok_s=f"{tokens_seen / dt:.0f}")
                if step % args.log_every == 0 or step == 1:
                    metrics.log(step, train_loss=step_loss, lr=sched.get_last_lr()[0], grad_norm=float(gnorm),
                                images_per_s=imgs_seen / dt)
                if stop.stop or (args.stop_after_steps and step >= args.stop_after_steps):
                    stopped = True
                    break
            if stopped:
                save(last_path, step // steps_per_epoch)
                metrics.flush()
                log.info("stopped at step %d (%s); resumable checkpoint %s", step,
                         f"signal {stop.signal}" if stop.stop else "--stop-after-steps", last_path)
                break
            # --- end of epoch: validation, checkpoints -------------------------------------------
            epoch_done = step // steps_per_epoch
            v, vu = validate(ema.model if ema else raw, epoch_done, step)
            log.info("epoch %d/%d step %d | train %.4f | val %.4f acc %.3f | val-unseen %.4f acc %.3f", epoch_done,
                     args.epochs, step, sum(losses[-steps_per_epoch:]) / min(len(losses), steps_per_epoch) if losses
                     else math.nan, v["loss"], v["acc"], vu["loss"], vu["acc"])
            if v["loss"] < best_val:
                best_val = v["loss"]
                save(best_path, epoch_done, v["loss"])
                export("transformer_best.pth")
            save(last_path, epoch_done, v["loss"])
            export("transformer_last.pth")
            if args.ckpt_interval and epoch_done % args.ckpt_interval == 0:
                export(f"epoch_{epoch_done}.pth")
            metrics.flush()
    pbar.close()
    result = {"step": step, "losses": losses, "history": history, "stopped": stopped,
              "images_per_s": imgs_seen / max(1e-9, time.time() - t0)}
    if world > 1:  # rank-0 records every rank's weight checksum: DDP keeps them identical
        with torch.no_grad():
            sums = gather(sum(p.double().sum() for p in raw.parameters()).item())
        if rank == 0:
            with open(os.path.join(args.out_d_path, "ddp_check.json"), "w") as f:
                json.dump({"weight_sums": sums, "losses": losses}, f)
        # Free the DDP wrapper (its reducer holds the process group) while the interpreter is alive, and
        # let every rank reach this point before the group goes: a gloo group destroyed during interpreter
        # finalisation, or while a peer still talks to it, aborts the process ("terminate called without
        # an active exception").
        del transformer, fwd
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        metrics.plot(["train_loss", "val_loss", "val_unseen_loss"], os.path.join(args.out_d_path, "loss.png"),
                     "MVTM cross-entropy on masked tokens")
        metrics.close()
    return result


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None
