"""How to paste the known pixels back: compositing variants scored on one set of predictions.

The composited protocol keeps every known pixel and takes the hole from the model's output; how
the two meet decides much of its FID (plain paste vs the seamless blend: 17.8 vs 9.7 on the unseen
val images, the previous bundled pair). This script composites the same lab-protocol predictions in several ways and scores
each (FID vs the originals, hole PSNR / SSIM), so a blend is chosen on the lab's val images:

    python bench/run.py --sets val-unseen --combos cosine:10 --skip-speed --only-ours --out runs/blend_val
    python bench/blend_study.py --root runs/blend_val/work/val-unseen \
        --pred runs/blend_val/work/val-unseen/ours_cosine_T10/test_results --out runs/blend_study

Variants (every one keeps the known pixels exactly): hard (plain paste), seamless (the
default before: membrane fill of the residual, 30 Jacobi steps), seamless_<N> (N steps),
biharmonic (the default now: the residual filled by an exact thin-plate solve, smooth first
derivatives across the border too), bilaplace (the same with scikit-image's biharmonic fill, the
first try), order_<k> (the exact fill with Laplacian^k, e.g. 3), lowres_<s> (the residual Gaussian-blurred, sigma s, before
the membrane fill: the tokenizer's pixel noise on the known side is not spread into the hole),
detail_<s> (scikit-image's biharmonic fill of the image plus the model's detail above a Gaussian
of sigma s: the classical colour with the model's structure).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image

from common import print_table, write_csv  # importing bench/common.py puts the repository on sys.path

from utils.composite import BLENDS, fill_holes, paste_known, smooth_fill  # noqa: E402
from utils.data import list_images, load_mask, pil_to_tensor01, to_uint8  # noqa: E402
from utils.fid import compute_fid  # noqa: E402
from utils.metrics import paired_metrics  # noqa: E402


def load_set(root: str, pred_dir: str):
    """(pred, masked input, original, known mask) as tensors; the names of the images."""
    imgs, masks = list_images(os.path.join(root, "masked_image")), list_images(os.path.join(root, "mask64"))
    names = [os.path.basename(p) for p in imgs]

    def rgb(p):
        return pil_to_tensor01(Image.open(p).convert("RGB"))

    pred = torch.stack([rgb(os.path.join(pred_dir, n)) for n in names])
    inp = torch.stack([rgb(p) for p in imgs])
    orig = torch.stack([rgb(os.path.join(root, "originals", n)) for n in names])
    known = torch.stack([load_mask(m) for m in masks])
    return pred, inp, orig, known, names


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma + 0.5))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def skimage_biharmonic(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """scikit-image's biharmonic fill of the holes of x (values need not lie in [0, 1])."""
    from skimage.restoration import inpaint_biharmonic
    out = []
    for xi, ki in zip(x, known):
        arr = xi.permute(1, 2, 0).double().numpy()
        out.append(torch.from_numpy(inpaint_biharmonic(arr, ki[0].numpy() < 0.5, channel_axis=-1)).permute(2, 0, 1))
    return torch.stack(out).to(x.dtype)


def variant(name: str, pred, inp, known):
    k = known

    def corrected(fill):  # paste_known's scheme with another fill of the residual inp - pred
        return k * inp + (1 - k) * (pred + fill(inp - pred))

    if name in BLENDS:
        return paste_known(pred, inp, known, name)
    if name.startswith("order_"):  # the exact fill of smooth_fill at another order (3: triharmonic)
        return corrected(lambda r: smooth_fill(r, known, order=int(name.split("_")[1])))
    if name.startswith("seamless_"):
        return paste_known(pred, inp, known, "seamless", smooth_iters=int(name.split("_")[1]))
    if name == "bilaplace":
        return corrected(lambda r: skimage_biharmonic(r, known))
    if name.startswith("lowres_"):
        return corrected(lambda r: fill_holes(gaussian_blur(fill_holes(r, known), float(name.split("_")[1])), known))
    if name.startswith("detail_"):
        base = skimage_biharmonic(inp, known)
        return k * inp + (1 - k) * (base + pred - gaussian_blur(pred, float(name.split("_")[1])))
    raise SystemExit(f"unknown variant {name!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="a set in the lab layout: masked_image/, mask64/, originals/")
    p.add_argument("--pred", required=True, help="the model's lab-protocol outputs for it (same file names)")
    p.add_argument("--out", default="runs/blend_study")
    p.add_argument("--variants", default="hard,seamless,seamless_300,biharmonic,order_3,bilaplace,lowres_1,detail_1,detail_2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also write a picture: per image the masked input, each variant, the original")
    p.add_argument("--figure-ids", default="0,1,2,3,4,5", help="which images (positions in the set) it shows")
    p.add_argument("--figure-only", action="store_true", help="only the picture, from variant folders already written")
    args = p.parse_args(argv)
    pred, inp, orig, known, names = load_set(args.root, args.pred)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.figure_only:
        return figure(args, variants, inp, orig, names)
    rows, gt = [], os.path.join(args.root, "originals")
    for name in variants:
        t0 = time.time()
        out = variant(name, pred, inp, known).clamp(0, 1)
        sec = time.time() - t0
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        for n, o in zip(names, out):
            Image.fromarray(to_uint8(o)).save(os.path.join(d, n))
        back = torch.stack([pil_to_tensor01(Image.open(os.path.join(d, n)).convert("RGB")) for n in names])
        m = paired_metrics(back, orig, 1 - known)
        rows.append({"variant": name, "FID": compute_fid(d, gt, device=args.device),
                     "psnr_hole": m["psnr_hole"].mean().item(), "ssim_hole": m["ssim_hole"].mean().item(),
                     "blend_s": round(sec, 2), "images": len(names)})
        print(rows[-1], flush=True)
    print_table(rows, f"compositing variants on {args.root}")
    write_csv(rows, os.path.join(args.out, "blend_study.csv"))
    with open(os.path.join(args.out, "blend_study.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if args.figure:
        figure(args, variants, inp, orig, names)


def figure(args, variants: list, inp, orig, names: list, scale: int = 3) -> None:
    """Rows: images; columns: masked input, each variant (read back from its folder), original; enlarged
    with crisp pixels, the column names written above."""
    from PIL import ImageDraw
    ids = [int(i) for i in args.figure_ids.split(",")]
    cols = ["input"] + variants + ["original"]
    size, pad, head = 64 * scale, 4, 16
    sheet = Image.new("RGB", (len(cols) * (size + pad) + pad, head + len(ids) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, col in enumerate(cols):
        draw.text((pad + c * (size + pad), 2), col, fill="black")
        for r, i in enumerate(ids):
            img = (Image.fromarray(to_uint8(inp[i])) if col == "input" else
                   Image.fromarray(to_uint8(orig[i])) if col == "original" else
                   Image.open(os.path.join(args.out, col, names[i])).convert("RGB"))
            sheet.paste(img.resize((size, size), Image.NEAREST), (pad + c * (size + pad), head + pad + r * (size + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    sheet.save(args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
