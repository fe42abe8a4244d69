"""A picture of ``inpainting.py --refine``: unseen val images inpainted once, their final tokens decoded plainly and
from latents fitted to the known pixels, each raw (as the lab scores it) and composited (``--paste-known``).

    python bench/refine_figure.py --ids 0,1,2,3,4,5 --steps 10 --figure docs/refine_compare.png

Rows: the first unseen val images of ``bench/run.py``'s val-unseen set (the same images and lab masks); the bundled
pair, its default decoding (cosine, T=10, seed 0). The figures for the full set come from ``bench/run.py --combos
cosine:10:refine=10`` (README › Inpainting › Refining the final decode).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from PIL import Image

from blend_study import figure  # importing bench/common.py (via blend_study) puts the repository on sys.path
from common import SHARED_DATA
from run import _load01, build_sets, load_model
from utils.data import TEST_MEAN, TEST_STD, list_images, load_mask, normalize, to_uint8
from utils.inpaint import InpaintOptions, inpaint_batch, token_choice_options


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", default="0,1,2,3,4,5", help="comma-separated row indices into the unseen val set")
    p.add_argument("--steps", type=int, default=10, help="refine steps (inpainting.py --refine)")
    p.add_argument("--data", default=str(SHARED_DATA / "lab3_dataset"))
    p.add_argument("--figure", default="docs/refine_compare.png")
    args = p.parse_args(argv)
    ids = [int(i) for i in args.ids.split(",")]
    model = load_model(argparse.Namespace(transformer_ckpt=None, vqgan_ckpt=None, config=None))
    with tempfile.TemporaryDirectory() as work:
        root = build_sets(work, max(ids) + 1, args.data, "", ("val-unseen",))["val-unseen"]
        paths = list_images(os.path.join(root, "masked_image"))
        names = [os.path.basename(q) for q in paths]
        x01 = torch.stack([_load01(q) for q in paths])
        known = torch.stack([load_mask(q) for q in list_images(os.path.join(root, "mask64"))])
        orig = torch.stack([_load01(os.path.join(root, "originals", n)) for n in names])
        x = normalize(x01, TEST_MEAN, TEST_STD)
        cols = []
        for steps in (0, args.steps):
            for paste in (False, True):
                col = ("composite" if paste else "decode") + (f", refine {steps}" if steps else "")
                opts = InpaintOptions(refine=steps, paste_known=paste, visualize=False,
                                      **token_choice_options(model.decoding))
                out = inpaint_batch(model, x, known, range(len(names)), opts, "cpu")[0]
                os.makedirs(os.path.join(work, col))
                for name, img in zip(names, out):
                    Image.fromarray(to_uint8(img)).save(os.path.join(work, col, name))
                cols.append(col)
        figure(argparse.Namespace(figure_ids=args.ids, out=work, figure=args.figure), cols, x01, orig, names)


if __name__ == "__main__":
    main()
