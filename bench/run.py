"""Where the repository stands: quality and speed against real baselines, one command.

    python bench/run.py --quick          # < 10 min on 2 CPU cores (48 images per set)
    python bench/run.py                  # full: 570 test images + 1,118 unseen val images

Quality sets:
  test        the lab's masked test images whose originals were recovered (570)
  val-unseen  val images that never occur in train, holed with the lab's masks (1,118)
Methods: ours (bundled small model, or --transformer-ckpt with --vqgan-ckpt, e.g. a pipeline run's
candidate; lab protocol = no pasting; composited = known pixels
pasted back; composited, seamless = pasted with the hole corrected to meet them (membrane);
composited, biharmonic = the same with a thin-plate correction, as `inpainting.py --paste-known`
does by default) for cosine / linear / square and T in {4, 8, 12} (or the
settings of --combos, e.g. cosine:10:halton for the Halton order, cosine:10:logprob for the
official log-probability confidence, cosine:10:prefill=biharmonic for another hole prefill); OpenCV Telea and Navier-Stokes; scikit-image biharmonic;
and the tokenizer's own reconstruction (encode -> decode of the originals), the floor of the lab
protocol. Metrics: FID (our FID, pytorch-fid features) and
PSNR / SSIM / L1 on the hole region. Speed: training and decoding throughput ratios.
Writes bench/results/quality.csv and speed.csv and prints both tables.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common import SHARED_DATA, device_name, print_table, write_csv
from inpainting import BUNDLED_CONFIG, BUNDLED_TRANSFORMER
from utils.build import (adopt_tokenizer, build_maskgit, checkpoint_config, load_inference_model,
                         load_transformer_checkpoint)
from utils.config import REPO_ROOT, load_maskgit_config, resolve_path
from utils.checkpoint import stored_config
from utils.cli import UserError, run_cli
from utils.composite import PREFILLS, paste_known
from utils.data import (TEST_MEAN, TEST_STD, MaskedImageSet, denormalize, known_pixels, list_images, load_mask,
                        normalize, pil_to_tensor01, to_uint8)
from utils.fid import compute_fid
from utils.inpaint import InpaintOptions, sampling_options
from utils.outputs import run_inpainting
from utils.metrics import paired_metrics
from utils.runtime import create_logger, get_device
from utils.tokens import unseen_val_paths



def load_model(args):
    """The model scored as "ours", in eval mode on the CPU: the bundled small models (with
    ``--vqgan-ckpt``, another tokenizer: the architecture its file stores, else the bundled config's),
    or ``--transformer-ckpt`` built as inpainting.py builds it (the config the checkpoint stores, else
    ``--config``) with its tokenizer from ``--vqgan-ckpt``; a file without a config needs ``--config``,
    and the tokenizer is never guessed."""
    if args.transformer_ckpt:
        if args.vqgan_ckpt is None:  # a flag check first, before the checkpoint is read
            raise UserError("--transformer-ckpt needs --vqgan-ckpt: the tokenizer it was trained on (a pipeline "
                            "run's tokenizer/vqgan.pt)")
        cfg, obj = checkpoint_config(args.transformer_ckpt, args.config)
        if args.config is None and stored_config(obj) is None:
            raise UserError(f"{args.transformer_ckpt} stores no config: pass the MaskGit YAML it was trained with as "
                            f"--config (e.g. {BUNDLED_CONFIG}, the bundled models' config)")
        return load_inference_model(cfg, obj, resolve_path(args.transformer_ckpt), args.vqgan_ckpt)
    cfg = load_maskgit_config(str(REPO_ROOT / BUNDLED_CONFIG))
    if args.vqgan_ckpt:  # a tokenizer of ours is built as its file says (e.g. a wider decoder: same tokens' interface)
        note = adopt_tokenizer(cfg, args.vqgan_ckpt)
        if note:
            create_logger().info(note)
    model = build_maskgit(cfg)
    load_transformer_checkpoint(model, str(REPO_ROOT / BUNDLED_TRANSFORMER))
    return model.eval()


def parse_seeds(parser, text: str) -> list:
    """'0,1,2' -> [0, 1, 2] (distinct non-negative integers)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items) or len(set(map(int, items))) != len(items):
        parser.error(f"--seeds: {text!r} is not a comma-separated list of distinct non-negative integers, e.g. 0,1,2")
    return [int(t) for t in items]


