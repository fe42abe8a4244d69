"""Stage 1: train a VQGAN tokenizer on a folder of images.

    python train_vqgan.py --data ../shared/data/lab3_dataset/train \
        --config models/VQGAN/config/VQGAN_small.yml --steps 6000 --out-dir runs/vqgan_small

Writes ``<out-dir>/last.pt`` (resumable: model, discriminator, optimizers, codebook statistics,
step, the step total fixed by a time budget, RNG), ``<out-dir>/vqgan.pt`` (a plain fp32
state_dict that loads like the lab's VQGAN.pt, with its config in the dict's _metadata; the EMA
weights with ``--ema``), reconstruction
grids, TensorBoard scalars, ``metrics.csv`` and ``loss.png``.
Losses: L1 + L2 (+ SSIM) reconstruction, codebook/commitment, PatchGAN (hinge or BCE, adaptive
weight, optional LeCam and R1 regularisers of the discriminator, optional discriminator feature
matching for the generator). Perceptual (LPIPS/VGG) loss is not used: its weights cannot
be fetched offline, and an ImageNet network in the loss would game FID.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.utils import save_image
from tqdm import tqdm

from models import VQGAN
from models.VQGAN.discriminator import PatchDiscriminator, d_loss_fn, feature_matching_loss, g_loss_fn, r1_penalty
from models.VQGAN.training import EMACodebook, LeCam, kmeans, restart_dead_codes, ssim_loss
from utils.build import SILENT_VQGAN_KEYS, TOKEN_PARTS, load_vqgan_weights, tokenizer_file_config
from utils.checkpoint import atomic_save, half_state_dict, lab_state_dict, load_checkpoint
from utils.cli import ArgumentParser, Interrupted, UserError, run_cli
from utils.config import ConfigError, apply_overrides, load_vqgan_config
from utils.data import TRAIN_MEAN, TRAIN_STD, denormalize, load_image_stack, to_uint8, uint8_to_normalized
from utils.metrics import psnr
from utils.runtime import (autocast, create_logger, get_device, grad_scaler, make_generator, resolve_precision,
                           rng_state, seed_everything, set_rng_state)
from utils.tokens import unseen_rows
from utils.train_utils import EMA, MetricLog, StopFlag, check_finite, warmup_cosine

DEFAULT_CONFIG = "models/VQGAN/config/VQGAN.yml"  # the lab's tokenizer
BUDGET_WARMUP, BUDGET_PROBE = 20, 60  # steps skipped, then steps timed, to fit --time-budget-min


def parse_args(argv=None):
    p = ArgumentParser(description="Train a VQGAN tokenizer (stage 1)")
    p.add_argument("--data", default="../shared/data/lab3_dataset/train", help="folder of training images")
    p.add_argument("--val-data", default=None, help="folder of held-out images for reconstruction PSNR")
    p.add_argument("--config", default=None,
                   help=f"VQGAN YAML (lab layout; default: the config --resume's last.pt or --init's file stores, "
                        f"else {DEFAULT_CONFIG})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--out-dir", default="runs/vqgan", help="checkpoints, logs and reconstruction grids go here")
    p.add_argument("--steps", type=int, default=20000, help="training steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (Adam, warmup + cosine)")
    p.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warmup steps")
    p.add_argument("--l1-weight", type=float, default=1.0, help="weight of the L1 reconstruction loss")
    p.add_argument("--l2-weight", type=float, default=1.0, help="weight of the L2 reconstruction loss")
    p.add_argument("--ssim-weight", type=float, default=0.0, help="weight of 1 - SSIM on [0,1] pixels (0: off)")
    p.add_argument("--ssim-window", type=int, default=7, help="Gaussian SSIM window size (sigma 1.5)")
    p.add_argument("--disc-start", type=int, default=-1, help="step at which the GAN loss starts (-1: never)")
    p.add_argument("--disc-start-frac", type=float, default=None,
                   help="start the GAN loss at this fraction of --steps (overrides --disc-start)")
    p.add_argument("--time-budget-min", type=float, default=0,
                   help="fit the run into this many minutes: --steps is set from the throughput of the first "
                        "steps (GAN steps assumed 1.5x as costly) and kept on --resume")
    p.add_argument("--disc-weight", type=float, default=0.1, help="GAN loss weight (times the adaptive weight)")
    p.add_argument("--disc-loss", choices=["hinge", "bce"], default="hinge", help="discriminator loss")
    p.add_argument("--lecam-weight", type=float, default=0.0, help="LeCam regulariser of the discriminator (0: off)")
    p.add_argument("--r1-weight", type=float, default=0.0,
                   help="R1 gradient penalty gamma of the discriminator on real images (0: off), e.g. 1.0")
    p.add_argument("--r1-every", type=int, default=16,
                   help="apply R1 every N discriminator steps, scaled by N (StyleGAN2's lazy regularisation)")
    p.add_argument("--fm-weight", type=float, default=0.0,
                   help="discriminator feature-matching loss of the generator, fixed weight (0: off), e.g. 1.0")
    p.add_argument("--ema-codebook", type=float, default=0.0,
                   help="learn the codebook by EMA updates with this decay, e.g. 0.99 (0: by gradient)")
    p.add_argument("--kmeans-init", action="store_true", help="initialise the codebook by k-means on the first batch")
    p.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the tokenizer weights, e.g. 0.999 (0: off); evaluation and vqgan.pt use them")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these tokenizer weights (a vqgan.pt, the bundled fp16 file or the lab's VQGAN.pt)")
    p.add_argument("--train-part", choices=["all", "decoder"], default="all",
                   help="decoder: train post_quant_conv + decoder only (needs --init); encoder and codebook stay "
                        "frozen, so every image keeps its tokens and a transformer trained on them stays valid")
    p.add_argument("--new-decoder", action="store_true",
                   help="with --train-part decoder: load only the --init file's encoder, quant_conv and codebook (its "
                        "tokens) and train a new post_quant_conv + decoder from scratch, of the config's decoder "
                        "architecture (e.g. --set dec_channels=[64,128,256]: a wider decoder for the same tokens)")
    p.add_argument("--val-fid", type=int, default=0, metavar="N",
                   help="at each evaluation also the FID of the reconstructions of the first N --val-data images "
                        "against them (offline FID Inception); keeps vqgan_best.pt, the lowest (0: off)")
    p.add_argument("--val-unseen", action="store_true",
                   help="keep only the --val-data images whose pixels occur in no --data image (the lab's val folder "
                        "repeats some training images), so val PSNR, val FID and vqgan_best.pt measure held-out images")
    p.add_argument("--restart-every", type=int, default=200, help="dead-code restart period in steps (0: off)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--resize", action="store_true", help="resize images of another size instead of failing")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable or wrongly sized images with a warning (default: list them and stop)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write last.pt and vqgan.pt every N steps")
    p.add_argument("--eval-every", type=int, default=1000, help="validation PSNR and a reconstruction grid every N steps")
    p.add_argument("--snapshot-at", type=fractions, default=(), metavar="F,F",
                   help="also keep the weights at these fractions of the run, e.g. 0.3,0.6 (before a GAN that starts "
                        "at 0.6): vqgan_stepNNNNNN.pt beside vqgan.pt, the same format, to score afterwards")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    p.add_argument("--half", action="store_true", help="also write vqgan_fp16.pt (half precision, for bundling)")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@dataclass
class Stage1:
    """Everything one training step reads or updates."""
    model: VQGAN
    disc: PatchDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    counts: torch.Tensor  # (K,) code assignments since the last restart, on the device
    ema: EMA | None  # weight EMA
    ema_codebook: EMACodebook | None
    lecam: LeCam | None
    step: int = 0
    total_steps: int = 0
    disc_start: int = -1
    budget_fixed: bool = False  # total_steps set by --time-budget-min (kept on --resume)
    best_val_fid: float = math.inf  # lowest --val-fid so far (vqgan_best.pt holds those weights)

    def eval_model(self) -> VQGAN:
        return self.ema.model if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "disc": self.disc.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "counts": self.counts.cpu(), "step": self.step, "total_steps": self.total_steps,
                "disc_start": self.disc_start, "budget_fixed": self.budget_fixed, "best_val_fid": self.best_val_fid,
                "gen": self.gen.get_state(), "rng": rng_state(),
                "ema": self.ema.model.state_dict() if self.ema else None,
                "ema_codebook": self.ema_codebook.state_dict() if self.ema_codebook else None,
                "lecam": self.lecam.state_dict() if self.lecam else None}

    def load_state_dict(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.disc.load_state_dict(ck["disc"])
        for name in ("opt_g", "opt_d", "sched", "scaler"):
            getattr(self, name).load_state_dict(ck[name])
        self.counts.copy_(ck["counts"])
        self.step, self.total_steps, self.disc_start = ck["step"], ck["total_steps"], ck["disc_start"]
        self.budget_fixed, self.best_val_fid = ck["budget_fixed"], ck.get("best_val_fid", math.inf)
        self.gen.set_state(ck["gen"])
        set_rng_state(ck["rng"])
        for name in ("ema", "ema_codebook", "lecam"):
            part = getattr(self, name)
            if (part is None) != (ck.get(name) is None):
                raise UserError(f"--resume: the checkpoint was trained {'with' if ck.get(name) is not None else 'without'}"
                                f" --{name.replace('_', '-')}; resume with the same options")
            if part is not None:
                (part.model if name == "ema" else part).load_state_dict(ck[name])


def fractions(text: str) -> tuple:
    """``--snapshot-at``: comma-separated fractions of the run, each in (0, 1]."""
    try:
        fs = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    if not all(0 < f <= 1 for f in fs):
        raise argparse.ArgumentTypeError(f"fractions of the run must lie in (0, 1]: {text!r}")
    return fs


def snapshot_steps(fracs: tuple, total_steps: int) -> set:
    """The steps ``--snapshot-at`` keeps: each fraction of the step total, rounded (at least step 1)."""
    return {max(1, round(f * total_steps)) for f in fracs}


def check_options(args) -> None:
    if args.train_part == "decoder":
        if not args.init and not args.resume:
            raise UserError("--train-part decoder fine-tunes a trained tokenizer: give its weights with --init PATH")
        clash = [f for f, on in (("--kmeans-init", args.kmeans_init), ("--ema-codebook", args.ema_codebook)) if on]
        if clash:
            raise UserError(f"--train-part decoder keeps the codebook frozen: drop {' and '.join(clash)}")
    elif args.new_decoder:
        raise UserError("--new-decoder trains a new decoder on a trained tokenizer's frozen tokens: add --train-part "
                        "decoder (and --init PATH)")
    if args.val_fid and not args.val_data:
        raise UserError("--val-fid N scores the first N --val-data images: give --val-data DIR")
    if args.val_unseen and not args.val_data:
        raise UserError("--val-unseen filters the --val-data images: give --val-data DIR")
    if args.val_fid == 1 or args.val_fid < 0:
        raise UserError(f"--val-fid needs at least 2 images (got {args.val_fid}; 0 turns it off)")
    if args.r1_every < 1:
        raise UserError(f"--r1-every must be at least 1 (got {args.r1_every})")
    bad = [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in ("r1_weight", "fm_weight", "lecam_weight")
           if getattr(args, n) < 0]
    if bad:
        raise UserError(f"negative loss weights: {', '.join(bad)} (0 turns a term off)")


def config_source(args, resumed: dict | None = None) -> tuple:
    """(where the tokenizer config comes from, that config before --set): --config; without it the config
    stored in ``resumed`` (--resume's last.pt, read once by main) or in the --init file (train_vqgan.py's
    vqgan.pt stores it; a fine-tune of one needs no YAML), else the lab's DEFAULT_CONFIG."""
    if args.config:
        return args.config, load_vqgan_config(args.config).to_dict()
    if resumed is not None and resumed.get("config") is not None:
        return os.path.join(args.out_dir, "last.pt"), resumed["config"]
    if args.init:
        own = tokenizer_file_config(args.init)
        if own is not None:
            return args.init, own
    return DEFAULT_CONFIG, load_vqgan_config(DEFAULT_CONFIG).to_dict()


