"""Decoding throughput: batched iterative decoding vs a batch-1 loop (as in the lab's seeds).

    python bench/decode_throughput.py --config config/MaskGit.yml --device cuda        # lab size
    python bench/decode_throughput.py --bundled --device cpu

Both paths run the same work per image: encode the masked image, T decoding steps, decode the
final tokens with the VQGAN. Masks are the lab's 747 test masks when the dataset is found,
else random blobs. Weights are random unless --bundled (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import os

import torch

from common import device_name, print_table, sync, timed, write_csv
from models import image_generators
from utils.build import build_maskgit
from utils.config import REPO_ROOT, load_maskgit_config
from utils.data import load_mask, list_images, pixel_to_token_mask
from utils.runtime import autocast, get_device, resolve_precision

LAB_MASKS = REPO_ROOT.parent / "shared" / "data" / "lab3_dataset" / "mask64"


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
def inpaint_core(model, x, pm, idx, T, device, precision):
    _, ids = model.encode_to_z(x)
    mask = pixel_to_token_mask(pm, model.vqgan.cfg.latent_resolution)
    res = model.inpaint(ids, mask, T, image_generators(0, idx, device), "cosine",
                        autocast_ctx=lambda: autocast(device, precision))
    with autocast(device, precision):
        return model.decode_tokens(res.ids)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/MaskGit.yml")
    p.add_argument("--bundled", action="store_true", help="bundled small models (trained weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=747)
    p.add_argument("--batch-size", type=int, default=None, help="batched path (default 256 CUDA, 8 CPU)")
    p.add_argument("--baseline-images", type=int, default=None, help="images timed in the batch-1 loop")
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

    def batched(limit=n):
        for i in range(0, limit, bs):
            inpaint_core(model, x_all[i:i + bs], pm_all[i:i + bs], range(i, min(i + bs, limit)), args.total_iter,
                         device, precision)

    def batch1():
        for i in range(n_base):
            inpaint_core(model, x_all[i:i + 1], pm_all[i:i + 1], [i], args.total_iter, device, precision)

    batched(min(n, bs))  # warm-up (cuDNN autotune, allocator)
    batch1() if not cuda else inpaint_core(model, x_all[:1], pm_all[:1], [0], args.total_iter, device, precision)
    t_batched = timed(batched, device)
    t_base = timed(batch1, device)
    rows = [{"path": f"batch-1 loop ({n_base} images timed)", "images_per_s": n_base / t_base,
             "seconds_for_747": 747 * t_base / n_base, "speedup": 1.0},
            {"path": f"batched (batch {bs}, {n} images)", "images_per_s": n / t_batched,
             "seconds_for_747": 747 * t_batched / n, "speedup": (n / t_batched) / (n_base / t_base)}]
    for r in rows:
        r.update(device=device_name(device), precision=precision, T=args.total_iter, model=name)
    print_table(rows, f"decoding throughput, {name}, T={args.total_iter}, {device_name(device)}")
    write_csv(rows, args.csv)
    sync(device)
    return rows


if __name__ == "__main__":
    main()