def seed_summary(rows: list) -> list:
    """Mean and sample std (ddof 1) of FID and hole PSNR over the seeds of each (set, method, protocol)
    that ran with more than one seed."""
    groups = {}
    for r in rows:
        if "seed" in r:
            groups.setdefault((r["set"], r["method"], r["protocol"]), []).append(r)
    out = []
    for (set_name, method, protocol), rs in groups.items():
        if len(rs) < 2:
            continue
        fid, ph = np.array([r["FID"] for r in rs]), np.array([r["psnr_hole"] for r in rs])
        out.append({"set": set_name, "method": method, "protocol": protocol, "seeds": len(rs),
                    "FID mean": fid.mean(), "FID std": fid.std(ddof=1), "FID min": fid.min(), "FID max": fid.max(),
                    "hole PSNR mean": ph.mean(), "hole PSNR std": ph.std(ddof=1)})
    return out


def _tag_number(tag: str, prefix: str, zero_ok: bool = False) -> float | None:
    """'PREFIX1.5' -> 1.5 when finite and > 0 (>= 0 with zero_ok), anything else -> None."""
    try:
        t = float(tag[len(prefix):]) if tag.startswith(prefix) else None
    except ValueError:
        return None
    return t if t is not None and (t >= 0 if zero_ok else t > 0) and t < float("inf") else None


def _temperature(tag: str) -> float | None:
    """'sample' -> 1.0, 'sample=0.7' -> 0.7, anything else (or a temperature <= 0) -> None."""
    return 1.0 if tag == "sample" else _tag_number(tag, "sample=")


def parse_combos(parser, text: str) -> list:
    """'cosine:10,linear:8:halton,cosine:10:logprob,cosine:10:prefill=gray,cosine:10:sample=0.7,cosine:10:choice=2' ->
    [Combo("cosine", 10), Combo("linear", 8, "halton"), Combo("cosine", 10, confidence="logprob"),
    Combo("cosine", 10, prefill="gray"), Combo("cosine", 10, temperature=0.7), Combo("cosine", 10, choice=2.0)]:
    schedule:T, then optionally an order, a confidence, prefill=NAME, sample[=TEMPERATURE] (--token-choice
    sample at that --sample-temperature, default 1; without it argmax), choice=C (the confidence noise's
    choice temperature, inpainting.py --choice-temperature; without it the model config's) and / or refine=N
    (inpainting.py --refine N: the final decode fitted to the known pixels in N steps). 'none' -> []: no
    inpainting, the tokenizer's reconstruction only (a tokenizer scored alone)."""
    from models import CONFIDENCES, ORDERS, SCHEDULES
    if text.strip() == "none":
        return []
    combos = []
    for item in text.split(","):
        name, t, *extra = item.strip().split(":") + [""] * (":" not in item)
        orders, confs = [e for e in extra if e in ORDERS], [e for e in extra if e in CONFIDENCES]
        fills = [e[len("prefill="):] for e in extra if e.startswith("prefill=") and e[len("prefill="):] in PREFILLS]
        temps = [t for t in map(_temperature, extra) if t is not None]
        choices = [c for c in (_tag_number(e, "choice=", zero_ok=True) for e in extra) if c is not None]
        refines = [int(e[len("refine="):]) for e in extra if e.startswith("refine=") and e[len("refine="):].isdigit()]
        tags = (orders, confs, fills, temps, choices, refines)
        if (name not in SCHEDULES or not t.isdigit() or int(t) < 1 or any(len(g) > 1 for g in tags)
                or sum(map(len, tags)) != len(extra)):
            parser.error(f"--combos: {item!r} is not schedule:T[:order][:confidence][:prefill=NAME][:sample[=TEMP]]"
                         f"[:choice=C][:refine=N] with schedule in {list(SCHEDULES)}, T >= 1, order in {list(ORDERS)}, "
                         f"confidence in {list(CONFIDENCES)}, prefill in {list(PREFILLS)}, TEMP > 0, C >= 0, N >= 0")
        combos.append(Combo(name, int(t), (orders or ["confidence"])[0], (confs or ["prob"])[0],
                            (fills or ["smooth"])[0], (temps or [None])[0], (choices or [None])[0],
                            (refines or [0])[0]))
    return combos


