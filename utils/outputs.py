"""The lab's output files of an inpainting run, and the reports drawn from them.

Outputs (under ``out_dir``), exactly as the lab expects:
  test_results/image_XXX.png   full VQGAN decode of the final tokens, de-normalized (test constants)
  mask_scheduling/test_X.png   the latent mask after each step (white = known/decoded, black = masked)
  imga/test_X.png              the masked input, then the decoded image after each step
Optional: gifs/test_X.gif (decoding animation), metrics.csv (vs ground truth), report.png.
"""
from __future__ import annotations

import csv
import logging
import os

import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from .data import TEST_MEAN, TEST_STD, denormalize, pil_to_tensor01, read_image, to_uint8
from .inpaint import InpaintOptions, inpaint_batch, latent_mask_images
from .metrics import paired_metrics

log = logging.getLogger("maskgit")


def save_gif(frames: torch.Tensor, path: str, scale: int = 4, ms: int = 300) -> None:
    """frames (S, 3, H, W) in [0,1] -> animated GIF, enlarged ``scale`` times."""
    ims = [Image.fromarray(to_uint8(f)).resize((f.shape[-1] * scale, f.shape[-2] * scale), Image.NEAREST)
           for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:] + [ims[-1]] * 2, duration=ms, loop=0)


def output_name(dataset, i: int) -> str:
    """test_results/ file name: the masked image's own name as .png (image_XXX.png for the lab)."""
    return os.path.splitext(os.path.basename(dataset.images[i]))[0] + ".png"


def run_inpainting(model, dataset, out_dir: str, opts: InpaintOptions, device, batch_size: int = 32,
                   gt_dir: str | None = None, progress: bool = True) -> dict:
    """Inpaint every image of a :class:`utils.data.MaskedImageSet`; write the lab's files."""
    res = model.vqgan.cfg.latent_resolution
    dirs = {k: os.path.join(out_dir, k) for k in ("test_results", "mask_scheduling", "imga", "gifs")}
    os.makedirs(dirs["test_results"], exist_ok=True)
    if opts.visualize:
        os.makedirs(dirs["mask_scheduling"], exist_ok=True)
        os.makedirs(dirs["imga"], exist_ok=True)
    if opts.gif:
        os.makedirs(dirs["gifs"], exist_ok=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    rows, n_done = [], 0
    for x, pm, idx in tqdm(loader, desc=f"inpainting ({opts.mask_func}, T={opts.total_iter})", disable=not progress):
        x, pm = x.to(device), pm.to(device)
        out, result, token_mask, step_imgs = inpaint_batch(model, x, pm, idx.tolist(), opts, device,
                                                           with_steps=opts.visualize or opts.gif)
        masked_in = denormalize(x, TEST_MEAN, TEST_STD)
        for b, i in enumerate(idx.tolist()):
            Image.fromarray(to_uint8(out[b])).save(os.path.join(dirs["test_results"], output_name(dataset, i)))
            if opts.visualize:
                masks = latent_mask_images(torch.stack([m[b] for m in result.mask_per_step]).cpu(), res)
                save_image(masks, os.path.join(dirs["mask_scheduling"], f"test_{i}.png"), nrow=10)
                frames = torch.cat([masked_in[b:b + 1], step_imgs[b]]).cpu()  # (S+1, 3, H, W)
                save_image(frames, os.path.join(dirs["imga"], f"test_{i}.png"), nrow=len(frames))
            if opts.gif:
                save_gif(torch.cat([masked_in[b:b + 1], step_imgs[b]]).cpu(), os.path.join(dirs["gifs"], f"test_{i}.gif"))
        if gt_dir:
            rows += _metrics_rows(out, pm, idx.tolist(), dataset, gt_dir, token_mask)
        n_done += len(idx)
    summary = {"images": n_done, "out_dir": out_dir}
    if gt_dir:
        summary.update(write_metrics(rows, os.path.join(out_dir, "metrics.csv")))
    return summary


def _metrics_rows(out, pm, indices, dataset, gt_dir, token_mask) -> list:
    rows = []
    for b, i in enumerate(indices):
        name = output_name(dataset, i)
        gt_path = os.path.join(gt_dir, name)
        if not os.path.exists(gt_path):
            continue  # the lab's test set has originals for 570 of 747 images
        gt = pil_to_tensor01(read_image(gt_path, out.shape[-1])).to(out.device)[None]
        m = paired_metrics(out[b:b + 1].float(), gt, 1 - pm[b:b + 1])
        rows.append({"image": name, "masked_tokens": int(token_mask[b].sum()), **{k: float(v) for k, v in m.items()}})
    return rows


def write_metrics(rows: list, path: str) -> dict:
    if not rows:
        log.warning("no ground-truth image matched the inpainted names: no metrics written")
        return {"gt_matched": 0}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = [k for k in rows[0] if k not in ("image", "masked_tokens")]
    means = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"gt_matched": len(rows), **means, "metrics_csv": path}


@torch.no_grad()
def schedule_report(model, dataset, ids: list, schedules: list, opts: InpaintOptions, device, path: str) -> None:
    """One PNG comparing schedules side by side: per image id, one row per schedule showing the
    masked input, the decoded image after every step, and the final result."""
    rows = []
    for i in ids:
        x, pm, _ = dataset[i]
        x, pm = x[None].to(device), pm[None].to(device)
        for s in schedules:
            o = InpaintOptions(**{**opts.__dict__, "mask_func": s, "paste_known": False})
            out, result, _, steps = inpaint_batch(model, x, pm, [i], o, device, with_steps=True)
            steps = steps[0]  # (S, 3, H, W)
            masks = latent_mask_images(torch.stack([m[0] for m in result.mask_per_step]).cpu(),
                                       model.vqgan.cfg.latent_resolution)
            masks = torch.nn.functional.interpolate(masks, size=x.shape[-2:], mode="nearest")
            rows.append(torch.cat([denormalize(x, TEST_MEAN, TEST_STD).cpu(), steps.cpu(), out.cpu()]))
            rows.append(torch.cat([torch.ones_like(x).cpu(), masks, torch.ones_like(x).cpu()]))
    grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    img = Image.fromarray(to_uint8(grid)).resize((grid.shape[-1] * 2, grid.shape[-2] * 2), Image.NEAREST)
    canvas = Image.new("RGB", (img.width + 150, img.height), "white")
    canvas.paste(img, (150, 0))
    d = ImageDraw.Draw(canvas)
    row_h = img.height / len(rows)
    for r in range(0, len(rows), 2):
        i, s = ids[r // (2 * len(schedules))], schedules[(r // 2) % len(schedules)]
        d.text((6, int(r * row_h + row_h / 2)), f"image {i}\n{s}", fill=(0, 0, 0))
    canvas.save(path)
