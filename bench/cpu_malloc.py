"""CPU speed with and without ``keep_freed_memory`` (utils/runtime.py): the same command run
alternately in fresh processes, once with glibc's malloc defaults (``MALLOC_TRIM_THRESHOLD_=131072``,
glibc's own default, which makes ``keep_freed_memory`` stand aside) and once as every command runs it
(freed tensor memory kept for reuse), ``--repeat`` times each; prints wall seconds, minor page
faults and peak RSS of each run, and the ratio of the best times (> 1: keeping is faster).

    python bench/cpu_malloc.py                       # python demo.py (the README's first command)
    python bench/cpu_malloc.py --workload attention  # the hand-written attention of the bundled size
    python bench/cpu_malloc.py -- python inpainting.py --bundled --limit 16 --no-vis

For the demo it also checks that both settings wrote the same images (byte for byte).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import print_table
from utils.runtime import MALLOC_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_DEFAULT = {"MALLOC_TRIM_THRESHOLD_": "131072"}  # glibc's default trim threshold: keep_freed_memory stands aside

# the bundled transformer's attention (dim 256, 8 heads, 256 tokens) at the demo's batch of 16, hand-written path
ATTENTION = """
import time, torch
from utils.runtime import keep_freed_memory
from models.Transformer.modules.layers import MultiHeadAttention
keep_freed_memory()
torch.manual_seed(0)
attn = MultiHeadAttention(256, 8, 0.0).eval()
x = torch.randn(16, 256, 256)  # (B, N, C)
with torch.no_grad():
    for _ in range(3):
        attn(x)
    t = time.perf_counter()
    for _ in range(40):
        attn(x)
print(f"{(time.perf_counter() - t) / 40 * 1000:.1f} ms per call")
"""


def run_once(cmd: list, env_extra: dict, cwd: str) -> dict:
    """Run ``cmd`` in a fresh process; its wall seconds, minor page faults, peak RSS (MiB) and last line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env_extra}, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(f"cpu_malloc.py: error: {' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-2000:]}")
        lines = out.read().strip().splitlines()
    return {"seconds": wall, "minor_faults": usage.ru_minflt, "max_rss_mib": usage.ru_maxrss / 1024,
            "last_line": lines[-1] if lines else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("demo", "attention"), default="demo")
    p.add_argument("--repeat", type=int, default=2, help="runs of each setting, alternating")
    p.add_argument("command", nargs="*", help="after --: any command to time instead of --workload")
    args = p.parse_args()
    if any(k in os.environ for k in MALLOC_ENV):
        sys.exit("cpu_malloc.py: error: unset the MALLOC_*_ variables first (they are this benchmark's switch)")
    tmp = tempfile.mkdtemp(prefix="cpu_malloc_")
    outs = {}

    def command(setting: str, i: int) -> list:
        if args.command:
            return args.command
        if args.workload == "attention":
            return [sys.executable, "-c", ATTENTION]
        outs[setting] = os.path.join(tmp, f"{setting}_{i}")
        return [sys.executable, "demo.py", "--no-progress", "--out-dir", outs[setting]]

    rows = []
    for i in range(args.repeat):
        for setting, env in (("glibc defaults", GLIBC_DEFAULT), ("freed memory kept", {})):
            r = run_once(command(setting, i), env, REPO)
            rows.append({"setting": setting, "run": i, "seconds": round(r["seconds"], 1),
                         "minor_faults": r["minor_faults"], "max_rss_mib": round(r["max_rss_mib"]),
                         "output": r["last_line"].split(" Open ")[0][:60]})  # the demo's: not its temporary folder
            print(rows[-1], flush=True)
    print_table(rows)
    best = {s: min(r["seconds"] for r in rows if r["setting"] == s) for s in ("glibc defaults", "freed memory kept")}
    print(f"best wall seconds: glibc defaults {best['glibc defaults']:.1f}, freed memory kept "
          f"{best['freed memory kept']:.1f}; ratio {best['glibc defaults'] / best['freed memory kept']:.2f}x")
    if outs:  # the demo: the same images either way
        a, b = (os.path.join(outs[s], "inpaint_cosine", "test_results") for s in ("glibc defaults", "freed memory kept"))
        names = sorted(os.listdir(a))
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        print(f"demo images identical: {len(match)} of {len(names)}" + (f" (differ: {mismatch + errors})"
                                                                        if mismatch or errors else ""))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
