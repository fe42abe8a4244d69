"""Fresh-machine demo with the bundled small models (no dataset, no download needed).

    python demo.py                       # generate cats, punch holes, inpaint, write a report
    python demo.py --data ../shared/data/lab3_dataset --gt ../shared/data/lab3_test_gt --limit 64

Without --data: (a) generates cat faces from an all-masked canvas, (b) punches generated
lab-style holes into them, (c) inpaints with cosine / linear / square, (d) writes the decoding
visualisations and a one-page report (report.html + report.png). With --data it inpaints the
real test images instead and, given --gt, reports FID and PSNR/SSIM against the originals.
"""
from __future__ import annotations

import html
import os
import re
import time
from argparse import RawDescriptionHelpFormatter

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from utils.build import BUNDLED_CONFIG, BUNDLED_TRANSFORMER, build_maskgit, load_transformer_checkpoint
from utils.cli import ArgumentParser, run_cli
from utils.config import REPO_ROOT, load_maskgit_config
from utils.data import MaskedImageSet, find_lab_layout, to_uint8
from utils.inpaint import (InpaintOptions, generate_images, sampling_options, token_choice_label,
                           token_choice_options)
from utils.outputs import run_inpainting, schedule_report
from utils.masks import generate_mask
from utils.runtime import create_logger, get_device, resolve_precision

SCHEDULES = ("cosine", "linear", "square")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="demo_out", help="where the report and all images go")
    p.add_argument("--n", type=int, default=16, help="images to generate and inpaint")
    p.add_argument("--total-iter", type=int, default=10, help="decoding steps T")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images, holes and decoding")
    p.add_argument("--gen-temperature", type=float, default=GEN_TEMPERATURE,
                   help="the generated cats are drawn with --token-choice sample at this --sample-temperature "
                        "(0: argmax, which from a blank canvas gives mostly black-and-white cats); the inpainting "
                        "itself uses inpainting.py's defaults")
    p.add_argument("--data", default=None, help="a lab dataset root: inpaint its masked test images instead")
    p.add_argument("--gt", default=None, help="with --data: folder of originals for FID / PSNR / SSIM")
    p.add_argument("--limit", type=int, default=None, help="with --data: only the first N test images")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not 0 <= args.gen_temperature < float("inf"):
        p.error(f"--gen-temperature must be a number >= 0, got {args.gen_temperature}")
    return args


# the lowest FID of unconditional samples: 45.5, against 47.5 at 0.7 and 168.5 argmax (docs/generation_study.csv)
GEN_TEMPERATURE = 0.5
DARK = 0.15  # mean brightness below which a sample counts as near-black in the report


def generation_options(opts: InpaintOptions, temperature: float) -> InpaintOptions:
    """The demo's options for generating its cats: sampling at ``temperature`` (0: argmax)."""
    return InpaintOptions(**{**opts.__dict__, **sampling_options(temperature or None)})


def synthetic_testset(model, n, opts, device, root, seed) -> int:
    """Generate n cats (with ``opts``), punch seeded lab-like holes, write them in the lab's layout.
    Returns how many of the generated cats are near-black (mean brightness < DARK)."""
    imgs, _, _ = generate_images(model, n, opts, device)  # (n, 3, H, W) in [0, 1]
    lay = {k: os.path.join(root, k) for k in ("masked_image", "mask64", "originals")}
    for d in lay.values():
        os.makedirs(d, exist_ok=True)
    for i in range(n):
        img = to_uint8(imgs[i]).copy()  # (H, W, 3)
        m = generate_mask(seed * 10_000 + i, img.shape[0])
        Image.fromarray(img).save(os.path.join(lay["originals"], f"image_{i:03d}.png"))
        img[m == 0] = 128  # the lab's hole gray
        Image.fromarray(img).save(os.path.join(lay["masked_image"], f"image_{i:03d}.png"))
        Image.fromarray(m, "L").save(os.path.join(lay["mask64"], f"mask_{i:03d}.png"))
    return int((imgs.mean((1, 2, 3)) < DARK).sum())


