"""Decoding throughput: batched iterative decoding vs batch-1 loops, in the same run.

    python bench/decode_throughput.py --config config/MaskGit.yml --device cuda        # lab size
    python bench/decode_throughput.py --bundled --device cpu

Every row makes the lab's outputs for each image (the final image and the decoded image after
every step, for imga/) except the last, which makes the final image only (inpainting.py --no-vis,
what FID scoring needs):
  seed loop      the lab's seed inpainting loop: batch 1, fp32; MaskGit.inpainting(x, ratio, mask)
                 takes the image, so every step re-encodes it, runs the transformer, then decodes
                 the current tokens with the VQGAN for imga/
  ours, batch 1  our decoder one image at a time: encode once, T steps, one VQGAN decode per step
  ours, batched  the same, batch B (bf16 on CUDA)
Masks are the lab's 747 test masks when the dataset is found, else random blobs. Weights are
random unless --bundled (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import os

import torch

from common import SHARED_DATA, device_name, print_table, sync, timed, write_csv
from models import decode_step, image_generators
from utils.build import build_maskgit
from utils.config import REPO_ROOT, load_maskgit_config
from utils.data import load_mask, list_images, pixel_to_token_mask
from utils.inpaint import InpaintOptions, inpaint_batch
from utils.runtime import get_device, resolve_precision

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
    n_hole, gens, gamma = mask.sum(-1), image_generators(0, [index], device), model.gamma_func("cosine")
    ids, hole = None, mask
    for t in range(total_iter):
        _, z = model.encode_to_z(x)  # the seed re-encodes the image at every step
        ids = z if ids is None else torch.where(hole, ids, z)
        logits = model.transformer(ids.masked_fill(mask, model.mask_token_id))
        ids, mask = decode_step(logits, ids, mask, n_hole, (t + 1) / total_iter, gamma, gens,
                                model.choice_temperature)
        img = model.decode_tokens(ids)  # this step's picture for imga/
    return img


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
    p.add_argument("--csv", default="bench/results/decode_throughput.csv")
    args = p.parse_args(argv)
    device = get_device(args.device)
    cuda = device.type == "cuda"
    precision = resolve_precision("auto", device)
    if args.bundled:
        from inpainting import BUNDLED_CONFIG, BUNDLED_TRANSFORMER
        from utils.build import load_transformer_checkpoint
        model = build_maskgit(load_maskgit_config(BUNDLED_CONFIG))
        load_transformer_checkpoint(model, str(REPO_ROOT / BUNDLED_TRANSFORMER))
        name = BUNDLED_CONFIG
    else:
        model = build_maskgit(load_maskgit_config(args.config), load_vqgan=False)
        name = args.config
    model = model.to(device).eval()
    res = model.vqgan.cfg.img_resolution
    n, bs = args.images, args.batch_size or (256 if cuda else 8)
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
    for r in rows:
        r["speedup_vs_seed"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["speedup_vs_ours_batch1"] = r["images_per_s"] / rows[1]["images_per_s"]
        r.update(device=device_name(device), T=args.total_iter, model=name)
    print_table(rows, f"decoding throughput, {name}, T={args.total_iter}, {device_name(device)}")
    write_csv(rows, args.csv)
    sync(device)
    return rows


if __name__ == "__main__":
    main()
