"""Shared helpers of the benchmark scripts: timing with device sync, table printing, CSV."""
from __future__ import annotations

import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils.config import REPO_ROOT  # noqa: E402
from utils.runtime import keep_freed_memory  # noqa: E402

# the benchmarks measure the CPU as every command runs it: freed tensor memory kept for reuse (README › Speed ›
# CPU memory reuse; MALLOC_TRIM_THRESHOLD_=131072 in the environment measures glibc's defaults instead)
keep_freed_memory()

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the lab data beside the repository, read in place


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Seconds per call of fn() (after the caller's warm-up), device-synchronised."""
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


def device_name(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def columns(rows: list[dict]) -> list[str]:
    """Every key of every row, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def print_table(rows: list[dict], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    if not rows:
        return
    keys = columns(rows)
    fmt = [max(len(k), *(len(_s(r.get(k))) for r in rows)) for k in keys]
    print("| " + " | ".join(k.ljust(w) for k, w in zip(keys, fmt)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in fmt) + "|")
    for r in rows:
        print("| " + " | ".join(_s(r.get(k)).ljust(w) for k, w in zip(keys, fmt)) + " |")


def _s(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