def natural_key(name: str):
    """image_2 before image_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def row_labels(has_originals: bool) -> list:
    return (["original"] if has_originals else []) + ["mask (black = hole)", "masked input"] + \
        [f"inpainted, {s}" for s in SCHEDULES]


def overview(root: str, n: int, out_png: str, has_originals: bool) -> None:
    """One grid, each row labelled: (original), mask, masked input, cosine, linear, square."""
    def load(folder, name):
        return torch.from_numpy(np.asarray(Image.open(os.path.join(folder, name)).convert("RGB")).copy()
                                ).permute(2, 0, 1).float() / 255

    rows = []
    names = sorted(os.listdir(os.path.join(root, "masked_image")))[:n]
    if has_originals:
        rows += [load(os.path.join(root, "originals"), f) for f in names]
    masks = sorted(os.listdir(os.path.join(root, "mask64")))[:n]
    rows += [load(os.path.join(root, "mask64"), f) for f in masks]
    rows += [load(os.path.join(root, "masked_image"), f) for f in names]
    for s in SCHEDULES:
        rows += [load(os.path.join(root, f"inpaint_{s}", "test_results"), f) for f in names]
    grid = make_grid(torch.stack(rows), nrow=len(names), padding=2, pad_value=1.0)
    img = Image.fromarray(to_uint8(grid)).resize((grid.shape[-1] * 2, grid.shape[-2] * 2), Image.NEAREST)
    labels = row_labels(has_originals)
    canvas = Image.new("RGB", (img.width + 130, img.height), "white")
    canvas.paste(img, (130, 0))
    draw, row_h = ImageDraw.Draw(canvas), img.height / len(labels)
    for r, label in enumerate(labels):
        draw.text((6, int(r * row_h + row_h / 2) - 6), label, fill=(0, 0, 0))
    canvas.save(out_png)


def write_html(root: str, summary: dict, has_originals: bool, n_dark: int | None = None,
               gen_temperature: float = GEN_TEMPERATURE) -> str:
    labels = row_labels(has_originals)
    gifs = sorted(os.listdir(os.path.join(root, "inpaint_cosine", "gifs")), key=natural_key)
    how = (f"<code>--token-choice sample --sample-temperature {gen_temperature:g}</code>" if gen_temperature else
           "<code>--token-choice argmax</code>")
    dark = "" if n_dark is None else f"""<h2>How the cats were generated</h2>
