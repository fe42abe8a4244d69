"""Does torch.compile turn our hand-written attention into one fused (flash-style) kernel here?

    python bench/attn_fusion.py --device cuda            # on the GPU (the question of issue #14)
    python bench/attn_fusion.py --device cpu --layers 1 --batch 2 --tokens 16 --dim 64 --heads 4   # a check of the script

Inductor's attention fusion rewrites ``softmax((q @ k^T) * scale)`` [-> dropout] ``@ v`` into
``scaled_dot_product_attention`` when the traced graph matches one of its patterns; whether it does
depends on the torch version, the device and the precision setup, so this asks the compiler, it does
not assume. For each way of writing the attention weights (``--forms``) and each precision setup
(``--modes``: the trainer's bf16 autocast over fp32 weights, bf16 weights without autocast, fp32 with
TF32), it compiles a stack of ``--layers`` blocks of the lab's width in training mode (dropout on),
runs one forward + backward and reports inductor's ``fuse_attention`` count and the step's peak
memory (CUDA). A count of 0 means the attention maps are still formed and kept for the backward.

Then ``--full``: the lab-size model's training step (bench/train_throughput.py's, compiled) at each
``--full-batches`` with the first form that fused under autocast (the trainer's setup), patched in
for this process only; its images/s, peak memory and fusion count.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from common import device_name, print_table, sync, write_csv
from models.Transformer.modules.layers import Encoder, MultiHeadAttention


def w_dtype(self, q, k):  # the code's form (models/Transformer/modules/layers.py)
    scores = (q @ k.transpose(-2, -1)) * self.scale
    return scores.softmax(dim=-1, dtype=scores.dtype)


def w_plain(self, q, k):  # as inductor's pattern is written: no dtype (autocast runs it in fp32)
    return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


def w_matmul(self, q, k):  # torch.matmul(...).mul(scale).softmax(-1) with the dtype kept
    s = torch.matmul(q, k.transpose(-2, -1)).mul(self.scale)
    return s.softmax(dim=-1, dtype=s.dtype)


FORMS = {"dtype": w_dtype, "plain": w_plain, "matmul": w_matmul}
MODES = ("autocast", "bf16", "tf32")


def stack_step(args, device, form: str, mode: str) -> dict:
    """One compiled forward + backward of --layers blocks: fusion count, peak memory, seconds."""
    MultiHeadAttention.attention_weights = FORMS[form]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = nn.Sequential(*[Encoder(args.dim, 2 * args.dim, args.heads) for _ in range(args.layers)]).to(device).train()
    dtype = torch.float32
    if mode == "bf16":
        net = net.to(torch.bfloat16)
        dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    x = torch.randn(args.batch, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    f = torch.compile(net)
    t = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
        y = f(x)
    y.float().square().mean().backward()
    sync(device)
    row = {"form": form, "mode": mode, "fuse_attention": counters["inductor"]["fuse_attention"],
           "layers": args.layers, "compile_and_step_s": round(time.perf_counter() - t, 1)}
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def full_rows(args, device, form: str) -> list:
    from train_throughput import measure, trainer_step
    from utils.build import build_maskgit
    from utils.config import load_maskgit_config
    from utils.runtime import resolve_precision

    MultiHeadAttention.attention_weights = FORMS[form]
    torch.backends.cuda.matmul.allow_tf32 = False
    prec = resolve_precision("auto", device)
    rows = []
    for batch in args.full_batches:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = build_maskgit(load_maskgit_config(args.config), load_vqgan=False).to(device).train()
        try:
            r = measure(trainer_step(model, device, prec, batch, True, 0.0), device, batch, model.num_image_tokens,
                        args.steps, 5)
        except torch.OutOfMemoryError as e:
            r = {"error": f"out of memory: {str(e).splitlines()[0][:80]}"}
        rows.append({"form": form, "batch": batch, "fuse_attention": counters["inductor"]["fuse_attention"], **r})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--forms", default="dtype,plain,matmul", help=f"comma-separated, of {', '.join(FORMS)}")
    p.add_argument("--modes", default="autocast,bf16", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--full", action="store_true", help="then the lab-size training step with the first fusing form")
    p.add_argument("--config", default="config/MaskGit.yml")
    p.add_argument("--full-batches", type=lambda s: [int(b) for b in s.split(",")], default=[256, 512])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--csv", default="bench/results/attn_fusion.csv")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # a graph loaded from inductor's caches skips the pattern passes and so counts no fusion: compile afresh
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False
    print(f"torch {torch.__version__}, {device_name(device)}", flush=True)
    rows = []
    for form in args.forms.split(","):
        for mode in args.modes.split(","):
            rows.append(stack_step(args, device, form, mode))
            print(rows[-1], flush=True)
    print_table(rows, f"inductor attention fusion, {args.layers} blocks of width {args.dim}, training mode")
    write_csv(rows, args.csv)
    if args.full:
        fusing = [r["form"] for r in rows if r["mode"] == "autocast" and r["fuse_attention"] > 0]
        form = fusing[0] if fusing else "dtype"
        full = full_rows(args, device, form)
        for r in full:
            r["device"] = device_name(device)
        print_table(full, f"lab-size training step, torch.compile, attention form '{form}'"
                          + ("" if fusing else " (no form fused under autocast)"))
        write_csv(full, args.csv.replace(".csv", "_full.csv"))
    return rows


if __name__ == "__main__":
    main()
