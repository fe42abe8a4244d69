"""Stage 1: train a VQGAN tokenizer on a folder of images.

    python train_vqgan.py --data ../shared/data/lab3_dataset/train \
        --config models/VQGAN/config/VQGAN_small.yml --steps 6000 --out-dir runs/vqgan_small

Writes ``<out-dir>/last.pt`` (resumable: model, discriminator, optimizers, step, RNG),
``<out-dir>/vqgan.pt`` (a plain fp32 state_dict that loads like the lab's VQGAN.pt),
reconstruction grids, TensorBoard scalars, ``metrics.csv`` and ``loss.png``.
Perceptual (LPIPS/VGG) loss is not used: its weights cannot be fetched offline.
"""
from __future__ import annotations

import math
import os
import time

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from models import VQGAN
from models.VQGAN.discriminator import PatchDiscriminator, d_loss_fn, g_loss_fn
from utils.checkpoint import atomic_save, load_checkpoint
from utils.cli import ArgumentParser, Interrupted, UserError, run_cli
from utils.config import ConfigError, apply_overrides, load_vqgan_config
from utils.data import TRAIN_MEAN, TRAIN_STD, denormalize, load_image_stack, uint8_to_normalized
from utils.metrics import psnr
from utils.runtime import (autocast, create_logger, get_device, grad_scaler, make_generator, resolve_precision,
                           rng_state, seed_everything, set_rng_state)
from utils.train_utils import MetricLog, StopFlag, check_finite, warmup_cosine