def tokenizer_config(args, resumed: dict | None = None) -> tuple:
    """(source, the resolved tokenizer config dict: config_source's with --set applied)."""
    where, cfg = config_source(args, resumed)
    return where, apply_overrides(cfg, args.set, where=where)


def build(args, raw_cfg: dict, device, source: str | None = None) -> Stage1:
    """``source``: where ``raw_cfg`` came from, named in a config error (default --config)."""
    try:
        model = VQGAN(raw_cfg).to(device).train()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source or args.config}: {e}") from e
    if args.init and not args.resume:
        # a fine-tune may change the norm groups on purpose; with the decoder alone only its own (tokens kept)
        may = ("dec_norm_group_channels",) if args.train_part == "decoder" else SILENT_VQGAN_KEYS
        parts = TOKEN_PARTS if args.new_decoder else None  # a new decoder: the file's tokens only
        for line in load_vqgan_weights(model, args.init, may_differ=may, parts=parts):
            logging.getLogger("maskgit").info("--init: the config differs from the file's in %s", line)
        if args.new_decoder:
            logging.getLogger("maskgit").info(
                "--new-decoder: encoder, quant_conv and codebook from %s (its tokens); post_quant_conv and a new "
                "decoder (dec_channels %s) trained from scratch", args.init, model.cfg.dec_channels)
    if args.train_part == "decoder":  # tokens fixed: only post_quant_conv and the decoder learn
        for part in (model.encoder, model.quant_conv, model.codebook):
            part.requires_grad_(False)
    ema_codebook = EMACodebook(model.codebook.embedding, args.ema_codebook) if args.ema_codebook else None
    disc = PatchDiscriminator().to(device).train()
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
    st = Stage1(model, disc, opt_g, opt_d, None, grad_scaler(device, args.precision), make_generator(args.seed),
                torch.zeros(model.cfg.num_codebook_vectors, dtype=torch.long, device=device),
                EMA(model, args.ema) if args.ema else None, ema_codebook,
                LeCam() if args.lecam_weight else None, total_steps=args.steps)
    st.sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: warmup_cosine(s, args.warmup_steps, st.total_steps))
    st.disc_start = disc_start(args, st.total_steps)
    return st