@dataclass(frozen=True)
class Combo:
    """One of our decoding settings."""
    schedule: str
    steps: int
    order: str = "confidence"
    confidence: str = "prob"
    prefill: str = "smooth"
    temperature: float | None = None  # None: argmax; else --token-choice sample at this temperature
    choice: float | None = None  # the confidence noise's choice temperature; None: the model config's
    refine: int = 0  # steps of utils.inpaint.refine_decode (0: the plain decode)

    def label(self) -> str:
        """'cosine T=10', plus the order / confidence / prefill / sampling / choice temperature / refinement
        where they are not the defaults."""
        extra = [e for e, default in ((self.order, "confidence"), (self.confidence, "prob"),
                                      (f"prefill={self.prefill}", "prefill=smooth")) if e != default]
        if self.temperature is not None:
            extra.append(f"sample={self.temperature:g}")
        if self.choice is not None:
            extra.append(f"choice={self.choice:g}")
        if self.refine:
            extra.append(f"refine={self.refine}")
        return " ".join([f"{self.schedule} T={self.steps}", *extra])

    def dirname(self) -> str:
        return "ours_" + self.label().replace(" T=", "_T").replace(" ", "_").replace("=", "-")

    def options(self, seed: int = 0) -> InpaintOptions:
        return InpaintOptions(total_iter=self.steps, mask_func=self.schedule, order=self.order,
                              confidence=self.confidence, prefill=self.prefill, visualize=False, seed=seed,
                              choice_temperature=self.choice, refine=self.refine, **sampling_options(self.temperature))


def build_sets(work: str, n: int | None, data: str, gt: str, wanted=("test", "val-unseen")) -> dict:
    """Write each quality set in the lab layout: masked_image/, mask64/, originals/."""
    masks = list_images(os.path.join(data, "mask64"))
    builders = {"test": lambda: _test_set(work, n, data, gt, masks),
                "val-unseen": lambda: _val_unseen_set(work, n, data, masks)}
    return {name: builders[name]() for name in wanted}


def _test_set(work: str, n: int | None, data: str, gt: str, masks: list) -> str:
    """The test images whose originals are known, with their own masks."""
    names = sorted(os.listdir(gt))[:n]
    root = os.path.join(work, "test")
    _reset(root)
    for name in names:
        i = int(name.split("_")[1].split(".")[0])
        shutil.copy(os.path.join(data, "masked_image", name), os.path.join(root, "masked_image", name))
        shutil.copy(masks[i], os.path.join(root, "mask64", f"mask_{i:03d}.png"))
        shutil.copy(os.path.join(gt, name), os.path.join(root, "originals", name))
    return root


def _val_unseen_set(work: str, n: int | None, data: str, masks: list) -> str:
    """Generalisation images (val, never in train), holed with the lab masks (round robin)."""
    root = os.path.join(work, "val-unseen")
    _reset(root)
    for j, path in enumerate(unseen_val_paths(data, n)):
        img = np.asarray(Image.open(path).convert("RGB")).copy()
        m = np.asarray(Image.open(masks[j % len(masks)]).convert("L"))
        Image.fromarray(img).save(os.path.join(root, "originals", f"image_{j:04d}.png"))
        img[~known_pixels(m)] = 128
        Image.fromarray(img).save(os.path.join(root, "masked_image", f"image_{j:04d}.png"))
        Image.fromarray(m).save(os.path.join(root, "mask64", f"mask_{j:04d}.png"))
    return root


def _reset(root):
    shutil.rmtree(root, ignore_errors=True)
    for k in ("masked_image", "mask64", "originals"):
        os.makedirs(os.path.join(root, k))


def _load01(path):
    return pil_to_tensor01(Image.open(path).convert("RGB"))


# bench/run.py's composited rows: each blend of utils.composite.paste_known, and its protocol label
BLEND_PROTOCOLS = (("hard", "composited"), ("seamless", "composited, seamless"),
                   ("biharmonic", "composited, biharmonic"))


def composite(pred_dir: str, root: str, out_dir: str, blend: str = "hard") -> str:
    """Paste the known pixels of the masked inputs into the predictions: ``hard`` (plain paste),
    ``seamless`` (the hole is corrected to meet the known pixels with a membrane, the default
    before) or ``biharmonic`` (with a thin plate, as ``--paste-known`` now does by default)."""
    os.makedirs(out_dir, exist_ok=True)
    imgs, masks = list_images(os.path.join(root, "masked_image")), list_images(os.path.join(root, "mask64"))
    for ip, mp in zip(imgs, masks):
        name = os.path.basename(ip)
        known = load_mask(mp)
        orig, pred = _load01(ip), _load01(os.path.join(pred_dir, name))
        out = paste_known(pred[None], orig[None], known[None], blend)[0]
        Image.fromarray(to_uint8(out)).save(os.path.join(out_dir, name))
    return out_dir


