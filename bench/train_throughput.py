"""Training throughput: our step vs the naive reference step of the lab's seeds, same run.

    python bench/train_throughput.py --config config/MaskGit.yml --device cuda --batch-size 256
    python bench/train_throughput.py --config config/MaskGit_small.yml --device cpu --batch-size 32

ours : token ids from the cache, bf16 autocast on CUDA (fp32 on CPU), fused AdamW, one
       batched step (optionally torch.compile).
naive: as in the lab's seed code: fp32, the frozen VQGAN re-encodes the images every step,
       batch 10 (the seeds' default), plain AdamW.
Weights are random: throughput does not depend on them.
"""
from __future__ import annotations

import argparse

import torch

from common import device_name, print_table, sync, timed, write_csv
from utils.build import build_maskgit
from utils.config import load_maskgit_config
from utils.runtime import autocast, get_device, resolve_precision


def make_step(model, opt, batch_fn, device, precision, use_cache: bool, fwd):
    def step():
        x = batch_fn()
        ids = x if use_cache else model.encode_to_z(x)[1]
        inputs, mask = model.mask_tokens(ids)
        with autocast(device, precision):
            logits = fwd(inputs)
        loss = model.loss(logits, ids.masked_fill(~mask, -100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(model, device, precision, batch, use_cache, compile_, steps, warmup, fused):
    torch.manual_seed(0)
    N, K, res = model.num_image_tokens, model.mask_token_id, model.vqgan.cfg.img_resolution
    fwd = torch.compile(model.transformer) if compile_ else model.transformer
    opt = torch.optim.AdamW(model.transformer.parameters(), lr=1e-4, fused=fused)
    ids = torch.randint(0, K, (batch, N), device=device)
    imgs = torch.randn(batch, 3, res, res, device=device)
    step = make_step(model, opt, (lambda: ids) if use_cache else (lambda: imgs), device, precision, use_cache, fwd)
    for _ in range(warmup):
        step()
    sync(device)
    sec = timed(step, device, steps)
    return {"images_per_s": batch / sec, "tokens_per_s": batch * N / sec, "ms_per_step": 1000 * sec}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/MaskGit.yml")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="ours (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--naive-batch", type=int, default=10)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also measure ours with torch.compile")
    p.add_argument("--csv", default="bench/results/train_throughput.csv")
    args = p.parse_args(argv)
    device = get_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 8)
    steps = args.steps or (20 if cuda else 3)
    cfg = load_maskgit_config(args.config)
    model = build_maskgit(cfg, load_vqgan=False).to(device).train()
    ours_prec = resolve_precision("auto", device)
    rows = []
    naive = measure(model, device, "fp32", args.naive_batch, False, False, steps, 2, False)
    rows.append({"variant": "naive (seed loop: fp32, re-encode every step)", "batch": args.naive_batch, **naive})
    ours = measure(model, device, ours_prec, batch, True, False, steps, 3, cuda)
    rows.append({"variant": f"ours (token cache, {ours_prec})", "batch": batch, **ours})
    if args.compile:
        comp = measure(model, device, ours_prec, batch, True, True, steps, 5, cuda)
        rows.append({"variant": f"ours + torch.compile ({ours_prec})", "batch": batch, **comp})
    for r in rows:
        r["speedup_vs_naive"] = r["images_per_s"] / naive["images_per_s"]
        r["device"] = device_name(device)
        r["config"] = args.config
    n_params = sum(p.numel() for p in model.transformer.parameters())
    print_table(rows, f"training throughput, {args.config} ({n_params / 1e6:.1f}M transformer params), "
                      f"{device_name(device)}")
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
