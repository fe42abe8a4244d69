"""Fill the holes of every masked test image by iterative MaskGIT decoding.

    python inpainting.py --mask-func cosine --load-transformer-ckpt-path PATH   # the lab's command
    python inpainting.py --bundled --mask-func cosine                            # bundled small models

Writes ``test_results/``, ``mask_scheduling/`` and ``imga/`` (the lab's files) into ``--out-dir``.
"""
from __future__ import annotations

import json
import math
import os
import time

from torchvision.utils import save_image

from models import CONFIDENCES, ORDERS, SCHEDULES, decoding_defaults
from utils.build import BUNDLED_CONFIG, BUNDLED_TRANSFORMER, checkpoint_config, load_inference_model
from utils.cli import ArgumentParser, UserError, run_cli
from utils.config import REPO_ROOT, resolve_path
from utils.composite import BLENDS, PREFILLS
from utils.data import MaskedImageSet, default_data_root, find_lab_layout
from utils.inpaint import InpaintOptions, generate_images, token_choice_label, token_choice_options
from utils.outputs import ImageWriter, run_inpainting, schedule_report
from utils.runtime import create_logger, get_device, resolve_precision



def parse_args(argv=None):
    p = ArgumentParser(description="MaskGIT inpainting")
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
    p.add_argument("--mask-func", default=None, choices=SCHEDULES,
                   help="mask schedule (default: the config's): the lab's cosine, linear, square; the paper's cubic, "
                        "sqrt; the official code's log, exp (these depend on the hole size)")
    # ours
    p.add_argument("--data", default=None, help="a lab dataset root (lab3_dataset or lab5_dataset layout)")
    p.add_argument("--out-dir", "--predicted-path", dest="out_dir", default=".",
                   help="where test_results/, mask_scheduling/, imga/ go (--predicted-path is the lab's spelling; "
                        "here it names the OUTPUT folder, in fid_score_gpu.py the folder of predictions it reads)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. model_param.Transformer_param.dim=256 (also on the config "
                        "stored in a checkpoint)")
    p.add_argument("--invert-mask", action="store_true",
                   help="masks are 255 = hole, 0 = known (the lab's are 0 = hole, 255 = known)")
    p.add_argument("--resize", action="store_true",
                   help="resize images and masks of another size to the model's (default: such files are an error)")
    p.add_argument("--vqgan-ckpt", default=None, help="tokenizer weights (default: VQ_CKPT_path of the config)")
    p.add_argument("--bundled", action="store_true", help="use the bundled small tokenizer + transformer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-choice", choices=["sample", "argmax"], default=None,
                   help="argmax: the most probable token (the lab's); sample: draw from the softmax, as in the MaskGIT "
                        "paper. Default: the model config's token_choice (the bundled model's: sample at 0.4, "
                        "measured better under the lab protocol, README), argmax when it names none (the lab's)")
    p.add_argument("--sample-temperature", type=float, default=None,
                   help="with token choice sample: draw from softmax(logits / this); 1 = the model's "
                        "distribution, lower = sharper (towards argmax). Default: the model config's "
                        "sample_temperature, else 1")
    p.add_argument("--confidence", choices=CONFIDENCES, default="prob",
                   help="confidence of a decoded token: prob = p(token) + noise (the lab's, default); logprob = "
                        "log p(token) + noise (the official MaskGIT code's); noise = temperature * (1 - r) * Gumbel")
    p.add_argument("--order", choices=ORDERS, default="confidence",
                   help="which hole tokens a step commits: confidence (the most confident, MaskGIT; default) or "
                        "halton (the next ones in a fixed 2-D Halton order of the grid, Besnier et al. 2025)")
    p.add_argument("--choice-temperature", type=float, default=None,
                   help="scale of the Gumbel noise on the confidences (annealed by 1 - r; 0: none). Default: the "
                        "model config's choice_temperature (4.5, the lab's)")
    p.add_argument("--mask-rule", choices=["lab", "dilated"], default="lab",
                   help="pixel->token rule: lab (token known if all its pixels are) or dilated (+1 token ring)")
    p.add_argument("--prefill", choices=PREFILLS, default="smooth",
                   help="what the tokenizer sees in the holes: smooth (filled from the known pixels, default), "
                        "biharmonic (an exact thin-plate fill of them) or gray (the masked image as given, as the "
                        "lab's seed encodes it)")
    p.add_argument("--paste-known", action="store_true",
                   help="composite the known pixels into the output (not allowed for lab scoring)")
    p.add_argument("--blend", choices=BLENDS, default="biharmonic",
                   help="with --paste-known: biharmonic (the hole is corrected to meet the known pixels and their "
                        "slope, an exact thin-plate fill of the difference; default), seamless (the same with a "
                        "membrane, Poisson style, the default before) or hard (plain paste)")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="after decoding, fit the decoder's input to the known pixels in N Adam steps and decode the "
                        "chosen tokens from it: the known region comes back closer to the input and the holes meet "
                        "it; with --paste-known, a better composite (README: 10 steps, 2.2x the CPU time). 0 "
                        "(default): the lab's plain decode. The output then uses the known pixels, as --paste-known "
                        "does: score it apart from the lab's protocol")
    p.add_argument("--no-vis", action="store_true", help="skip mask_scheduling/ and imga/ (faster)")
    p.add_argument("--gif", action="store_true", help="write an animated GIF of the decoding per image")
    p.add_argument("--report-ids", default="", help="comma-separated image ids for report.png (cosine/linear/square)")
    p.add_argument("--gt-path", default=None, help="folder of originals: PSNR/SSIM/L1 to metrics.csv")
    p.add_argument("--unconditional", type=int, default=0, help="also generate N images from an all-masked canvas")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on CUDA)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.sample_temperature is not None:
        if not 0 < args.sample_temperature < math.inf:
            p.error(f"--sample-temperature must be a number > 0, got {args.sample_temperature}")
        if args.token_choice == "argmax":
            p.error("--sample-temperature only changes --token-choice sample (argmax takes the most probable token "
                    "at any temperature): leave out one of them")
    if args.choice_temperature is not None and not 0 <= args.choice_temperature < math.inf:
        p.error(f"--choice-temperature must be a number >= 0, got {args.choice_temperature}")
    if args.refine < 0:
        p.error(f"--refine must be a number of steps >= 0 (0: off), got {args.refine}")
    return args


