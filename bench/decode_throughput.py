"""Decoding throughput: batched iterative decoding vs batch-1 loops, and the decoding steps of
before #14 vs now, in the same run.

    python bench/decode_throughput.py --config config/MaskGit.yml --device cuda        # lab size
    python bench/decode_throughput.py --bundled --device cpu
    python bench/decode_throughput.py --steps-only --device cpu --batch-size 8     # decoding steps only

The model rows make the lab's outputs for each image (the final image and the decoded image after
every step, for imga/) except the last of them, which makes the final image only (inpainting.py
--no-vis, what FID scoring needs):
  seed loop      the lab's seed inpainting loop: batch 1, fp32; MaskGit.inpainting(x, ratio, mask)
                 takes the image, so every step re-encodes it, runs the transformer, then decodes
                 the current tokens with the VQGAN for imga/
  ours, batch 1  our decoder one image at a time: encode once, T steps, one VQGAN decode per step
  ours, batched  the same, batch B (bf16 on CUDA)
Then the decoding steps alone (fixed random logits in place of the transformer, batch B, argmax
and sample): "previous" is decode_step before #14 (one torch.Generator per image drawing in a
Python loop at every step, full softmax, two argsorts), "ours" is models.decoding.iterative_decode
(counter-based noise for the whole batch, logsumexp, topk), timed alternately --repeat times, best
of each kept; ours_over_previous is previous seconds / ours seconds (> 1: ours is faster).
Masks are the lab's 747 test masks when the dataset is found, else random blobs. Weights are
random unless --bundled (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from common import SHARED_DATA, device_name, print_table, sync, timed, write_csv
from models import decode_step, gamma_func, image_noise, iterative_decode, masked_count
from models.Transformer.modules.layers import MultiHeadAttention
from utils.build import BUNDLED_CONFIG, BUNDLED_TRANSFORMER, build_maskgit
from utils.config import REPO_ROOT, load_maskgit_config
from utils.data import load_mask, list_images, pixel_to_token_mask
from utils.inpaint import InpaintOptions, inpaint_batch
from utils.runtime import autocast, get_device, resolve_precision

LAB_MASKS = SHARED_DATA / "lab3_dataset" / "mask64"


def load_masks(n: int, res: int, mask_dir: str | None) -> torch.Tensor:
    d = mask_dir or (str(LAB_MASKS) if os.path.isdir(LAB_MASKS) else None)
    if d:
        paths = list_images(d)
        return torch.stack([load_mask(paths[i % len(paths)]) for i in range(n)])  # (n, 1, H, W)
    g = torch.Generator().manual_seed(0)
    m = torch.ones(n, 1, res, res)
    for i in range(n):
        y, x = torch.randint(0, res - 20, (2,), generator=g).tolist()
        m[i, :, y:y + 20, x:x + 16] = 0
    return m


@torch.no_grad()
def seed_loop_image(model, x, pm, index: int, total_iter: int) -> torch.Tensor:
    """One image (batch 1, fp32) the way the lab's seed loop runs it; returns the final decode."""
    device = x.device
    mask = pixel_to_token_mask(pm, model.vqgan.cfg.latent_resolution).to(device)  # (1, N) True = masked
    n_hole, noise, gamma = mask.sum(-1), image_noise(0, [index], device), model.gamma_func("cosine")
    ids, hole = None, mask
    for t in range(total_iter):
        _, z = model.encode_to_z(x)  # the seed re-encodes the image at every step
        ids = z if ids is None else torch.where(hole, ids, z)
        logits = model.transformer(ids.masked_fill(mask, model.mask_token_id))
        ids, mask = decode_step(logits, ids, mask, n_hole, (t + 1) / total_iter, gamma, noise.at_step(t),
                                model.choice_temperature)
        img = model.decode_tokens(ids)  # this step's picture for imga/
    return img


class PerImageGenerators:
    """The noise of decode_step before #14, kept only as the baseline to time: one torch.Generator
    per image, seeded from (seed, image index), drawing image by image at every step."""

    def __init__(self, seed: int, indices, device):
        self.device, self.gens = device, []
        for i in indices:
            g = torch.Generator(device=device)
            g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
            self.gens.append(g)

    def gumbel(self, shape_per_image) -> torch.Tensor:
        u = torch.stack([torch.rand(shape_per_image, generator=g, device=self.device) for g in self.gens])
        return -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))  # (B, *shape)


