"""The lab's output files of an inpainting run, and the reports drawn from them.

Outputs (under ``out_dir``), exactly as the lab expects:
  test_results/image_XXX.png   full VQGAN decode of the final tokens, de-normalized (test constants)
  mask_scheduling/test_X.png   the latent mask after each step (white = known/decoded, black = masked)
  imga/test_X.png              the masked input, then the decoded image after each step
Optional: gifs/test_X.gif (decoding animation), metrics.csv (vs ground truth), report.png.

The image files are encoded and written on background threads (:class:`ImageWriter`) while the next
batch decodes; a run returns only after every write finished, and a failed write raises
:class:`OutputWriteError` naming the file.
"""
from __future__ import annotations

import csv
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from .data import TEST_MEAN, TEST_STD, denormalize, pil_to_tensor01, read_image, to_uint8
from .inpaint import InpaintOptions, inpaint_batch, latent_mask_images
from .metrics import paired_metrics

log = logging.getLogger("maskgit")


class OutputWriteError(OSError):
    """An output file could not be written; the message names it."""


class ImageWriter:
    """Runs image writes ``fn(*args, path, **kw)`` on ``workers`` background threads (0: in the
    caller, the reference path), at most ``max_pending`` queued: ``submit`` blocks when the queue is
    full. The arguments must not change after ``submit`` (pass CPU tensors or arrays made for it).
    ``close`` (or leaving the ``with`` block) waits for every write and raises the first failure,
    naming its file: an OSError as :class:`OutputWriteError`, anything else as itself with a note;
    ``submit`` raises one already seen. On an exception inside the ``with`` block it only waits, so
    the original error is the one reported."""

    def __init__(self, workers: int = 2, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="image-writer") if workers > 0 else None
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._pending: list = []  # [(path, future)] not yet checked

    def submit(self, path: str, fn, *args, **kw) -> None:
        self._raise_failed(wait=False)
        if self._pool is None:
            self._run(path, fn, args, kw)
            return
        self._slots.acquire()  # back-pressure: at most max_pending writes hold their data
        try:
            future = self._pool.submit(self._run, path, fn, args, kw)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append((path, future))

    @staticmethod
    def _run(path, fn, args, kw) -> None:
        try:
            fn(*args, path, **kw)
        except OSError as e:  # the disk, a folder, permissions: the user's to fix
            raise OutputWriteError(f"could not write {path}: {type(e).__name__}: {e}") from e
        except Exception as e:  # a bug: keep its type and traceback, name the file
            e.add_note(f"while writing {path}")
            raise

    def _raise_failed(self, wait: bool) -> None:
        """Raise the first failed write (waiting for all of them with ``wait``); forget the finished."""
        still = []
        for path, future in self._pending:
            if wait or future.done():
                future.result()  # raises OutputWriteError
            else:
                still.append((path, future))
        self._pending = still

    def close(self) -> None:
        """Wait for every write; raise the first failure."""
        try:
            self._raise_failed(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._pool is not None:  # keep the caller's error: wait, do not raise a write's
            self._pool.shutdown(wait=True, cancel_futures=True)


def save_png(x01: torch.Tensor, path: str) -> None:
    """[0,1] (3,H,W) CPU tensor -> RGB PNG (rounded like torchvision.save_image)."""
    Image.fromarray(to_uint8(x01)).save(path)


def save_gif(frames: torch.Tensor, path: str, scale: int = 4, ms: int = 300) -> None:
    """frames (S, 3, H, W) in [0,1] -> animated GIF, enlarged ``scale`` times."""
    ims = [Image.fromarray(to_uint8(f)).resize((f.shape[-1] * scale, f.shape[-2] * scale), Image.NEAREST)
           for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:] + [ims[-1]] * 2, duration=ms, loop=0)


def output_name(dataset, i: int) -> str:
    """test_results/ file name: the masked image's own name as .png (image_XXX.png for the lab)."""
    return os.path.splitext(os.path.basename(dataset.images[i]))[0] + ".png"


