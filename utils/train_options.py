"""The command line of ``training_transformer.py``: every option declared once, as a field of the
frozen :class:`RunConfig` with its flag and help text; read once by :func:`parse_options`, never
changed afterwards (what changes while training lives in ``utils.train_engine.LoopState``)."""
from __future__ import annotations

from dataclasses import dataclass

from .cli import ArgumentParser
from .train_utils import add_options, config_from_args, option


@dataclass(frozen=True)
class RunConfig:
    """Every option, read once (``parse_options``), never changed. The lab's flags keep their spellings."""
    train_d_path: str = option(None, "--train_d_path", help="training images (default: train/ of the first lab "
                               "dataset found: ./lab3_dataset, ./lab5_dataset, ../shared/data/lab3_dataset)")
    val_d_path: str = option(None, "--val_d_path", help="validation images (default: val/ beside train)")
    out_d_path: str = option("./checkpoints/transformer", "--out_d_path", help="output folder")
    device: str = option("auto", help="cuda | cpu | auto (a GPU when present)")
    num_workers: int = option(0, "--num_workers", help="accepted for the lab's command; unused (cached tokens)")
    batch_size: int = option(64, help="sequences per step over all processes (per micro-batch)")
    partial: float = option(1.0, help="fraction of the training images to use (only those are encoded)")
    accum_grad: int = option(1, help="gradient accumulation steps (the gradient of a batch that much larger)")
    epochs: int = option(50, help="epochs to train")
    ckpt_interval: int = option(0, "--save-per-epoch", "--ckpt-interval", help="also write epoch_N.pth every N epochs")
    start_from_epoch: int = option(0, help="accepted for the lab's command; ignored (--resume knows the epoch)")
    learning_rate: float = option(3e-4, help="peak learning rate of AdamW")
    MaskGitConfig: str = option("config/MaskGit.yml", "--MaskGitConfig", help="the MaskGit YAML (the lab's layout)")
    set: tuple = option((), metavar="KEY=VALUE", help="override config keys, e.g. "
                        "model_param.Transformer_param.dim=256")
    vqgan_ckpt: str = option(None, help="tokenizer weights (default: VQ_CKPT_path of the config)")
    resume: bool = option(False, help="continue exactly from <out_d_path>/last.pt")
    warmup_steps: int = option(500, help="linear LR warmup steps (then cosine decay to 5%%)")
    weight_decay: float = option(0.05, help="AdamW weight decay (not on biases, norms, embeddings)")
    clip_grad: float = option(1.0, help="clip the gradient norm to this")
    label_smoothing: float = option(0.1, help="label smoothing of the masked-token cross-entropy")
    ema: float = option(0.0, help="EMA decay of the weights (0: off), e.g. 0.999; exports hold the EMA weights")
    hflip: bool = option(False, help="also train on mirrored images (encoded once)")
    hole_frac: float = option(0.0, help="fraction of each batch masked only inside a generated inpainting hole "
                              "(lab-like random walks and blobs); 0 = the lab's MVTM")
    compile: bool = option(False, help="torch.compile the transformer")
    precision: str = option("auto", help="fp32 | bf16 | fp16 | auto (bf16 on CUDA, fp32 on CPU)")
    seed: int = option(0, help="seed of the data order, the MVTM masks and dropout")
    cache_dir: str = option("cache", help="token cache folder")
    skip_bad_images: bool = option(False, help="leave out unusable images (logged) instead of stopping with their list")
    resize: bool = option(False, help="resize images of another size to the tokenizer's resolution")
    stop_after_steps: int = option(0, help="save last.pt and stop after this global step (0: off)")
    val_batches: int = option(0, help="validate on at most this many batches of 256 (0: all)")
    time_budget_min: float = option(0.0, help="fit the run into this many minutes (epochs set from the first steps "
                                    "and kept on --resume)")
    log_every: int = option(10, help="read and log the training loss every N steps (the only per-step host syncs)")
    no_progress: bool = option(False, help="no progress bars")


def parse_options(argv=None) -> RunConfig:
    p = ArgumentParser(description="MaskGIT stage 2: train the transformer (MVTM)")
    add_options(p, RunConfig)
    opts = config_from_args(RunConfig, p.parse_args(argv))
    if not 0.0 <= opts.hole_frac <= 1.0 or not 0.0 < opts.partial <= 1.0:
        p.error("--hole-frac must lie in [0, 1] and --partial in (0, 1]")
    if min(opts.batch_size, opts.accum_grad, opts.epochs, opts.log_every) < 1:
        p.error("--batch-size, --accum-grad, --epochs and --log-every must be positive")
    return opts