def hole_metrics(pred_dir: str, root: str) -> dict:
    imgs, masks = list_images(os.path.join(root, "masked_image")), list_images(os.path.join(root, "mask64"))
    preds, gts, holes = [], [], []
    for ip, mp in zip(imgs, masks):
        name = os.path.basename(ip)
        preds.append(_load01(os.path.join(pred_dir, name)))
        gts.append(_load01(os.path.join(root, "originals", name)))
        holes.append(1 - load_mask(mp))
    m = paired_metrics(torch.stack(preds), torch.stack(gts), torch.stack(holes))
    return {"psnr_hole": m["psnr_hole"].mean().item(), "ssim_hole": m["ssim_hole"].mean().item(),
            "l1_hole": m["l1_hole"].mean().item(), "psnr": m["psnr"].mean().item()}


def classical(root: str, out_dir: str, method: str) -> str:
    import cv2
    from skimage.restoration import inpaint_biharmonic
    os.makedirs(out_dir, exist_ok=True)
    imgs, masks = list_images(os.path.join(root, "masked_image")), list_images(os.path.join(root, "mask64"))
    for ip, mp in zip(imgs, masks):
        img = np.asarray(Image.open(ip).convert("RGB"))
        hole = (~known_pixels(np.asarray(Image.open(mp).convert("L")))).astype(np.uint8)
        if method == "biharmonic":
            out = (inpaint_biharmonic(img / 255.0, hole.astype(bool), channel_axis=-1) * 255).round()
        else:
            flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
            out = cv2.inpaint(img[..., ::-1].copy(), hole, 3, flag)[..., ::-1]
        Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(os.path.join(out_dir, os.path.basename(ip)))
    return out_dir