def run_inpainting(model, dataset, out_dir: str, opts: InpaintOptions, device, batch_size: int = 32,
                   gt_dir: str | None = None, progress: bool = True, write_workers: int = 2,
                   keep: dict | None = None) -> dict:
    """Inpaint every image of a :class:`utils.data.MaskedImageSet`; write the lab's files (on
    ``write_workers`` background threads; 0: in the loop). Returns once every file is written.

    ``keep``: a dict whose keys are dataset indices; each is set to that image's :class:`Decoded`
    (needs ``opts.visualize`` or ``opts.gif``), so :func:`schedule_report` can draw it without decoding it again."""
    keep = {} if keep is None else keep
    if keep and not (opts.visualize or opts.gif):
        raise ValueError("run_inpainting: keep needs the step images (opts.visualize or opts.gif)")
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
    with ImageWriter(write_workers) as writer:  # PNG encoding overlaps the next batch; all written on exit
        for x, pm, idx in tqdm(loader, desc=f"inpainting ({opts.mask_func}, T={opts.total_iter})",
                               disable=not progress):
            x, pm = x.to(device), pm.to(device)
            out, result, token_mask, step_imgs = inpaint_batch(model, x, pm, idx.tolist(), opts, device,
                                                               with_steps=opts.visualize or opts.gif)
            _submit_batch(writer, dirs, dataset, idx.tolist(), out, result, step_imgs,
                          denormalize(x, TEST_MEAN, TEST_STD), opts, res)
            for b, i in enumerate(idx.tolist()):
                if i in keep:
                    keep[i] = Decoded.of(opts, out, result, step_imgs, b)
            if gt_dir:
                rows += _metrics_rows(out, pm, idx.tolist(), dataset, gt_dir, token_mask)
            n_done += len(idx)
    summary = {"images": n_done, "out_dir": out_dir}
    if gt_dir:
        summary.update(write_metrics(rows, os.path.join(out_dir, "metrics.csv")))
    return summary


def _submit_batch(writer: ImageWriter, dirs: dict, dataset, indices: list, out, result, step_imgs, masked_in,
                  opts: InpaintOptions, res: int) -> None:
    """Queue one batch's files; the tensors come to the CPU once per batch, not once per image."""
    out = out.cpu()  # (B, 3, H, W)
    if opts.visualize or opts.gif:
        frames = torch.cat([masked_in[:, None], step_imgs], 1).cpu()  # (B, S+1, 3, H, W)
    if opts.visualize:
        masks = torch.stack(result.mask_per_step, 1).cpu()  # (B, S, N) True = masked
    for b, i in enumerate(indices):
        writer.submit(os.path.join(dirs["test_results"], output_name(dataset, i)), save_png, out[b])
        if opts.visualize:
            writer.submit(os.path.join(dirs["mask_scheduling"], f"test_{i}.png"), save_image,
                          latent_mask_images(masks[b], res), nrow=10)
            writer.submit(os.path.join(dirs["imga"], f"test_{i}.png"), save_image, frames[b], nrow=frames.shape[1])
        if opts.gif:
            writer.submit(os.path.join(dirs["gifs"], f"test_{i}.gif"), save_gif, frames[b])


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


@dataclass
class Decoded:
    """One image's decoding, as :func:`run_inpainting` keeps it: the options it ran with, the decoded
    image after every step (S, 3, H, W) in [0, 1], the token mask after every step (S, N) True = masked,
    and the final image (3, H, W). All on the CPU."""
    opts: InpaintOptions
    steps: torch.Tensor
    masks: torch.Tensor
    out: torch.Tensor

    @classmethod
    def of(cls, opts: InpaintOptions, out, result, step_imgs, b: int) -> "Decoded":
        """Image ``b`` of a batch that :func:`utils.inpaint.inpaint_batch` decoded ``with_steps``."""
        return cls(opts, step_imgs[b].cpu(), torch.stack([m[b] for m in result.mask_per_step]).cpu(), out[b].cpu())

    def drawn_as(self, opts: InpaintOptions) -> bool:
        """Whether decoding with ``opts`` gives these images (the options differ at most in what is written)."""
        return replace(self.opts, visualize=opts.visualize, gif=opts.gif) == opts


@torch.no_grad()
def schedule_report(model, dataset, ids: list, schedules: list, opts: InpaintOptions, device, path: str,
                    done: dict | None = None) -> None:
    """One PNG comparing schedules side by side: per image id, one row per schedule showing the
    masked input, the decoded image after every step, and the final result.

    ``done``: ``{schedule: {id: Decoded}}`` from :func:`run_inpainting`'s ``keep``; an entry decoded with
    these options (the schedule's, no paste) is drawn as it is, the others are decoded here."""
    rows = []
    for i in ids:
        x, pm, _ = dataset[i]
        x, pm = x[None].to(device), pm[None].to(device)
        for s in schedules:
            o = InpaintOptions(**{**opts.__dict__, "mask_func": s, "paste_known": False})
            d = (done or {}).get(s, {}).get(i)
            if d is None or not d.drawn_as(o):
                out, result, _, steps = inpaint_batch(model, x, pm, [i], o, device, with_steps=True)
                d = Decoded.of(o, out, result, steps, 0)
            masks = latent_mask_images(d.masks, model.vqgan.cfg.latent_resolution)
            masks = torch.nn.functional.interpolate(masks, size=x.shape[-2:], mode="nearest")
            rows.append(torch.cat([denormalize(x, TEST_MEAN, TEST_STD).cpu(), d.steps, d.out[None]]))
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
