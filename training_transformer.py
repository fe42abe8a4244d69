"""Stage 2: train the bidirectional transformer with masked visual token modeling (MVTM).

    python training_transformer.py                                   # the lab's command
    torchrun --nproc_per_node 4 training_transformer.py ...          # several GPUs (DDP)

Options: ``utils.train_options``. ``main()`` builds; ``utils.train_engine`` runs (``train_one_epoch``,
``train_step``, ``evaluate``); ``save()`` / ``export()`` write ``last.pt`` (resumable), ``best.pt`` and the
raw lab-layout ``transformer_{last,best}.pth`` / ``epoch_N.pth`` (config in their ``_metadata``).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch.distributed as dist

from utils.build import adopt_tokenizer, build_maskgit
from utils.checkpoint import atomic_save, lab_state_dict, load_checkpoint
from utils.cli import Interrupted, UserError, run_cli
from utils.config import load_maskgit_config, resolve_path
from utils.data import DataError, default_data_root, find_lab_layout, list_images
from utils.runtime import create_logger, get_device, resolve_precision, seed_everything
from utils.tokens import cached_tokens, state_dict_fingerprint, unseen_indices
from utils.train_engine import (LoopState, Monitor, StepConfig, TrainParts, evaluate, finish_distributed,
                                init_distributed, load_training_state, make_parts, train_one_epoch, training_state)
from utils.train_options import RunConfig, parse_options
from utils.train_utils import MetricLog, NonFiniteLoss, StopFlag


def data_folders(opts: RunConfig) -> tuple[str, str]:
    """The train and val folders, checked before any model work."""
    root = None if opts.train_d_path and opts.val_d_path else default_data_root()
    if not (opts.train_d_path and opts.val_d_path) and root is None:
        raise UserError("no dataset: pass --train_d_path and --val_d_path (lab3_dataset/train, .../val)")
    folders = (resolve_path(opts.train_d_path or find_lab_layout(root).train),
               resolve_path(opts.val_d_path or find_lab_layout(root).val))
    for flag, path in zip(("--train_d_path", "--val_d_path"), folders):
        if not os.path.isdir(path):
            raise DataError(f"{flag} {path} {'is not a folder' if os.path.exists(path) else 'does not exist'}")
    return folders


def load_tokens(opts: RunConfig, model, device, folders, rank: int, world: int):
    """Token ids (on ``device``) of the training images the run uses, of val, and of the val images
    that never occur in train. Rank 0 encodes (every image checked first), the others read the cache."""
    train_dir, val_dir = folders
    kw = dict(cache_dir=opts.cache_dir, device=device, image_size=model.vqgan.cfg.img_resolution, precision="fp32",
              progress=not opts.no_progress and rank == 0, vq_key=state_dict_fingerprint(model.vqgan),
              resize=opts.resize, skip_bad=opts.skip_bad_images)
    if rank > 0:
        dist.barrier()  # wait for rank 0 to fill the cache
    train = cached_tokens(model.vqgan, train_dir, hflip=opts.hflip,
                          limit=math.ceil(opts.partial * len(list_images(train_dir))), **kw)
    val = cached_tokens(model.vqgan, val_dir, hflip=False, **kw)
    path = os.path.join(opts.cache_dir, f"unseen_{val['folder_key']}_{train['folder_key']}"
                                        f"{'_skipbad' if opts.skip_bad_images else ''}.pt")
    if rank == 0 and not os.path.exists(path):
        atomic_save(unseen_indices(val_dir, train_dir, val["files"], train["files"]), path)
    if rank == 0 and world > 1:
        dist.barrier()
    unseen = load_checkpoint(path, "unseen-index file")
    return train["ids"].to(device), val["ids"].to(device), val["ids"][unseen].to(device)


def model_config(opts: RunConfig, notes: list | None = None) -> dict:
    """The resolved MaskGit config of the run: --MaskGitConfig, --set, and --vqgan-ckpt as its tokenizer.
    A tokenizer file that stores its config (train_vqgan.py's vqgan.pt) brings its own architecture;
    for one without (the lab's VQGAN.pt) the YAML's model_param.VQ_Configs.VQ_config_path says it.
    ``notes`` receives a line for the log when the file's config replaces the YAML's."""
    cfg = load_maskgit_config(opts.MaskGitConfig, list(opts.set))
    if opts.vqgan_ckpt:
        note = adopt_tokenizer(cfg, opts.vqgan_ckpt)
        if note and notes is not None:
            notes.append(note)
    return cfg


@dataclasses.dataclass
class Run:
    """What main() built: the options, the resolved model config, the engine's parts and loop state."""
    opts: RunConfig
    cfg: dict
    parts: TrainParts
    state: LoopState
    step_cfg: StepConfig
    data: tuple  # token ids on the device: train, val, val unseen in train
    log: object
    metrics: MetricLog
    history: list = dataclasses.field(default_factory=list)


def build(opts: RunConfig) -> Run:
    """Check the inputs, then build the model, the token cache, the optimizer, and resume."""
    folders, last = data_folders(opts), os.path.join(opts.out_d_path, "last.pt")
    if opts.resume and not os.path.isfile(last):
        raise UserError(f"--resume: no checkpoint at {last}")
    notes = []
    cfg = model_config(opts, notes)
    rank, world, ddp_device = init_distributed()
    if opts.batch_size % world:
        raise UserError(f"--batch-size {opts.batch_size} must be a multiple of the number of processes {world}")
    create_logger("maskgit", None, rank)
    device = get_device(ddp_device or opts.device)
    seed_everything(opts.seed + rank)
    model = build_maskgit(cfg).to(device)
    data = load_tokens(opts, model, device, folders, rank, world)
    state = LoopState(len(data[0]) // (opts.batch_size * opts.accum_grad), opts.epochs)
    if state.steps_per_epoch < 1:
        raise UserError(f"{len(data[0])} training sequences are fewer than one step of {opts.batch_size}x"
                        f"{opts.accum_grad}: lower --batch-size or raise --partial")
    precision = resolve_precision(opts.precision, device)
    parts = make_parts(model, device, precision, lr=opts.learning_rate, weight_decay=opts.weight_decay,
                       warmup_steps=opts.warmup_steps, total_steps=lambda: state.total_steps, ema=opts.ema,
                       compile=opts.compile, hole_frac=opts.hole_frac, seed=opts.seed, rank=rank, world=world)
    log = create_logger("maskgit", os.path.join(opts.out_d_path, "train.log") if rank == 0 else None, rank)
    for note in notes:
        log.info(note)
    if opts.resume:
        load_training_state(parts, state, load_checkpoint(last, "training checkpoint"), opts.time_budget_min > 0)
        log.info("resumed from %s at step %d (epoch %d)", last, state.step, state.step // state.steps_per_epoch)
    log.info("transformer %.2fM params | %d train sequences, %d val (%d unseen in train) | %d steps/epoch x %d epochs "
             "| device %s x%d, %s", sum(p.numel() for p in parts.raw.parameters()) / 1e6, len(data[0]), len(data[1]),
             len(data[2]), state.steps_per_epoch, state.epochs, device, world, precision)
    return Run(opts, cfg, parts, state, StepConfig(opts.batch_size, opts.accum_grad, opts.seed, opts.clip_grad,
                                                   opts.label_smoothing, precision, opts.hole_frac),
               data, log, MetricLog(opts.out_d_path, enabled=rank == 0))


def save(run: Run, name: str, **extra) -> None:
    """A resumable checkpoint with the resolved config and the options (call on every rank; rank 0 writes)."""
    ck = training_state(run.parts, run.state)
    if run.parts.rank == 0:
        epoch = run.state.step // run.state.steps_per_epoch
        atomic_save({**ck, "config": run.cfg, "options": dataclasses.asdict(run.opts), "epoch": epoch, **extra},
                    os.path.join(run.opts.out_d_path, name))


def export(run: Run, name: str) -> None:
    """A raw lab-layout state_dict (EMA weights when on): CPU tensors, the config in its _metadata."""
    if run.parts.rank == 0:
        atomic_save(lab_state_dict(run.parts.eval_net, run.cfg), os.path.join(run.opts.out_d_path, name))


def validate(run: Run, **train_means) -> dict:
    """Masked-token loss/accuracy on val and on the val images unseen in train (EMA weights when on)."""
    row, bar = {"epoch": run.state.step // run.state.steps_per_epoch, "step": run.state.step}, not run.opts.no_progress
    for key, ids in (("val", run.data[1]), ("val_unseen", run.data[2])):
        r = evaluate(run.parts.model, run.parts.eval_net, ids, run.step_cfg.precision, 256, run.opts.val_batches,
                     bar and run.parts.rank == 0, "validate")
        row.update({f"{key}_loss": r["loss"], f"{key}_acc": r["acc"]})
    run.history.append(row)
    scalars = {**train_means, **{k: x for k, x in row.items() if k.startswith("val")}}
    run.metrics.log(run.state.step, **scalars)
    run.log.info("epoch %d step %d | %s", row["epoch"], row["step"], " | ".join(f"{k} {x:.4f}" for k, x in
                                                                              scalars.items()))
    return row


def end_epoch(run: Run) -> None:
    """The epoch's mean training loss (all its steps, also those before a resume), validation, checkpoints."""
    loss, ce = run.state.epoch_losses.mean(0).tolist()
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the epoch's mean loss became {loss} at step {run.state.step}: stopping; the last good "
                            "checkpoint is untouched (try a lower --learning-rate, or fp32)")
    val = validate(run, epoch_train_loss=loss, epoch_train_ce=ce)["val_loss"]
    epoch = run.state.step // run.state.steps_per_epoch
    if val < run.state.best_val:
        run.state.best_val = val
        save(run, "best.pt", val_loss=val)
        export(run, "transformer_best.pth")
    save(run, "last.pt", val_loss=val)
    export(run, "transformer_last.pth")
    if run.opts.ckpt_interval and epoch % run.opts.ckpt_interval == 0:
        export(run, f"epoch_{epoch}.pth")


def main(argv=None) -> dict:
    run = build(parse_options(argv))
    opts, state, parts = run.opts, run.state, run.parts
    if state.step == 0:  # the starting point, so every curve shows what training bought
        validate(run)
    monitor = Monitor(state, parts, run.metrics, run.log, step_images=opts.batch_size * opts.accum_grad,
                      log_every=opts.log_every, progress=not opts.no_progress, time_budget_min=opts.time_budget_min,
                      stop_after_steps=opts.stop_after_steps, stop_flag=StopFlag())
    losses, why = [], None
    with monitor.stop_flag:
        while why is None and state.step < state.total_steps:
            done, why = train_one_epoch(parts, run.step_cfg, run.data[0], state, monitor)
            losses += done
            if state.step % state.steps_per_epoch == 0:  # the epoch is complete (also when stopped at its last step)
                end_epoch(run)
            run.metrics.flush()
    monitor.pbar.close()
    if why is not None:
        save(run, "last.pt")
        run.log.info("stopped at step %d (%s); last.pt saved", state.step, why)
    if parts.world > 1:
        finish_distributed(parts, os.path.join(opts.out_d_path, "ddp_check.json"), losses)
    if parts.rank == 0:
        run.metrics.plot(["epoch_train_ce", "val_loss", "val_unseen_loss"], os.path.join(opts.out_d_path, "loss.png"),
                         "masked-token cross-entropy, no label smoothing: train = mean of each epoch, val at its end")
        run.metrics.close()
    if why is not None and why.startswith("signal"):
        raise Interrupted(f"stopped by {why} at step {state.step}; continue with --resume ({opts.out_d_path}/last.pt)")
    return {"step": state.step, "losses": losses, "history": run.history, "stopped": why is not None,
            "images_per_s": monitor.images_per_s(state)}


if __name__ == "__main__":
    run_cli(main)
