"""FID of inpainted images against the lab's ground truth, like the lab's script, but offline,
with current SciPy, on CPU or GPU, with cached ground-truth statistics.

    cd faster-pytorch-fid && python fid_score_gpu.py --predicted-path ../test_results
    python faster-pytorch-fid/fid_score_gpu.py --predicted-path test_results \
        --gtcsv-path ../shared/data/lab3_test_gt --match-names --kid

Prints ``FID:  <value>``.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.fid import (FIDError, activations, frechet_distance, get_model, gt_statistics,  # noqa: E402
                       image_files, kernel_inception_distance, statistics)
from utils.cli import ArgumentParser, run_cli  # noqa: E402
from utils.data import unreadable_images  # noqa: E402
from utils.runtime import create_logger, get_device  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description="FID (pytorch-fid features) of predicted images vs ground truth")
    p.add_argument("--predicted-path", default="../test_results",
                   help="folder of predicted images to score (the lab's spelling; in inpainting.py the same flag "
                        "names the folder it writes)")
    p.add_argument("--gtcsv-path", default="./test_gt.csv",
                   help="ground truth: the lab's CSV (one row of 12,288 HWC pixels per image), a folder of "
                        "images, or an .npz with mu/sigma")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048])
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image-loading workers (default: 0 on CPU, where they would compete with the network, "
                        "else min(8, cores))")
    p.add_argument("--inception-weights", default=None, help="path to pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--save-stats", default=None, help="write the ground truth's mu/sigma to this .npz and exit")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached ground-truth statistics")
    p.add_argument("--match-names", action="store_true",
                   help="use only predicted files whose names exist in the ground-truth folder")
    p.add_argument("--kid", action="store_true", help="also print the kernel inception distance")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = create_logger()
    device = get_device(args.device)
    workers = args.num_workers if args.num_workers is not None else \
        (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    progress = not args.no_progress
    t0 = time.time()
    pred = [] if args.save_stats else image_files(args.predicted_path)  # inputs first, before any model work
    unreadable_images(pred, f"predicted images in {args.predicted_path}")
    if not (os.path.exists(args.gtcsv_path)):
        raise FIDError(f"ground truth {args.gtcsv_path} does not exist: pass --gtcsv-path (the lab's test_gt.csv, "
                       f"a folder of originals, or an .npz of mu/sigma)")
    model = get_model(args.dims, args.inception_weights)
    log.info("Inception weights: %s", model.weights_source)
    if args.save_stats:
        mu, sigma, feats = gt_statistics(args.gtcsv_path, model, args.batch_size, device, workers,
                                         cache=not args.no_cache, progress=progress, return_feats=True)
        path = args.save_stats if args.save_stats.endswith(".npz") else args.save_stats + ".npz"
        np.savez(path, mu=mu, sigma=sigma, feats=feats.astype(np.float32))
        print(f"saved statistics of {args.gtcsv_path} to {path}")
        return {"saved": path}
    names = None
    if args.match_names:
        if not os.path.isdir(args.gtcsv_path):
            raise FIDError("--match-names needs a ground-truth folder")
        names = {os.path.basename(p) for p in pred} & {os.path.basename(p) for p in image_files(args.gtcsv_path)}
        pred = [p for p in pred if os.path.basename(p) in names]
        log.info("%d predicted images have a ground-truth original", len(pred))
    gt = gt_statistics(args.gtcsv_path, model, args.batch_size, device, workers, cache=not args.no_cache,
                       progress=progress, names=names, return_feats=args.kid)
    t1 = time.time()
    feats = activations(pred, model, args.batch_size, device, workers, progress, "predictions")
    mu, sigma = statistics(feats)
    fid = frechet_distance(mu, sigma, gt[0], gt[1], device)
    out = {"fid": fid, "n_pred": len(pred), "seconds": time.time() - t0, "pred_seconds": time.time() - t1}
    print(f"FID:  {fid}")
    if args.kid:
        kid, kid_std = kernel_inception_distance(feats, np.asarray(gt[2], dtype=np.float64), args.kid_subsets,
                                                 args.kid_subset_size)
        out.update(kid=kid, kid_std=kid_std)
        print(f"KID:  {kid:.6f} +- {kid_std:.6f}")
    log.info("%d predictions in %.1f s (ground truth %s), device %s", len(pred), out["seconds"],
             "cached" if t1 - t0 < out["pred_seconds"] else "computed", device)
    return out


if __name__ == "__main__":
    run_cli(main)
