"""Training throughput: the trainer's own step vs the naive reference step of the lab's seeds, same run.

    python bench/train_throughput.py --config config/MaskGit.yml --device cuda --batch-size 256 --compile
    python bench/train_throughput.py --config config/MaskGit_small.yml --device cpu --batch-size 32

ours : ``utils.train_engine.train_step``, the very function ``training_transformer.py`` runs
       (built by the same ``make_parts``): token ids from a cache on the device, masks drawn on
       the CPU, loss on the masked positions only, bf16 autocast on CUDA (fp32 on CPU), fused
       AdamW on CUDA, clipping, warmup + cosine LR; optionally ``--ema``, ``torch.compile``
       and the opt-in fused attention (``--fused-attn``).
naive: a separate reference, as in the lab's seed code: fp32, the frozen VQGAN re-encodes the
       images every step, batch 10 (the seeds' default), loss over all logits, plain AdamW.
Weights are random: throughput does not depend on them. On CUDA the peak memory is reported.
"""
from __future__ import annotations

import argparse
import copy

import torch

from common import device_name, print_table, sync, timed, write_csv
from utils.build import build_maskgit
from utils.config import load_maskgit_config
from utils.runtime import get_device, resolve_precision
from utils.train_engine import StepConfig, make_parts, train_step


def naive_seed_step(model, opt, images):
    """The reference: one step of the lab's seed loop (re-encode, MVTM, CE over all logits, AdamW)."""
    def step():
        ids = model.encode_to_z(images)[1]
        inputs, mask = model.mask_tokens(ids)
        logits = model.transformer(inputs)
        loss = model.loss(logits, ids.masked_fill(~mask, -100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def trainer_step(model, device, precision, batch, compile_, ema):
    """``steps()`` runs the trainer's ``train_step`` on a device-resident token cache."""
    parts = make_parts(model, device, precision, lr=1e-4, warmup_steps=10, total_steps=lambda: 10**6, ema=ema,
                       compile=compile_)
    cfg = StepConfig(batch_size=batch, precision=precision)
    cache = torch.randint(0, model.mask_token_id, (16 * batch, model.num_image_tokens), device=device,
                          dtype=torch.int16)  # (n, N), like the trainer's token cache
    state = {"step": 0}

    def step():
        rows = torch.randint(len(cache), (batch,), device=device)  # sampled on the device
        train_step(parts, cfg, cache[rows].long(), state["step"])
        state["step"] += 1
    return step


def measure(step, device, batch, n_tokens, steps, warmup):
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(step, device, steps)
    row = {"images_per_s": batch / sec, "tokens_per_s": batch * n_tokens / sec, "ms_per_step": 1000 * sec}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/MaskGit.yml", help="MaskGit YAML of the model to time")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--batch-size", type=int, default=None, help="ours (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--naive-batch", type=int, default=10, help="batch of the naive seed loop")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--ema", type=float, default=0.0, help="also update a weight EMA with this decay (0: off)")
    p.add_argument("--compile", action="store_true", help="also measure ours with torch.compile")
    p.add_argument("--fused-attn", action="store_true",
                   help="also measure ours with the fused attention path (and, with --compile, both together)")
    p.add_argument("--recompute-attn", action="store_true",
                   help="also measure ours with the hand-written attention maps recomputed in backward (with --compile, also compiled)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive seed loop")
    p.add_argument("--csv", default="bench/results/train_throughput.csv", help="where to write the table")
    args = p.parse_args(argv)
    device = get_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 8)
    steps = args.steps or (20 if cuda else 3)
    cfg = load_maskgit_config(args.config)
    prec = resolve_precision("auto", device)
    # (label, torch.compile, the Transformer_param option turned on)
    variants = [("", False, "")] + [(" + torch.compile", True, "")] * args.compile
    for opt, label, on in (("fused_attn", "fused attention", args.fused_attn),
                           ("recompute_attn", "attention maps recomputed in backward", args.recompute_attn)):
        variants += [(f" + {label}", False, opt)] * on + [(f" + torch.compile + {label}", True, opt)] * (on and args.compile)
    rows = []
    for label, compile_, opt in variants:
        c = copy.deepcopy(cfg)
        if opt:
            c["model_param"]["Transformer_param"][opt] = True
        torch.manual_seed(0)
        model = build_maskgit(c, load_vqgan=False).to(device).train()
        n_params = sum(q.numel() for q in model.transformer.parameters())
        try:
            r = measure(trainer_step(model, device, prec, batch, compile_, args.ema), device, batch,
                        model.num_image_tokens, steps, 5 if compile_ else 3)
        except torch.OutOfMemoryError:  # one variant out of memory (e.g. batch 512): the others still run
            r = {"images_per_s": float("nan"), "error": "out of memory"}
        rows.append({"variant": f"ours: train_step (token cache, {prec}){label}", "batch": batch, **r})
        del model
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_naive:
        torch.manual_seed(0)
        model = build_maskgit(cfg, load_vqgan=False).to(device).train()
        opt = torch.optim.AdamW(model.transformer.parameters(), lr=1e-4)
        res = model.vqgan.cfg.img_resolution
        images = torch.randn(args.naive_batch, 3, res, res, device=device)
        naive = measure(naive_seed_step(model, opt, images), device, args.naive_batch, model.num_image_tokens, steps, 2)
        rows.append({"variant": "naive (seed loop: fp32, re-encode every step)", "batch": args.naive_batch, **naive})
        for r in rows:
            r["speedup_vs_naive"] = r["images_per_s"] / naive["images_per_s"]
    for r in rows:
        r["device"] = device_name(device)
        r["config"] = args.config
    print_table(rows, f"training throughput, {args.config} ({n_params / 1e6:.1f}M transformer params), "
                      f"{device_name(device)}")
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