def tokenizer_state_dict(model: VQGAN):
    """The exported weights: the lab's raw layout (``VQGAN.pt`` loads the same way, strictly) with the
    tokenizer's config stored in the dict's ``_metadata``, so the file names its own architecture
    (training_transformer.py --vqgan-ckpt builds the tokenizer from it)."""
    return lab_state_dict(model, model.cfg.to_dict())


def disc_start(args, total_steps: int) -> int:
    return int(args.disc_start_frac * total_steps) if args.disc_start_frac is not None else args.disc_start


def flat_latents(model: VQGAN, z_e: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) encoder latents -> (B*h*w, D) rows as the codebook searches them."""
    return model.codebook.project(z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]))


def generator_step(st: Stage1, x: torch.Tensor, args, device) -> dict:
    """Reconstruction + codebook (+ SSIM, + adaptive-weight GAN) loss, one optimizer step.
    Returns the step's tensors (no host sync)."""
    model, use_disc, frozen = st.model, 0 <= st.disc_start <= st.step, args.train_part == "decoder"
    with autocast(device, args.precision):
        with torch.set_grad_enabled(not frozen):
            z_e = model.quant_conv(model.encoder(x))  # (B, D, h, w)
            z_q, codes, q_loss = model.codebook(z_e)
        if frozen:
            q_loss = torch.zeros((), device=x.device)
        xr = model.decode(z_q)
    err = xr.float() - x
    rec = args.l1_weight * err.abs().mean() + args.l2_weight * err.pow(2).mean()
    if args.ssim_weight:
        rec = rec + args.ssim_weight * ssim_loss(denormalize(xr.float(), TRAIN_MEAN, TRAIN_STD),
                                                 denormalize(x, TRAIN_MEAN, TRAIN_STD), args.ssim_window)
    loss = rec + q_loss.float()
    gan_w, fm = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    if use_disc:
        with autocast(device, args.precision):
            fake_feats = st.disc.features(xr) if args.fm_weight else [st.disc(xr)]
            g_gan = g_loss_fn(args.disc_loss, fake_feats[-1].float())
            if args.fm_weight:
                with torch.no_grad():
                    real_feats = st.disc.features(x)
                fm = feature_matching_loss(real_feats, fake_feats)
        last_layer = model.decoder.model[-1].weight
        g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_gan, last_layer, retain_graph=True)[0]
        gan_w = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * args.disc_weight
        loss = loss + gan_w * g_gan + args.fm_weight * fm
    st.opt_g.zero_grad(set_to_none=True)
    st.scaler.scale(loss).backward()
    st.scaler.unscale_(st.opt_g)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    st.scaler.step(st.opt_g)
    st.scaler.update()
    st.sched.step()
    return {"loss": loss.detach(), "rec": rec.detach(), "q": q_loss.detach(), "gan_w": gan_w, "fm": fm.detach(),
            "xr": xr.detach(), "z_e": z_e.detach(), "codes": codes, "use_disc": use_disc}