def previous_decode_step(logits, ids, mask, n_hole, r, gamma, noise: PerImageGenerators, choice_temperature,
                         token_choice):
    """decode_step before #14 (order "confidence", confidence "prob"), the baseline to time."""
    B, N, V = logits.shape
    logits = logits[..., : V - 1].float()  # (B, N, K)
    if token_choice == "sample":
        chosen = (logits + noise.gumbel((N, V - 1))).argmax(-1)  # (B, N)
    else:
        chosen = logits.argmax(-1)  # (B, N)
    new_ids = torch.where(mask, chosen, ids)
    score = logits.softmax(-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # (B, N) p(chosen)
    score = score + choice_temperature * (1.0 - r) * noise.gumbel((N,))  # (B, N)
    score = torch.where(mask, score, torch.full_like(score, math.inf))
    n_keep_masked = masked_count(gamma, r, n_hole, mask.sum(-1)).to(logits.device)  # (B,)
    rank = score.argsort(dim=-1).argsort(dim=-1)  # (B, N)
    return new_ids, rank < n_keep_masked[:, None]


class FixedLogits(torch.nn.Module):
    """Stands in for the transformer in the steps-only rows: the same (B, N, V) logits every step."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, inputs):
        return self.logits  # (B, N, V)


@torch.no_grad()
def steps_only_rows(batch: int, num_tokens: int, num_codes: int, total_iter: int, device, precision: str,
                    repeat: int) -> list:
    """Time T decoding steps on fixed random logits, previous vs ours, argmax and sample."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    logits = (3 * torch.randn(batch, num_tokens, num_codes + 1, generator=g)).to(device, dtype)  # (B, N, V)
    ids = torch.randint(0, num_codes, (batch, num_tokens), generator=g).to(device)  # (B, N)
    mask = (torch.rand(batch, num_tokens, generator=g) < 0.4).to(device)  # (B, N) True = masked
    gamma, model = gamma_func("cosine"), FixedLogits(logits)

    def previous(choice):
        noise, i, m, n_hole = PerImageGenerators(0, range(batch), device), ids, mask, mask.sum(-1)
        for t in range(total_iter):
            i, m = previous_decode_step(model(i.masked_fill(m, num_codes)), i, m, n_hole, (t + 1) / total_iter,
                                        gamma, noise, 4.5, choice)

    def ours(choice):
        iterative_decode(model, ids, mask, gamma, total_iter, image_noise(0, range(batch), device), num_codes, 4.5,
                         token_choice=choice)

    rows = []
    for choice in ("argmax", "sample"):
        paths = {"previous": previous, "ours": ours}
        for fn in paths.values():
            fn(choice)  # warm-up
        secs = {name: math.inf for name in paths}
        for _ in range(repeat):  # alternate the two, keep each one's best: fair on a busy machine
            for name, fn in paths.items():
                secs[name] = min(secs[name], timed(lambda: fn(choice), device))
        for name in paths:
            rows.append({"path": f"steps only, {name} ({choice}, batch {batch})", "images": batch,
                         "images_per_s": batch / secs[name], "seconds_for_747": 747 * secs[name] / batch,
                         "precision": precision})
        rows[-1]["ours_over_previous"] = secs["previous"] / secs["ours"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/MaskGit.yml")
    p.add_argument("--bundled", action="store_true", help="bundled small models (trained weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=747)
    p.add_argument("--batch-size", type=int, default=None, help="batched path (default 256 CUDA, 8 CPU)")
    p.add_argument("--baseline-images", type=int, default=None, help="images timed in the batch-1 loops")
    p.add_argument("--total-iter", type=int, default=10)
    p.add_argument("--mask-dir", default=None)
    p.add_argument("--steps-only", action="store_true",
                   help="only the decoding-step rows (previous vs ours on fixed logits): no model is built")
    p.add_argument("--repeat", type=int, default=5,
                   help="decoding-step rows: alternating timed runs of each path, the best one kept")
    p.add_argument("--fused-attn", action="store_true", help="also time the batched final-only run with fused attention")
    p.add_argument("--compile", action="store_true",
                   help="also time it with the transformer under torch.compile (and, with --fused-attn, both)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the VQGAN encode, the T transformer passes and the VQGAN decode apart")
    p.add_argument("--csv", default="bench/results/decode_throughput.csv")
    args = p.parse_args(argv)
    device = get_device(args.device)
    cuda = device.type == "cuda"
    precision = resolve_precision("auto", device)
    n, bs = args.images, args.batch_size or (256 if cuda else 8)
    cfg = load_maskgit_config(BUNDLED_CONFIG if args.bundled else args.config)["model_param"]
    steps_rows = steps_only_rows(bs, cfg["num_image_tokens"], cfg["num_codebook_vectors"], args.total_iter, device,
                                 precision, args.repeat)
    rows = steps_rows if args.steps_only else model_rows(args, device, precision, n, bs) + steps_rows
    for r in rows:
        r.update(device=device_name(device), T=args.total_iter,
                 model=BUNDLED_CONFIG if args.bundled else args.config)
    print_table(rows, f"decoding throughput, T={args.total_iter}, {device_name(device)}")
    for r in rows:
        if "ours_over_previous" in r:
            print(f"{r['path']}: ours is {r['ours_over_previous']:.2f}x the previous decoding steps' speed")
    write_csv(rows, args.csv)
    sync(device)
    return rows


def set_fused_attention(model, on: bool) -> None:
    """Switch every attention layer of the transformer between the hand-written and the fused path."""
    for m in model.transformer.modules():
        if isinstance(m, MultiHeadAttention):
            m.fused_attn = on


def breakdown_rows(model, x_all, total_iter: int, bs: int, device, precision: str) -> list:
    """VQGAN encode, T transformer passes and VQGAN decode of all images at batch ``bs``, timed apart
    (no decoding steps between the passes: these rows bound what each part costs)."""
    n = len(x_all)
    ids = torch.cat([model.encode_to_z(x_all[i:i + bs])[1] for i in range(0, n, bs)])

    def encode():
        for i in range(0, n, bs):
            model.encode_to_z(x_all[i:i + bs])

    def passes():
        for i in range(0, n, bs):
            for _ in range(total_iter):
                model.transformer(ids[i:i + bs])

    def decode():
        for i in range(0, n, bs):
            model.decode_tokens(ids[i:i + bs])

    rows = []
    for name, fn in (("VQGAN encode", encode), (f"{total_iter} transformer passes", passes), ("VQGAN decode", decode)):
        with torch.no_grad(), autocast(device, precision):
            fn()  # warm-up
            sec = timed(fn, device)
        rows.append({"path": f"part: {name} of {n} images, batch {bs}", "images": n, "images_per_s": n / sec,
                     "seconds_for_747": 747 * sec / n, "precision": precision})
        print(f"{rows[-1]['path']}: {rows[-1]['seconds_for_747']:.3f} s for 747", flush=True)
    return rows


def model_rows(args, device, precision: str, n: int, bs: int) -> list:
    """The seed loop and our batch-1 / batched paths with the real model (encode, T steps, decode)."""
    cuda = device.type == "cuda"
    if args.bundled:
        from utils.build import load_transformer_checkpoint
        model = build_maskgit(load_maskgit_config(BUNDLED_CONFIG))
        load_transformer_checkpoint(model, str(REPO_ROOT / BUNDLED_TRANSFORMER))
    else:
        model = build_maskgit(load_maskgit_config(args.config), load_vqgan=False)
    model = model.to(device).eval()
    res = model.vqgan.cfg.img_resolution
    n_base = args.baseline_images or (64 if cuda else 8)
    torch.manual_seed(0)
    x_all = torch.randn(n, 3, res, res, device=device)
    pm_all = load_masks(n, res, args.mask_dir).to(device)
    x_all = x_all * pm_all  # holes at 0 (= gray after normalization), as in masked_image/

    def ours(limit, batch, with_steps, prec):
        opts = InpaintOptions(total_iter=args.total_iter, precision=prec)
        for i in range(0, limit, batch):
            j = min(i + batch, limit)
            inpaint_batch(model, x_all[i:j], pm_all[i:j], range(i, j), opts, device, with_steps=with_steps)

    def seed():
        for i in range(n_base):
            seed_loop_image(model, x_all[i:i + 1], pm_all[i:i + 1], i, args.total_iter)

    runs = [("seed loop (batch 1, fp32, re-encode + decode every step)", n_base, seed, "fp32"),
            ("ours, batch 1 (final + every step)", n_base, lambda: ours(n_base, 1, True, precision), precision),
            (f"ours, batch {bs} (final + every step)", n, lambda: ours(n, bs, True, precision), precision),
            (f"ours, batch {bs} (final only, --no-vis)", n, lambda: ours(n, bs, False, precision), precision)]
    ours(min(n, bs), bs, True, precision)  # warm-up (cuDNN autotune, allocator)
    ours(1, 1, True, precision)
    seed_loop_image(model, x_all[:1], pm_all[:1], 0, 1)
    rows = []
    for path, count, fn, prec in runs:
        sec = timed(fn, device)
        rows.append({"path": path, "images": count, "images_per_s": count / sec, "seconds_for_747": 747 * sec / count,
                     "precision": prec})
    # the opt-in fast paths on the batched final-only run: fused attention, torch.compile of the transformer
    eager = model.transformer
    for fused, compiled in [(True, False)] * args.fused_attn + [(False, True)] * args.compile \
            + [(True, True)] * (args.fused_attn and args.compile):
        set_fused_attention(model, fused)
        model.transformer = torch.compile(eager) if compiled else eager
        ours(n, bs, False, precision)  # warm-up: compiles for the full and the last, smaller batch
        sec = timed(lambda: ours(n, bs, False, precision), device)
        label = " + ".join(["fused attention"] * fused + ["torch.compile"] * compiled)
        rows.append({"path": f"ours, batch {bs} (final only, --no-vis) + {label}", "images": n,
                     "images_per_s": n / sec, "seconds_for_747": 747 * sec / n, "precision": precision})
        print(f"{rows[-1]['path']}: {rows[-1]['seconds_for_747']:.3f} s for 747", flush=True)  # kept if cut off later
    set_fused_attention(model, False)
    model.transformer = eager
    for r in rows:
        r["speedup_vs_seed"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["speedup_vs_ours_batch1"] = r["images_per_s"] / rows[1]["images_per_s"]
    if args.breakdown:  # where the batched final-only run's time goes: its three parts, each alone
        rows += breakdown_rows(model, x_all, args.total_iter, bs, device, precision)
    return rows


if __name__ == "__main__":
    main()