<p>The "original" row was generated by the bundled model from an all-masked canvas with {how}
(<code>--gen-temperature</code>). Greedy decoding (argmax) commits the most probable token everywhere, and the
most confident tokens of a blank canvas are flat dark or white fur: it gives mostly black-and-white cats. Sampling
from the model's softmax at temperature 1 gives varied but noisy ones; at 0.5 they look like cats
(<code>bench/generation_study.py</code>, README). {n_dark} of these {summary['images']} have a mean brightness
below {DARK} (of the lab's training images 3.0% are that dark). The inpainting below uses
<code>inpainting.py</code>'s default for this model ({html.escape(summary["holes filled with"])}, set in
<code>config/MaskGit_small.yml</code>): there the known tokens anchor the colours, and a low temperature only
keeps the filled tokens from always being the single most probable one.</p>"""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>MaskGIT demo</title>
<style>body{{font-family:sans-serif;margin:24px}} img{{image-rendering:pixelated}} td{{padding:2px 10px}}</style>
</head><body><h1>MaskGIT inpainting demo</h1>
<p>Rows of the overview, top to bottom: {html.escape(', '.join(labels))}.</p>
<img src="report.png" alt="overview"><h2>Schedules step by step</h2>
<p>Per image and schedule: masked input, decoded image after each step, result; below, the latent mask
after each step (black = still masked).</p><img src="schedules.png" alt="schedules" width="900">
<h2>Decoding animations (cosine, all {len(gifs)} images)</h2>
{''.join(f'<figure style="display:inline-block;margin:4px"><img src="inpaint_cosine/gifs/{g}" width="128">'
         f'<figcaption>{html.escape(os.path.splitext(g)[0])}</figcaption></figure>' for g in gifs)}
{dark}<h2>Numbers</h2><table>{rows}</table></body></html>"""
    path = os.path.join(root, "report.html")
    with open(path, "w") as f:
        f.write(body)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = create_logger()
    t0 = time.time()
    device = get_device(args.device)
    precision = resolve_precision("auto", device)
    model = build_maskgit(load_maskgit_config(str(REPO_ROOT / BUNDLED_CONFIG)))
    n_dark = None
    load_transformer_checkpoint(model, str(REPO_ROOT / BUNDLED_TRANSFORMER))
    model = model.to(device).eval()
    opts = InpaintOptions(total_iter=args.total_iter, seed=args.seed, precision=precision, visualize=True,
                          **token_choice_options(model.decoding))  # inpainting.py's default for this model
    root = os.path.abspath(args.out_dir)
    os.makedirs(root, exist_ok=True)
    if args.data:
        lay = find_lab_layout(args.data)
        img_dir, mask_dir, gt_dir = lay.masked_image, lay.mask64, args.gt
        log.info("inpainting the lab test images of %s", args.data)
    else:
        log.info("generating %d cat faces unconditionally, then punching holes", args.n)
        gen = generation_options(opts, args.gen_temperature)
        n_dark = synthetic_testset(model, args.n, gen, device, root, args.seed)
        img_dir, mask_dir, gt_dir = os.path.join(root, "masked_image"), os.path.join(root, "mask64"), \
            os.path.join(root, "originals")
    ds = MaskedImageSet(img_dir, mask_dir, model.vqgan.cfg.img_resolution, limit=args.limit)
    summary = {"images": len(ds), "device": str(device), "T": args.total_iter}
    if not args.data:
        summary["cats generated with"] = token_choice_label(gen.token_choice, gen.sample_temperature)
    summary["holes filled with"] = token_choice_label(opts.token_choice, opts.sample_temperature)
    report_ids = [i for i in (0, 1) if i < len(ds)]
    done = {}  # schedule -> {id: Decoded}: the schedule report draws these runs' decodes of its images
    for s in SCHEDULES:
        o = InpaintOptions(**{**opts.__dict__, "mask_func": s, "gif": s == "cosine"})
        done[s] = dict.fromkeys(report_ids)
        res = run_inpainting(model, ds, os.path.join(root, f"inpaint_{s}"), o, device, 32, gt_dir,
                             not args.no_progress, keep=done[s])
        if "psnr_hole" in res:
            summary[f"{s}: hole PSNR / SSIM"] = f"{res['psnr_hole']:.2f} dB / {res['ssim_hole']:.3f}"
        if args.data and args.gt:
            from utils.fid import compute_fid
            summary[f"{s}: FID vs {os.path.basename(args.gt.rstrip('/'))}"] = round(compute_fid(
                os.path.join(root, f"inpaint_{s}", "test_results"), args.gt, match_names=True, device=device), 2)
    if not args.data:  # overview needs the lab layout that synthetic_testset wrote
        overview(root, min(args.n, 8), os.path.join(root, "report.png"), True)
    else:
        for k in ("masked_image", "mask64"):
            link = os.path.join(root, k)
            if not os.path.exists(link):
                os.symlink(os.path.abspath(img_dir if k == "masked_image" else mask_dir), link)
        overview(root, min(len(ds), 8), os.path.join(root, "report.png"), False)
    schedule_report(model, ds, report_ids, list(SCHEDULES), opts, device, os.path.join(root, "schedules.png"), done)
    summary["seconds"] = round(time.time() - t0, 1)
    page = write_html(root, summary, not args.data, n_dark, args.gen_temperature)
    for k, v in summary.items():
        log.info("%s: %s", k, v)
    print(f"\nDemo finished in {summary['seconds']} s. Open {page} (overview: {os.path.join(root, 'report.png')})")
    return summary


if __name__ == "__main__":
    run_cli(main)