def discriminator_step(st: Stage1, x: torch.Tensor, xr: torch.Tensor, args, device) -> torch.Tensor:
    """One discriminator update: GAN loss (+ LeCam) (+ R1 on every --r1-every-th GAN step). Returns the
    GAN loss with LeCam, without the lazily applied R1 term (so the logged curve does not jump)."""
    with autocast(device, args.precision):
        real, fake = st.disc(x).float(), st.disc(xr).float()
    d_loss = d_loss_fn(args.disc_loss, real, fake)
    if st.lecam is not None:
        d_loss = d_loss + args.lecam_weight * st.lecam(real, fake)
    total = d_loss
    if args.r1_weight and (st.step - st.disc_start) % args.r1_every == 0:  # lazy: every N-th GAN step, scaled by N
        total = d_loss + 0.5 * args.r1_weight * args.r1_every * r1_penalty(st.disc, x)
    st.opt_d.zero_grad(set_to_none=True)
    total.backward()
    st.opt_d.step()
    return d_loss.detach()


@torch.no_grad()
def codebook_step(st: Stage1, z_e: torch.Tensor, codes: torch.Tensor, args) -> int | None:
    """k-means seeding on the first step, EMA codebook update, usage counts and the periodic
    dead-code restart. Returns the number of restarted codes on restart steps, else None."""
    st.counts += torch.bincount(codes, minlength=len(st.counts))
    if args.train_part == "decoder":  # frozen codebook: usage counts only
        return None
    z = flat_latents(st.model, z_e)  # (B*h*w, D)
    if st.ema_codebook is not None:
        st.ema_codebook.update(z, codes)
    if not (args.restart_every and st.step % args.restart_every == 0 and st.step < 0.9 * st.total_steps):
        return None
    if st.ema_codebook is not None:
        n_dead = st.ema_codebook.restart_dead(st.counts, z, st.gen)
    else:
        n_dead = restart_dead_codes(st.model.codebook.embedding, st.counts, z, st.gen)
    st.counts.zero_()
    return n_dead