def parse_args(argv=None):
    p = ArgumentParser(description="Train a VQGAN tokenizer (stage 1)")
    p.add_argument("--data", default="../shared/data/lab3_dataset/train", help="folder of training images")
    p.add_argument("--val-data", default=None, help="folder of held-out images for reconstruction PSNR")
    p.add_argument("--config", default="models/VQGAN/config/VQGAN.yml", help="VQGAN YAML (lab layout)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--out-dir", default="runs/vqgan", help="checkpoints, logs and reconstruction grids go here")
    p.add_argument("--steps", type=int, default=20000, help="training steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (Adam, warmup + cosine)")
    p.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warmup steps")
    p.add_argument("--l1-weight", type=float, default=1.0, help="weight of the L1 reconstruction loss")
    p.add_argument("--l2-weight", type=float, default=1.0, help="weight of the L2 reconstruction loss")
    p.add_argument("--disc-start", type=int, default=-1, help="step at which the GAN loss starts (-1: never)")
    p.add_argument("--disc-start-frac", type=float, default=None,
                   help="start the GAN loss at this fraction of --steps (overrides --disc-start)")
    p.add_argument("--time-budget-min", type=float, default=0,
                   help="fit the run into this many minutes: --steps is set from the throughput of the first "
                        "steps (GAN steps assumed 1.5x as costly)")
    p.add_argument("--disc-weight", type=float, default=0.1, help="GAN loss weight (times the adaptive weight)")
    p.add_argument("--disc-loss", choices=["hinge", "bce"], default="hinge", help="discriminator loss")
    p.add_argument("--restart-every", type=int, default=200, help="dead-code restart period in steps (0: off)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--resize", action="store_true", help="resize images of another size instead of failing")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable or wrongly sized images with a warning (default: list them and stop)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write last.pt and vqgan.pt every N steps")
    p.add_argument("--eval-every", type=int, default=1000, help="validation PSNR and a reconstruction grid every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    p.add_argument("--half", action="store_true", help="also write vqgan_fp16.pt (half precision, for bundling)")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model, images_u8, device, precision, batch_size=128):
    """Mean reconstruction PSNR (dB) and codebook usage over uint8 images (N,3,H,W)."""
    model.eval()
    vals, used = [], torch.zeros(model.cfg.num_codebook_vectors, dtype=torch.bool)
    for i in range(0, len(images_u8), batch_size):
        x = uint8_to_normalized(images_u8[i:i + batch_size].to(device))
        with autocast(device, precision):
            xr, idx, _ = model(x)
        vals.append(psnr(denormalize(xr.float(), TRAIN_MEAN, TRAIN_STD), denormalize(x, TRAIN_MEAN, TRAIN_STD)).cpu())
        used[idx.cpu()] = True
    model.train()
    return torch.cat(vals).mean().item(), used.float().mean().item()


@torch.no_grad()
def restart_dead_codes(model: VQGAN, counts: torch.Tensor, z_e: torch.Tensor, generator: torch.Generator) -> int:
    """Re-initialise codes unused since the last restart with random encoder outputs of the
    current batch (plus a little noise). Returns how many were restarted."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = z_e.detach().float()  # (M, D)
    pick = torch.randint(0, len(pool), (len(dead),), generator=generator, device=generator.device).to(pool.device)
    noise = torch.randn(len(dead), pool.shape[1], generator=generator, device=generator.device).to(pool.device)
    new = pool[pick] + 0.01 * pool.std() * noise
    model.codebook.embedding.weight.data[dead.to(pool.device)] = new.to(model.codebook.embedding.weight.dtype)
    return len(dead)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = create_logger("maskgit", os.path.join(args.out_dir, "train_vqgan.log"))
    device = get_device(args.device)
    precision = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    raw_cfg = apply_overrides(load_vqgan_config(args.config).to_dict(), args.set, where=args.config)
    size = raw_cfg["img_resolution"]
    images = load_image_stack(args.data, size, args.resize, args.limit, not args.no_progress, args.skip_bad_images)
    val_images = (load_image_stack(args.val_data, size, args.resize, 512, False, args.skip_bad_images)
                  if args.val_data else images[-min(256, len(images)):])
    last_path = os.path.join(args.out_dir, "last.pt")
    if args.resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no checkpoint at {last_path} (drop --resume to start a new run)")
    try:
        model = VQGAN(raw_cfg).to(device).train()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{args.config}: {e}") from e
    cfg = model.cfg
    disc = PatchDiscriminator().to(device).train()
    opt_g = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: warmup_cosine(s, args.warmup_steps, args.steps))
    scaler = grad_scaler(device, precision)
    gen = make_generator(args.seed)
    counts = torch.zeros(cfg.num_codebook_vectors, dtype=torch.long)
    step = 0
    if args.resume:
        ck = load_checkpoint(last_path, "VQGAN training checkpoint")
        model.load_state_dict(ck["model"])
        disc.load_state_dict(ck["disc"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        sched.load_state_dict(ck["sched"])
        scaler.load_state_dict(ck["scaler"])
        counts, step = ck["counts"], ck["step"]
        gen.set_state(ck["gen"])
        set_rng_state(ck["rng"])
        log.info("resumed from %s at step %d", last_path, step)

    n_params = sum(p.numel() for p in model.parameters())
    log.info("VQGAN %.2fM params, %d training images, device %s, precision %s", n_params / 1e6, len(images), device,
             precision)
    metrics = MetricLog(args.out_dir)

    def save():
        state = {"model": model.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
                 "opt_d": opt_d.state_dict(), "sched": sched.state_dict(), "scaler": scaler.state_dict(),
                 "counts": counts, "step": step, "gen": gen.get_state(), "rng": rng_state(),
                 "config": cfg.to_dict(), "args": vars(args)}
        atomic_save(state, last_path)
        atomic_save(model.state_dict(), os.path.join(args.out_dir, "vqgan.pt"))
        metrics.flush()

    last_layer = model.decoder.model[-1].weight
    t0, seen = time.time(), 0
    pbar = tqdm(total=args.steps, initial=step, disable=args.no_progress, desc="vqgan")
    first_rec, rec_v = None, math.nan
    start_step, budget_probe, t_probe = step, step + 80, time.time()
    with StopFlag() as stop:
        while step < args.steps and not stop.stop:
            idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
            x = uint8_to_normalized(images[idx].to(device, non_blocking=True))
            if args.hflip:
                flip = torch.rand(args.batch_size, generator=gen) < 0.5
                x[flip.to(device)] = x[flip.to(device)].flip(-1)
            if args.disc_start_frac is not None:
                args.disc_start = int(args.disc_start_frac * args.steps)
            if args.time_budget_min and step == start_step + 20:
                t_probe = time.time()  # measure after the warm-up steps
            if args.time_budget_min and step == budget_probe:
                rate = (step - start_step - 20) / (time.time() - t_probe)  # steps/s without the GAN
                f = args.disc_start_frac if args.disc_start_frac is not None else 1.0
                args.steps = max(step + 1, int(args.time_budget_min * 60 * rate / (f + 1.5 * (1 - f))))
                pbar.total = args.steps
                log.info("time budget %.1f min at %.2f steps/s: %d steps", args.time_budget_min, rate, args.steps)
            use_disc = 0 <= args.disc_start <= step
            with autocast(device, precision):
                z_e = model.quant_conv(model.encoder(x))  # (B, D, h, w)
                z_q, codes, q_loss = model.codebook(z_e)
                xr = model.decode(z_q)
            rec = args.l1_weight * (xr.float() - x).abs().mean() + args.l2_weight * (xr.float() - x).pow(2).mean()
            loss = rec + q_loss.float()
            gan_w = torch.zeros(())
            if use_disc:
                with autocast(device, precision):
                    g_gan = g_loss_fn(args.disc_loss, disc(xr).float())
                g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
                g_adv = torch.autograd.grad(g_gan, last_layer, retain_graph=True)[0]
                gan_w = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * args.disc_weight
                loss = loss + gan_w * g_gan
            check_finite(loss, step)
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt_g)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt_g)
            scaler.update()
            sched.step()
            d_loss = torch.zeros(())
            if use_disc:
                with autocast(device, precision):
                    d_loss = d_loss_fn(args.disc_loss, disc(x).float(), disc(xr.detach()).float())
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            counts += torch.bincount(codes.cpu(), minlength=cfg.num_codebook_vectors)
            step += 1
            seen += args.batch_size
            if args.restart_every and step % args.restart_every == 0 and step < 0.9 * args.steps:
                n_dead = restart_dead_codes(model, counts, z_e.permute(0, 2, 3, 1).reshape(-1, cfg.latent_dim), gen)
                metrics.log(step, dead_codes_restarted=n_dead, code_usage=(counts > 0).float().mean().item())
                counts.zero_()
            rec_v = rec.item()
            first_rec = rec_v if first_rec is None else first_rec
            if step % 10 == 0 or step == 1:
                metrics.log(step, rec_loss=rec_v, q_loss=q_loss.item(), d_loss=d_loss.item(), gan_weight=float(gan_w),
                            lr=sched.get_last_lr()[0])
            pbar.update(1)
            pbar.set_postfix(rec=f"{rec_v:.4f}", q=f"{q_loss.item():.4f}", img_s=f"{seen / (time.time() - t0):.0f}")
            if step % args.eval_every == 0 or step == args.steps:
                p, usage = evaluate(model, val_images, device, precision)
                metrics.log(step, val_psnr=p, val_code_usage=usage)
                log.info("step %d  rec %.4f  val PSNR %.2f dB  codebook usage %.1f%%", step, rec_v, p, 100 * usage)
                with torch.no_grad():
                    xs = uint8_to_normalized(val_images[:16].to(device))
                    with autocast(device, precision):
                        rs = model(xs)[0].float()
                save_image(torch.cat([denormalize(xs, TRAIN_MEAN, TRAIN_STD), denormalize(rs, TRAIN_MEAN, TRAIN_STD)]),
                           os.path.join(args.out_dir, f"recon_{step:06d}.png"), nrow=16)
            if step % args.ckpt_every == 0:
                save()
        pbar.close()
        save()
        if stop.stop:
            metrics.close()
            raise Interrupted(f"stopped by signal {stop.signal} at step {step}; checkpoint saved, continue with "
                              f"--resume ({last_path})")
    if args.half:
        atomic_save({k: v.half() for k, v in model.state_dict().items()}, os.path.join(args.out_dir, "vqgan_fp16.pt"))
    metrics.plot(["rec_loss", "q_loss"], os.path.join(args.out_dir, "loss.png"), "VQGAN training losses")
    metrics.close()
    final_psnr, usage = evaluate(model, val_images, device, precision)
    log.info("done: %d steps, %.1f images/s, val PSNR %.2f dB, codebook usage %.1f%%, weights %s", step,
             seen / max(1e-9, time.time() - t0), final_psnr, 100 * usage, os.path.join(args.out_dir, "vqgan.pt"))
    return {"step": step, "first_rec": first_rec, "last_rec": rec_v, "val_psnr": final_psnr, "code_usage": usage}


if __name__ == "__main__":
    run_cli(main)
