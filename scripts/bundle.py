"""Make a tokenizer + transformer pair the bundled small models, after checking that it can be.

    python scripts/bundle.py --vqgan FILES/vqgan.pt --transformer FILES/transformer_fp16.pth --dry-run
    python scripts/bundle.py --vqgan FILES/vqgan.pt --transformer FILES/transformer_fp16.pth

(FILES: e.g. what `bash bench/gpu_session.sh pipe` sent back.) Checked before anything is written:
both files load strictly into the bundled config (config/MaskGit_small.yml and the tokenizer YAML it
names), the models `demo.py`, `app.py` and `inpainting.py --bundled` build; the files are stored as
fp16 CPU tensors with their configs kept (the transformer's config then names the bundled tokenizer
file as its VQ_CKPT_path, so a loader given only the transformer file finds its partner instead of
the path it was trained with, and the config that tokenizer file stores as its tokenizer config; and
the bundled config's decoding defaults, so the file passed by path decodes as ``--bundled`` does); no
file over 24 MiB and both together at most 40 MB. Then
``checkpoints/vqgan_small_fp16.pt`` and ``checkpoints/transformer_small_fp16.pth`` are replaced
(atomically; ``--out-dir`` writes elsewhere). Deciding *whether* to bundle is the scores' job
(bench/run.py --transformer-ckpt on the val images); this only makes it safe to.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils.build import (BUNDLED_CONFIG, build_maskgit, load_transformer_checkpoint, load_vqgan_weights,  # noqa: E402
                         vqgan_file_config)
from models.convert import CheckpointLayoutError  # noqa: E402
from utils.checkpoint import CheckpointError, atomic_write, half_state_dict, load_checkpoint, stored_config  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.config import REPO_ROOT, load_maskgit_config  # noqa: E402

NAMES = {"vqgan": "vqgan_small_fp16.pt", "transformer": "transformer_small_fp16.pth"}
MAX_FILE_MIB, MAX_TOTAL_MB = 24, 40
DEFAULT_OUT = REPO_ROOT / "checkpoints"


def half_file(src: str, what: str) -> dict:
    """The file's content with every floating tensor in fp16 on the CPU (the stored config kept)."""
    obj = load_checkpoint(src, what)
    if not isinstance(obj, dict):
        raise UserError(f"{src}: not a state_dict ({type(obj).__name__})")
    return half_state_dict(obj)


def point_at_tokenizer(sd: dict, vqgan_path: str, vqgan_cfg: dict | None = None) -> None:
    """Make the config ``sd`` stores (if any) name ``vqgan_path`` as its tokenizer file
    (``model_param.VQ_Configs.VQ_CKPT_path``): a pipeline run's transformer names the vqgan.pt of
    its run folder, which is not where the bundled pair lives; and ``vqgan_cfg`` (the config the
    tokenizer file stores, if any) as its tokenizer config: a tokenizer with a new decoder
    (train_vqgan.py --new-decoder) has the tokens the transformer was trained on but another decoder."""
    cfg = stored_config(sd)  # the dict inside sd, changed in place
    if cfg is not None and isinstance(cfg.get("model_param"), dict):
        cfg["model_param"]["VQ_Configs"] = {**(cfg["model_param"].get("VQ_Configs") or {}), "VQ_CKPT_path": vqgan_path}
        if vqgan_cfg is not None:
            cfg["vqgan"] = dict(vqgan_cfg)


DECODING_KEYS = ("token_choice", "sample_temperature", "choice_temperature")


def adopt_decoding(sd: dict, model_param: dict) -> None:
    """Give the config ``sd`` stores (if any) the decoding defaults the bundled config names (token choice,
    sample and choice temperatures), so that the bundled file passed by path (``inpainting.py
    --load-transformer-ckpt-path``, ``app.py --transformer``) decodes as ``--bundled`` does."""
    cfg = stored_config(sd)  # the dict inside sd, changed in place
    if cfg is not None and isinstance(cfg.get("model_param"), dict):
        cfg["model_param"].update({k: model_param[k] for k in DECODING_KEYS if k in model_param})