@torch.no_grad()
def init_codebook(st: Stage1, x: torch.Tensor) -> None:
    """k-means on the encoder's latents of one batch (the first step of a new run)."""
    model = st.model
    z = flat_latents(model, model.quant_conv(model.encoder(x)))
    if st.ema_codebook is not None:
        st.ema_codebook.init_kmeans(z, st.gen)
    else:
        model.codebook.embedding.weight.copy_(kmeans(z, len(st.counts), 10, st.gen)[0])


@torch.no_grad()
def evaluate(model, images_u8, device, precision, batch_size=128, keep: int = 0):
    """Mean reconstruction PSNR (dB) and codebook usage over uint8 images (N,3,H,W), and the
    reconstructions of the first ``keep`` images as (keep, H, W, 3) uint8 (rounded like
    torchvision.save_image, as FID reads images; None for keep=0)."""
    was_training = model.training
    model.eval()
    vals, kept, used = [], [], torch.zeros(model.cfg.num_codebook_vectors, dtype=torch.bool)
    for i in range(0, len(images_u8), batch_size):
        x = uint8_to_normalized(images_u8[i:i + batch_size].to(device))
        with autocast(device, precision):
            xr, idx, _ = model(x)
        xr01 = denormalize(xr.float(), TRAIN_MEAN, TRAIN_STD)
        vals.append(psnr(xr01, denormalize(x, TRAIN_MEAN, TRAIN_STD)).cpu())
        used[idx.cpu()] = True
        if i < keep:
            kept.append(to_uint8(xr01[:keep - i]))  # (b, H, W, 3)
    model.train(was_training)
    rec = np.concatenate(kept) if kept else None
    return torch.cat(vals).mean().item(), used.float().mean().item(), rec


