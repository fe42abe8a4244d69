"""Unconditional generation (every token masked at the start) by token choice and sampling temperature.

For argmax and for ``--token-choice sample`` at each ``--temperatures`` value, the bundled pair (or
``--transformer-ckpt`` / ``--vqgan-ckpt`` as in bench/run.py) generates ``--n`` cats with the same
schedule, T and seed; each setting is scored by FID against the 1,118 val images that never occur in
train (the lab's data, not its test set), by the share of near-black samples (mean brightness < 0.15,
demo.py's rule) and by the mean per-pixel colour saturation; a picture shows the first samples of every
setting, one row each:

    python bench/generation_study.py --n 500 --temperatures 0.3,0.5,0.7,1.0 --picture docs/generation_temperature.png
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import SHARED_DATA, print_table, write_csv  # importing bench/common.py puts the repository on sys.path

from demo import DARK  # noqa: E402
from run import load_model  # noqa: E402
from utils.data import list_images, to_uint8  # noqa: E402
from utils.fid import compute_fid  # noqa: E402
from utils.inpaint import InpaintOptions, generate_images, sampling_options  # noqa: E402
from utils.runtime import get_device  # noqa: E402
from utils.tokens import unseen_val_paths  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="samples per setting")
    p.add_argument("--temperatures", default="0.3,0.5,0.7,1.0", help="sampling temperatures (besides argmax)")
    p.add_argument("--total-iter", type=int, default=10, help="decoding steps T")
    p.add_argument("--mask-func", default="cosine", help="mask schedule")
    p.add_argument("--seed", type=int, default=0, help="decoding seed (the same for every setting)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--data", default=str(SHARED_DATA / "lab3_dataset"), help="lab dataset root (train/, val/)")
    p.add_argument("--out", default="runs/generation_study", help="samples, reference images, results")
    p.add_argument("--picture", default=None, help="also write the picture here (default: OUT/generation.png)")
    p.add_argument("--per-row", type=int, default=10, help="samples per row of the picture")
    p.add_argument("--transformer-ckpt", default=None, help="another transformer (with --vqgan-ckpt), as bench/run.py")
    p.add_argument("--vqgan-ckpt", default=None, help="another tokenizer of the bundled config, as bench/run.py")
    p.add_argument("--config", default=None, help="MaskGit YAML for a --transformer-ckpt that stores none")
    p.add_argument("--no-fid", action="store_true", help="skip the FIDs (e.g. for the picture alone)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        args.temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        p.error(f"--temperatures: {args.temperatures!r} is not a comma-separated list of numbers")
    if not all(0 < t < float("inf") for t in args.temperatures) or args.n < 1:
        p.error("--temperatures must be > 0 and --n >= 1")
    return args


def reference(args) -> str:
    """The val images unseen in train, copied once into OUT/reference (FID needs a folder)."""
    ref = os.path.join(args.out, "reference")
    paths = unseen_val_paths(args.data)
    if not os.path.isdir(ref) or len(list_images(ref)) != len(paths):
        os.makedirs(ref, exist_ok=True)
        for j, path in enumerate(paths):
            Image.open(path).convert("RGB").save(os.path.join(ref, f"image_{j:04d}.png"))
    return ref


def generate(model, args, opts: InpaintOptions, folder: str, device) -> torch.Tensor:
    """args.n samples into folder; batch b draws the noise of seed + 1 + b (distinct for every sample,
    the same for every setting). Returns them (n, 3, H, W) in [0, 1]."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for b, start in enumerate(tqdm(range(0, args.n, args.batch_size), desc=os.path.basename(folder), leave=False)):
        imgs, _, _ = generate_images(model, min(args.batch_size, args.n - start), opts, device, seed_offset=1 + b)
        for k, img in enumerate(imgs.cpu()):
            Image.fromarray(to_uint8(img)).save(os.path.join(folder, f"image_{start + k:04d}.png"))
        out.append(imgs.cpu())
    return torch.cat(out)


def saturation(x: torch.Tensor) -> float:
    """Mean HSV saturation (max - min) / max of the pixels, images (n, 3, H, W) in [0, 1]."""
    hi, lo = x.amax(1), x.amin(1)
    return ((hi - lo) / hi.clamp_min(1e-6)).mean().item()


def picture(rows: list, path: str, per_row: int, scale: int = 2) -> None:
    """One row per setting: its label, then its first samples, enlarged with crisp pixels."""
    size, pad, label_w = 64 * scale, 4, 110
    sheet = Image.new("RGB", (label_w + per_row * (size + pad) + pad, len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        for c, img in enumerate(imgs[:per_row]):
            sheet.paste(Image.fromarray(to_uint8(img)).resize((size, size), Image.NEAREST),
                        (label_w + pad + c * (size + pad), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    print(f"wrote {path}")


def main(argv=None) -> list:
    args = parse_args(argv)
    device = get_device(args.device)
    model = load_model(args).to(device).eval()
    ref = None if args.no_fid else reference(args)
    settings = [("argmax", None)] + [(f"sample T={t:g}", t) for t in args.temperatures]
    rows, shown = [], []
    for label, temp in settings:
        opts = InpaintOptions(total_iter=args.total_iter, mask_func=args.mask_func, seed=args.seed, visualize=False,
                              **sampling_options(temp))
        folder = os.path.join(args.out, "argmax" if temp is None else f"sample_{temp:g}")
        t0 = time.time()
        imgs = generate(model, args, opts, folder, device)
        gen_s = time.time() - t0
        row = {"setting": label, "samples": len(imgs)}
        if ref is not None:
            row[f"FID vs {len(list_images(ref))} unseen val"] = compute_fid(folder, ref, device=device)
        rows.append({**row, "near-black share": (imgs.mean((1, 2, 3)) < DARK).float().mean().item(),
                     "mean saturation": saturation(imgs), "generation s": gen_s})
        shown.append((label, imgs))
        print_table(rows[-1:])
    print_table(rows, f"unconditional generation, {args.mask_func} T={args.total_iter}, seed {args.seed}")
    write_csv(rows, os.path.join(args.out, "generation_study.csv"))
    with open(os.path.join(args.out, "generation_study.json"), "w") as f:
        json.dump(rows, f, indent=1)
    picture(shown, args.picture or os.path.join(args.out, "generation.png"), args.per_row)
    return rows


if __name__ == "__main__":
    main()