def check_sizes(sizes: dict, max_file_mib: float = MAX_FILE_MIB, max_total_mb: float = MAX_TOTAL_MB) -> None:
    """``sizes``: file name -> bytes; refuses a file over ``max_file_mib`` MiB or a sum over ``max_total_mb`` MB."""
    for name, n in sizes.items():
        if n > max_file_mib * 2**20:
            raise UserError(f"{name} would be {n / 2**20:.1f} MiB, over the {max_file_mib} MiB a bundled file may have")
    total = sum(sizes.values())
    if total > max_total_mb * 1e6:
        raise UserError(f"the bundled files would be {total / 1e6:.1f} MB together, over {max_total_mb} MB")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", required=True, help="tokenizer weights (train_vqgan.py's vqgan.pt, fp32 or fp16)")
    p.add_argument("--transformer", required=True, help="transformer weights (a .pth of training_transformer.py)")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT),
                   help="where the two files are written (default: the repository's checkpoints/)")
    p.add_argument("--dry-run", action="store_true", help="check only, write nothing")
    args = p.parse_args(argv)
    halves = {"vqgan": half_file(args.vqgan, "VQGAN checkpoint"),
              "transformer": half_file(args.transformer, "transformer checkpoint")}
    out_dir = os.path.abspath(args.out_dir)
    vq_dst = os.path.join(out_dir, NAMES["vqgan"])
    # the repository's own checkpoints/ as a relative path (resolved against the repository from any directory)
    point_at_tokenizer(halves["transformer"], os.path.join("checkpoints", NAMES["vqgan"])
                       if out_dir == os.path.abspath(DEFAULT_OUT) else vq_dst, vqgan_file_config(halves["vqgan"]))
    cfg = load_maskgit_config(str(REPO_ROOT / BUNDLED_CONFIG))
    adopt_decoding(halves["transformer"], cfg["model_param"])
    with tempfile.TemporaryDirectory() as tmp:  # check the very bytes that would be bundled
        paths = {k: os.path.join(tmp, NAMES[k]) for k in halves}
        for k, obj in halves.items():
            torch.save(obj, paths[k])
        model = build_maskgit(cfg, load_vqgan=False)
        try:
            load_vqgan_weights(model.vqgan, paths["vqgan"])
            load_transformer_checkpoint(model, paths["transformer"])
        except (CheckpointLayoutError, CheckpointError) as e:  # the loaders name the problem; say which input
            vq_yaml = cfg["model_param"]["VQ_Configs"]["VQ_config_path"]
            detail = str(e).replace(paths["vqgan"], args.vqgan).replace(paths["transformer"], args.transformer)
            raise UserError(f"{args.vqgan} + {args.transformer} do not fit the bundled config {BUNDLED_CONFIG} "
                            f"(--vqgan must be a tokenizer of {vq_yaml}, --transformer a transformer of "
                            f"{BUNDLED_CONFIG}; check that the two are not swapped): {detail}") from e
        sizes = {NAMES[k]: os.path.getsize(paths[k]) for k in halves}
        check_sizes(sizes)
        summary = {"sizes_mib": {n: round(b / 2**20, 2) for n, b in sizes.items()},
                   "transformer_params": sum(q.numel() for q in model.transformer.parameters()),
                   "vqgan_params": sum(q.numel() for q in model.vqgan.parameters()), "written": []}
        if not args.dry_run:
            for k in halves:
                dst = os.path.join(out_dir, NAMES[k])
                atomic_write(dst, lambda t, src=paths[k]: shutil.copyfile(src, t))
                summary["written"].append(dst)
    print(f"fits {BUNDLED_CONFIG}: tokenizer {summary['vqgan_params'] / 1e6:.2f} M, transformer "
          f"{summary['transformer_params'] / 1e6:.2f} M parameters; sizes {summary['sizes_mib']} MiB; "
          + (f"written: {', '.join(summary['written'])}" if summary["written"] else "dry run: nothing written"))
    if summary["written"]:
        print("now re-measure what the README states of the bundled models: python demo.py; python bench/run.py "
              "--combos cosine:10 --skip-speed --only-ours (model table, quality tables)")
    return summary


if __name__ == "__main__":
    run_cli(main)
