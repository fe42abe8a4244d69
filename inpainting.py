"""Fill the holes of every masked test image by iterative MaskGIT decoding.

    python inpainting.py --mask-func cosine --load-transformer-ckpt-path PATH   # the lab's command
    python inpainting.py --bundled --mask-func cosine                            # bundled small models

Writes ``test_results/``, ``mask_scheduling/`` and ``imga/`` (the lab's files) into ``--out-dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torchvision.utils import save_image

from models import SCHEDULES, image_generators
from utils.build import build_maskgit, load_transformer_checkpoint
from utils.checkpoint import load_checkpoint
from utils.config import REPO_ROOT, load_maskgit_config, resolve_path
from utils.data import (BLENDS, PREFILLS, TEST_MEAN, TEST_STD, MaskedImageSet, default_data_root, denormalize,
                        find_lab_layout)
from utils.inpaint import InpaintOptions, run_inpainting, schedule_report
from utils.runtime import autocast, create_logger, get_device, resolve_precision

BUNDLED_CONFIG = "config/MaskGit_small.yml"
BUNDLED_TRANSFORMER = "checkpoints/transformer_small_fp16.pth"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MaskGIT inpainting")
    # the lab's flags
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=0, help="unused (images are small)")
    p.add_argument("--MaskGitConfig", default=None,
                   help="config YAML (default: the one stored in our checkpoints, else config/MaskGit.yml)")
    p.add_argument("--load-transformer-ckpt-path", default="", help="transformer checkpoint (lab raw or ours)")
    p.add_argument("--test-maskedimage-path", default=None, help="masked images (default: <data>/masked_image)")
    p.add_argument("--test-mask-path", default=None, help="masks, 0 = hole (default: <data>/mask64)")
    p.add_argument("--sweet-spot", type=int, default=0, help="stop after this many steps (0: run all)")
    p.add_argument("--total-iter", type=int, default=10, help="decoding steps T")
    p.add_argument("--mask-func", default=None, choices=SCHEDULES, help="mask schedule (default: the config's)")
    # ours
    p.add_argument("--data", default=None, help="a lab dataset root (lab3_dataset or lab5_dataset layout)")
    p.add_argument("--out-dir", "--predicted-path", dest="out_dir", default=".",
                   help="where test_results/, mask_scheduling/, imga/ go")
    p.add_argument("--vqgan-ckpt", default=None, help="tokenizer weights (default: VQ_CKPT_path of the config)")
    p.add_argument("--bundled", action="store_true", help="use the bundled small tokenizer + transformer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-choice", choices=["sample", "argmax"], default="argmax",
                   help="argmax: most probable token (default; FID 94.5 vs 143.0 for sample on 94 lab test "
                        "images with the bundled model); sample: draw from the softmax as in the MaskGIT paper")
    p.add_argument("--choice-temperature", type=float, default=None, help="Gumbel noise scale (default: config's)")
    p.add_argument("--mask-rule", choices=["lab", "dilated"], default="lab",
                   help="pixel->token rule: lab (token known if all its pixels are) or dilated (+1 token ring)")
    p.add_argument("--prefill", choices=PREFILLS, default="smooth",
                   help="what the tokenizer sees in the holes: smooth (filled from the known pixels, default) "
                        "or gray (the masked image as given, as the lab's seed encodes it)")
    p.add_argument("--paste-known", action="store_true",
                   help="composite the known pixels into the output (not allowed for lab scoring)")
    p.add_argument("--blend", choices=BLENDS, default="seamless",
                   help="with --paste-known: seamless (the hole is corrected to meet the known pixels, Poisson "
                        "style; default) or hard (plain paste)")
    p.add_argument("--no-vis", action="store_true", help="skip mask_scheduling/ and imga/ (faster)")
    p.add_argument("--gif", action="store_true", help="write an animated GIF of the decoding per image")
    p.add_argument("--report-ids", default="", help="comma-separated image ids for report.png (cosine/linear/square)")
    p.add_argument("--gt-path", default=None, help="folder of originals: PSNR/SSIM/L1 to metrics.csv")
    p.add_argument("--unconditional", type=int, default=0, help="also generate N images from an all-masked canvas")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on CUDA)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_model(args, device):
    """Build MaskGit from the config (or the one stored in our checkpoint) and load both stages."""
    ckpt_path = args.load_transformer_ckpt_path
    config_path, vq_ckpt = args.MaskGitConfig, args.vqgan_ckpt
    if args.bundled:
        ckpt_path = ckpt_path or str(REPO_ROOT / BUNDLED_TRANSFORMER)
        config_path = config_path or str(REPO_ROOT / BUNDLED_CONFIG)
    if not ckpt_path:
        raise SystemExit("error: no transformer checkpoint: pass --load-transformer-ckpt-path PATH "
                         "(a lab .pth or one of ours), or --bundled for the bundled small models")
    obj = load_checkpoint(resolve_path(ckpt_path), "transformer checkpoint")
    if config_path is None and isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        cfg = obj["config"]  # our checkpoints rebuild their own architecture
    else:
        cfg = load_maskgit_config(config_path or "config/MaskGit.yml")
    model = build_maskgit(cfg, vqgan_ckpt=vq_ckpt)
    load_transformer_checkpoint(model, resolve_path(ckpt_path))
    if args.choice_temperature is not None:
        model.choice_temperature = args.choice_temperature
    return model.to(device).eval(), cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = create_logger()
    device = get_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, cfg = load_model(args, device)
    data = args.data or default_data_root()
    if args.test_maskedimage_path is None or args.test_mask_path is None:
        if data is None:
            raise SystemExit("error: no test data: pass --data LAB_DATASET_ROOT or --test-maskedimage-path and "
                             "--test-mask-path")
        lay = find_lab_layout(resolve_path(data))
    img_dir = args.test_maskedimage_path or lay.masked_image
    mask_dir = args.test_mask_path or lay.mask64
    ds = MaskedImageSet(img_dir, mask_dir, cfg["vqgan"]["img_resolution"], limit=args.limit)
    opts = InpaintOptions(total_iter=args.total_iter, mask_func=args.mask_func or model.gamma_type,
                          sweet_spot=args.sweet_spot, seed=args.seed, token_choice=args.token_choice,
                          mask_rule=args.mask_rule, prefill=args.prefill, paste_known=args.paste_known,
                          blend=args.blend, visualize=not args.no_vis, gif=args.gif, precision=precision)
    log.info("inpainting %d images from %s (masks %s) on %s/%s: %s schedule, T=%d%s", len(ds), img_dir, mask_dir,
             device, precision, opts.mask_func, opts.total_iter,
             f", sweet spot {opts.sweet_spot}" if opts.sweet_spot else "")
    t0 = time.time()
    summary = run_inpainting(model, ds, args.out_dir, opts, device, args.batch_size, args.gt_path,
                             not args.no_progress)
    summary["seconds"] = time.time() - t0
    log.info("%d images in %.1f s (%.1f images/s) -> %s", summary["images"], summary["seconds"],
             summary["images"] / summary["seconds"], os.path.join(args.out_dir, "test_results"))
    if args.gt_path and summary.get("gt_matched"):
        log.info("vs ground truth (%d images): hole PSNR %.2f dB, SSIM %.3f, L1 %.4f | whole PSNR %.2f dB, "
                 "SSIM %.3f, L1 %.4f -> %s", summary["gt_matched"], summary["psnr_hole"], summary["ssim_hole"],
                 summary["l1_hole"], summary["psnr"], summary["ssim"], summary["l1"], summary["metrics_csv"])
    if args.report_ids:
        ids = [int(i) for i in args.report_ids.split(",") if i.strip()]
        bad = [i for i in ids if not 0 <= i < len(ds)]
        if bad:
            raise SystemExit(f"error: --report-ids {bad} out of range 0..{len(ds) - 1}")
        path = os.path.join(args.out_dir, "report.png")
        schedule_report(model, ds, ids, ["cosine", "linear", "square"], opts, device, path)
        log.info("schedule comparison -> %s", path)
    if args.unconditional:
        summary["generated"] = generate(model, args.unconditional, opts, device, os.path.join(args.out_dir, "generated"))
        log.info("%d unconditional samples -> %s", args.unconditional, summary["generated"])
    with open(os.path.join(args.out_dir, "inpainting_summary.json"), "w") as f:
        json.dump({**summary, "args": vars(args)}, f, indent=1, default=str)
    return summary


@torch.no_grad()
def generate(model, n: int, opts: InpaintOptions, device, out_dir: str) -> str:
    """Unconditional samples: every token starts masked."""
    os.makedirs(out_dir, exist_ok=True)
    N = model.num_image_tokens
    ids = torch.zeros(n, N, dtype=torch.long, device=device)
    mask = torch.ones(n, N, dtype=torch.bool, device=device)
    res = model.inpaint(ids, mask, opts.total_iter, image_generators(opts.seed + 1, range(n), device), opts.mask_func,
                        0, opts.token_choice, autocast_ctx=lambda: autocast(device, opts.precision))
    with autocast(device, opts.precision):
        imgs = denormalize(model.decode_tokens(res.ids).float(), TEST_MEAN, TEST_STD)
    for i, im in enumerate(imgs):
        save_image(im, os.path.join(out_dir, f"image_{i:03d}.png"))
    save_image(imgs, os.path.join(out_dir, "grid.png"), nrow=8)
    return out_dir


if __name__ == "__main__":
    main()