def load_config(args) -> tuple[dict, object, str]:
    """(resolved config, checkpoint object, checkpoint path); builds nothing (see
    :func:`utils.build.checkpoint_config`)."""
    ckpt_path, config_path = args.load_transformer_ckpt_path, args.MaskGitConfig
    if args.bundled:
        ckpt_path = ckpt_path or str(REPO_ROOT / BUNDLED_TRANSFORMER)
        config_path = config_path or str(REPO_ROOT / BUNDLED_CONFIG)
    if not ckpt_path:
        raise UserError("no transformer checkpoint: pass --load-transformer-ckpt-path PATH (a lab .pth or one of "
                        "ours), or --bundled for the bundled small models")
    cfg, obj = checkpoint_config(ckpt_path, config_path, args.set)
    return cfg, obj, resolve_path(ckpt_path)


def test_set(args, image_size: int) -> MaskedImageSet:
    """The masked test images and their masks, every file checked (before any model work)."""
    if args.test_maskedimage_path is None or args.test_mask_path is None:
        data = args.data or default_data_root()
        if data is None:
            raise UserError("no test data: pass --data LAB_DATASET_ROOT or --test-maskedimage-path and "
                            "--test-mask-path")
        lay = find_lab_layout(resolve_path(data))
    ds = MaskedImageSet(args.test_maskedimage_path or lay.masked_image, args.test_mask_path or lay.mask64,
                        image_size, resize=args.resize, limit=args.limit, invert_mask=args.invert_mask)
    ds.check()
    return ds


def token_choice(args, cfg: dict, ckpt_path: str) -> dict:
    """--token-choice / --sample-temperature, the rest from the model's config (before any model work)."""
    try:
        defaults = decoding_defaults(cfg["model_param"])
    except ValueError as e:
        raise UserError(f"the config {ckpt_path} is used with: {e}") from e
    try:
        return token_choice_options(defaults, args.token_choice, args.sample_temperature)
    except ValueError as e:
        raise UserError(f"--sample-temperature only changes --token-choice sample, and the config used with "
                        f"{ckpt_path} chooses {defaults['token_choice']}: add --token-choice sample") from e


