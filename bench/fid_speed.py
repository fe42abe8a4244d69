"""FID time, 747 vs 747 images: the first run embeds the ground truth and caches its statistics,
the second (what a user repeats after every inpainting run) only embeds the predictions.

    python bench/fid_speed.py --device cpu

Predictions: the lab's 747 masked test images; ground truth: the first 747 val images (any two
747-image sets do; the timing does not depend on the pictures).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from common import SHARED_DATA, device_name, print_table, write_csv
from utils.data import list_images
from utils.fid import compute_fid, get_model

DATA = SHARED_DATA / "lab3_dataset"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", default=str(DATA / "masked_image"))
    p.add_argument("--gt-source", default=str(DATA / "val"))
    p.add_argument("--n", type=int, default=747)
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", default="bench/results/fid_speed.csv")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        gt = os.path.join(tmp, "gt")
        os.makedirs(gt)
        for f in list_images(args.gt_source)[: args.n]:
            shutil.copy(f, gt)
        t = time.time()
        get_model(2048)
        t_load = time.time() - t
        t = time.time()
        fid1 = compute_fid(args.pred, gt, device=args.device)
        t_first = time.time() - t
        t = time.time()
        fid2 = compute_fid(args.pred, gt, device=args.device)
        t_cached = time.time() - t
    rows = [{"run": "model load (weights from cache)", "seconds": t_load},
            {"run": f"first: embed {args.n} GT + {args.n} predictions", "seconds": t_first, "FID": fid1},
            {"run": f"repeat: GT statistics cached, {args.n} predictions", "seconds": t_cached, "FID": fid2}]
    for r in rows:
        r["device"] = device_name(args.device)
    print_table(rows, f"FID time, {args.n} vs {args.n} images")
    write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
