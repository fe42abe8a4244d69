"""Stage-1 recipe ablation: train one tokenizer per variant with the same steps and data, then
score each by its reconstructions (PSNR and FID, no holes) of held-out images: by default the
1,118 val images that never occur in train (``--eval-set val-unseen``: the recipe is chosen on
the lab's train/val data), or the 570 recovered test originals (``--eval-set test``, a report).

    python bench/stage1_ablation.py --out bench/results/stage1_ablation            # CPU scale
    python bench/stage1_ablation.py --scale h100 --device cuda --out runs/ablation   # GPU scale

Each variant is one ``train_vqgan.py`` run (a subprocess, so variants cannot leak state) whose
arguments differ from the base recipe by the listed options only. Finished variants are skipped
on a rerun (their scores are kept in ``results.json``); ``results.md`` is the README table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import SHARED_DATA  # importing bench/common.py puts the repository on sys.path

from models import VQGAN  # noqa: E402
from utils.build import load_vqgan_weights  # noqa: E402
from utils.config import load_vqgan_config, apply_overrides  # noqa: E402
from utils.data import list_images  # noqa: E402
from utils.fid import compute_fid, get_model  # noqa: E402
from utils.pipeline import reconstruct_images  # noqa: E402
from utils.tokens import unseen_val_paths  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tokenizer small enough for the 2-core CPU (16/32/64 channels, 0.7 M parameters) with the lab's
# token interface (64x64 -> 16x16 tokens, 1024 codes); the H100 scale uses VQGAN_small.yml.
SCALES = {
    "cpu": {"config": "models/VQGAN/config/VQGAN_small.yml", "steps": 200, "batch": 32,
            "set": ["enc_channels=[16,32,64]", "dec_channels=[16,32,64]",
                    "latent_dim=32"]},
    "h100": {"config": "models/VQGAN/config/VQGAN_small.yml", "steps": 2000, "batch": 128, "set": []},
}
BASE = ["--learning-rate", "4e-4", "--warmup-steps", "50", "--hflip", "--restart-every", "100"]
VARIANTS = {
    "base": [],
    "kmeans_init": ["--kmeans-init"],
    "l2_codes": ["--set", "codebook_norm=true"],
    "ema_codebook": ["--ema-codebook", "0.99", "--kmeans-init"],
    "ssim": ["--ssim-weight", "0.5"],
    "ema_weights": ["--ema", "0.99"],
    "l2_ema_codebook": ["--set", "codebook_norm=true", "--ema-codebook", "0.99", "--kmeans-init"],
    "ema_codebook_ssim": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "0.5"],
    # on top of the recipe above: a weight EMA (with its warmup), and the GAN of config/pipeline.yml
    "ema_codebook_ssim_ema": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "0.5", "--ema", "0.999"],
    "ema_codebook_ssim_gan": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "0.5",
                              "--disc-start-frac", "0.6", "--disc-weight", "0.1"],
    "ema_codebook_ssim1": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "1.0"],
    # the recipe of config/pipeline.yml (the one above + its GAN), then the GAN's hygiene on top of it
    "ema_codebook_ssim1_gan": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "1.0",
                               "--disc-start-frac", "0.6", "--disc-weight", "0.1"],
    "ema_codebook_ssim1_gan_fm": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "1.0",
                                  "--disc-start-frac", "0.6", "--disc-weight", "0.1", "--fm-weight", "1.0"],
    "ema_codebook_ssim1_gan_r1": ["--ema-codebook", "0.99", "--kmeans-init", "--ssim-weight", "1.0",
                                  "--disc-start-frac", "0.6", "--disc-weight", "0.1", "--r1-weight", "0.1"],
}
# capacity, step size and norm groups on top of the recipe (ema_codebook_ssim1_gan_fm). ``KEY=*F`` scales the scale's
# own value of a config key by F (so one variant means the same at both scales: a decoder twice as wide)
RECIPE = VARIANTS["ema_codebook_ssim1_gan_fm"]
VARIANTS.update({
    "recipe_dec2x": RECIPE + ["--set", "dec_channels=*2"],
    "recipe_dec1.5x": RECIPE + ["--set", "dec_channels=*1.5"],
    "recipe_dec_res2": RECIPE + ["--set", "dec_num_res_blocks=*2"],
    "recipe_wide1.5x": RECIPE + ["--set", "enc_channels=*1.5", "--set", "dec_channels=*1.5"],
    "recipe_lr8e-4": RECIPE + ["--learning-rate", "8e-4"],
    "recipe_gn4": RECIPE + ["--set", "enc_norm_group_channels=4", "--set", "dec_norm_group_channels=4"],
    "recipe_dec1.5x_gn4": RECIPE + ["--set", "dec_channels=*1.5", "--set", "enc_norm_group_channels=4",
                                    "--set", "dec_norm_group_channels=4"],
    # which part's groups: the 1.5x decoder with 4-channel groups in the decoder only (the encoder's as the recipe's)
    "recipe_dec1.5x_gn4dec": RECIPE + ["--set", "dec_channels=*1.5", "--set", "dec_norm_group_channels=4"],
    # session 19, for the next H100 tokenizer run: the doubled step size on the bundled (1.5x) decoder, and the 2x
    # decoder with the groups it has at H100 scale (64/128/256 channels: 2 per group in its last stage under the
    # lab's rule, where the CPU scale's 32 channels get 1; at H100 scale the setting changes nothing)
    "recipe_dec1.5x_lr8e-4": RECIPE + ["--set", "dec_channels=*1.5", "--learning-rate", "8e-4"],
    "recipe_dec2x_gn2dec": RECIPE + ["--set", "dec_channels=*2", "--set", "dec_norm_group_channels=2"],
    # session 20: the two together, the exact recipe of the planned H100 tokenizer call
    "recipe_dec2x_gn2dec_lr8e-4": RECIPE + ["--set", "dec_channels=*2", "--set", "dec_norm_group_channels=2",
                                           "--learning-rate", "8e-4"],
    # session 21: the encoder 1.5x wider beside that 2x decoder (more than one channel per group in its first stages
    # at both scales, as the wider decoder's)
    "recipe_dec2x_gn2dec_enc1.5x": RECIPE + ["--set", "dec_channels=*2", "--set", "dec_norm_group_channels=2",
                                            "--set", "enc_channels=*1.5"],
})
# session 23, on top of both widths (the next H100 tokenizer's architecture): the loss balance (SSIM weight 2.0 instead
# of 1.0) and the GAN's length (it and its feature matching from 40% of the run instead of 60%); a later option wins
WIDE = VARIANTS["recipe_dec2x_gn2dec_enc1.5x"]
VARIANTS.update({
    "recipe_dec2x_gn2dec_enc1.5x_ssim2": WIDE + ["--ssim-weight", "2.0"],
    "recipe_dec2x_gn2dec_enc1.5x_disc0.4": WIDE + ["--disc-start-frac", "0.4"],
    # the GAN from 40% cost 8.2 FID on seed 0, so the other way: from 80%
    "recipe_dec2x_gn2dec_enc1.5x_disc0.8": WIDE + ["--disc-start-frac", "0.8"],
})
# session 24, on top of session 23's best (SSIM weight 2.0): further along the loss balance (3.0), and the LeCam
# regulariser of the discriminator (the issue's GAN hygiene, not yet ablated at 800 steps)
WIDE_SSIM2 = VARIANTS["recipe_dec2x_gn2dec_enc1.5x_ssim2"]
VARIANTS.update({
    "recipe_dec2x_gn2dec_enc1.5x_ssim3": WIDE + ["--ssim-weight", "3.0"],
    "recipe_dec2x_gn2dec_enc1.5x_ssim2_lecam": WIDE_SSIM2 + ["--lecam-weight", "0.1"],
})
# session 25, the issue's two levers not yet measured on that recipe: a weight EMA whose averaging window is scaled to
# the run (decay 0.99: about the last 100 of 800 steps, the share 0.999 averages of the GPU call's ~7,000 steps; the
# 0.999 of the 800-step table above averaged most of the run), and the R1 penalty of the discriminator (gamma 0.1)
VARIANTS.update({
    "recipe_dec2x_gn2dec_enc1.5x_ssim2_ema0.99": WIDE_SSIM2 + ["--ema", "0.99"],
    "recipe_dec2x_gn2dec_enc1.5x_ssim2_r1": WIDE_SSIM2 + ["--r1-weight", "0.1"],
    # the GAN's strongest lever at 800 steps (feature matching, -2.6 FID at weight 1.0), doubled
    "recipe_dec2x_gn2dec_enc1.5x_ssim2_fm2": WIDE_SSIM2 + ["--fm-weight", "2.0"],
    # SSIM 3.0 won on both seeds (-0.4, -2.4), so one step further along the loss balance (worse on both seeds: 3.0 stays)
    "recipe_dec2x_gn2dec_enc1.5x_ssim4": WIDE + ["--ssim-weight", "4.0"],
})
# session 26, on top of session 25's choice (SSIM 3.0): the issue's code-lookup levers, measured so far only on the narrow
# tokenizer in 200-step runs: the l2-normalised lookup (ViT-VQGAN; with the recipe's EMA codebook and k-means), and a
# lower-dimensional one (the latent and code dimension halved: 16 at the CPU scale, 32 at the H100 scale)
WIDE_SSIM3 = VARIANTS["recipe_dec2x_gn2dec_enc1.5x_ssim3"]
VARIANTS.update({
    "recipe_dec2x_gn2dec_enc1.5x_ssim3_l2": WIDE_SSIM3 + ["--set", "codebook_norm=true"],
    "recipe_dec2x_gn2dec_enc1.5x_ssim3_lat0.5x": WIDE_SSIM3 + ["--set", "latent_dim=*0.5"],
    # the bundled tokenizer's architecture (the 1.5x decoder) with the same loss balance: run for more steps, it asks
    # whether the wide tokenizer's width pays at a fixed time (an H100 call gives it ~0.7 of the 1.5x decoder's steps)
    "recipe_dec1.5x_ssim3": VARIANTS["recipe_dec1.5x"] + ["--ssim-weight", "3.0"],
})
# session 27, decoders trained on the frozen tokens of a trained tokenizer (--init FILE, e.g. recipe_dec1.5x_ssim3's
# vqgan.pt): the tokens stay, so a transformer trained on them stays valid. Its own decoder trained on (the decoder
# fine-tune), a new decoder of the same width from scratch, and a new one twice as wide (with the groups of the
# H100 scale's 64/128/256). The loss is recipe_dec1.5x_ssim3's without the codebook options (the codebook is frozen)
DECODER_RECIPE = ["--train-part", "decoder", "--ssim-weight", "3.0", "--disc-start-frac", "0.6", "--disc-weight", "0.1",
                  "--fm-weight", "1.0"]
VARIANTS.update({
    "dec1.5x_ft": DECODER_RECIPE + ["--set", "dec_channels=*1.5"],
    "newdec1.5x": DECODER_RECIPE + ["--new-decoder", "--set", "dec_channels=*1.5"],
    "newdec2x_gn2dec": DECODER_RECIPE + ["--new-decoder", "--set", "dec_channels=*2", "--set", "dec_norm_group_channels=2"],
    # the decoder fine-tune's settings of session 17 on the H100 (which raised the unseen val floor FID there): the GAN and feature
    # matching from step 0 with a fresh discriminator, learning rate 1e-4, SSIM 1.0 (scripts/train_bundled.sh's)
    "dec1.5x_ft_s17": ["--train-part", "decoder", "--ssim-weight", "1.0", "--disc-start", "0", "--disc-weight", "0.1",
                       "--fm-weight", "1.0", "--learning-rate", "1e-4", "--set", "dec_channels=*1.5"],
})
# session 28, which of session 17's settings cost dec1.5x_ft_s17 its 3.4 FID: the learning rate alone (1e-4 instead of
# the stage's 4e-4), and whether the GAN helps a decoder trained on (no discriminator at all: L1 + SSIM only)
VARIANTS.update({
    "dec1.5x_ft_lr1e-4": DECODER_RECIPE + ["--learning-rate", "1e-4", "--set", "dec_channels=*1.5"],
    "dec1.5x_ft_nogan": ["--train-part", "decoder", "--ssim-weight", "3.0", "--disc-start", "-1",
                         "--set", "dec_channels=*1.5"],
    # the GAN and feature matching from the first decoder step (as session 17's), the stage's learning rate and SSIM
    "dec1.5x_ft_gan0": ["--train-part", "decoder", "--ssim-weight", "3.0", "--disc-start", "0", "--disc-weight", "0.1",
                        "--fm-weight", "1.0", "--set", "dec_channels=*1.5"],
})
# session 29, where between those the GAN's start pays most: from 30% and from 80% of the decoder steps (the stage: 60%)
VARIANTS.update({f"dec1.5x_ft_disc{f}": DECODER_RECIPE + ["--disc-start-frac", f, "--set", "dec_channels=*1.5"]
                 for f in ("0.3", "0.8")})


def scale_sets(sets: list, base: dict) -> list:
    """``sets`` with every ``KEY=*F`` replaced by ``KEY=`` F times that key's value in ``base`` after
    the sets before it (an int or a list of ints, rounded to integers); other items unchanged."""
    out = []
    for item in sets:
        key, _, value = item.partition("=")
        if value.startswith("*"):
            f = float(value[1:])
            old = apply_overrides(base, out)[key]
            new = [round(c * f) for c in old] if isinstance(old, list) else round(old * f)
            item = f"{key}={new}".replace(" ", "")
        out.append(item)
    return out


def run_name(variant: str, seed: int = 0) -> str:
    """A run's folder under --out and its row's name: the variant, with its seed unless 0 (so two
    seeds of one variant neither share a folder, resuming each other's run, nor count as done)."""
    return f"{variant}_seed{seed}" if seed else variant


def run_variant(name: str, extra: list, scale: dict, args, held_out: tuple) -> dict:
    """Train one variant (resuming a run that was cut off) and score it on ``held_out``, the
    (folder, names) of :func:`eval_images`."""
    out = os.path.join(args.out, run_name(name, args.seed))
    cmd = [sys.executable, "train_vqgan.py", "--data", os.path.join(args.data, "train"),
           "--val-data", os.path.join(args.data, "val"), "--config", scale["config"], "--out-dir", out,
           "--steps", str(args.steps or scale["steps"]), "--batch-size", str(scale["batch"]), "--device", args.device,
           "--eval-every", "100000", "--ckpt-every", "100", "--no-progress", "--seed", str(args.seed), *BASE]
    if args.init:
        cmd += ["--init", args.init]
    if os.path.exists(os.path.join(out, "last.pt")):
        cmd.append("--resume")
    base_cfg = load_vqgan_config(os.path.join(REPO, scale["config"])).to_dict()
    sets = scale_sets(scale["set"] + [extra[i + 1] for i, a in enumerate(extra) if a == "--set"], base_cfg)
    cmd += ["--set", *sets] if sets else []
    cmd += [a for i, a in enumerate(extra) if a != "--set" and (i == 0 or extra[i - 1] != "--set")]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    train_s = time.time() - t0
    cfg = apply_overrides(base_cfg, sets)
    model = VQGAN(cfg).to(args.device).eval()
    load_vqgan_weights(model, os.path.join(out, "vqgan.pt"))
    src, names = held_out
    rec_dir = os.path.join(out, "recon")
    shutil.rmtree(rec_dir, ignore_errors=True)  # no stale images of another run in the FID
    p = reconstruct_images(model, src, names, rec_dir, args.device)
    return {"variant": name, "options": " ".join(extra) or "(base recipe)", "steps": args.steps or scale["steps"],
            "eval_set": args.eval_set, "psnr": round(p, 2), "fid": recon_fid(rec_dir, src, args.device),
            "train_s": round(train_s), **({"seed": args.seed} if args.seed else {}),
            **({"init": args.init} if args.init else {})}


def eval_images(args) -> tuple:
    """(folder, file names) of the held-out images a variant reconstructs: the val images that never
    occur in train (val-unseen), or every original in --gt (test)."""
    src = eval_folder(args, args.eval_set)
    if args.eval_set == "test":
        return src, [os.path.basename(f) for f in list_images(src)]
    return src, [os.path.basename(f) for f in unseen_val_paths(args.data)]


def eval_folder(args, eval_set: str) -> str:
    return args.gt if eval_set == "test" else os.path.join(args.data, "val")


def recon_fid(rec_dir: str, gt: str, device: str) -> float | None:
    """FID of a variant's reconstructions against the originals; None on a machine without the FID
    Inception weights (the device machine: its recon_test folders come back and --rescore scores them)."""
    try:
        get_model(2048)  # loads (and keeps, for compute_fid) the Inception, or says why it cannot
    except FileNotFoundError as e:
        print(f"{rec_dir}: FID not scored on this machine ({str(e).split('. ')[0]}): rerun with --rescore where "
              "the weights are", flush=True)
        return None
    return round(compute_fid(rec_dir, gt, device=device, match_names=True), 2)


def rescore(results: list, args) -> None:
    """Fill in the FIDs a machine without the Inception weights left out, from the variants' recon
    folders (recon_test in results of older versions, which scored only the test originals)."""
    for r in results:
        eval_set = r.get("eval_set", "test")
        rec_dir = os.path.join(args.out, run_name(r["variant"], r.get("seed", 0)),
                               "recon" if "eval_set" in r else "recon_test")
        if r["fid"] is None and os.path.isdir(rec_dir):
            r["fid"] = recon_fid(rec_dir, eval_folder(args, eval_set), args.device)
            print(json.dumps(r), flush=True)


def write_table(results: list, path: str, scale_name: str) -> None:
    steps = "/".join(sorted({str(r.get("steps", "?")) for r in results}))
    sets = "/".join(sorted({r.get("eval_set", "test") for r in results}))
    lines = [f"| variant ({scale_name} scale, {steps} steps each) | options | PSNR (dB) | recon FID ({sets}) "
             "| train s |",
             "|---|---|---|---|---|"]
    lines += [f"| {run_name(r['variant'], r.get('seed', 0))} | `{r['options']}` | {r['psnr']:.2f} | "
              f"{'n/a' if r['fid'] is None else format(r['fid'], '.2f')} | {r['train_s']} |" for r in results]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="steps per variant (default: the scale's)")
    p.add_argument("--data", default=str(SHARED_DATA / "lab3_dataset"))
    p.add_argument("--gt", default=str(SHARED_DATA / "lab3_test_gt"), help="folder of test originals (--eval-set test)")
    p.add_argument("--eval-set", choices=["val-unseen", "test"], default="val-unseen",
                   help="held-out images to score: val images never in train (default; choose the recipe here) "
                        "or the recovered test originals (a report)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0,
                   help="train_vqgan.py's seed for every variant (one thread on the CPU repeats a run exactly; "
                        "another seed shows how far a result moves by chance)")
    p.add_argument("--out", default="bench/results/stage1_ablation")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start every variant from this tokenizer (train_vqgan.py --init): for the decoder variants "
                        "(dec1.5x_ft, newdec*), which train on its frozen tokens")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: score the FIDs left out by a machine without the FID Inception weights")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    scale = SCALES[args.scale]
    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, "results.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else []
    other = sorted({r.get("eval_set", "test") for r in results} - {args.eval_set})
    if other and not args.rescore:
        p.error(f"{res_path} holds variants scored on {', '.join(other)}, not --eval-set {args.eval_set}: "
                f"give another --out (or the same --eval-set) so the table compares like with like")
    done = {run_name(r["variant"], r.get("seed", 0)) for r in results}

    def save():
        with open(res_path, "w") as f:
            json.dump(results, f, indent=1)
        write_table(results, os.path.join(args.out, "results.md"), args.scale)

    held_out = None  # read once (unseen_indices decodes every train and val image), and only if a variant runs
    for name in () if args.rescore else args.variants.split(","):
        if run_name(name, args.seed) in done:
            continue
        held_out = held_out or eval_images(args)
        r = run_variant(name, VARIANTS[name], scale, args, held_out)
        print(json.dumps(r), flush=True)
        results.append(r)
        save()
    if args.rescore:
        rescore(results, args)
        save()
    return results


if __name__ == "__main__":
    main()