@torch.no_grad()
def reconstruction(model, root: str, out_dir: str, device) -> str:
    """The tokenizer's encode -> decode of the originals: the best any token model can reach."""
    os.makedirs(out_dir, exist_ok=True)
    for p in list_images(os.path.join(root, "originals")):
        x = normalize(_load01(p), TEST_MEAN, TEST_STD)[None].to(device)
        _, ids = model.encode_to_z(x)
        out = denormalize(model.decode_tokens(ids).float(), TEST_MEAN, TEST_STD)[0]
        Image.fromarray(to_uint8(out)).save(os.path.join(out_dir, os.path.basename(p)))
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="48 images per set, fewer schedule/T combinations")
    p.add_argument("--n", type=int, default=None, help="images per set (default: all; 48 with --quick)")
    p.add_argument("--data", default=str(SHARED_DATA / "lab3_dataset"))
    p.add_argument("--gt", default=str(SHARED_DATA / "lab3_test_gt"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--only-ours", action="store_true",
                   help="skip the classical baselines (they do not depend on our model)")
    p.add_argument("--vqgan-ckpt", default=None, metavar="PATH",
                   help="score another tokenizer: one of ours is built as its file stores (e.g. a pipeline "
                        "run's tokenizer/vqgan.pt, alone with --combos none), a file without a config (the lab's "
                        "VQGAN.pt) must fit the bundled config; or the one --transformer-ckpt was trained on")
    p.add_argument("--transformer-ckpt", default=None, metavar="PATH",
                   help="score this transformer instead of the bundled one (e.g. a pipeline run's, with its "
                        "tokenizer as --vqgan-ckpt); its stored config is used, else --config")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="MaskGit YAML for a --transformer-ckpt that stores no config (e.g. a lab-layout file "
                        "of the bundled models' architecture: config/MaskGit_small.yml)")
    p.add_argument("--sets", default="test,val-unseen", help="comma-separated subset of: test, val-unseen")
    p.add_argument("--combos", default=None,
                   help="our settings as schedule:T[:order][:confidence][:prefill=NAME][:sample[=TEMP]][:choice=C]"
                        "[:refine=N], e.g. cosine:10,linear:8,cosine:10:halton,cosine:10:logprob,"
                        "cosine:10:prefill=biharmonic,cosine:10:sample=0.4:choice=2,cosine:10:refine=10 (default: the "
                        "grid, confidence order, prob confidence, smooth prefill, argmax, the config's choice "
                        "temperature, no refinement)")
    p.add_argument("--blends", default=",".join(b for b, _ in BLEND_PROTOCOLS),
                   help="comma-separated blends whose --paste-known composites are scored (default: all; "
                        "e.g. biharmonic, the default of --paste-known, for a third of the FID time)")
    p.add_argument("--seeds", default="0",
                   help="comma-separated decoding seeds (the confidence noise); with more than one, each of our "
                        "settings runs once per seed and a mean +- std table over the seeds follows")
    args = p.parse_args(argv)
    seeds = parse_seeds(p, args.seeds)
    blends = [b.strip() for b in args.blends.split(",") if b.strip()]
    if not blends or set(blends) - {b for b, _ in BLEND_PROTOCOLS}:
        p.error(f"--blends: {args.blends!r}: choose from {', '.join(b for b, _ in BLEND_PROTOCOLS)}")
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {"test", "val-unseen"})
    if unknown or not wanted:
        p.error(f"--sets: {args.sets!r} names no known set {unknown}; choose from test, val-unseen")
    combos = parse_combos(p, args.combos) if args.combos else (
        [Combo("cosine", 8), Combo("linear", 8), Combo("square", 8), Combo("cosine", 4)] if args.quick
        else [Combo(s, t) for s in ("cosine", "linear", "square") for t in (4, 8, 12)])
    log = create_logger()
    t_start = time.time()
    device = get_device(args.device)
    n = args.n or (48 if args.quick else None)
    out = str(REPO_ROOT / args.out) if not os.path.isabs(args.out) else args.out
    work = os.path.join(out, "work")
    model = load_model(args).to(device)
    sets = build_sets(work, n, args.data, args.gt, wanted)
    rows = []

    def score(set_name, root, method, pred_dir, protocol, seconds=None, seed=None):
        gt = os.path.join(root, "originals")
        row = {"set": set_name, "method": method, "protocol": protocol,
               "FID": compute_fid(pred_dir, gt, device=device), **hole_metrics(pred_dir, root),
               "images": len(list_images(pred_dir))}
        if seconds is not None:
            row["seconds"] = seconds
        if seed is not None:
            row["seed"] = seed
        rows.append(row)
        log.info("%-10s %-28s %-10s FID %7.2f  hole PSNR %.2f", set_name, method, protocol, row["FID"],
                 row["psnr_hole"])

    for set_name, root in sets.items():
        ds = MaskedImageSet(os.path.join(root, "masked_image"), os.path.join(root, "mask64"))
        rec = reconstruction(model, root, os.path.join(work, set_name, "recon"), device)  # moves with the tokenizer
        score(set_name, root, "tokenizer reconstruction (floor)", rec, "no holes")
        for c in combos:
            for seed in seeds:
                d = os.path.join(work, set_name, c.dirname() + (f"_seed{seed}" if seed else ""))
                t0 = time.time()
                run_inpainting(model, ds, d, c.options(seed), device, 8, progress=False)
                sec, tag = time.time() - t0, seed if len(seeds) > 1 else None
                score(set_name, root, f"ours {c.label()}", os.path.join(d, "test_results"), "lab (no paste)", sec, tag)
                for blend, protocol in BLEND_PROTOCOLS:
                    if blend not in blends:
                        continue
                    comp = composite(os.path.join(d, "test_results"), root, os.path.join(d, f"composited_{blend}"),
                                     blend)
                    score(set_name, root, f"ours {c.label()}", comp, protocol, seed=tag)
        for method in () if args.only_ours else ("telea", "ns", "biharmonic"):
            t0 = time.time()
            d = classical(root, os.path.join(work, set_name, method), method)
            score(set_name, root, {"telea": "OpenCV Telea", "ns": "OpenCV Navier-Stokes",
                                   "biharmonic": "scikit-image biharmonic"}[method], d, "composited",
                  time.time() - t0)
    print_table(rows, f"quality ({device_name(device)}; FID vs the originals of each set)")
    write_csv(rows, os.path.join(out, "quality.csv"))
    spread = seed_summary(rows)
    if spread:
        print_table(spread, f"spread over the decoding seeds {args.seeds}")
        write_csv(spread, os.path.join(out, "quality_seeds.csv"))
    if not args.skip_speed:
        from decode_throughput import main as decode_main
        from train_throughput import main as train_main
        train_main(["--config", BUNDLED_CONFIG, "--device", str(device), "--csv", os.path.join(out, "speed_train.csv")]
                   + (["--steps", "2"] if device.type == "cpu" else []))
        decode_main(["--bundled", "--device", str(device), "--images", "32" if args.quick else "128",
                     "--csv", os.path.join(out, "speed_decode.csv")])
        t0 = time.time()
        first_set = next(iter(sets))
        compute_fid(os.path.join(work, first_set, combos[0].dirname(), "test_results") if combos
                    else os.path.join(work, first_set, "recon"),
                    os.path.join(work, first_set, "originals"), device=device)
        n_fid = len(list_images(os.path.join(work, first_set, "originals")))
        print(f"\nFID of {n_fid} vs {n_fid} images with cached ground-truth statistics: {time.time() - t0:.1f} s "
              f"({device_name(device)})")
    print(f"\nbench/run.py {'--quick ' if args.quick else ''}finished in {time.time() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    run_cli(main)