@torch.no_grad()
def save_grid(model, val_images, device, precision, path: str) -> None:
    was_training = model.training
    xs = uint8_to_normalized(val_images[:16].to(device))
    with autocast(device, precision):
        rs = model.eval()(xs)[0].float()
    model.train(was_training)
    save_image(torch.cat([denormalize(xs, TRAIN_MEAN, TRAIN_STD), denormalize(rs, TRAIN_MEAN, TRAIN_STD)]), path, nrow=16)


def sample_batch(images: torch.Tensor, st: Stage1, args, device) -> torch.Tensor:
    idx = torch.randint(0, len(images), (args.batch_size,), generator=st.gen)
    x = uint8_to_normalized(images[idx].to(device, non_blocking=True))  # (B, 3, H, W)
    if args.hflip:
        flip = (torch.rand(args.batch_size, generator=st.gen) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def train_step(st: Stage1, images: torch.Tensor, args, device):
    """One step of stage 1: a batch, (k-means seeding on step 0,) the generator and discriminator
    updates, the codebook bookkeeping and the weight EMA. Returns (generator tensors, d_loss or None,
    restarted codes or None); no host sync."""
    x = sample_batch(images, st, args, device)
    if st.step == 0 and args.kmeans_init:
        init_codebook(st, x)
    out = generator_step(st, x, args, device)
    d_loss = discriminator_step(st, x, out["xr"], args, device) if out["use_disc"] else None
    st.step += 1
    n_dead = codebook_step(st, out["z_e"], out["codes"], args)
    if st.ema is not None:
        st.ema.update(st.model, st.step - 1)  # the step just taken (0-based)
    return out, d_loss, n_dead


class ValFID:
    """FID of the reconstructions of fixed val images against those images: the Inception features
    of the originals are computed once. Inception weights are looked up offline when this is made,
    so a missing file stops the run before any training."""

    def __init__(self, images_u8: torch.Tensor, device, progress: bool):
        from utils.fid import activations, get_model, statistics
        self.images, self.device, self.progress = images_u8, device, progress
        self.net = get_model(2048)
        self.ref = statistics(activations(images_u8.permute(0, 2, 3, 1).numpy(), self.net, device=device,
                                          progress=progress, desc="val FID originals"))

    def __call__(self, rec_u8: np.ndarray) -> float:
        """FID of the reconstructions (N, H, W, 3) uint8 of the same images, in the same order."""
        from utils.fid import activations, frechet_distance, statistics
        mu, sigma = statistics(activations(rec_u8, self.net, device=self.device, progress=self.progress,
                                           desc="val FID"))
        return frechet_distance(mu, sigma, *self.ref)


def validate(st: Stage1, val_images, args, device, metrics, val_fid: ValFID | None = None) -> tuple:
    """Val PSNR and codebook usage of the evaluated weights (and the val FID, keeping the lowest's
    weights in vqgan_best.pt), logged with a reconstruction grid. Returns (step, PSNR, usage, FID or None)."""
    p, usage, rec = evaluate(st.eval_model(), val_images, device, args.precision,
                             keep=len(val_fid.images) if val_fid is not None else 0)
    metrics.log(st.step, val_psnr=p, val_code_usage=usage)
    fid = None
    if val_fid is not None:
        fid = val_fid(rec)
        metrics.log(st.step, val_fid=fid)
        if fid < st.best_val_fid:
            st.best_val_fid = fid
            atomic_save(tokenizer_state_dict(st.eval_model()), os.path.join(args.out_dir, "vqgan_best.pt"))
    save_grid(st.eval_model(), val_images, device, args.precision, os.path.join(args.out_dir, f"recon_{st.step:06d}.png"))
    return st.step, p, usage, fid


class BudgetProbe:
    """Times steps BUDGET_WARMUP..BUDGET_WARMUP+BUDGET_PROBE of a new run and sets the step total
    so that the run fits ``minutes`` (steps after the GAN start cost 1.5x)."""

    def __init__(self, minutes: float, first_step: int):
        self.minutes, self.t0 = minutes, None
        self.start, self.end = first_step + BUDGET_WARMUP, first_step + BUDGET_WARMUP + BUDGET_PROBE

    def __call__(self, st: Stage1, args) -> bool:
        if st.step == self.start:
            self.t0 = time.time()
        if st.step != self.end or self.t0 is None:
            return False
        rate = BUDGET_PROBE / (time.time() - self.t0)  # steps/s without the GAN
        f = args.disc_start_frac if args.disc_start_frac is not None else 1.0
        st.total_steps = max(st.step + 1, int(self.minutes * 60 * rate / (f + 1.5 * (1 - f))))
        st.disc_start = disc_start(args, st.total_steps)
        st.budget_fixed = True
        return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = get_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    last_path = os.path.join(args.out_dir, "last.pt")
    if args.resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no checkpoint at {last_path} (drop --resume to start a new run)")
    log = create_logger("maskgit", os.path.join(args.out_dir, "train_vqgan.log"))
    check_options(args)
    resumed = load_checkpoint(last_path, "VQGAN training checkpoint") if args.resume else None
    source, raw_cfg = tokenizer_config(args, resumed)
    if not args.config:
        log.info("tokenizer config (no --config): %s", "the lab's " + source if source == DEFAULT_CONFIG
                 else "the one stored in " + source)
    size = raw_cfg["img_resolution"]
    images = load_image_stack(args.data, size, args.resize, args.limit, not args.no_progress, args.skip_bad_images)
    n_val = max(512, args.val_fid)
    val_images = (load_image_stack(args.val_data, size, args.resize, None if args.val_unseen else n_val, False,
                                   args.skip_bad_images)
                  if args.val_data else images[-min(256, len(images)):])  # without --val-data: the last training images
    if args.val_unseen:
        keep = unseen_rows(val_images, images)
        if len(keep) == 0:
            raise UserError(f"--val-unseen: every image of {args.val_data} also occurs in {args.data}")
        log.info("--val-unseen: %d of the %d images of %s occur in no training image; the first %d are the val set",
                 len(keep), len(val_images), args.val_data, min(n_val, len(keep)))
        val_images = val_images[keep[:n_val]]
    st = build(args, raw_cfg, device, source)
    if resumed is not None:
        was = (resumed.get("args") or {}).get("train_part", "all")
        if was != args.train_part:
            raise UserError(f"--resume: {last_path} was trained with --train-part {was}; resume with the same option")
        st.load_state_dict(resumed)
        if not st.budget_fixed:  # --steps may extend a finished run; a time budget's total is kept
            st.total_steps, st.disc_start = args.steps, disc_start(args, args.steps)
        log.info("resumed from %s at step %d of %d", last_path, st.step, st.total_steps)
    probe = BudgetProbe(args.time_budget_min, st.step) if args.time_budget_min and not st.budget_fixed else None
    log.info("VQGAN %.2fM params, %d training images, device %s, precision %s",
             sum(p.numel() for p in st.model.parameters()) / 1e6, len(images), device, args.precision)
    metrics = MetricLog(args.out_dir)
    val_fid = ValFID(val_images[:args.val_fid], device, not args.no_progress) if args.val_fid else None

    out = None

    def save():
        if out is not None:
            check_finite(out["loss"], st.step)  # never write weights a non-finite step touched
        atomic_save({**st.state_dict(), "config": st.model.cfg.to_dict(), "args": vars(args)}, last_path)
        atomic_save(tokenizer_state_dict(st.eval_model()), os.path.join(args.out_dir, "vqgan.pt"))
        metrics.flush()

    t0, seen, first_rec, rec_v, start_step, last_eval = time.time(), 0, None, math.nan, st.step, None
    init_psnr = None
    if args.init and st.step == 0:  # the starting point of a fine-tune, for comparison (and vqgan_best.pt)
        last_eval = validate(st, val_images, args, device, metrics, val_fid)
        init_psnr = last_eval[1]
        log.info("step 0 (--init %s)  val PSNR %.2f dB  codebook usage %.1f%%%s", args.init, last_eval[1],
                 100 * last_eval[2], f"  val FID {last_eval[3]:.2f}" if val_fid else "")
    pbar = tqdm(total=st.total_steps, initial=st.step, disable=args.no_progress, desc="vqgan")
    with StopFlag() as stop:
        while st.step < st.total_steps and not stop.stop:
            out, d_loss, n_dead = train_step(st, images, args, device)
            seen += args.batch_size
            if n_dead is not None:
                metrics.log(st.step, dead_codes_restarted=n_dead)
            if probe is not None and probe(st, args):
                pbar.total = st.total_steps
                log.info("time budget %.1f min: %d steps", args.time_budget_min, st.total_steps)
            if st.step % 10 == 0 or st.step == start_step + 1:  # host syncs only here and in save()
                check_finite(out["loss"], st.step)
                rec_v = out["rec"].item()
                first_rec = rec_v if first_rec is None else first_rec
                metrics.log(st.step, rec_loss=rec_v, q_loss=out["q"].item(), gan_weight=out["gan_w"].item(),
                            **({"fm_loss": out["fm"].item()} if args.fm_weight else {}),
                            d_loss=d_loss.item() if d_loss is not None else 0.0, lr=st.sched.get_last_lr()[0])
                pbar.set_postfix(rec=f"{rec_v:.4f}", img_s=f"{seen / (time.time() - t0):.1f}")
            pbar.update(1)
            if st.step % args.eval_every == 0 or st.step == st.total_steps:
                last_eval = validate(st, val_images, args, device, metrics, val_fid)
                log.info("step %d  rec %.4f  val PSNR %.2f dB  codebook usage %.1f%%%s", st.step, rec_v, last_eval[1],
                         100 * last_eval[2], f"  val FID {last_eval[3]:.2f}" if val_fid else "")
            if st.step % args.ckpt_every == 0:
                save()
            if st.step in snapshot_steps(args.snapshot_at, st.total_steps):
                snap = os.path.join(args.out_dir, f"vqgan_step{st.step:06d}.pt")
                atomic_save(tokenizer_state_dict(st.eval_model()), snap)
                log.info("step %d: snapshot %s", st.step, snap)
        pbar.close()
        save()
        if stop.stop:
            metrics.close()
            raise Interrupted(f"stopped by signal {stop.signal} at step {st.step}; checkpoint saved, continue with "
                              f"--resume ({last_path})")
    model = st.eval_model()
    if args.half:
        atomic_save(half_state_dict(tokenizer_state_dict(model)), os.path.join(args.out_dir, "vqgan_fp16.pt"))
    metrics.plot(["rec_loss", "q_loss"], os.path.join(args.out_dir, "loss.png"), "VQGAN training losses")
    metrics.close()
    final_psnr, usage = (last_eval[1:3] if last_eval and last_eval[0] == st.step
                         else evaluate(model, val_images, device, args.precision)[:2])
    log.info("done: %d steps, %.1f images/s, val PSNR %.2f dB, codebook usage %.1f%%, weights %s", st.step,
             seen / max(1e-9, time.time() - t0), final_psnr, 100 * usage, os.path.join(args.out_dir, "vqgan.pt"))
    return {"step": st.step, "first_rec": first_rec, "last_rec": rec_v, "val_psnr": final_psnr, "code_usage": usage,
            "best_val_fid": st.best_val_fid if args.val_fid else None, "init_val_psnr": init_psnr}


if __name__ == "__main__":
    run_cli(main)
