"""Plumbing shared by the two trainers: LR schedule, EMA, logging sinks, signals, NaN guard,
options declared once as fields of a frozen run config, raw state_dicts that carry their config."""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import math
import os
import signal

import torch
from PIL import Image, ImageDraw


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.05) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of a model's parameters, e_t = d_t e_(t-1) + (1 - d_t) p_t, in one
    fused ``_foreach_lerp_`` (no Python loop over tensors); buffers are copied.

    With the optimizer step ``step`` (0-based) given, d_t = min(decay, (1 + step) / (10 + step)):
    the average forgets the random initial weights within the first steps instead of carrying
    decay^t of them (at decay 0.999, 82% after 200 steps), the warmup of diffusers' EMAModel and
    TensorFlow's ExponentialMovingAverage(num_updates). Without ``step``, d_t = decay."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._params, self._buffers = list(self.model.parameters()), list(self.model.buffers())

    def decay_at(self, step: int | None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        torch._foreach_lerp_(self._params, [p.detach() for p in model.parameters()], 1 - self.decay_at(step))
        if self._buffers:
            torch._foreach_copy_(self._buffers, list(model.buffers()))


class NonFiniteLoss(RuntimeError):
    pass


def option(default, *flags: str, help: str, **argparse_kw):
    """A field of a frozen run-config dataclass that is also a command-line option: its flags
    (default ``--field-name``), help text and other ``add_argument`` keywords. A bool is a switch."""
    return dataclasses.field(default=default, metadata={"flags": flags, "help": help, **argparse_kw})


def add_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """Add every :func:`option` field of ``config_cls`` to ``parser`` (dest = the field name)."""
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        flags = meta.pop("flags") or (f"--{f.name.replace('_', '-')}",)
        if isinstance(f.default, bool):
            meta["action"] = "store_true"
        elif isinstance(f.default, tuple):
            meta.setdefault("nargs", "*")
        elif f.default is not None and "type" not in meta:
            meta["type"] = type(f.default)
        parser.add_argument(*flags, dest=f.name, default=f.default, **meta)


def config_from_args(config_cls, args: argparse.Namespace):
    """The frozen run config of parsed arguments (lists become tuples; extra arguments such as
    ``--debug`` are left out)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names})


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f"loss became {loss.item()} at step {step}: stopping; the last good checkpoint is "
                            "untouched (try a lower --learning-rate, or fp32)")


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.stop = False
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        self.stop, self.signal = True, signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class MetricLog:
    """Scalars to TensorBoard (when installed) and to a CSV; a PNG of the curves at the end."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.out_dir, self.enabled, self.rows = out_dir, enabled, []
        self.writer = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:
                self.writer = None
            path = os.path.join(out_dir, "metrics.csv")
            if os.path.exists(path):  # resumed run: keep history
                with open(path) as f:
                    self.rows = [{k: int(float(v)) if k == "step" else float(v) for k, v in r.items() if v != ""}
                                 for r in csv.DictReader(f)]  # steps stay ints on a resumed run

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.rows.append(row)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)

    def flush(self) -> None:
        if not self.enabled:
            return
        keys = sorted({k for r in self.rows for k in r} - {"step"})
        with open(os.path.join(self.out_dir, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step"] + keys)
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        if self.writer is not None:
            self.writer.flush()

    def plot(self, keys: list[str], path: str, title: str = "") -> None:
        if self.enabled:
            series = {k: [(r["step"], r[k]) for r in self.rows if k in r] for k in keys}
            plot_curves(series, path, title)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_curves(series: dict, path: str, title: str = "", size=(720, 420)) -> None:
    """Line chart of {name: [(x, y), ...]} written as a PNG (PIL only, no plotting library)."""
    W, H = size
    L, R, T, B = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        img.save(path)
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(x, y):
        return L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline=(0, 0, 0))
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        d.text((4, xy(x0, y)[1] - 6), f"{y:.3g}", fill=(0, 0, 0))
        d.line([L, xy(x0, y)[1], W - R, xy(x0, y)[1]], fill=(225, 225, 225))
        x = x0 + (x1 - x0) * i / 4
        d.text((xy(x, y0)[0] - 10, H - B + 6), f"{x:.0f}", fill=(0, 0, 0))
    d.text((L, 8), title, fill=(0, 0, 0))
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        s = [p for p in s if math.isfinite(p[1])]
        if len(s) > 1:
            d.line([xy(*p) for p in s], fill=c, width=2)
        elif s:
            x, y = xy(*s[0])
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((W - R - 150, T + 6 + 14 * i), name, fill=c)
    img.save(path)
