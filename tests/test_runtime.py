"""utils.runtime.keep_freed_memory: freed tensor memory is reused without fresh page faults, the
user's own allocator settings win, and every command and benchmark applies it."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from utils import cli, runtime

# the minor page faults of six calls of the bundled transformer's attention at the demo's batch (after three
# warm-up calls): with glibc's defaults each call maps its 32 MiB score and weight maps afresh (about four
# maps' pages a call); kept, the heap still grows now and then by a map as small blocks settle between them
FAULTS = """
import resource, torch
from utils.runtime import keep_freed_memory
print(keep_freed_memory())
from models.Transformer.modules.layers import MultiHeadAttention
attn = MultiHeadAttention(256, 8, 0.0).eval()
x = torch.randn(16, 256, 256)  # (B, N, C)
with torch.no_grad():
    for _ in range(3):
        attn(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        attn(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
MAP_PAGES = (16 * 8 * 256 * 256 * 4) // os.sysconf("SC_PAGE_SIZE")  # one (B, H, N, N) fp32 map
ALLOCATOR_ENV = runtime.MALLOC_ENV + ("GLIBC_TUNABLES", "LD_PRELOAD")  # every setting that makes it stand aside


def attention_faults(extra_env: dict) -> tuple:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, env={**env, **extra_env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_attention_reuses_freed_maps_without_page_faults():
    applied, control = attention_faults({"MALLOC_TRIM_THRESHOLD_": "131072"})  # glibc's default: stands aside
    assert not applied
    if control < 6 * MAP_PAGES:
        pytest.skip(f"six attention calls took only {control} page faults here (huge pages?): nothing to save")
    applied, kept = attention_faults({})
    assert applied
    assert kept < control / 4, (kept, control)  # measured: 0-12,000 kept against ~200,000


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                         ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_the_users_allocator_settings_win(monkeypatch, name, value):
    for k in ALLOCATOR_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(name, value)
    assert runtime.keep_freed_memory() is False


def test_every_command_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    cli.run_cli(lambda argv: None, [])
    assert calls == [1]


def test_every_benchmark_keeps_freed_memory(monkeypatch):
    """bench/common.py, which every benchmark imports, applies it too: their CPU figures are the commands'."""
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1))
    path = os.path.join(ROOT, "bench", "common.py")
    spec = importlib.util.spec_from_file_location("bench_common_under_test", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert calls == [1]