def report_ids(args, n: int) -> list:
    ids = [int(i) for i in args.report_ids.split(",") if i.strip()]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise UserError(f"--report-ids {bad} out of range 0..{n - 1}")
    return ids


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = create_logger()
    device = get_device(args.device)
    precision = resolve_precision(args.precision, device)
    cfg, obj, ckpt_path = load_config(args)
    choice = token_choice(args, cfg, ckpt_path)
    ds = test_set(args, cfg["vqgan"]["img_resolution"])  # every input checked before the model is built
    ids = report_ids(args, len(ds)) if args.report_ids else []
    model = load_inference_model(cfg, obj, ckpt_path, args.vqgan_ckpt).to(device)
    opts = InpaintOptions(total_iter=args.total_iter, mask_func=args.mask_func or model.gamma_type,
                          sweet_spot=args.sweet_spot, seed=args.seed, **choice,
                          choice_temperature=args.choice_temperature, confidence=args.confidence,
                          order=args.order, mask_rule=args.mask_rule, prefill=args.prefill,
                          paste_known=args.paste_known, blend=args.blend, refine=args.refine,
                          visualize=not args.no_vis, gif=args.gif, precision=precision)
    choice_temperature = model.choice_temperature_for(opts.choice_temperature)
    log.info("inpainting %d images from %s (masks %s) on %s/%s: %s schedule, T=%d, %s, %s order%s%s%s", len(ds),
             os.path.dirname(ds.images[0]), os.path.dirname(ds.masks[0]), device, precision, opts.mask_func,
             opts.total_iter, token_choice_label(opts.token_choice, opts.sample_temperature),
             opts.order, f" ({opts.confidence}, choice temperature {choice_temperature:g})"
             if opts.order == "confidence" else "",
             f", sweet spot {opts.sweet_spot}" if opts.sweet_spot else "",
             f", decode refined in {opts.refine} steps" if opts.refine else "")
    t0 = time.time()
    summary = run_inpainting(model, ds, args.out_dir, opts, device, args.batch_size, args.gt_path,
                             not args.no_progress)
    summary["seconds"] = time.time() - t0
    summary.update(token_choice=opts.token_choice, sample_temperature=opts.sample_temperature,
                   choice_temperature=choice_temperature)
    log.info("%d images in %.1f s (%.1f images/s) -> %s", summary["images"], summary["seconds"],
             summary["images"] / summary["seconds"], os.path.join(args.out_dir, "test_results"))
    if args.gt_path and summary.get("gt_matched"):
        log.info("vs ground truth (%d images): hole PSNR %.2f dB, SSIM %.3f, L1 %.4f | whole PSNR %.2f dB, "
                 "SSIM %.3f, L1 %.4f -> %s", summary["gt_matched"], summary["psnr_hole"], summary["ssim_hole"],
                 summary["l1_hole"], summary["psnr"], summary["ssim"], summary["l1"], summary["metrics_csv"])
    if ids:
        path = os.path.join(args.out_dir, "report.png")
        schedule_report(model, ds, ids, ["cosine", "linear", "square"], opts, device, path)
        log.info("schedule comparison -> %s", path)
    if args.unconditional:
        summary["generated"] = generate(model, args.unconditional, opts, device, os.path.join(args.out_dir, "generated"))
        log.info("%d unconditional samples -> %s", args.unconditional, summary["generated"])
    with open(os.path.join(args.out_dir, "test_results", "inpainting_summary.json"), "w") as f:
        json.dump({**summary, "args": vars(args)}, f, indent=1, default=str)
    return summary


def generate(model, n: int, opts: InpaintOptions, device, out_dir: str) -> str:
    """Unconditional samples (every token starts masked) -> out_dir/image_XXX.png and grid.png."""
    os.makedirs(out_dir, exist_ok=True)
    imgs, _, _ = generate_images(model, n, opts, device)  # (n, 3, H, W) in [0, 1]
    imgs = imgs.cpu()  # one transfer; the writer threads encode from it
    with ImageWriter() as writer:  # every file written (or an error naming it) before we return
        for i, im in enumerate(imgs):
            writer.submit(os.path.join(out_dir, f"image_{i:03d}.png"), save_image, im)
        writer.submit(os.path.join(out_dir, "grid.png"), save_image, imgs, nrow=8)
    return out_dir

if __name__ == "__main__":
    run_cli(main)
